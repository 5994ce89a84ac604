"""A blocking, pipelining client over a plain socket, driving the sans-IO `ClientProtocol`.

    with Client(port=7440) as client:
        client.hello()
        client.reserve("order-17", [("sku-1", "dock-a", 2)], ttl_ms=60_000)
        replies = client.pipeline([("get", {"sku": "sku-1", "loc": "dock-a"}), ("query", {"sku": "sku-1"})])

Replies may arrive in any order; the client buffers the ones nobody asked for yet and hands each
to whoever calls `receive` with its id. Pushed `{"event": ...}` frames of a `watch` connection are
buffered apart and read with `next_event`.
"""

from __future__ import annotations

import socket
import ssl
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

from ._connection import ClientProtocol
from ._errors import ConnectionClosed, ProtocolViolation, ServerError
from ._limits import DEFAULT_HOST, DEFAULT_PORT, MAX_FRAME_BYTES
from ._requests import Request, RequestMethods, pushed_event
from ._tls import resolve_ssl_context

# One recv. It also bounds what a single read can add to the buffers: the client reads only when
# nothing buffered answers the caller, so buffered frames are at most one read ahead of the caller
# (plus the replies to the caller's own outstanding requests, which the caller bounds).
RECEIVE_BYTES_MAX = 64 * 1024

# `pipeline` sends at most this many requests before it reads their replies. Small enough that a
# window of requests fits in the kernel's socket buffers and stays below what a server keeps queued
# per connection, so the server never has to stop reading while this client is still writing (a
# blocking client that writes without reading could otherwise deadlock against a full server).
PIPELINE_IN_FLIGHT_MAX = 128

# Replies that match no outstanding request (id nil errors such as `bad_request` for raw garbage,
# or a buggy server's unknown ids). Past this bound the server is not speaking the protocol.
UNMATCHED_REPLIES_MAX = 1024


class Client(RequestMethods[dict[str, Any]]):
    """A blocking connection to the server. Not thread-safe: use one client per thread.

    Every wait (`receive`, `next_event`, `receive_any`, a send) gives up after `timeout_seconds`
    with `TimeoutError` (None waits forever). A timed-out read leaves the connection usable; a
    timed-out send closes it, because part of a frame may already be on the wire.

    TLS: pass `ssl_context` (e.g. `client_ssl_context(cafile, cert_file, key_file)`), or just
    `cafile` to verify the server's certificate against that CA. The certificate must name
    `server_hostname` (default: `host`; give it when connecting by another name, a tunnel's
    127.0.0.1 say).
    """

    def __init__(
        self,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        timeout_seconds: float | None = 10.0,
        max_frame_bytes: int = MAX_FRAME_BYTES,
        ssl_context: ssl.SSLContext | None = None,
        cafile: str | None = None,
        server_hostname: str | None = None,
    ):
        self.timeout_seconds = timeout_seconds
        self._protocol = ClientProtocol(max_frame_bytes)
        context = resolve_ssl_context(ssl_context, cafile)
        self._socket = socket.create_connection((host, port), timeout=timeout_seconds)
        # Requests are small and latency matters more than packet count; pipelining batches anyway.
        self._socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if context is not None:
            try:
                self._socket = context.wrap_socket(self._socket, server_hostname=server_hostname or host)  # handshakes within the timeout
            except BaseException:
                self._socket.close()
                raise
        # Buffered frames carry their arrival number so that `receive_any` can return the oldest.
        self._arrivals = 0
        self._awaited: set[int] = set()  # ids sent whose reply has not arrived yet
        self._replies: dict[int, tuple[int, dict[str, Any]]] = {}  # by id, in arrival order
        self._unmatched: deque[tuple[int, dict[str, Any]]] = deque()
        self._events: deque[tuple[int, dict[str, Any]]] = deque()  # whole `{"event": ...}` frames
        self._watch_request_id: int | None = None
        self._closed_reason: str | None = None

    # -- lifecycle --------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the connection. Replies already buffered can still be received."""
        self._shut_down("the client closed the connection")

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exception_info: object) -> None:
        self.close()

    # -- requests ---------------------------------------------------------------------------------

    def send(self, op: str, **fields: Any) -> int:
        """Send one request without waiting for its reply; return its id. None fields are left off."""
        (request_id,) = self._send_requests([(op, fields)])
        return request_id

    def receive(self, request_id: int) -> dict[str, Any]:
        """Wait for the reply to `request_id` and return it, whether ok or not.

        Replies to other requests that arrive meanwhile are buffered for their own `receive`.
        """
        if request_id not in self._replies and request_id not in self._awaited:
            raise ValueError(f"no reply is awaited for request id {request_id}")
        deadline = self._deadline()
        while request_id not in self._replies:
            self._read_more(deadline, f"the reply to request {request_id}")
        return self._replies.pop(request_id)[1]

    def call(self, op: str, **fields: Any) -> dict[str, Any]:
        """Send one request and wait for its reply; raise `ServerError` if the reply is not ok."""
        reply = self.receive(self.send(op, **fields))
        if reply.get("ok") is not True:
            raise ServerError(reply)
        return reply

    def pipeline(self, requests: Sequence[Request], in_flight_max: int = PIPELINE_IN_FLIGHT_MAX) -> list[dict[str, Any]]:
        """Send `(op, fields)` requests in batches and return their replies in request order.

        Error replies are returned, not raised. At most `in_flight_max` requests are outstanding.
        """
        assert in_flight_max >= 1
        replies: list[dict[str, Any]] = []
        for start in range(0, len(requests), in_flight_max):
            request_ids = self._send_requests(requests[start : start + in_flight_max])
            replies.extend(self.receive(request_id) for request_id in request_ids)
        return replies

    def next_event(self) -> dict[str, Any]:
        """Wait for the next pushed event of a `watch` connection and return the inner event map."""
        deadline = self._deadline()
        while not self._events:
            self._read_more(deadline, "a pushed event")
        return self._events.popleft()[1]["event"]

    def send_raw(self, data: bytes) -> None:
        """Write bytes as they are (for tests of malformed input). They are not tracked as a request."""
        self._write(data)

    def receive_any(self) -> dict[str, Any]:
        """Return the oldest frame not yet returned, of any kind: a reply (for any id or none) or a
        whole `{"event": ...}` frame. Buffered frames come first, then the socket is read.
        """
        deadline = self._deadline()
        while True:
            message = self._pop_oldest_buffered()
            if message is not None:
                return message
            self._read_more(deadline, "any frame")

    # -- sending ----------------------------------------------------------------------------------

    def _send_requests(self, requests: Sequence[Request]) -> list[int]:
        # Check the whole batch before anything is written or recorded.
        if self._watch_request_id is not None:
            raise RuntimeError("a watching connection sends no more requests (protocol v1, op watch)")
        for op, _ in requests[:-1]:
            if op == "watch":
                raise RuntimeError("'watch' must be the last request sent on a connection")
        request_ids = []
        frames = []
        for op, fields in requests:
            request_id, data = self._protocol.request(op, **fields)
            request_ids.append(request_id)
            frames.append(data)
        self._write(b"".join(frames))
        self._awaited.update(request_ids)
        if requests and requests[-1][0] == "watch":
            self._watch_request_id = request_ids[-1]
        return request_ids

    def _write(self, data: bytes) -> None:
        if self._closed_reason is not None:
            raise ConnectionClosed(self._closed_reason)
        self._socket.settimeout(self.timeout_seconds)
        try:
            self._socket.sendall(data)
        except TimeoutError as error:
            # Part of a frame may be on the wire: the stream cannot be resumed.
            self._shut_down(f"timed out sending after {self.timeout_seconds} s")
            raise TimeoutError(self._closed_reason) from error
        except OSError as error:
            self._shut_down(f"the connection failed while sending: {error}")
            raise ConnectionClosed(self._closed_reason) from error

    # -- receiving --------------------------------------------------------------------------------

    def _deadline(self) -> float | None:
        if self.timeout_seconds is None:
            return None
        return time.monotonic() + self.timeout_seconds

    def _read_more(self, deadline: float | None, awaited: str) -> None:
        """Read once from the socket and sort the frames it completes into the buffers."""
        if self._closed_reason is not None:
            raise ConnectionClosed(f"{self._closed_reason} while waiting for {awaited}{self._last_words()}")
        remaining_seconds = None
        if deadline is not None:
            remaining_seconds = deadline - time.monotonic()
            if remaining_seconds <= 0:
                raise TimeoutError(f"no {awaited} within {self.timeout_seconds} s")
        self._socket.settimeout(remaining_seconds)
        try:
            data = self._socket.recv(RECEIVE_BYTES_MAX)
        except TimeoutError as error:
            raise TimeoutError(f"no {awaited} within {self.timeout_seconds} s") from error
        except OSError as error:
            self._shut_down(f"the connection failed: {error}")
            raise ConnectionClosed(f"{self._closed_reason} while waiting for {awaited}") from error
        if not data:
            self._shut_down("the server closed the connection")
            raise ConnectionClosed(f"{self._closed_reason} while waiting for {awaited}{self._last_words()}")
        try:
            messages = self._protocol.receive_data(data)
        except ProtocolViolation as error:
            self._shut_down(f"the server broke the protocol: {error}")
            raise
        for message in messages:
            self._sort(message)

    def _sort(self, message: dict[str, Any]) -> None:
        arrival = self._arrivals
        self._arrivals += 1
        if pushed_event(message) is not None:
            self._events.append((arrival, message))
            return
        request_id = message.get("id")
        # `type(...) is int`: a boolean id must not match request 1.
        if type(request_id) is int and request_id in self._awaited:
            self._awaited.remove(request_id)
            self._replies[request_id] = (arrival, message)
            if request_id == self._watch_request_id and message.get("ok") is not True:
                self._watch_request_id = None  # a refused watch leaves an ordinary connection
            return
        if len(self._unmatched) >= UNMATCHED_REPLIES_MAX:
            self._shut_down(f"the server sent more than {UNMATCHED_REPLIES_MAX} replies that match no request")
            raise ProtocolViolation(self._closed_reason)
        self._unmatched.append((arrival, message))

    def _pop_oldest_buffered(self) -> dict[str, Any] | None:
        oldest_reply_id = next(iter(self._replies), None)
        heads = []
        if oldest_reply_id is not None:
            heads.append((self._replies[oldest_reply_id][0], "reply"))
        if self._unmatched:
            heads.append((self._unmatched[0][0], "unmatched"))
        if self._events:
            heads.append((self._events[0][0], "event"))
        if not heads:
            return None
        _, kind = min(heads)
        if kind == "reply":
            return self._replies.pop(oldest_reply_id)[1]
        if kind == "unmatched":
            return self._unmatched.popleft()[1]
        return self._events.popleft()[1]

    def _last_words(self) -> str:
        # A server that closes on us usually said why first (frame_too_large has no id to match).
        if not self._unmatched:
            return ""
        return f"; its last unmatched reply was {self._unmatched[-1][1]!r}"

    def _shut_down(self, reason: str) -> None:
        if self._closed_reason is None:
            self._closed_reason = reason
        self._socket.close()

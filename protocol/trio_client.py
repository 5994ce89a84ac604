"""A trio client: many tasks share one connection, each awaiting its own reply.

    async with open_trio_client("127.0.0.1", 7440) as client:
        await client.hello()
        async with trio.open_nursery() as nursery:
            for number in range(100):
                nursery.start_soon(client.reserve, f"order-{number}", [("sku-1", "dock-a", 1)])

Shape of a connection (all tasks live in the nursery `open_trio_client` opens):
- callers register a waiter under their request id and put the encoded frame on a bounded channel;
- the writer task drains that channel and sends whatever has gathered in one `send_all`, so a
  caller being cancelled never leaves half a frame on the wire;
- the reader task decodes replies and wakes the waiter with the matching id; pushed
  `{"event": ...}` frames go to a bounded channel read by `next_event` / `events`.
When the connection fails, every waiter, and every later call, gets `ConnectionClosed`.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import Any

import trio

from ._connection import ClientProtocol
from ._errors import ConnectionClosed, ProtocolViolation, ServerError
from ._limits import DEFAULT_HOST, DEFAULT_PORT, MAX_FRAME_BYTES
from ._requests import RequestMethods, pushed_event
from ._tls import resolve_ssl_context

RECEIVE_BYTES_MAX = 64 * 1024

# Requests awaiting a reply on one connection. Callers past it wait for a slot, so a burst of
# tasks cannot queue without bound in this client; the server sheds what it cannot take.
REQUESTS_IN_FLIGHT_MAX = 1024

# Encoded frames waiting for the writer task; callers block (backpressure) when it is full.
OUTGOING_FRAMES_MAX = 256

# One `send_all` carries at most this many bytes of gathered frames (a single frame may be larger).
WRITE_BATCH_BYTES_MAX = 256 * 1024

# Pushed events not yet read by the application. When full the reader waits, TCP pushes back, and
# the server's own bound on a watcher's backlog decides what happens next.
EVENTS_BUFFERED_MAX = 1024


class _Waiter:
    """One caller waiting for the reply with its id."""

    __slots__ = ("done", "reply")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.reply: dict[str, Any] | None = None  # None once done: the connection closed


class TrioClient(RequestMethods[Awaitable[dict[str, Any]]]):
    """One connection shared by many tasks. Make it with `open_trio_client`.

    The convenience methods (`reserve`, `get`, ...) return awaitables: `await client.get(sku, loc)`.
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        max_frame_bytes: int = MAX_FRAME_BYTES,
        requests_in_flight_max: int = REQUESTS_IN_FLIGHT_MAX,
        events_buffered_max: int = EVENTS_BUFFERED_MAX,
    ):
        self._stream = stream
        self._protocol = ClientProtocol(max_frame_bytes)
        self._in_flight_slots = trio.Semaphore(requests_in_flight_max)
        self._waiters: dict[int, _Waiter] = {}
        self._outgoing_send, self._outgoing_receive = trio.open_memory_channel[bytes](OUTGOING_FRAMES_MAX)
        self._event_send, self._event_receive = trio.open_memory_channel[dict[str, Any]](events_buffered_max)
        self._watching = False
        self._closed_reason: str | None = None
        self._closed_cause: BaseException | None = None
        self._last_unmatched_reply: dict[str, Any] | None = None

    # -- requests ---------------------------------------------------------------------------------

    async def request(self, op: str, **fields: Any) -> dict[str, Any]:
        """Send one request and return its reply, whether ok or not. None fields are left off.

        Raises `ConnectionClosed` if the connection closes before the reply arrives.
        """
        async with self._in_flight_slots:
            self._raise_if_closed()
            if self._watching:
                raise RuntimeError("a watching connection sends no more requests (protocol v1, op watch)")
            request_id, data = self._protocol.request(op, **fields)
            if op == "watch":
                self._watching = True
            waiter = _Waiter()
            # Registered before the frame can leave, so the reply always finds its waiter.
            self._waiters[request_id] = waiter
            try:
                try:
                    await self._outgoing_send.send(data)
                except (trio.ClosedResourceError, trio.BrokenResourceError):
                    self._raise_if_closed()
                    raise
                await waiter.done.wait()
            finally:
                # A cancelled caller leaves no waiter behind: its reply, if any, is dropped.
                del self._waiters[request_id]
        if waiter.reply is None:
            self._raise_if_closed()
        assert waiter.reply is not None
        if op == "watch" and waiter.reply.get("ok") is not True:
            self._watching = False  # a refused watch leaves an ordinary connection
        return waiter.reply

    async def call(self, op: str, **fields: Any) -> dict[str, Any]:
        """Send one request and return its reply; raise `ServerError` if the reply is not ok."""
        reply = await self.request(op, **fields)
        if reply.get("ok") is not True:
            raise ServerError(reply)
        return reply

    async def next_event(self) -> dict[str, Any]:
        """Wait for the next pushed event of a `watch` connection; return the inner event map.

        Raises `ConnectionClosed` once the connection is closed and every buffered event was read.
        """
        try:
            return await self._event_receive.receive()
        except trio.EndOfChannel:
            self._raise_if_closed()
            raise AssertionError("the event channel ends only when the connection closes") from None

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """Pushed events, in order: `async for event in client.events()`. Raises `ConnectionClosed`
        at the end of the connection."""
        while True:
            yield await self.next_event()

    @property
    def closed(self) -> bool:
        """Whether the connection is closed (by either side); calls then raise `ConnectionClosed`."""
        return self._closed_reason is not None

    # -- background tasks (run by open_trio_client) -----------------------------------------------

    async def _read_loop(self) -> None:
        try:
            while True:
                data = await self._stream.receive_some(RECEIVE_BYTES_MAX)
                if not data:
                    self._shut_down("the server closed the connection")
                    return
                for message in self._protocol.receive_data(data):
                    await self._dispatch(message)
        except ProtocolViolation as error:
            self._shut_down(f"the server broke the protocol: {error}", error)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as error:
            self._shut_down(f"the connection failed: {error!r}", error)

    async def _dispatch(self, message: dict[str, Any]) -> None:
        event = pushed_event(message)
        if event is not None:
            await self._event_send.send(event)
            return
        request_id = message.get("id")
        # `type(...) is int`: a boolean id must not match request 1.
        waiter = self._waiters.get(request_id) if type(request_id) is int else None
        if waiter is None or waiter.done.is_set():
            # Nobody waits for it: the reply to a caller that was cancelled (dropped), or an id nil
            # error, which is kept to explain the close that follows it (frame_too_large).
            if request_id is None:
                self._last_unmatched_reply = message
            return
        waiter.reply = message
        waiter.done.set()

    async def _write_loop(self) -> None:
        try:
            async for data in self._outgoing_receive:
                batch = [data]
                batch_bytes = len(data)
                while batch_bytes < WRITE_BATCH_BYTES_MAX:
                    try:
                        data = self._outgoing_receive.receive_nowait()
                    except trio.WouldBlock:
                        break
                    batch.append(data)
                    batch_bytes += len(data)
                await self._stream.send_all(b"".join(batch))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as error:
            self._shut_down(f"the connection failed while sending: {error!r}", error)

    # -- closing ----------------------------------------------------------------------------------

    def _shut_down(self, reason: str, cause: BaseException | None = None) -> None:
        """Fail every waiter and refuse new requests. Idempotent: the first reason wins."""
        if self._closed_reason is not None:
            return
        if self._last_unmatched_reply is not None:
            reason = f"{reason}; its last unmatched reply was {self._last_unmatched_reply!r}"
        self._closed_reason = reason
        self._closed_cause = cause
        for waiter in self._waiters.values():
            waiter.done.set()
        self._outgoing_send.close()
        self._event_send.close()

    def _raise_if_closed(self) -> None:
        if self._closed_reason is not None:
            # A fresh exception per caller: many tasks may raise it at once.
            raise ConnectionClosed(self._closed_reason) from self._closed_cause


@asynccontextmanager
async def open_trio_client(
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    max_frame_bytes: int = MAX_FRAME_BYTES,
    requests_in_flight_max: int = REQUESTS_IN_FLIGHT_MAX,
    events_buffered_max: int = EVENTS_BUFFERED_MAX,
    ssl_context: ssl.SSLContext | None = None,
    cafile: str | None = None,
    server_hostname: str | None = None,
) -> AsyncIterator[TrioClient]:
    """Connect, run the client's reader and writer tasks, and yield the client.

    TLS: pass `ssl_context` (e.g. `client_ssl_context(cafile, cert_file, key_file)`), or just
    `cafile`; the connection is then a `trio.SSLStream` checking the server's certificate against
    `server_hostname` (default: `host`).

    On exit the tasks are cancelled, callers still waiting get `ConnectionClosed`, and the stream
    is closed. An exception raised in the body propagates as it is (not wrapped in a group).
    """
    context = resolve_ssl_context(ssl_context, cafile)
    stream: trio.abc.Stream = await trio.open_tcp_stream(host, port)
    if context is not None:
        stream = trio.SSLStream(stream, context, server_hostname=server_hostname or host)
        try:
            await stream.do_handshake()
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
    body_error: BaseException | None = None
    async with stream:
        client = TrioClient(stream, max_frame_bytes, requests_in_flight_max, events_buffered_max)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client._read_loop)
            nursery.start_soon(client._write_loop)
            try:
                yield client
            except Exception as error:
                # Re-raised below, outside the nursery, so callers can catch what the body raised
                # instead of an ExceptionGroup (trio nurseries always group exceptions). Cancelled
                # and KeyboardInterrupt go through the nursery: trio's cancel scopes unwrap those.
                body_error = error
            finally:
                client._shut_down("the client closed the connection")
                nursery.cancel_scope.cancel()
    if body_error is not None:
        try:
            raise body_error
        finally:
            body_error = None  # no reference cycle through the traceback

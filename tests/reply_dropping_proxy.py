"""A TCP proxy for tests: the link drops after a request reached the server, before its reply.

`ReplyDroppingProxy(server_port, drop_replies_for={"order-3", ...})` listens on 127.0.0.1 (any
free port) and forwards frames both ways. It reads each request's `rid` or `key` on its way to
the server; when the first reply to a request with an id in `drop_replies_for` comes back, it
closes the client's connection (and its own upstream one) instead of forwarding that reply. So the
server has applied the request and the client never hears of it: the client must reconnect and
resend, and the server's answer to the resend is `duplicate: true`. Each id is dropped once.

Threads, blocking sockets, every wait bounded: `close()` stops everything within a second.
"""

from __future__ import annotations

import socket
import threading
from typing import Any

import msgpack

from protocol import FrameDecoder, frame

POLL_SECONDS = 0.1  # how often blocked threads look at the stop flag
RECEIVE_BYTES_MAX = 64 * 1024
CONNECTIONS_MAX = 64  # a client that reconnects more often than this is broken: the proxy stops accepting
FRAME_BYTES_MAX = 1024 * 1024


class ReplyDroppingProxy:
    """Forward 127.0.0.1:`port` to the server, dropping the first reply for each chosen id."""

    def __init__(self, server_port: int, drop_replies_for: set[str]):
        self.server_port = server_port
        self._drop_pending = set(drop_replies_for)
        self.dropped: list[str] = []  # ids whose reply was dropped, in order
        self.connections = 0
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(POLL_SECONDS)
        self.port = self._listener.getsockname()[1]
        self._start(self._accept_loop)

    def close(self) -> None:
        """Stop accepting, close every connection, and join every thread."""
        self._stopping.set()
        with self._lock:
            sockets = list(self._sockets)
        for connection in sockets:
            _close_quietly(connection)
        for thread in list(self._threads):
            thread.join(timeout=5)
            assert not thread.is_alive(), f"proxy thread {thread.name} did not stop"
        self._listener.close()

    def __enter__(self) -> ReplyDroppingProxy:
        return self

    def __exit__(self, *exception_info: object) -> None:
        self.close()

    def _start(self, target, *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        with self._lock:
            self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        while not self._stopping.is_set() and self.connections < CONNECTIONS_MAX:
            try:
                client_side, _ = self._listener.accept()
            except TimeoutError:
                continue
            self.connections += 1
            try:
                server_side = socket.create_connection(("127.0.0.1", self.server_port), timeout=5)
            except OSError:
                _close_quietly(client_side)  # the server is down: so is the link
                continue
            for connection in (client_side, server_side):
                connection.settimeout(POLL_SECONDS)
            with self._lock:
                self._sockets += [client_side, server_side]
            idempotency_ids: dict[int, str] = {}  # request id -> rid or key, on this connection
            self._start(self._pump_requests, client_side, server_side, idempotency_ids)
            self._start(self._pump_replies, server_side, client_side, idempotency_ids)

    def _pump_requests(self, client_side: socket.socket, server_side: socket.socket, idempotency_ids: dict[int, str]) -> None:
        decoder = FrameDecoder(FRAME_BYTES_MAX)
        for body in self._bodies(client_side, decoder, server_side):
            request = msgpack.unpackb(body, raw=False)
            idempotency_id = request.get("rid") or request.get("key")
            if idempotency_id is not None:
                idempotency_ids[request["id"]] = idempotency_id
            if not _send_quietly(server_side, frame(body)):
                break
        _close_quietly(client_side, server_side)

    def _pump_replies(self, server_side: socket.socket, client_side: socket.socket, idempotency_ids: dict[int, str]) -> None:
        decoder = FrameDecoder(FRAME_BYTES_MAX)
        for body in self._bodies(server_side, decoder, client_side):
            reply = msgpack.unpackb(body, raw=False)
            idempotency_id = idempotency_ids.get(reply.get("id"))
            with self._lock:
                drop = idempotency_id in self._drop_pending
                if drop:
                    self._drop_pending.discard(idempotency_id)
                    self.dropped.append(idempotency_id)
            if drop or not _send_quietly(client_side, frame(body)):
                break
        _close_quietly(client_side, server_side)

    def _bodies(self, source: socket.socket, decoder: FrameDecoder, peer: socket.socket):
        """Frame bodies read from `source` until it or `peer` closes, or the proxy stops."""
        while not self._stopping.is_set():
            try:
                data = source.recv(RECEIVE_BYTES_MAX)
            except TimeoutError:
                if peer.fileno() == -1:
                    return
                continue
            except OSError:
                return
            if not data:
                return
            decoder.feed(data)
            while (body := decoder.next_body()) is not None:
                yield bytes(body)


def _send_quietly(connection: socket.socket, data: bytes) -> bool:
    try:
        connection.sendall(data)
    except OSError:
        return False
    return True


def _close_quietly(*connections: socket.socket) -> None:
    for connection in connections:
        try:
            connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        connection.close()

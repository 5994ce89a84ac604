"""A fake server for tests: answers each request as a script says, and records what it received.

`ScriptedServer(answer)` listens on 127.0.0.1 (any free port) and, for every request frame,
sends `answer(request)` (a reply map without `id`; the request's id is added), or nothing when
it returns None (a reply that never comes). `received` lists
every request in arrival order. For replies a real server cannot be made to give on demand
(`overloaded`, `internal`). Threads, blocking sockets, every wait bounded.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from typing import Any

import msgpack

from protocol import FrameDecoder, pack

POLL_SECONDS = 0.1
RECEIVE_BYTES_MAX = 64 * 1024
FRAME_BYTES_MAX = 1024 * 1024
CONNECTIONS_MAX = 16


class ScriptedServer:
    """Answer requests with `answer(request) -> reply fields or None`; one connection at a time."""

    def __init__(self, answer: Callable[[dict[str, Any]], dict[str, Any] | None]):
        self._answer = answer
        self.received: list[dict[str, Any]] = []
        self._stopping = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(POLL_SECONDS)
        self.port = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop serving and join the thread."""
        self._stopping.set()
        self._thread.join(timeout=5)
        assert not self._thread.is_alive(), "scripted server did not stop"
        self._listener.close()

    def __enter__(self) -> ScriptedServer:
        return self

    def __exit__(self, *exception_info: object) -> None:
        self.close()

    def _serve(self) -> None:
        for _ in range(CONNECTIONS_MAX):
            connection = self._accept()
            if connection is None:
                return
            with connection:
                self._converse(connection)

    def _accept(self) -> socket.socket | None:
        while not self._stopping.is_set():
            try:
                connection, _ = self._listener.accept()
            except TimeoutError:
                continue
            connection.settimeout(POLL_SECONDS)
            return connection
        return None

    def _converse(self, connection: socket.socket) -> None:
        decoder = FrameDecoder(FRAME_BYTES_MAX)
        while not self._stopping.is_set():
            try:
                data = connection.recv(RECEIVE_BYTES_MAX)
            except TimeoutError:
                continue
            except OSError:
                return
            if not data:
                return
            decoder.feed(data)
            while (body := decoder.next_body()) is not None:
                request = msgpack.unpackb(bytes(body), raw=False)
                self.received.append(request)
                reply = self._answer(request)
                if reply is not None:
                    connection.sendall(pack({"id": request["id"], **reply}))

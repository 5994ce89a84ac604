"""A simulated network: in-memory byte pipes with bounded buffers, and a listener.

`ServerTransport` implements what `engine.connection.Connection` uses of
`engine.transport.SocketTransport` (receive, try_send, wait_writable, send_all, send_eof,
close, closed), so the server's real connection code runs unchanged. A pipe's buffer is small
and seeded (as a kernel's socket buffer is bounded), so partial sends and the writer task's
waits happen. `ClientEnd` is the client's side of one connection.
"""

from __future__ import annotations

import random
from typing import Awaitable, Callable

import trio

from engine.transport import RECEIVE_BYTES_MAX, ConnectionLost

PIPE_BYTES_MIN = 64
PIPE_BYTES_MAX = 8192


class _Pipe:
    """Bytes one way: a bounded buffer, the writer's end-of-file, and the reader's close."""

    def __init__(self, capacity_bytes: int):
        assert capacity_bytes >= 1
        self.capacity_bytes = capacity_bytes
        self.buffer = bytearray()
        self.eof = False  # the writer is done (half-close or close)
        self.reader_closed = False
        self._changed = trio.Event()

    def changed(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_changed(self) -> None:
        await self._changed.wait()

    def write_some(self, data: bytes | bytearray | memoryview) -> int:
        if self.reader_closed:
            raise ConnectionLost("connection reset by peer")
        if self.eof:
            raise ConnectionLost("connection closed")
        room = self.capacity_bytes - len(self.buffer)
        taken = min(room, len(data))
        if taken:
            self.buffer += data[:taken]
            self.changed()
        return taken

    async def read_some(self, bytes_max: int) -> bytes:
        """Up to `bytes_max` bytes; b"" at end-of-file. A checkpoint, like a socket read."""
        await trio.lowlevel.checkpoint()
        while not self.buffer and not self.eof and not self.reader_closed:
            await self.wait_changed()
        if self.reader_closed:
            return b""
        data = bytes(self.buffer[:bytes_max])
        del self.buffer[:bytes_max]
        if data:
            self.changed()  # room for the writer
        return data

    async def wait_room(self) -> None:
        while len(self.buffer) >= self.capacity_bytes and not self.reader_closed and not self.eof:
            await self.wait_changed()

    def close_reader(self) -> None:
        self.reader_closed = True
        self.buffer.clear()
        self.changed()

    def close_writer(self) -> None:
        self.eof = True
        self.changed()


class ServerTransport:
    """The server's side of one simulated connection (the `SocketTransport` interface)."""

    def __init__(self, inbound: _Pipe, outbound: _Pipe):
        self._inbound = inbound
        self._outbound = outbound
        self.closed = False

    async def receive(self) -> bytes:
        if self.closed:
            return b""
        return await self._inbound.read_some(RECEIVE_BYTES_MAX)

    def try_send(self, data: bytes | bytearray | memoryview) -> int:
        if self.closed:
            raise ConnectionLost("connection closed")
        return self._outbound.write_some(data)

    async def wait_writable(self) -> None:
        await trio.lowlevel.checkpoint()
        await self._outbound.wait_room()

    async def send_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[self.try_send(view):]
            if view:
                await self.wait_writable()

    def send_eof(self) -> None:
        if not self._outbound.eof:
            self._outbound.close_writer()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._outbound.close_writer()
        self._inbound.close_reader()


class ClientEnd:
    """The client's side of one simulated connection."""

    def __init__(self, outbound: _Pipe, inbound: _Pipe, chooser: random.Random):
        self._outbound = outbound
        self._inbound = inbound
        self._chooser = chooser

    async def send(self, data: bytes) -> None:
        """Send everything, in seeded pieces (frames split anywhere). Raises ConnectionLost."""
        view = memoryview(data)
        while view:
            piece = view[: self._chooser.randint(1, max(1, len(view)))] if self._chooser.random() < 0.2 else view
            sent = self._outbound.write_some(piece)
            view = view[sent:]
            if view:
                await trio.lowlevel.checkpoint()
                await self._outbound.wait_room()

    async def receive(self) -> bytes:
        """Bytes from the server; b"" when it closed."""
        return await self._inbound.read_some(RECEIVE_BYTES_MAX)

    def close(self) -> None:
        if not self._outbound.eof:
            self._outbound.close_writer()
        self._inbound.close_reader()


class ConnectionRefused(Exception):
    """No server is listening (it crashed and is not back yet)."""


class SimulatedListener:
    """Where clients connect: hands each new connection to the running server's handler."""

    def __init__(self, chooser: random.Random):
        self._chooser = chooser
        self._accept: Callable[[ServerTransport], None] | None = None
        self._open: dict[int, ServerTransport] = {}  # by connection number: closed by `drop_all`
        self.connections = 0

    def listen(self, nursery: trio.Nursery, handler: Callable[[ServerTransport], Awaitable[None]]) -> None:
        """Serve new connections with `handler`, each a child task of `nursery` (as
        `engine.transport.serve` does), until `stop_listening`."""

        async def run(number: int, transport: ServerTransport) -> None:
            try:
                await handler(transport)
            finally:
                transport.close()
                self._open.pop(number, None)

        def accept(transport: ServerTransport) -> None:
            self._open[self.connections] = transport
            nursery.start_soon(run, self.connections, transport)

        self._accept = accept

    def stop_listening(self) -> None:
        self._accept = None

    def drop_all(self) -> None:
        """The server process died: every connection is gone at once (its peers see the close)."""
        self._accept = None
        for transport in list(self._open.values()):
            transport.close()
        self._open.clear()

    def connect(self) -> ClientEnd:
        """A new connection to the server, or ConnectionRefused."""
        if self._accept is None:
            raise ConnectionRefused("no server is listening")
        to_server = _Pipe(self._chooser.randint(PIPE_BYTES_MIN, PIPE_BYTES_MAX))
        to_client = _Pipe(self._chooser.randint(PIPE_BYTES_MIN, PIPE_BYTES_MAX))
        self.connections += 1
        self._accept(ServerTransport(to_server, to_client))
        return ClientEnd(to_server, to_client, self._chooser)

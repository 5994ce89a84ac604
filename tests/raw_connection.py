"""A raw TCP connection for tests: send any bytes, read decoded frames one at a time."""

from __future__ import annotations

from typing import Any

import trio

import protocol
from protocol import ClientProtocol


class Raw:
    """A raw TCP connection: send any bytes, read decoded reply frames one at a time."""

    def __init__(self, stream: trio.SocketStream):
        self.stream = stream
        self.protocol = ClientProtocol()
        self.buffered: list[dict[str, Any]] = []

    async def send(self, *messages: dict[str, Any] | bytes) -> None:
        await self.stream.send_all(b"".join(m if isinstance(m, bytes) else protocol.pack(m) for m in messages))

    async def receive(self) -> dict[str, Any]:
        while not self.buffered:
            data = await self.stream.receive_some(65536)
            assert data, "the server closed the connection"
            self.buffered.extend(self.protocol.receive_data(data))
        return self.buffered.pop(0)

    async def receive_n(self, count: int) -> list[dict[str, Any]]:
        return [await self.receive() for _ in range(count)]

    async def expect_closed(self) -> None:
        """The server closes the connection: EOF (or a reset) with no further frames."""
        while True:
            try:
                data = await self.stream.receive_some(65536)
            except trio.BrokenResourceError:
                return
            if not data:
                assert not self.buffered, self.buffered
                return
            self.buffered.extend(self.protocol.receive_data(data))
            assert not self.buffered, f"frames after the final reply: {self.buffered!r}"

    async def ping_ok(self, request_id: int = 99) -> None:
        await self.send({"id": request_id, "op": "ping"})
        reply = await self.receive()
        assert (reply["id"], reply["ok"]) == (request_id, True), reply


async def open_raw(server) -> Raw:
    return Raw(await trio.open_tcp_stream(server.host, server.port))

"""A lean TLS client stream for the load generator: `ssl.SSLObject` over two `MemoryBIO`s on a
`trio.SocketStream`, with the part of `trio.abc.Stream` the drivers use (`send_all`,
`receive_some`, `aclose`, `async with`).

Why not `trio.SSLStream` here: on 2 shared cores the generator's own CPU per request limits the
pooled runs, and SSLStream's general machinery (locks, conflict detection, renegotiation
handling: several awaits per call) costs the generator several times what the TLS itself costs.
A load generator should measure the server's TLS, not the client library's; this is the same
reasoning as its hand-made codec (engine_driver.py). The protocol's own trio client keeps
`trio.SSLStream`. `python -m bench.tls_overhead --generator-tls sslstream` measures with it.

One task sends and one receives at most (as the generator does); each method drives the
SSLObject synchronously between its awaits, so the two never interleave inside OpenSSL.
"""

from __future__ import annotations

import ssl

import trio

RECEIVE_BYTES_MAX = 64 * 1024
RECORD_PLAINTEXT_BYTES = 16 * 1024


class LeanTlsStream:
    """A TLS connection over `stream` (call `handshake` first)."""

    def __init__(self, stream: trio.SocketStream, context: ssl.SSLContext, server_hostname: str):
        self._stream = stream
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_hostname=server_hostname)

    async def handshake(self) -> None:
        """Complete the handshake (raises `ssl.SSLError` for a bad certificate)."""
        while True:
            try:
                self._tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self._flush()
                data = await self._stream.receive_some(RECEIVE_BYTES_MAX)
                if not data:
                    raise trio.BrokenResourceError("the server closed the connection during the TLS handshake") from None
                self._incoming.write(data)
        await self._flush()

    async def _flush(self) -> None:
        if self._outgoing.pending:
            await self._stream.send_all(self._outgoing.read())

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Encrypt and send all of `data`."""
        view = memoryview(data)
        for start in range(0, len(view), RECORD_PLAINTEXT_BYTES):
            self._tls.write(view[start : start + RECORD_PLAINTEXT_BYTES])
        await self._flush()

    async def receive_some(self, max_bytes: int = RECEIVE_BYTES_MAX) -> bytes:
        """Plaintext from the server; b"" at its close."""
        while True:
            if self._incoming.pending or self._tls.pending():
                try:
                    data = self._tls.read(max_bytes)
                    return data
                except ssl.SSLWantReadError:
                    pass
                except ssl.SSLZeroReturnError:
                    return b""
            data = await self._stream.receive_some(RECEIVE_BYTES_MAX)
            if not data:
                return b""
            self._incoming.write(data)

    async def aclose(self) -> None:
        await self._stream.aclose()

    async def __aenter__(self) -> LeanTlsStream:
        return self

    async def __aexit__(self, *exception_info: object) -> None:
        await self.aclose()

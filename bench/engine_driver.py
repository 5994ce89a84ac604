"""The load generator's codec for protocol v1 (the engine, a baseline engine, the echo server).

Same wire format as `protocol.ClientProtocol` (4-byte big-endian length + msgpack map, replies
matched by `id`), but built for a load generator: the constant parts of each request are
pre-encoded, the encoding of each `lines` list is cached, and replies are cut from the read buffer
without copying. `protocol` stays the reference codec: the smoke test checks that both encode
the same maps.
"""

from __future__ import annotations

import ssl
import struct

import msgpack
import trio

from bench.tls_stream import LeanTlsStream
from bench.workloads import ERROR, OK, REFUSED

_HEADER = struct.Struct(">I")
_packb = msgpack.packb
_unpackb = msgpack.unpackb


def _key(name: str) -> bytes:
    return _packb(name)


_ID = _key("id")
_RESERVE = _key("op") + _key("reserve") + _key("rid")
_RELEASE = _key("op") + _key("release") + _key("rid")
_COMMIT = _key("op") + _key("commit") + _key("rid")
_ADJUST = _key("op") + _key("adjust") + _key("key")
_GET = _key("op") + _key("get")
_HELLO = _key("op") + _key("hello") + _key("version") + _packb(1) + _key("token")
HELLO_REPLY_BYTES_MAX = 1 << 16
_LINES = _key("lines")
_TTL = _key("ttl_ms")


class EngineDriver:
    """One connection's codec. Tokens (lanes) are matched to replies by the request `id`."""

    def __init__(self, keys: list[tuple[str, str]], shared: dict | None = None) -> None:
        # `shared`: caches shared by every connection of one generator process.
        shared = {} if shared is None else shared
        self.keys = keys
        self.pending: dict[int, object] = {}
        self.next_id = 1
        self.buffer = bytearray()
        self.lines_cache: dict[tuple, bytes] = shared.setdefault("engine_lines", {})
        if "engine_keys" not in shared:
            shared["engine_keys"] = [_key("sku") + _packb(sku) + _key("loc") + _packb(loc) for sku, loc in keys]
        self.key_fields = shared["engine_keys"]

    async def connect(self, host: str, port: int, ssl_context: ssl.SSLContext | None = None, server_hostname: str | None = None,
                      tls_library: str = "lean") -> trio.abc.Stream:
        """A TCP connection; with `ssl_context`, TLS checking the server's certificate against
        `server_hostname` (default `host`), through `bench.tls_stream.LeanTlsStream` (`tls_library`
        "lean") or `trio.SSLStream` ("sslstream")."""
        stream = await trio.open_tcp_stream(host, port)
        if ssl_context is None:
            return stream
        try:
            if tls_library == "lean":
                lean = LeanTlsStream(stream, ssl_context, server_hostname=server_hostname or host)
                await lean.handshake()
                return lean
            assert tls_library == "sslstream", f"unknown TLS library {tls_library!r}"
            tls_stream = trio.SSLStream(stream, ssl_context, server_hostname=server_hostname or host)
            await tls_stream.do_handshake()
            return tls_stream
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise

    async def hello(self, stream: trio.SocketStream, token: str) -> None:
        """Authenticate `stream` with `token` (a server started with --token); raise if refused."""
        marker = object()
        await stream.send_all(self._frame(marker, 4, (_HELLO, _packb(token))))
        replies: list = []
        while not replies:
            data = await stream.receive_some(HELLO_REPLY_BYTES_MAX)
            if not data:
                raise ConnectionError("the server closed the connection after hello")
            replies = self.feed(data)
        ((_, status, detail),) = replies
        if status != OK:
            raise ConnectionError(f"hello refused: {detail}")

    # --- requests -------------------------------------------------------------------------

    def _frame(self, token: object, map_size: int, parts: tuple) -> bytes:
        request_id = self.next_id
        self.next_id = request_id + 1
        self.pending[request_id] = token
        body = b"".join((bytes((0x80 | map_size,)), _ID, _packb(request_id)) + parts)
        return _HEADER.pack(len(body)) + body

    def _lines(self, lines: tuple) -> bytes:
        encoded = self.lines_cache.get(lines)
        if encoded is None:
            encoded = _packb([{"sku": self.keys[index][0], "loc": self.keys[index][1], "qty": qty} for index, qty in lines])
            if len(self.lines_cache) < 100_000:
                self.lines_cache[lines] = encoded
        return encoded

    def reserve(self, token: object, rid: str, lines: tuple, ttl_ms: int) -> bytes:
        if ttl_ms:
            return self._frame(token, 5, (_RESERVE, _packb(rid), _LINES, self._lines(lines), _TTL, _packb(ttl_ms)))
        return self._frame(token, 4, (_RESERVE, _packb(rid), _LINES, self._lines(lines)))

    def release(self, token: object, rid: str, lines: tuple) -> bytes:
        return self._frame(token, 3, (_RELEASE, _packb(rid)))

    def commit(self, token: object, rid: str, lines: tuple) -> bytes:
        return self._frame(token, 3, (_COMMIT, _packb(rid)))

    def adjust(self, token: object, key: str, index: int, delta: int) -> bytes:
        return self._frame(token, 7, (_ADJUST, _packb(key), self.key_fields[index], _key("delta"), _packb(delta),
                                      _key("reason"), _key("receipt")))

    def get(self, token: object, index: int) -> bytes:
        return self._frame(token, 4, (_GET, self.key_fields[index]))

    # --- replies --------------------------------------------------------------------------

    def feed(self, data: bytes) -> list[tuple[object, int, object]]:
        """Replies completed by `data`: (token, status, detail); detail is the reply map."""
        buffer = self.buffer
        buffer += data
        size = len(buffer)
        offset = 0
        out = []
        pending = self.pending
        view = memoryview(buffer)
        try:
            while size - offset >= 4:
                (length,) = _HEADER.unpack_from(buffer, offset)
                end = offset + 4 + length
                if end > size:
                    break
                reply = _unpackb(view[offset + 4 : end], raw=False, strict_map_key=False)
                offset = end
                token = pending.pop(reply.get("id"), None)
                if token is None:
                    raise ConnectionError(f"reply that matches no request: {reply!r}")
                if reply.get("ok"):
                    out.append((token, OK, reply))
                elif reply.get("error") == "insufficient":
                    out.append((token, REFUSED, reply))
                else:
                    out.append((token, ERROR, reply.get("error") or "?"))
        finally:
            view.release()
        if offset:
            del buffer[:offset]
        return out

    @staticmethod
    def stock(detail: dict) -> tuple[int, int]:
        return detail["on_hand"], detail["reserved"]

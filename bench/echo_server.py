"""A bare trio echo server: the per-request ceiling of a Python/trio server.

Reads length-prefixed msgpack frames, decodes each map (streaming: every frame of one read),
answers `{"id": id, "ok": True}` at once, and sends the replies of one read in one `send_all`.
No validation, no state: whatever the engine spends above this is the cost of its own work.

    python -m bench.echo_server --port 0     # logs "listening on 127.0.0.1:PORT" to stderr
"""

from __future__ import annotations

import argparse
import gc
import struct
import sys

import msgpack
import trio

RECEIVE_BYTES_MAX = 1 << 16
_HEADER = struct.Struct(">I")
_REPLY_PREFIX = b"\x82\xa2ok\xc3\xa2id"  # fixmap(2) "ok": true, "id": then the packed id


def answer_frames(buffer: bytes | bytearray) -> tuple[bytes, int]:
    """The replies to every complete frame at the start of `buffer`, joined, and how many bytes
    those frames took. The echo server's whole work per request (`bench.core_floor` times it)."""
    unpackb, packb, pack_header = msgpack.unpackb, msgpack.packb, _HEADER.pack
    offset = 0
    size = len(buffer)
    replies = []
    while size - offset >= 4:
        (length,) = _HEADER.unpack_from(buffer, offset)
        end = offset + 4 + length
        if end > size:
            break
        message = unpackb(memoryview(buffer)[offset + 4 : end], raw=False)
        body = _REPLY_PREFIX + packb(message.get("id"))
        replies.append(pack_header(len(body)))
        replies.append(body)
        offset = end
    return b"".join(replies), offset


async def serve_connection(stream: trio.SocketStream) -> None:
    buffer = bytearray()
    async with stream:
        while True:
            try:
                data = await stream.receive_some(RECEIVE_BYTES_MAX)
            except trio.BrokenResourceError:
                return
            if not data:
                return
            buffer += data
            replies, consumed = answer_frames(buffer)
            if consumed:
                del buffer[:consumed]
            if replies:
                try:
                    await stream.send_all(replies)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return


async def serve(host: str, port: int) -> None:
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()
    print(f"listening on {bound[0]}:{bound[1]}", file=sys.stderr, flush=True)
    await trio.serve_listeners(serve_connection, listeners)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    # Same treatment as a lean server: nothing long-lived to collect, so keep the GC out of the way.
    gc.freeze()
    gc.set_threshold(100_000, 50, 50)
    try:
        trio.run(serve, args.host, args.port)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())

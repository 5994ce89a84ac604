"""Length-prefixed framing: a 4-byte unsigned big-endian length, then that many bytes of body."""

from __future__ import annotations

import struct

from ._limits import FRAME_HEADER_BYTES

_HEADER = struct.Struct(">I")


class FrameTooLarge(Exception):
    """A frame announced a length of 0 or above the limit; the stream cannot be resynchronised."""

    def __init__(self, length: int, limit: int):
        super().__init__(f"frame length {length} is outside 1..{limit} bytes")
        self.length = length
        self.limit = limit


def frame(body: bytes) -> bytes:
    """Prefix `body` with its length."""
    return _HEADER.pack(len(body)) + body


class FrameDecoder:
    """Accumulates bytes and cuts them into frame bodies. Pure: no sockets, no clock.

    Memory is bounded by one frame: a body is only buffered after its header passed the size check.
    """

    def __init__(self, max_frame_bytes: int):
        assert max_frame_bytes >= 1
        self.max_frame_bytes = max_frame_bytes
        # Unconsumed input from `_offset` on. Usually the bytes of the last read as they came (no
        # copy: most reads end on a frame boundary); a bytearray only while a frame straddles
        # reads, so that a large frame arriving in pieces is gathered in amortized linear time.
        self._buffer: bytes | bytearray = b""
        self._offset = 0

    def feed(self, data: bytes) -> None:
        if self._offset >= len(self._buffer):
            self._buffer = data
            self._offset = 0
            return
        if type(self._buffer) is not bytearray:
            self._buffer = bytearray(memoryview(self._buffer)[self._offset :])
            self._offset = 0
        self._buffer += data

    @property
    def buffered_bytes(self) -> int:
        return len(self._buffer) - self._offset

    def next_body(self) -> bytes | None:
        """The next complete body, or None when more bytes are needed. Raises FrameTooLarge."""
        bodies = self.next_bodies(1)
        return bytes(bodies[0]) if bodies else None

    def next_bodies(self, count_max: int) -> list[bytes | bytearray]:
        """Up to `count_max` complete bodies, in order; fewer when the bytes run out. A bad
        header raises FrameTooLarge, but only once the bodies before it have been returned."""
        bodies: list[bytes] = []
        buffer, offset, limit = self._buffer, self._offset, self.max_frame_bytes
        end = len(buffer)
        unpack_header = _HEADER.unpack_from
        while len(bodies) < count_max and end - offset >= FRAME_HEADER_BYTES:
            (length,) = unpack_header(buffer, offset)
            if length == 0 or length > limit:
                if bodies:
                    break
                self._offset = offset
                raise FrameTooLarge(length, limit)
            start = offset + FRAME_HEADER_BYTES
            if end - start < length:
                break
            offset = start + length
            bodies.append(buffer[start:offset])
        self._offset = offset
        if len(bodies) < count_max:
            self._compact()  # waiting for more bytes anyway
        return bodies

    def _compact(self) -> None:
        # Drop consumed bytes only when we must wait anyway: one memmove per read, not per frame.
        if self._offset >= len(self._buffer):
            self._buffer = b""
            self._offset = 0
        elif self._offset and type(self._buffer) is bytearray:
            del self._buffer[: self._offset]
            self._offset = 0

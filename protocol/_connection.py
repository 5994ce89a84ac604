"""Sans-IO protocol objects: bytes in, events out; messages in, bytes out.

`ServerProtocol` and `ClientProtocol` never touch a socket. The server, the blocking client and
the trio client all drive one of these with whatever I/O they have.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, Union

import msgpack

from . import _errors as errors
from ._commands import Command, parse_request, read_request_id
from ._framing import FrameDecoder, FrameTooLarge, frame
from ._limits import FRAME_HEADER_BYTES, MAX_FRAME_BYTES


# One packer for every message: `packb` builds a new one per call, which costs as much as the
# packing of a small reply. Packing holds the GIL throughout, so threads cannot interleave in it.
_PACKER = msgpack.Packer(use_bin_type=True)


def pack(message: dict[str, Any]) -> bytes:
    """Encode one message map as a frame (header + msgpack body)."""
    return frame(_PACKER.pack(message))


_unpackb_strict = msgpack.unpackb  # raw=False, use_list=True, strict_map_key=True: the defaults


def _unpack_body(body: bytes) -> Any:
    # raw=False: strings must be valid UTF-8. unpackb raises ExtraData on trailing bytes.
    return msgpack.unpackb(body, raw=False, strict_map_key=False, use_list=True)


class RequestReceived(NamedTuple):
    """A well-formed request (a tuple: one is made for every request)."""

    request_id: int
    command: Command


@dataclass(frozen=True, slots=True)
class RequestRejected:
    """A frame that is not a valid request. Send `reply`; if `close`, close the connection after it."""

    reply: dict[str, Any]
    close: bool


ServerEvent = Union[RequestReceived, RequestRejected]


class ServerProtocol:
    """The server's side of one connection."""

    def __init__(self, max_frame_bytes: int = MAX_FRAME_BYTES):
        self._decoder = FrameDecoder(max_frame_bytes)
        self.broken = False  # set after frame_too_large: nothing more is read

    @property
    def partial_frame_bytes(self) -> int:
        """Bytes of a frame begun but not complete (0 between frames)."""
        return self._decoder.buffered_bytes

    def receive_data(self, data: bytes, events_max: int = 1 << 30) -> list[ServerEvent]:
        """Feed bytes; return the requests (and rejections) they complete, in order.

        Bytes past `events_max` events stay buffered; call `next_events` to get them later.
        """
        if self.broken:
            return []
        self._decoder.feed(data)
        return self.next_events(events_max)

    def next_events(self, events_max: int) -> list[ServerEvent]:
        if self.broken:
            return []
        decoder, parse = self._decoder, self._parse
        events: list[ServerEvent] = []
        try:
            events += [parse(body) for body in decoder.next_bodies(events_max)]
            # Fewer bodies than asked for, yet a header's worth left: either a frame still coming
            # in, or a bad header that `next_bodies` stopped at after the good frames before it.
            if len(events) < events_max and decoder.buffered_bytes >= FRAME_HEADER_BYTES:
                events += [parse(body) for body in decoder.next_bodies(events_max - len(events))]
        except FrameTooLarge as error:
            self.broken = True
            events.append(RequestRejected(errors.error_reply(None, errors.FRAME_TOO_LARGE, str(error)), close=True))
        return events

    @staticmethod
    def _parse(body: bytes) -> ServerEvent:
        try:
            # msgpack's defaults (strict map keys) cost less than passing options; a body they
            # refuse is read again leniently, which names the problem as it always did.
            message = _unpackb_strict(body)
        except Exception:
            message = ServerProtocol._unpack_lenient(body)
            if type(message) is RequestRejected:
                return message
        try:
            request_id, command = parse_request(message)
        except errors.RequestError as error:
            return RequestRejected(error.reply(), close=False)
        return RequestReceived(request_id, command)

    @staticmethod
    def _unpack_lenient(body: bytes) -> Any:
        """The decoded body (any map keys), or the rejection that says why it cannot be read."""
        try:
            return _unpack_body(body)
        except msgpack.ExtraData as error:
            return RequestRejected(
                errors.error_reply(read_request_id(error.unpacked), errors.BAD_REQUEST, "frame has trailing bytes after the msgpack map"),
                close=False,
            )
        except Exception as error:  # any malformed body: msgpack, UTF-8, nesting, ...
            return RequestRejected(errors.error_reply(None, errors.BAD_REQUEST, f"frame body is not valid msgpack ({type(error).__name__}{': ' if str(error) else ''}{error})"), close=False)

    @staticmethod
    def send(message: dict[str, Any]) -> bytes:
        """Bytes for one reply or pushed event."""
        return pack(message)


class ClientProtocol:
    """The client's side: numbers requests, encodes them, and decodes reply frames."""

    def __init__(self, max_frame_bytes: int = MAX_FRAME_BYTES, first_id: int = 1):
        self._decoder = FrameDecoder(max_frame_bytes)
        self._next_id = first_id

    def request(self, op: str, **fields: Any) -> tuple[int, bytes]:
        """Allocate an id and encode `{"id", "op", **fields}`. Returns `(id, frame bytes)`.

        Fields whose value is None are left off. `id` is not a field: the caller could not match
        the reply if it overrode the id this method returns.
        """
        if "id" in fields:
            raise ValueError("'id' is allocated by ClientProtocol.request, it cannot be passed as a field")
        request_id = self._next_id
        self._next_id += 1
        message = {"id": request_id, "op": op}
        message.update({key: value for key, value in fields.items() if value is not None})
        return request_id, pack(message)

    def receive_data(self, data: bytes) -> list[dict[str, Any]]:
        """Feed bytes; return the complete messages (replies and `{"event": ...}` pushes).

        Raises `ProtocolViolation` when the server breaks the framing or sends a body that is not
        a msgpack map: the connection cannot be trusted after that.
        """
        self._decoder.feed(data)
        messages = []
        while True:
            try:
                body = self._decoder.next_body()
            except FrameTooLarge as error:
                raise errors.ProtocolViolation(str(error)) from None
            if body is None:
                return messages
            try:
                message = _unpack_body(body)
            except Exception as error:  # any malformed body: msgpack, UTF-8, trailing bytes, ...
                raise errors.ProtocolViolation(f"server sent a frame that is not valid msgpack: {error}") from error
            if not isinstance(message, dict):
                raise errors.ProtocolViolation(f"server sent a {type(message).__name__}, not a map")
            messages.append(message)

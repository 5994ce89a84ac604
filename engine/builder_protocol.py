"""The protocol between the server and its long-lived snapshot builder: lines on pipes, sans IO.

The server writes one request per line on the builder's stdin, `build <seq>\n`, and reads one
reply per request on its stdout: a JSON object on one line, the figures of the snapshot written
(`REPLY_FIELDS`). The builder answers only once the snapshot is durable; a builder that fails
says nothing more and exits (its status and its log on stderr say why). End of input tells the
builder to exit. Both sides refuse a line longer than its bound (`BuilderProtocolError`).
"""

from __future__ import annotations

import json
import re
from typing import Any

REQUEST_LINE_BYTES_MAX = 64  # "build " and a seq of at most 20 digits, with room to spare
REPLY_LINE_BYTES_MAX = 4096  # a dozen figures: ~300 bytes

_REQUEST = re.compile(rb"build (\d{1,20})\n")

# The reply's fields and their types.
REPLY_FIELDS: dict[str, type | tuple[type, ...]] = {
    "seq": int,  # the snapshot's seq: the one asked for
    "start_seq": int,  # where this build's replay started: the loaded snapshot's seq, or the previous build's
    "loaded_base": bool,  # whether the builder loaded a snapshot for this build (its first, or its state did not continue the log)
    "replayed": int,  # log records replayed for this build
    "check": str,  # "full" (check_invariants) or "tail" (TailCheck)
    "bytes": int,  # the snapshot file's size
    "load_seconds": (int, float),
    "replay_seconds": (int, float),
    "check_seconds": (int, float),
    "write_seconds": (int, float),
    "seconds": (int, float),  # the whole build, from the request to the durable file
    "builds": int,  # builds by this builder process, this one included
}


class BuilderProtocolError(Exception):
    """A line that breaks the protocol: too long, or not what the other side may send."""


def request_line(seq: int) -> bytes:
    assert 0 < seq < 10**20, seq
    return b"build %d\n" % seq


def parse_request(line: bytes) -> int:
    """The seq a request line asks for (`line` with its newline, as `readline` returns it)."""
    match = _REQUEST.fullmatch(line) if len(line) <= REQUEST_LINE_BYTES_MAX else None
    if match is None:
        raise BuilderProtocolError(f"not a request: {line[:REQUEST_LINE_BYTES_MAX]!r}")
    return int(match.group(1))


def reply_line(figures: dict[str, Any]) -> bytes:
    assert figures.keys() == REPLY_FIELDS.keys(), sorted(figures.keys() ^ REPLY_FIELDS.keys())
    line = json.dumps(figures, separators=(",", ":")).encode() + b"\n"
    assert len(line) <= REPLY_LINE_BYTES_MAX
    return line


def parse_reply(line: bytes) -> dict[str, Any]:
    """The figures in a reply line (without its newline)."""
    try:
        figures = json.loads(line)
    except ValueError as error:
        raise BuilderProtocolError(f"not a reply: {line[:100]!r}") from error
    if not isinstance(figures, dict) or figures.keys() != REPLY_FIELDS.keys():
        raise BuilderProtocolError(f"a reply without the expected fields: {line[:200]!r}")
    for name, kind in REPLY_FIELDS.items():
        if not isinstance(figures[name], kind) or (kind is int and isinstance(figures[name], bool)):
            raise BuilderProtocolError(f"reply field {name!r} is not a {kind}: {figures[name]!r}")
    return figures


class LineBuffer:
    """Bytes in, complete lines out (without their newline), each at most `line_bytes_max`."""

    def __init__(self, line_bytes_max: int):
        self._line_bytes_max = line_bytes_max
        self._pending = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._pending += data
        *lines, rest = self._pending.split(b"\n")
        self._pending = bytearray(rest)
        if len(rest) > self._line_bytes_max or any(len(line) > self._line_bytes_max for line in lines):
            raise BuilderProtocolError(f"a line longer than {self._line_bytes_max} bytes")
        return [bytes(line) for line in lines]

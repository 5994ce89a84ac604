"""Error codes of protocol v1 and the exceptions the clients raise for error replies."""

from __future__ import annotations

from typing import Any

BAD_REQUEST = "bad_request"
UNKNOWN_OP = "unknown_op"
INSUFFICIENT = "insufficient"
NOT_FOUND = "not_found"
CONFLICT = "conflict"
INVALID_STATE = "invalid_state"
INVALID = "invalid"
UNAUTHORIZED = "unauthorized"
OVERLOADED = "overloaded"
FRAME_TOO_LARGE = "frame_too_large"
UNSUPPORTED_VERSION = "unsupported_version"
INTERNAL = "internal"

ERROR_CODES = frozenset(
    {
        BAD_REQUEST,
        UNKNOWN_OP,
        INSUFFICIENT,
        NOT_FOUND,
        CONFLICT,
        INVALID_STATE,
        INVALID,
        UNAUTHORIZED,
        OVERLOADED,
        FRAME_TOO_LARGE,
        UNSUPPORTED_VERSION,
        INTERNAL,
    }
)


def error_reply(request_id: int | None, code: str, message: str, **details: Any) -> dict[str, Any]:
    """Build a failure reply map: `{"id", "ok": False, "error", "message", ...details}`."""
    assert code in ERROR_CODES, code
    reply: dict[str, Any] = {"id": request_id, "ok": False, "error": code, "message": message}
    reply.update(details)
    return reply


class RequestError(Exception):
    """A request that cannot be served as sent; becomes an error reply (used by the server side)."""

    def __init__(self, code: str, message: str, request_id: int | None = None, **details: Any):
        assert code in ERROR_CODES, code
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.request_id = request_id
        self.details = details

    def reply(self) -> dict[str, Any]:
        return error_reply(self.request_id, self.code, self.message, **self.details)


class ServerError(Exception):
    """Raised by the clients when the server answers `ok: false`. `reply` is the whole reply map."""

    def __init__(self, reply: dict[str, Any]):
        self.reply = reply
        self.code: str = reply.get("error", INTERNAL)
        self.message: str = reply.get("message", "")
        super().__init__(f"{self.code}: {self.message}")


class ProtocolViolation(Exception):
    """The peer broke the framing (for example a frame over the size limit); the connection is done."""


class ConnectionClosed(Exception):
    """The connection closed before a reply arrived."""

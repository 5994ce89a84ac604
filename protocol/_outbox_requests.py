"""What may enter the offline client's outbox: a valid mutating request with its idempotency id.

Pure: a request is checked here, before it is written, by the same validation the server runs
(`parse_request`), so a request that could never be applied is refused at once with the reason,
instead of being queued, sent later and refused then. A request without its id gets one
(`uuid4`) before it is written, so every resend of it carries the same id and is idempotent.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from . import _errors as errors
from ._commands import MUTATING_COMMANDS, parse_request
from ._connection import pack
from ._limits import MAX_FRAME_BYTES

# The id field of each mutating op (`reserve`, `release`, `commit`, `extend` name a reservation
# by `rid`; `adjust`, `count` and `transfer` are named by `key`), per the wire contract.
ID_FIELD_BY_OP = {
    "reserve": "rid",
    "release": "rid",
    "commit": "rid",
    "extend": "rid",
    "adjust": "key",
    "count": "key",
    "transfer": "key",
}

# Ops whose id the client may make up. `release`, `commit` and `extend` name an existing
# reservation: a made-up rid could only be `not_found`, so their rid is required.
OPS_WITH_GENERATED_IDS = frozenset({"reserve", "adjust", "count", "transfer"})

# A request id as large as any the wire allows, so that the frame measured here is never
# smaller than the frame sent later.
_LARGEST_REQUEST_ID = 2**64 - 1


class InvalidOutboxRequest(ValueError):
    """A request the outbox refuses to queue: not a mutating op, or fields the server would refuse."""


@dataclass(frozen=True, slots=True)
class PreparedRequest:
    """A request ready to be written: its op, its wire fields (id included) and that id."""

    op: str
    fields: dict[str, Any]
    idempotency_id: str


def prepare_request(op: str, fields: dict[str, Any], max_frame_bytes: int = MAX_FRAME_BYTES) -> PreparedRequest:
    """Check one mutating request and give it an id if it has none; raise `InvalidOutboxRequest`.

    Fields whose value is None are left off (as the clients do). The request must fit in one frame
    of `max_frame_bytes` (the server's bound), or it could never be sent.
    """
    id_field = ID_FIELD_BY_OP.get(op)
    if id_field is None:
        raise InvalidOutboxRequest(
            f"op {op!r} does not go through the outbox: only mutating ops ({', '.join(ID_FIELD_BY_OP)}) are queued; "
            "read with a connected Client"
        )
    for reserved_name in ("id", "op"):
        if reserved_name in fields:
            raise InvalidOutboxRequest(f"{reserved_name!r} is not a field: the outbox sets it")
    present = {name: value for name, value in fields.items() if value is not None}
    if id_field not in present:
        if op not in OPS_WITH_GENERATED_IDS:
            raise InvalidOutboxRequest(f"{op} needs the '{id_field}' of the reservation it acts on")
        present[id_field] = str(uuid.uuid4())
    message = {"id": _LARGEST_REQUEST_ID, "op": op, **present}
    try:
        _, command = parse_request(message)
    except errors.RequestError as error:
        raise InvalidOutboxRequest(f"{op} refused before queueing ({error.code}): {error.message}") from None
    assert isinstance(command, MUTATING_COMMANDS), (op, command)
    try:
        frame_bytes = len(pack(message))
    except (TypeError, ValueError, OverflowError) as error:
        raise InvalidOutboxRequest(f"{op}: a field cannot be encoded as msgpack: {error}") from None
    if frame_bytes > max_frame_bytes:
        raise InvalidOutboxRequest(f"{op}: the request is {frame_bytes} bytes, above the frame bound of {max_frame_bytes}")
    return PreparedRequest(op, present, present[id_field])

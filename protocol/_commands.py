"""Typed requests of protocol v1, and the validation that turns a decoded map into one.

Validation is total: any map, whatever it holds, either becomes a command or raises
`RequestError` with `bad_request`, `unknown_op` (and the request's `id` when it could be read).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Union

from . import _errors as errors
from ._limits import (
    CLIENT_NAME_BYTES_MAX,
    DELTA_MAX,
    LINES_PER_BATCH_MAX,
    LINES_PER_RESERVATION_MAX,
    NAME_BYTES_MAX,
    ON_HAND_MAX,
    QTY_MAX,
    REASON_BYTES_MAX,
    REF_BYTES_MAX,
    REQUEST_ID_MAX,
    SEQ_MAX,
    TOKEN_BYTES_MAX,
    TTL_MS_MAX,
)


class Line(NamedTuple):
    """One line of a reservation or commit. A tuple `(sku, loc, qty)`: cheap to build for every
    request, and the form the core keeps lines in."""

    sku: str
    loc: str
    qty: int


@dataclass(frozen=True, slots=True)
class Hello:
    version: int
    token: str | None = None
    client: str | None = None


@dataclass(frozen=True, slots=True)
class Ping:
    pass


@dataclass(frozen=True, slots=True)
class Reserve:
    rid: str
    lines: tuple[Line, ...]
    ttl_ms: int = 0  # 0 = no expiry
    ref: str | None = None


@dataclass(frozen=True, slots=True)
class Release:
    rid: str


@dataclass(frozen=True, slots=True)
class Commit:
    rid: str
    lines: tuple[Line, ...] | None = None  # None = every line in full


@dataclass(frozen=True, slots=True)
class Extend:
    rid: str
    ttl_ms: int


@dataclass(frozen=True, slots=True)
class Adjust:
    key: str
    sku: str
    loc: str
    delta: int
    reason: str


@dataclass(frozen=True, slots=True)
class Count:
    key: str
    sku: str
    loc: str
    on_hand: int
    reason: str | None = None


StockLine = tuple[str, str, int]
"""A line of a batch: `(sku, loc, on_hand)` in a `CountBatch`, `(sku, loc, delta)` in an `AdjustBatch`.
Plain tuples, not dataclasses: a batch holds thousands and they are built per request."""


@dataclass(frozen=True, slots=True)
class AdjustBatch:
    """`adjust` with `lines` of `{sku, loc, delta}`: all lines or none, under one `key`."""

    key: str
    lines: tuple[StockLine, ...]  # (sku, loc, delta), each SKU-location at most once
    reason: str


@dataclass(frozen=True, slots=True)
class CountBatch:
    """`count` with `lines` of `{sku, loc, on_hand}`: all lines, under one `key`."""

    key: str
    lines: tuple[StockLine, ...]  # (sku, loc, on_hand), each SKU-location at most once
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class Transfer:
    key: str
    sku: str
    from_loc: str
    to_loc: str
    qty: int


@dataclass(frozen=True, slots=True)
class Get:
    sku: str
    loc: str


@dataclass(frozen=True, slots=True)
class Query:
    sku: str


@dataclass(frozen=True, slots=True)
class Lookup:
    rid: str


@dataclass(frozen=True, slots=True)
class Watch:
    from_seq: int | None = None


@dataclass(frozen=True, slots=True)
class Snapshot:
    pass


@dataclass(frozen=True, slots=True)
class Stats:
    pass


Command = Union[
    Hello, Ping, Reserve, Release, Commit, Extend, Adjust, AdjustBatch, Count, CountBatch, Transfer,
    Get, Query, Lookup, Watch, Snapshot, Stats,
]

MUTATING_COMMANDS = (Reserve, Release, Commit, Extend, Adjust, AdjustBatch, Count, CountBatch, Transfer)


# ---------------------------------------------------------------------------------------------
# Field readers. Each raises RequestError(bad_request) naming the field and what was expected.


def _is_int(value: Any) -> bool:
    # msgpack booleans decode to bool, which Python counts as int: a quantity of `true` is wrong.
    return isinstance(value, int) and not isinstance(value, bool)


def _bad(request_id: int | None, message: str) -> errors.RequestError:
    return errors.RequestError(errors.BAD_REQUEST, message, request_id)


def _string(msg: dict, field: str, request_id: int | None, max_bytes: int, required: bool = True, min_bytes: int = 1) -> str | None:
    value = msg.get(field)
    if value is None:
        if required:
            raise _bad(request_id, f"missing field '{field}'")
        return None
    if not isinstance(value, str):
        raise _bad(request_id, f"field '{field}' must be a string, got {type(value).__name__}")
    # A character is 1 to 4 UTF-8 bytes: only encode when the length in characters cannot decide.
    characters = len(value)
    if min_bytes <= characters and characters * 4 <= max_bytes:
        return value
    size = len(value.encode("utf-8"))
    if size < min_bytes or size > max_bytes:
        raise _bad(request_id, f"field '{field}' must be {min_bytes} to {max_bytes} UTF-8 bytes, got {size}")
    return value


def _integer(msg: dict, field: str, request_id: int | None, low: int, high: int, required: bool = True) -> int | None:
    value = msg.get(field)
    if value is None:
        if required:
            raise _bad(request_id, f"missing field '{field}'")
        return None
    if not _is_int(value):
        raise _bad(request_id, f"field '{field}' must be an integer, got {type(value).__name__}")
    if value < low or value > high:
        raise _bad(request_id, f"field '{field}' must be between {low} and {high}, got {value}")
    return value


def _lines(msg: dict, field: str, request_id: int | None, qty_min: int, required: bool = True) -> tuple[Line, ...] | None:
    value = msg.get(field)
    if value is None:
        if required:
            raise _bad(request_id, f"missing field '{field}'")
        return None
    if not isinstance(value, (list, tuple)):
        raise _bad(request_id, f"field '{field}' must be a list of {{sku, loc, qty}}")
    if not 1 <= len(value) <= LINES_PER_RESERVATION_MAX:
        raise _bad(request_id, f"field '{field}' must hold 1 to {LINES_PER_RESERVATION_MAX} lines, got {len(value)}")
    clean = _clean_lines(value, qty_min)
    if clean is not None:
        return clean
    lines = []
    seen = set()
    for index, item in enumerate(value):
        if not isinstance(item, dict):
            raise _bad(request_id, f"{field}[{index}] must be a map {{sku, loc, qty}}")
        where = f"{field}[{index}]"
        try:
            sku = _name(item, "sku", request_id)
            loc = _name(item, "loc", request_id)
            qty = _integer(item, "qty", request_id, qty_min, QTY_MAX)
        except errors.RequestError as error:
            raise _bad(request_id, f"{where}: {error.message}") from None
        if (sku, loc) in seen:
            raise _bad(request_id, f"{where}: SKU-location ({sku!r}, {loc!r}) appears more than once")
        seen.add((sku, loc))
        lines.append(Line(sku, loc, qty))
    return tuple(lines)


# A string of at most this many characters is within NAME_BYTES_MAX UTF-8 bytes (4 bytes per
# character at most), so the common short name needs no encoding to be measured.
_NAME_CHARACTERS_SAFE = NAME_BYTES_MAX // 4
_REF_CHARACTERS_SAFE = REF_BYTES_MAX // 4


def _clean_lines(items: list, qty_min: int) -> tuple[Line, ...] | None:
    """The lines when every item is plainly valid (the common case, checked cheaply), else None:
    the caller then validates item by item to name the first problem."""
    lines = []
    for item in items:
        if type(item) is not dict:
            return None
        sku, loc, qty = item.get("sku"), item.get("loc"), item.get("qty")
        if not (
            type(sku) is str and type(loc) is str and type(qty) is int
            and 0 < len(sku) <= _NAME_CHARACTERS_SAFE and 0 < len(loc) <= _NAME_CHARACTERS_SAFE and qty_min <= qty <= QTY_MAX
        ):
            return None
        lines.append(Line(sku, loc, qty))
    if len(lines) > 1 and len({(line.sku, line.loc) for line in lines}) != len(lines):
        return None  # a repeated SKU-location: the detailed pass names it
    return tuple(lines)


def _batch_lines(msg: dict, request_id: int | None, figure: str, low: int, high: int, non_zero: bool) -> tuple[StockLine, ...]:
    """`lines` of a batch: 1 to LINES_PER_BATCH_MAX maps `{sku, loc, <figure>}`, each SKU-location
    at most once. Every line is checked on a fast path; a line that fails it is re-read by the
    ordinary field readers, which name what is wrong."""
    value = msg["lines"]
    if not isinstance(value, (list, tuple)):
        raise _bad(request_id, f"field 'lines' must be a list of {{sku, loc, {figure}}}")
    if not 1 <= len(value) <= LINES_PER_BATCH_MAX:
        raise _bad(request_id, f"field 'lines' must hold 1 to {LINES_PER_BATCH_MAX} lines, got {len(value)}")
    lines = []
    seen = set()
    for index, item in enumerate(value):
        if type(item) is not dict:
            raise _bad(request_id, f"lines[{index}] must be a map {{sku, loc, {figure}}}")
        sku = item.get("sku")
        loc = item.get("loc")
        number = item.get(figure)
        if not (
            type(sku) is str and 0 < len(sku) <= _NAME_CHARACTERS_SAFE
            and type(loc) is str and 0 < len(loc) <= _NAME_CHARACTERS_SAFE
            and type(number) is int and low <= number <= high and (number != 0 or not non_zero)
        ):
            try:
                sku = _name(item, "sku", request_id)
                loc = _name(item, "loc", request_id)
                number = _integer(item, figure, request_id, low, high)
            except errors.RequestError as error:
                raise _bad(request_id, f"lines[{index}]: {error.message}") from None
            if non_zero and number == 0:
                raise _bad(request_id, f"lines[{index}]: field '{figure}' must be non-zero")
        stock = (sku, loc)
        if stock in seen:
            raise _bad(request_id, f"lines[{index}]: SKU-location ({sku!r}, {loc!r}) appears more than once")
        seen.add(stock)
        lines.append((sku, loc, number))
    return tuple(lines)


def _one_form(msg: dict, request_id: int | None, single_fields: tuple[str, ...]) -> bool:
    """True for the batch form (`lines`), False for the single form; both at once is bad_request."""
    if msg.get("lines") is None:
        return False
    present = [field for field in single_fields if msg.get(field) is not None]
    if present:
        named = ", ".join(f"'{field}'" for field in present)
        raise _bad(request_id, f"a request with 'lines' is a batch: it cannot also have {named}; send one form or the other")
    return True


def _name(msg: dict, field: str, request_id: int | None) -> str:
    value = _string(msg, field, request_id, NAME_BYTES_MAX)
    assert value is not None
    return value


# ---------------------------------------------------------------------------------------------
# One parser per op.


def _hello(msg: dict, rid: int | None) -> Hello:
    version = _integer(msg, "version", rid, 0, 2**32)
    return Hello(
        version=version,
        token=_string(msg, "token", rid, TOKEN_BYTES_MAX, required=False),
        client=_string(msg, "client", rid, CLIENT_NAME_BYTES_MAX, required=False),
    )


def _reserve(msg: dict, rid: int | None) -> Reserve:
    # The common request, plainly valid, is checked in one pass; anything else is read field by
    # field below, which names the first problem.
    rid_value, lines, ttl_ms, ref = msg.get("rid"), msg.get("lines"), msg.get("ttl_ms"), msg.get("ref")
    if (
        type(rid_value) is str and 0 < len(rid_value) <= _NAME_CHARACTERS_SAFE
        and type(lines) is list and 0 < len(lines) <= LINES_PER_RESERVATION_MAX
        and (ttl_ms is None or (type(ttl_ms) is int and 0 <= ttl_ms <= TTL_MS_MAX))
        and (ref is None or (type(ref) is str and len(ref) <= _REF_CHARACTERS_SAFE))
    ):
        clean = _clean_lines(lines, 1)
        if clean is not None:
            return Reserve(rid_value, clean, ttl_ms or 0, ref)
    return Reserve(
        rid=_name(msg, "rid", rid),
        lines=_lines(msg, "lines", rid, qty_min=1),
        ttl_ms=_integer(msg, "ttl_ms", rid, 0, TTL_MS_MAX, required=False) or 0,
        # The contract bounds `ref` only from above ("up to 256 bytes"): an empty ref is allowed.
        ref=_string(msg, "ref", rid, REF_BYTES_MAX, required=False, min_bytes=0),
    )


def _commit(msg: dict, rid: int | None) -> Commit:
    return Commit(rid=_name(msg, "rid", rid), lines=_lines(msg, "lines", rid, qty_min=0, required=False))


def _adjust(msg: dict, rid: int | None) -> Adjust | AdjustBatch:
    if _one_form(msg, rid, ("sku", "loc", "delta")):
        return AdjustBatch(
            key=_name(msg, "key", rid),
            lines=_batch_lines(msg, rid, "delta", -DELTA_MAX, DELTA_MAX, non_zero=True),
            reason=_string(msg, "reason", rid, REASON_BYTES_MAX),
        )
    delta = _integer(msg, "delta", rid, -DELTA_MAX, DELTA_MAX)
    if delta == 0:
        raise _bad(rid, "field 'delta' must be non-zero")
    return Adjust(
        key=_name(msg, "key", rid),
        sku=_name(msg, "sku", rid),
        loc=_name(msg, "loc", rid),
        delta=delta,
        reason=_string(msg, "reason", rid, REASON_BYTES_MAX),
    )


def _count(msg: dict, rid: int | None) -> Count | CountBatch:
    if _one_form(msg, rid, ("sku", "loc", "on_hand")):
        return CountBatch(
            key=_name(msg, "key", rid),
            lines=_batch_lines(msg, rid, "on_hand", 0, ON_HAND_MAX, non_zero=False),
            reason=_string(msg, "reason", rid, REASON_BYTES_MAX, required=False),
        )
    return Count(
        key=_name(msg, "key", rid),
        sku=_name(msg, "sku", rid),
        loc=_name(msg, "loc", rid),
        on_hand=_integer(msg, "on_hand", rid, 0, ON_HAND_MAX),
        reason=_string(msg, "reason", rid, REASON_BYTES_MAX, required=False),
    )


def _transfer(msg: dict, rid: int | None) -> Transfer:
    return Transfer(
        key=_name(msg, "key", rid),
        sku=_name(msg, "sku", rid),
        from_loc=_name(msg, "from", rid),
        to_loc=_name(msg, "to", rid),
        qty=_integer(msg, "qty", rid, 1, QTY_MAX),
    )


_PARSERS: dict[str, Callable[[dict, int | None], Command]] = {
    "hello": _hello,
    "ping": lambda msg, rid: Ping(),
    "reserve": _reserve,
    "release": lambda msg, rid: Release(_name(msg, "rid", rid)),
    "commit": _commit,
    "extend": lambda msg, rid: Extend(rid=_name(msg, "rid", rid), ttl_ms=_integer(msg, "ttl_ms", rid, 1, TTL_MS_MAX)),
    "adjust": _adjust,
    "count": _count,
    "transfer": _transfer,
    "get": lambda msg, rid: Get(sku=_name(msg, "sku", rid), loc=_name(msg, "loc", rid)),
    "query": lambda msg, rid: Query(sku=_name(msg, "sku", rid)),
    "lookup": lambda msg, rid: Lookup(rid=_name(msg, "rid", rid)),
    "watch": lambda msg, rid: Watch(from_seq=_integer(msg, "from_seq", rid, 0, SEQ_MAX, required=False)),
    "snapshot": lambda msg, rid: Snapshot(),
    "stats": lambda msg, rid: Stats(),
}

OPS = frozenset(_PARSERS)


def read_request_id(msg: Any) -> int | None:
    """The request's `id` if it is a valid uint, else None (the error reply then carries id nil)."""
    if not isinstance(msg, dict):
        return None
    value = msg.get("id")
    if _is_int(value) and 0 <= value <= REQUEST_ID_MAX:
        return value
    return None


def parse_request(msg: Any) -> tuple[int, Command]:
    """Validate one decoded request map; return `(id, command)` or raise `RequestError`."""
    if not isinstance(msg, dict):
        raise _bad(None, f"a request must be a msgpack map, got {type(msg).__name__}")
    for key in msg:
        if type(key) is not str:
            raise _bad(read_request_id(msg), "request map keys must be strings")
    request_id = msg.get("id")
    if type(request_id) is not int or not 0 <= request_id <= REQUEST_ID_MAX:
        raise _bad(None, "field 'id' must be an unsigned integer below 2^64")
    op = msg.get("op")
    if type(op) is not str:
        raise _bad(request_id, "field 'op' must be a string")
    parser = _PARSERS.get(op)
    if parser is None:
        raise errors.RequestError(errors.UNKNOWN_OP, f"unknown op {op[:64]!r}", request_id)
    return request_id, parser(msg, request_id)

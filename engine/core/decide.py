"""`apply(state, command, now_ms)`: decide what a command does, log it as events, and reply.

Pure: no I/O, no clock (time is `now_ms`), no randomness. The state changes only through
`apply_event` on the events decided here, so replaying those events reproduces the state.

Availability is always the real, logged figure: the shell's tentative holds for multi-line
requests never reach the core (a request they would block waits in the shell instead).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import islice, takewhile
from typing import Any, Callable

from protocol import codes
from protocol import Adjust, AdjustBatch, Commit, Count, CountBatch, Extend, Get, Lookup, Query, Release, Reserve, Transfer

from .events import (
    ADJUSTED,
    ADJUSTED_BATCH,
    COUNTED,
    COUNTED_BATCH,
    EXTENDED,
    FORGOTTEN,
    RESERVED,
    TRANSFERRED,
    Event,
    adjust_batch_fingerprint,
    adjust_fingerprint,
    apply_event,
    count_batch_fingerprint,
    count_fingerprint,
    line_maps,
    transfer_fingerprint,
)
from .state import (
    COMMITTED, EXPIRED, HELD, RELEASED, RECORD_CLOSED_AT_MS, RECORD_EXPIRES_AT_MS, RECORD_STATE, ZERO_STOCK, KeyRecord,
    Reservation, State, packed_key_at_ms, record_lines, reserve_fingerprint,
)

Reply = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Expire:
    """Internal: the expiry timer says `rid` may be due."""

    rid: str


@dataclass(frozen=True, slots=True)
class Forget:
    """Internal: drop idempotency memory of reservations closed, and keys used, before a time."""

    closed_before_ms: int
    limit: int


def apply(state: State, command: Any, now_ms: int) -> tuple[State, list[Event], Reply]:
    """Apply `command` at time `now_ms`. Returns `(state, events, reply)`.

    `reply` is a reply map without `id`, with `seq`: the last logged change it reflects. The
    shell sends it only once the log is durable up to `seq`.
    """
    events: list[Event] = []
    reply = _DECIDERS[type(command)](_Context(state, now_ms, events), command)
    return state, events, reply


class _Context:
    """What a decider needs: the state, the time, and the list the new events go to."""

    __slots__ = ("state", "now_ms", "events")

    def __init__(self, state: State, now_ms: int, events: list[Event]):
        self.state = state
        self.now_ms = now_ms
        self.events = events

    def emit(self, kind: str, **fields: Any) -> Event:
        event = {"seq": self.state.seq + 1, "ts_ms": self.now_ms, "type": kind, **fields}
        apply_event(self.state, event)
        self.events.append(event)
        return event

    def available(self, sku: str, loc: str) -> int:
        return self.state.stock(sku, loc).available

    def stocks_seq(self, keys) -> int:
        return max((self.state.stock(sku, loc).last_seq for sku, loc in keys), default=0)


def _ok(seq: int, **fields: Any) -> Reply:
    return {"ok": True, **fields, "seq": seq}


def _error(seq: int, code: str, message: str, **details: Any) -> Reply:
    return {"ok": False, "error": code, "message": message, **details, "seq": seq}


# -- reservations ----------------------------------------------------------------------------


def _reserve(context: _Context, command: Reserve) -> Reply:
    lines = command.lines  # `Line`s are (sku, loc, qty) tuples
    state = context.state
    existing = state.reservation(command.rid)
    if existing is not None:
        if existing.fingerprint() != reserve_fingerprint(lines, command.ttl_ms, command.ref):
            return _error(existing.last_seq, codes.CONFLICT, f"rid {command.rid!r} was already used for a different reservation")
        return {**_reserve_reply(existing), "duplicate": True}
    stocks = state.stocks
    if len(lines) == 1:  # the hot path: the same decision as below, with less ceremony
        ((sku, loc, qty),) = lines
        stock = stocks.get((sku, loc))
        available = 0 if stock is None else stock.on_hand - stock.reserved
        if available < qty:
            short = [{"sku": sku, "loc": loc, "requested": qty, "available": available}]
            return _error(0 if stock is None else stock.last_seq, codes.INSUFFICIENT, "1 of 1 lines cannot be held", lines=short)
        expires_at_ms = context.now_ms + command.ttl_ms if command.ttl_ms else None
        context.emit(RESERVED, rid=command.rid, lines=[{"sku": sku, "loc": loc, "qty": qty}], ttl_ms=command.ttl_ms, expires_at_ms=expires_at_ms, ref=command.ref)
        granted = [{"sku": sku, "loc": loc, "qty": qty, "available": available - qty}]
        return {"ok": True, "rid": command.rid, "lines": granted, "expires_at_ms": expires_at_ms, "seq": state.seq}
    short = None
    for sku, loc, qty in lines:
        stock = stocks.get((sku, loc))
        available = 0 if stock is None else stock.on_hand - stock.reserved
        if available < qty:
            if short is None:
                short = []
            short.append({"sku": sku, "loc": loc, "requested": qty, "available": available})
    if short:
        seq = context.stocks_seq((sku, loc) for sku, loc, _ in lines)
        return _error(seq, codes.INSUFFICIENT, f"{len(short)} of {len(lines)} lines cannot be held", lines=short)
    expires_at_ms = context.now_ms + command.ttl_ms if command.ttl_ms else None
    context.emit(RESERVED, rid=command.rid, lines=line_maps(lines), ttl_ms=command.ttl_ms, expires_at_ms=expires_at_ms, ref=command.ref)
    return _reserve_reply(state.reservation(command.rid))


def _reserve_reply(reservation: Reservation) -> Reply:
    lines = [
        {"sku": sku, "loc": loc, "qty": qty, "available": available}
        for (sku, loc, qty), available in zip(reservation.lines, reservation.granted_available)
    ]
    # The original reply: the expiry the reserve granted, even if an extend has moved it since.
    expires_at_ms = reservation.created_at_ms + reservation.ttl_ms if reservation.ttl_ms else None
    return _ok(reservation.last_seq, rid=reservation.rid, lines=lines, expires_at_ms=expires_at_ms)


def _open_reservation(context: _Context, rid: str) -> Reservation | Reply:
    """The reservation, after expiring it if its time has passed (a late timer must not let a
    commit or extend through after `expires_at_ms`); or a `not_found` reply."""
    reservation = context.state.reservation(rid)
    if reservation is None:
        # seq = everything applied: an unknown rid may have been forgotten by a `forgotten` event
        # still in flight, and a crash must not bring back what this reply said is gone.
        return _error(context.state.seq, codes.NOT_FOUND, f"no reservation with rid {rid!r}")
    if reservation.state == HELD and reservation.expires_at_ms is not None and reservation.expires_at_ms <= context.now_ms:
        context.emit(EXPIRED, rid=rid, lines=line_maps(reservation.lines))
        reservation = context.state.reservation(rid)  # as the expiry left it
    return reservation


def _wrong_state(reservation: Reservation, wanted: str) -> Reply:
    return _error(
        reservation.last_seq, codes.INVALID_STATE,
        f"reservation {reservation.rid!r} is {reservation.state}; cannot {wanted}", state=reservation.state,
    )


def _release(context: _Context, command: Release) -> Reply:
    state = context.state
    record = state.reservations.get(command.rid)
    if record is not None and record[RECORD_STATE] == HELD and (
        record[RECORD_EXPIRES_AT_MS] is None or record[RECORD_EXPIRES_AT_MS] > context.now_ms
    ):  # the hot path: a held reservation, not due; the same decision as below, from the record
        context.emit(RELEASED, rid=command.rid, lines=[{"sku": sku, "loc": loc, "qty": qty} for sku, loc, qty in record_lines(record)])
        return {"ok": True, "rid": command.rid, "state": RELEASED, "seq": state.seq}
    reservation = _open_reservation(context, command.rid)
    if isinstance(reservation, dict):
        return reservation
    if reservation.state == RELEASED:
        return _ok(reservation.last_seq, rid=reservation.rid, state=RELEASED, duplicate=True)
    if reservation.state != HELD:
        return _wrong_state(reservation, "release")
    context.emit(RELEASED, rid=reservation.rid, lines=line_maps(reservation.lines))
    return {"ok": True, "rid": reservation.rid, "state": RELEASED, "seq": context.state.seq}


def _commit(context: _Context, command: Commit) -> Reply:
    reservation = _open_reservation(context, command.rid)
    if isinstance(reservation, dict):
        return reservation
    if reservation.state == COMMITTED:
        return _ok(reservation.last_seq, rid=reservation.rid, state=COMMITTED, lines=line_maps(reservation.committed), duplicate=True)
    if reservation.state != HELD:
        return _wrong_state(reservation, "commit")
    held = {(sku, loc): qty for sku, loc, qty in reservation.lines}
    if command.lines is None:
        shipped = dict(held)
    else:
        shipped = {}
        for line in command.lines:
            key = (line.sku, line.loc)
            if key not in held:
                return _error(reservation.last_seq, codes.INVALID, f"({line.sku!r}, {line.loc!r}) is not a line of reservation {reservation.rid!r}")
            if line.qty > held[key]:
                return _error(reservation.last_seq, codes.INVALID, f"cannot commit {line.qty} of ({line.sku!r}, {line.loc!r}): {held[key]} held")
            shipped[key] = line.qty
    for (sku, loc), qty in shipped.items():
        on_hand = context.state.stock(sku, loc).on_hand
        if qty > on_hand:
            # Goods cannot leave a location that (after damage or a count) does not have them.
            # The refusal reflects the stock and that the reservation is still held (e.g. extended).
            return _error(
                max(reservation.last_seq, context.stocks_seq(held)), codes.INVALID,
                f"cannot commit {qty} of ({sku!r}, {loc!r}): on_hand is {on_hand}; commit a short pick or record a receipt first",
            )
    committed = tuple((sku, loc, shipped.get((sku, loc), 0)) for sku, loc, _ in reservation.lines)
    context.emit(COMMITTED, rid=reservation.rid, lines=line_maps(committed))
    return _ok(context.state.seq, rid=reservation.rid, state=COMMITTED, lines=line_maps(committed))


def _extend(context: _Context, command: Extend) -> Reply:
    reservation = _open_reservation(context, command.rid)
    if isinstance(reservation, dict):
        return reservation
    if reservation.state != HELD:
        return _wrong_state(reservation, "extend")
    expires_at_ms = context.now_ms + command.ttl_ms
    context.emit(EXTENDED, rid=reservation.rid, ttl_ms=command.ttl_ms, expires_at_ms=expires_at_ms)
    return _ok(context.state.seq, rid=reservation.rid, expires_at_ms=expires_at_ms)


def _lookup(context: _Context, command: Lookup) -> Reply:
    reservation = _open_reservation(context, command.rid)
    if isinstance(reservation, dict):
        return reservation
    reply = _ok(
        reservation.last_seq, rid=reservation.rid, state=reservation.state, lines=line_maps(reservation.lines),
        ref=reservation.ref, expires_at_ms=reservation.expires_at_ms,
    )
    if reservation.committed is not None:
        reply["committed"] = line_maps(reservation.committed)
    return reply


def _expire(context: _Context, command: Expire) -> Reply:
    reservation = _open_reservation(context, command.rid)
    if isinstance(reservation, dict):
        return reservation
    return _ok(reservation.last_seq, rid=reservation.rid, state=reservation.state)


def _forget(context: _Context, command: Forget) -> Reply:
    cutoff_ms = command.closed_before_ms
    rids = _closed_before(context.state, cutoff_ms, command.limit)
    # Keys are remembered in the order they were used, so the old ones come first: stop at the
    # first recent one instead of scanning them all (a clock that stepped back only makes a key
    # wait longer to be forgotten, never shorter).
    keys = [
        key for key, _ in islice(
            takewhile(lambda item: packed_key_at_ms(item[1]) < cutoff_ms, context.state.keys.items()),
            command.limit,
        )
    ]
    if rids or keys:
        context.emit(FORGOTTEN, rids=rids, keys=keys)
    return _ok(context.state.seq, rids=len(rids), keys=len(keys))


def _closed_before(state: State, cutoff_ms: int, limit: int) -> list[str]:
    """Up to `limit` rids of reservations closed before `cutoff_ms`, oldest first, read from the
    close order: it stops at the first one closed at or after the cutoff (a clock that stepped
    back only makes a reservation wait longer to be forgotten, never shorter), and skips stale
    entries, at most `limit` of them per call, so one call's work is bounded either way."""
    rids: dict[str, None] = {}  # a rid closed twice (forgotten and reserved again) is listed once
    stale_left = limit
    reservations = state.reservations
    for rid in state.closed_order:
        record = reservations.get(rid)
        if record is None or record[RECORD_STATE] == HELD:
            stale_left -= 1
            if stale_left < 0:
                break
            continue
        closed_at_ms = record[RECORD_CLOSED_AT_MS]
        if closed_at_ms is None or closed_at_ms >= cutoff_ms:
            break
        rids[rid] = None
        if len(rids) >= limit:
            break
    return list(rids)


# -- stock -----------------------------------------------------------------------------------


def _retried(key: str, record: KeyRecord, payload_fingerprint: bytes, reply_fields: Callable[[tuple[int, ...]], dict[str, Any]]) -> Reply:
    """A request under a used key: the original reply again (rebuilt from the retry's fields and
    the remembered figures) if the payload is the same, else `conflict`."""
    if record.fingerprint != payload_fingerprint:
        return _error(record.last_seq, codes.CONFLICT, f"key {key!r} was already used for a different request")
    return _ok(record.last_seq, **reply_fields(record.figures), duplicate=True)


def _applied(context: _Context, key: str, reply_fields: Callable[[tuple[int, ...]], dict[str, Any]]) -> Reply:
    """The reply to a keyed request just applied: built from its key record, as a retry's is."""
    record = context.state.key_record(key)
    assert record is not None and record.last_seq == context.state.seq
    return _ok(context.state.seq, **reply_fields(record.figures))


def _adjust_reply(command: Adjust) -> Callable[[tuple[int, ...]], dict[str, Any]]:
    def fields(figures: tuple[int, ...]) -> dict[str, Any]:
        on_hand, reserved = figures
        return {"sku": command.sku, "loc": command.loc, "on_hand": on_hand, "reserved": reserved, "available": on_hand - reserved}
    return fields


def _count_reply(command: Count) -> Callable[[tuple[int, ...]], dict[str, Any]]:
    def fields(figures: tuple[int, ...]) -> dict[str, Any]:
        reserved, variance = figures
        on_hand = command.on_hand
        return {"sku": command.sku, "loc": command.loc, "on_hand": on_hand, "reserved": reserved, "available": on_hand - reserved, "variance": variance}
    return fields


def _transfer_reply(command: Transfer) -> Callable[[tuple[int, ...]], dict[str, Any]]:
    def fields(figures: tuple[int, ...]) -> dict[str, Any]:
        source_on_hand, source_reserved, target_on_hand, target_reserved = figures
        return {
            "from": {"loc": command.from_loc, "on_hand": source_on_hand, "reserved": source_reserved, "available": source_on_hand - source_reserved},
            "to": {"loc": command.to_loc, "on_hand": target_on_hand, "reserved": target_reserved, "available": target_on_hand - target_reserved},
        }
    return fields


def _adjust_batch_reply(command: AdjustBatch) -> Callable[[tuple[int, ...]], dict[str, Any]]:
    def fields(figures: tuple[int, ...]) -> dict[str, Any]:
        lines = [
            {"sku": sku, "loc": loc, "on_hand": on_hand, "reserved": reserved, "available": on_hand - reserved}
            for (sku, loc, _), on_hand, reserved in zip(command.lines, figures[0::2], figures[1::2])
        ]
        return {"lines": lines}
    return fields


def _count_batch_reply(command: CountBatch) -> Callable[[tuple[int, ...]], dict[str, Any]]:
    def fields(figures: tuple[int, ...]) -> dict[str, Any]:
        lines = [
            {"sku": sku, "loc": loc, "on_hand": on_hand, "reserved": reserved, "available": on_hand - reserved, "variance": variance}
            for (sku, loc, on_hand), reserved, variance in zip(command.lines, figures[0::2], figures[1::2])
        ]
        return {"lines": lines}
    return fields


def _adjust(context: _Context, command: Adjust) -> Reply:
    record = context.state.key_record(command.key)
    if record is not None:
        payload = adjust_fingerprint(command.sku, command.loc, command.delta, command.reason)
        return _retried(command.key, record, payload, _adjust_reply(command))
    stock = context.state.stock(command.sku, command.loc)
    if stock.on_hand + command.delta < 0:
        return _error(stock.last_seq, codes.INVALID, f"adjust by {command.delta} would make on_hand negative (on_hand is {stock.on_hand})")
    context.emit(ADJUSTED, key=command.key, sku=command.sku, loc=command.loc, delta=command.delta, reason=command.reason)
    return _applied(context, command.key, _adjust_reply(command))


def _count(context: _Context, command: Count) -> Reply:
    record = context.state.key_record(command.key)
    if record is not None:
        payload = count_fingerprint(command.sku, command.loc, command.on_hand, command.reason)
        return _retried(command.key, record, payload, _count_reply(command))
    variance = command.on_hand - context.state.stock(command.sku, command.loc).on_hand
    context.emit(COUNTED, key=command.key, sku=command.sku, loc=command.loc, on_hand=command.on_hand, variance=variance, reason=command.reason)
    return _applied(context, command.key, _count_reply(command))


def _adjust_batch(context: _Context, command: AdjustBatch) -> Reply:
    """All lines or none: one line that would make on_hand negative refuses the whole batch."""
    record = context.state.key_record(command.key)
    if record is not None:
        return _retried(command.key, record, adjust_batch_fingerprint(command.lines, command.reason), _adjust_batch_reply(command))
    stocks = context.state.stocks
    refused = []
    for index, (sku, loc, delta) in enumerate(command.lines):
        stock = stocks.get((sku, loc), ZERO_STOCK)
        if stock.on_hand + delta < 0:
            refused.append((index, sku, loc, delta, stock))
    if refused:
        index, sku, loc, delta, stock = refused[0]
        others = f" (and {len(refused) - 1} more lines)" if len(refused) > 1 else ""
        return _error(
            max(stock.last_seq for *_, stock in refused), codes.INVALID,
            f"lines[{index}] ({sku!r}, {loc!r}): adjust by {delta} would make on_hand negative (on_hand is {stock.on_hand}){others}; nothing was applied",
            lines=[{"line": index, "sku": sku, "loc": loc, "delta": delta, "on_hand": stock.on_hand} for index, sku, loc, delta, stock in refused],
        )
    lines = [{"sku": sku, "loc": loc, "delta": delta} for sku, loc, delta in command.lines]
    context.emit(ADJUSTED_BATCH, key=command.key, lines=lines, reason=command.reason)
    return _applied(context, command.key, _adjust_batch_reply(command))


def _count_batch(context: _Context, command: CountBatch) -> Reply:
    record = context.state.key_record(command.key)
    if record is not None:
        return _retried(command.key, record, count_batch_fingerprint(command.lines, command.reason), _count_batch_reply(command))
    stocks = context.state.stocks
    lines = [
        {"sku": sku, "loc": loc, "on_hand": on_hand, "variance": on_hand - stocks.get((sku, loc), ZERO_STOCK).on_hand}
        for sku, loc, on_hand in command.lines
    ]
    context.emit(COUNTED_BATCH, key=command.key, lines=lines, reason=command.reason)
    return _applied(context, command.key, _count_batch_reply(command))


def _transfer(context: _Context, command: Transfer) -> Reply:
    record = context.state.key_record(command.key)
    if record is not None:
        payload = transfer_fingerprint(command.sku, command.from_loc, command.to_loc, command.qty)
        return _retried(command.key, record, payload, _transfer_reply(command))
    if command.from_loc == command.to_loc:
        return _error(0, codes.INVALID, "transfer needs two different locations")
    available = context.available(command.sku, command.from_loc)
    if available < command.qty:
        seq = context.stocks_seq([(command.sku, command.from_loc), (command.sku, command.to_loc)])
        short = [{"sku": command.sku, "loc": command.from_loc, "requested": command.qty, "available": available}]
        return _error(seq, codes.INSUFFICIENT, f"only {available} available at {command.from_loc!r}", lines=short)
    context.emit(TRANSFERRED, key=command.key, sku=command.sku, **{"from": command.from_loc, "to": command.to_loc}, qty=command.qty)
    return _applied(context, command.key, _transfer_reply(command))


def _get(context: _Context, command: Get) -> Reply:
    stock = context.state.stock(command.sku, command.loc)
    return _ok(stock.last_seq, sku=command.sku, loc=command.loc, **stock.figures())


def _query(context: _Context, command: Query) -> Reply:
    locations = []
    total = {"on_hand": 0, "reserved": 0, "available": 0}
    seq = 0
    stocks = context.state.stocks
    for key in sorted(context.state.stock_keys_by_sku.get(command.sku, ())):  # one SKU: by location
        loc, stock = key[1], stocks[key]
        figures = stock.figures()
        locations.append({"loc": loc, **figures})
        for name, value in figures.items():
            total[name] += value
        seq = max(seq, stock.last_seq)
    return _ok(seq, sku=command.sku, locations=locations, total=total)


_DECIDERS = {
    Reserve: _reserve,
    Release: _release,
    Commit: _commit,
    Extend: _extend,
    Lookup: _lookup,
    Expire: _expire,
    Forget: _forget,
    Adjust: _adjust,
    Count: _count,
    AdjustBatch: _adjust_batch,
    CountBatch: _count_batch,
    Transfer: _transfer,
    Get: _get,
    Query: _query,
}

CORE_COMMANDS = tuple(_DECIDERS)

"""Events: the facts the log records, and `apply_event`, the only way state changes.

Live traffic applies the events that `decide` emits; recovery applies the events read back from
the log. Both call `apply_event`, so replay cannot disagree with live. An event is a plain map
(it is what the log stores and what `watch` pushes): `seq`, `ts_ms`, `type`, then its fields.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from .state import (
    COMMITTED,
    EXPIRED,
    HELD,
    RECORD_EXPIRES_AT_MS,
    RECORD_HEAD,
    RECORD_LAST_SEQ,
    RECORD_PER_LINE,
    RECORD_STATE,
    RELEASED,
    SHARED_INT_MAX,
    SHARED_INTS,
    KeyRecord,
    State,
    fingerprint,
    record_lines,
    reserve_fingerprint,
    shared_int,
)

Event = dict[str, Any]

RESERVED = "reserved"
EXTENDED = "extended"
ADJUSTED = "adjusted"
COUNTED = "counted"
ADJUSTED_BATCH = "adjusted_batch"
COUNTED_BATCH = "counted_batch"
TRANSFERRED = "transferred"
FORGOTTEN = "forgotten"
# `released`, `committed` and `expired` share their names with the reservation states.
EVENT_TYPES = frozenset({
    RESERVED, RELEASED, COMMITTED, EXPIRED, EXTENDED, ADJUSTED, COUNTED, ADJUSTED_BATCH, COUNTED_BATCH, TRANSFERRED, FORGOTTEN,
})

_REQUIRED_FIELDS: dict[str, tuple[str, ...]] = {
    RESERVED: ("rid", "lines", "ttl_ms", "expires_at_ms", "ref"),
    RELEASED: ("rid", "lines"),
    EXPIRED: ("rid", "lines"),
    COMMITTED: ("rid", "lines"),
    EXTENDED: ("rid", "ttl_ms", "expires_at_ms"),
    ADJUSTED: ("key", "sku", "loc", "delta", "reason"),
    COUNTED: ("key", "sku", "loc", "on_hand", "variance", "reason"),
    ADJUSTED_BATCH: ("key", "lines", "reason"),
    COUNTED_BATCH: ("key", "lines", "reason"),
    TRANSFERRED: ("key", "sku", "from", "to", "qty"),
    FORGOTTEN: ("rids", "keys"),
}


def check_event(event: Event) -> None:
    """Assert an event is well formed. Called before it is written and after it is read back."""
    assert isinstance(event, dict), f"event is a {type(event).__name__}"
    kind = event.get("type")
    assert kind in EVENT_TYPES, f"unknown event type {kind!r}"
    seq = event.get("seq")
    assert isinstance(seq, int) and seq >= 1, f"bad event seq {seq!r}"
    assert isinstance(event.get("ts_ms"), int), f"event {seq}: bad ts_ms"
    for name in _REQUIRED_FIELDS[kind]:
        assert name in event, f"event {seq} ({kind}) lacks field {name!r}"
    line_fields = _BATCH_LINE_FIELDS.get(kind)
    if line_fields is not None:
        lines = event["lines"]
        assert isinstance(lines, list) and lines, f"event {seq} ({kind}): lines must be a non-empty list"
        for line in lines:
            assert isinstance(line, dict) and line.keys() == line_fields, f"event {seq} ({kind}): bad line {line!r}"


_BATCH_LINE_FIELDS = {
    ADJUSTED_BATCH: {"sku", "loc", "delta"},
    COUNTED_BATCH: {"sku", "loc", "on_hand", "variance"},
}


def line_maps(lines) -> list[dict[str, Any]]:
    return [{"sku": sku, "loc": loc, "qty": qty} for sku, loc, qty in lines]


def line_tuples(lines: list[dict[str, Any]]) -> tuple[tuple[str, str, int], ...]:
    return tuple([(line["sku"], line["loc"], line["qty"]) for line in lines])


def apply_event(state: State, event: Event) -> State:
    """Apply one logged fact to `state` (in place) and return it. Never refuses: events are facts."""
    seq = event["seq"]
    assert seq == state.seq + 1, f"event seq {seq} does not follow state seq {state.seq}"
    _APPLIERS[event["type"]](state, event)
    state.seq = seq
    return state


def _apply_reserved(state: State, event: Event) -> None:
    rid, seq = event["rid"], event["seq"]
    assert rid not in state.reservations, f"event {seq}: rid {rid!r} reserved twice"
    stocks = state.stocks
    body: list = []
    units = 0
    for line in event["lines"]:
        sku, loc, qty = line["sku"], line["loc"], line["qty"]
        stock = stocks.get((sku, loc)) or state.stock_for_update(sku, loc)
        stock.reserved += qty
        stock.last_seq = seq
        units += qty
        body += (sku, loc, qty, stock.on_hand - stock.reserved, 0)
    state.held_reservations += 1
    state.held_units += units
    # A flat `Reservation` record (see `Reservation`).
    head = (rid, event["ttl_ms"], event["ref"], event["expires_at_ms"], event["ts_ms"], HELD, None, seq, False)
    state.reservations[rid] = head + tuple(body)


def _close(state: State, event: Event, new_state: str, committed: tuple | None) -> None:
    seq = event["seq"]
    record = state.reservations[event["rid"]]
    status = record[RECORD_STATE]
    assert status == HELD, f"event {seq}: {new_state} of a {status} reservation"
    committed_qty = {(sku, loc): qty for sku, loc, qty in committed} if committed is not None else None
    stocks = state.stocks
    body = list(record[RECORD_HEAD:]) if committed_qty is not None else None
    state.held_reservations -= 1
    for index, (sku, loc, qty) in enumerate(record_lines(record)):
        stock = stocks[(sku, loc)]
        stock.reserved -= qty
        state.held_units -= qty
        stock.last_seq = seq
        assert stock.reserved >= 0, f"event {seq}: reserved below zero at {(sku, loc)}"
        if committed_qty is not None:
            shipped = committed_qty.get((sku, loc), 0)
            assert 0 <= shipped <= qty, f"event {seq}: commits {shipped} of a {qty} hold"
            stock.on_hand = shared_int(stock.on_hand - shipped)
            assert stock.on_hand >= 0, f"event {seq}: on_hand below zero at {(sku, loc)}"
            body[index * RECORD_PER_LINE + 4] = shipped
    head = record[:RECORD_STATE] + (new_state, event["ts_ms"], seq, committed is not None)
    state.reservations[event["rid"]] = head + (record[RECORD_HEAD:] if body is None else tuple(body))
    state.closed_order.append(record[0])


def _apply_released(state: State, event: Event) -> None:
    _close(state, event, RELEASED, None)


def _apply_expired(state: State, event: Event) -> None:
    _close(state, event, EXPIRED, None)


def _apply_committed(state: State, event: Event) -> None:
    _close(state, event, COMMITTED, line_tuples(event["lines"]))


def _apply_extended(state: State, event: Event) -> None:
    record = state.reservations[event["rid"]]
    assert record[RECORD_STATE] == HELD
    # `ttl_ms` stays the one the reserve asked for: it is part of the reserve's fingerprint, so a
    # retry of the original reserve after an extend is still a duplicate, not a conflict.
    state.reservations[event["rid"]] = (
        record[:RECORD_EXPIRES_AT_MS] + (event["expires_at_ms"],) + record[RECORD_EXPIRES_AT_MS + 1 : RECORD_LAST_SEQ]
        + (event["seq"],) + record[RECORD_LAST_SEQ + 1 :]
    )


# A used key is remembered as a `KeyRecord`: the payload's fingerprint and the figures after the
# change, from which (with the retry's own fields) `decide` rebuilds the original reply:
#   adjust:          (on_hand, reserved)
#   count:           (reserved, variance)                  on_hand is the counted figure
#   transfer:        (from on_hand, from reserved, to on_hand, to reserved)
#   adjust batch:    (on_hand, reserved) per line, in line order
#   count batch:     (reserved, variance) per line, in line order


def _remember_key(state: State, event: Event, payload_fingerprint: bytes, figures: tuple[int, ...]) -> None:
    state.remember_key(event["key"], KeyRecord(payload_fingerprint, event["ts_ms"], event["seq"], figures))


def _apply_adjusted(state: State, event: Event) -> None:
    sku, loc = event["sku"], event["loc"]
    stock = state.stock_for_update(sku, loc)
    stock.on_hand = shared_int(stock.on_hand + event["delta"])
    assert stock.on_hand >= 0, f"event {event['seq']}: on_hand below zero at {(sku, loc)}"
    stock.last_seq = event["seq"]
    _remember_key(state, event, adjust_fingerprint(sku, loc, event["delta"], event["reason"]), (stock.on_hand, stock.reserved))


def _apply_counted(state: State, event: Event) -> None:
    sku, loc = event["sku"], event["loc"]
    stock = state.stock_for_update(sku, loc)
    assert stock.on_hand + event["variance"] == event["on_hand"], f"event {event['seq']}: variance does not match"
    stock.on_hand = shared_int(event["on_hand"])
    stock.last_seq = event["seq"]
    _remember_key(state, event, count_fingerprint(sku, loc, event["on_hand"], event["reason"]), (stock.reserved, event["variance"]))


def _apply_adjusted_batch(state: State, event: Event) -> None:
    seq = event["seq"]
    stocks = state.stocks  # the loops below run per line of up to thousands: locals, no calls
    shared_ints = SHARED_INTS  # `shared_int`, written out
    lines = []
    figures: list[int] = []
    for line in event["lines"]:
        sku, loc, delta = line["sku"], line["loc"], line["delta"]
        stock = stocks.get((sku, loc))
        if stock is None:
            stock = state.stock_for_update(sku, loc)
        on_hand = stock.on_hand + delta
        stock.on_hand = shared_ints[on_hand] if 0 <= on_hand <= SHARED_INT_MAX else on_hand
        assert stock.on_hand >= 0, f"event {seq}: on_hand below zero at {(sku, loc)}"
        stock.last_seq = seq
        lines.append((sku, loc, delta))
        figures.append(stock.on_hand)
        figures.append(stock.reserved)
    _remember_key(state, event, adjust_batch_fingerprint(lines, event["reason"]), tuple(figures))


def _apply_counted_batch(state: State, event: Event) -> None:
    seq = event["seq"]
    stocks = state.stocks
    shared_ints = SHARED_INTS
    lines = []
    figures: list[int] = []
    for line in event["lines"]:
        sku, loc, on_hand, variance = line["sku"], line["loc"], line["on_hand"], line["variance"]
        stock = stocks.get((sku, loc))
        if stock is None:
            stock = state.stock_for_update(sku, loc)
        assert stock.on_hand + variance == on_hand, f"event {seq}: variance does not match at {(sku, loc)}"
        stock.on_hand = shared_ints[on_hand] if 0 <= on_hand <= SHARED_INT_MAX else on_hand
        stock.last_seq = seq
        lines.append((sku, loc, on_hand))
        figures.append(stock.reserved)
        figures.append(variance)
    _remember_key(state, event, count_batch_fingerprint(lines, event["reason"]), tuple(figures))


def _apply_transferred(state: State, event: Event) -> None:
    sku, qty = event["sku"], event["qty"]
    source = state.stock_for_update(sku, event["from"])
    target = state.stock_for_update(sku, event["to"])
    assert source is not target
    source.on_hand = shared_int(source.on_hand - qty)
    target.on_hand = shared_int(target.on_hand + qty)
    assert source.on_hand >= 0, f"event {event['seq']}: on_hand below zero at {(sku, event['from'])}"
    source.last_seq = target.last_seq = event["seq"]
    figures = (source.on_hand, source.reserved, target.on_hand, target.reserved)
    _remember_key(state, event, transfer_fingerprint(sku, event["from"], event["to"], qty), figures)


def _apply_forgotten(state: State, event: Event) -> None:
    for rid in event["rids"]:
        record = state.reservations.pop(rid)
        assert record[RECORD_STATE] != HELD, f"event {event['seq']}: forgot held reservation {rid!r}"
    for key in event["keys"]:
        del state.keys[key]
    drop_stale_closed(state)


def drop_stale_closed(state: State) -> None:
    """Drop the entries at the front of `state.closed_order` that no longer name a closed
    reservation (forgotten, or forgotten and reserved again: its next close appends it anew)."""
    closed_order, reservations = state.closed_order, state.reservations
    while closed_order:
        record = reservations.get(closed_order[0])
        if record is not None and record[RECORD_STATE] != HELD:
            return
        closed_order.popleft()


_APPLIERS: dict[str, Callable[[State, Event], None]] = {
    RESERVED: _apply_reserved,
    RELEASED: _apply_released,
    EXPIRED: _apply_expired,
    COMMITTED: _apply_committed,
    EXTENDED: _apply_extended,
    ADJUSTED: _apply_adjusted,
    COUNTED: _apply_counted,
    ADJUSTED_BATCH: _apply_adjusted_batch,
    COUNTED_BATCH: _apply_counted_batch,
    TRANSFERRED: _apply_transferred,
    FORGOTTEN: _apply_forgotten,
}


# Fingerprints of keyed payloads. The single ops digest the tuples that snapshot format 1 kept
# whole, so a format 1 record converts to the same fingerprint (`state._key_record_from_format_1`).
# A batch's payload is its lines in order and its reason: the same lines in another order are
# another payload (`conflict`), which keeps the original reply's line order for a retry.


def adjust_fingerprint(sku: str, loc: str, delta: int, reason: str) -> bytes:
    """Fingerprint of a single `adjust`."""
    return fingerprint("adjust", sku, loc, delta, reason)


def count_fingerprint(sku: str, loc: str, on_hand: int, reason: str | None) -> bytes:
    """Fingerprint of a single `count`."""
    return fingerprint("count", sku, loc, on_hand, reason)


def transfer_fingerprint(sku: str, source: str, target: str, qty: int) -> bytes:
    """Fingerprint of a `transfer`."""
    return fingerprint("transfer", sku, source, target, qty)


def adjust_batch_fingerprint(lines: Sequence[tuple[str, str, int]], reason: str) -> bytes:
    """Fingerprint of a batch `adjust`: its `(sku, loc, delta)` lines in order, and its reason."""
    return fingerprint("adjust_batch", lines, reason)


def count_batch_fingerprint(lines: Sequence[tuple[str, str, int]], reason: str | None) -> bytes:
    """Fingerprint of a batch `count`: its `(sku, loc, on_hand)` lines in order, and its reason."""
    return fingerprint("count_batch", lines, reason)


__all__ = ["Event", "apply_event", "check_event", "reserve_fingerprint", "EVENT_TYPES"]

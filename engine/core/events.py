"""Events: the facts the log records, and `apply_event`, the only way state changes.

Live traffic applies the events that `decide` emits; recovery applies the events read back from
the log. Both call `apply_event`, so replay cannot disagree with live. An event is a plain map
(it is what the log stores and what `watch` pushes): `seq`, `ts_ms`, `type`, then its fields.
"""

from __future__ import annotations

from typing import Any, Callable

from .state import (
    COMMITTED,
    EXPIRED,
    HELD,
    RELEASED,
    KeyRecord,
    Reservation,
    State,
    reserve_fingerprint,
)

Event = dict[str, Any]

RESERVED = "reserved"
EXTENDED = "extended"
ADJUSTED = "adjusted"
COUNTED = "counted"
TRANSFERRED = "transferred"
FORGOTTEN = "forgotten"
# `released`, `committed` and `expired` share their names with the reservation states.
EVENT_TYPES = frozenset({RESERVED, RELEASED, COMMITTED, EXPIRED, EXTENDED, ADJUSTED, COUNTED, TRANSFERRED, FORGOTTEN})

_REQUIRED_FIELDS: dict[str, tuple[str, ...]] = {
    RESERVED: ("rid", "lines", "ttl_ms", "expires_at_ms", "ref"),
    RELEASED: ("rid", "lines"),
    EXPIRED: ("rid", "lines"),
    COMMITTED: ("rid", "lines"),
    EXTENDED: ("rid", "ttl_ms", "expires_at_ms"),
    ADJUSTED: ("key", "sku", "loc", "delta", "reason"),
    COUNTED: ("key", "sku", "loc", "on_hand", "variance", "reason"),
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


def line_maps(lines) -> list[dict[str, Any]]:
    return [{"sku": sku, "loc": loc, "qty": qty} for sku, loc, qty in lines]


def line_tuples(lines: list[dict[str, Any]]) -> tuple[tuple[str, str, int], ...]:
    return tuple((line["sku"], line["loc"], line["qty"]) for line in lines)


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
    lines = line_tuples(event["lines"])
    stocks = state.stocks
    granted = []
    for sku, loc, qty in lines:
        stock = stocks.get((sku, loc)) or state.stock_for_update(sku, loc)
        stock.reserved += qty
        stock.last_seq = seq
        granted.append(stock.on_hand - stock.reserved)
    state.reservations[rid] = Reservation(
        rid, lines, event["ttl_ms"], event["ref"], event["expires_at_ms"], event["ts_ms"], tuple(granted), HELD, None, None, seq,
    )


def _close(state: State, event: Event, new_state: str, committed: tuple | None) -> None:
    seq = event["seq"]
    reservation = state.reservations[event["rid"]]
    assert reservation.state == HELD, f"event {seq}: {new_state} of a {reservation.state} reservation"
    committed_qty = {(sku, loc): qty for sku, loc, qty in committed} if committed else None
    stocks = state.stocks
    for sku, loc, qty in reservation.lines:
        stock = stocks[(sku, loc)]
        stock.reserved -= qty
        stock.last_seq = seq
        assert stock.reserved >= 0, f"event {seq}: reserved below zero at {(sku, loc)}"
        if committed_qty is not None:
            shipped = committed_qty.get((sku, loc), 0)
            assert 0 <= shipped <= qty, f"event {seq}: commits {shipped} of a {qty} hold"
            stock.on_hand -= shipped
            assert stock.on_hand >= 0, f"event {seq}: on_hand below zero at {(sku, loc)}"
    reservation.state = new_state
    reservation.closed_at_ms = event["ts_ms"]
    reservation.committed = committed
    reservation.last_seq = seq


def _apply_released(state: State, event: Event) -> None:
    _close(state, event, RELEASED, None)


def _apply_expired(state: State, event: Event) -> None:
    _close(state, event, EXPIRED, None)


def _apply_committed(state: State, event: Event) -> None:
    _close(state, event, COMMITTED, line_tuples(event["lines"]))


def _apply_extended(state: State, event: Event) -> None:
    reservation = state.reservations[event["rid"]]
    assert reservation.state == HELD
    # `ttl_ms` stays the one the reserve asked for: it is part of the reserve's fingerprint, so a
    # retry of the original reserve after an extend is still a duplicate, not a conflict.
    reservation.expires_at_ms = event["expires_at_ms"]
    reservation.last_seq = event["seq"]


def _remember_key(state: State, event: Event, fingerprint: tuple, reply: dict[str, Any]) -> None:
    key = event["key"]
    assert key not in state.keys, f"event {event['seq']}: key {key!r} used twice"
    state.keys[key] = KeyRecord(key, fingerprint, reply, event["ts_ms"], event["seq"])


def _apply_adjusted(state: State, event: Event) -> None:
    sku, loc = event["sku"], event["loc"]
    stock = state.stock_for_update(sku, loc)
    stock.on_hand += event["delta"]
    assert stock.on_hand >= 0, f"event {event['seq']}: on_hand below zero at {(sku, loc)}"
    stock.last_seq = event["seq"]
    _remember_key(state, event, adjust_fingerprint(sku, loc, event["delta"], event["reason"]), {"sku": sku, "loc": loc, **stock.figures()})


def _apply_counted(state: State, event: Event) -> None:
    sku, loc = event["sku"], event["loc"]
    stock = state.stock_for_update(sku, loc)
    assert stock.on_hand + event["variance"] == event["on_hand"], f"event {event['seq']}: variance does not match"
    stock.on_hand = event["on_hand"]
    stock.last_seq = event["seq"]
    reply = {"sku": sku, "loc": loc, **stock.figures(), "variance": event["variance"]}
    _remember_key(state, event, count_fingerprint(sku, loc, event["on_hand"], event["reason"]), reply)


def _apply_transferred(state: State, event: Event) -> None:
    sku, qty = event["sku"], event["qty"]
    source = state.stock_for_update(sku, event["from"])
    target = state.stock_for_update(sku, event["to"])
    assert source is not target
    source.on_hand -= qty
    target.on_hand += qty
    assert source.on_hand >= 0, f"event {event['seq']}: on_hand below zero at {(sku, event['from'])}"
    source.last_seq = target.last_seq = event["seq"]
    reply = {"from": {"loc": event["from"], **source.figures()}, "to": {"loc": event["to"], **target.figures()}}
    _remember_key(state, event, transfer_fingerprint(sku, event["from"], event["to"], qty), reply)


def _apply_forgotten(state: State, event: Event) -> None:
    for rid in event["rids"]:
        reservation = state.reservations.pop(rid)
        assert reservation.state != HELD, f"event {event['seq']}: forgot held reservation {rid!r}"
    for key in event["keys"]:
        del state.keys[key]


_APPLIERS: dict[str, Callable[[State, Event], None]] = {
    RESERVED: _apply_reserved,
    RELEASED: _apply_released,
    EXPIRED: _apply_expired,
    COMMITTED: _apply_committed,
    EXTENDED: _apply_extended,
    ADJUSTED: _apply_adjusted,
    COUNTED: _apply_counted,
    TRANSFERRED: _apply_transferred,
    FORGOTTEN: _apply_forgotten,
}


def adjust_fingerprint(sku: str, loc: str, delta: int, reason: str) -> tuple:
    return ("adjust", sku, loc, delta, reason)


def count_fingerprint(sku: str, loc: str, on_hand: int, reason: str | None) -> tuple:
    return ("count", sku, loc, on_hand, reason)


def transfer_fingerprint(sku: str, source: str, target: str, qty: int) -> tuple:
    return ("transfer", sku, source, target, qty)


__all__ = ["Event", "apply_event", "check_event", "reserve_fingerprint", "EVENT_TYPES"]

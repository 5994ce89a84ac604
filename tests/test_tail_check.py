"""`TailCheck`: the long-lived snapshot builder's check after each replayed tail finds a broken
invariant in what the tail changed (the stateful core test replays every run through it too)."""

from __future__ import annotations

import pytest

from engine.core import State, apply_event, check_invariants
from engine.core.state import RECORD_LAST_SEQ
from engine.core.tail_check import TailCheck


def _events(first_seq: int, *bodies: dict) -> list[dict]:
    return [{"seq": seq, "ts_ms": seq, **body} for seq, body in enumerate(bodies, start=first_seq)]


def _adjust(key: str, sku: str, delta: int) -> dict:
    return {"type": "adjusted", "key": key, "sku": sku, "loc": "w", "delta": delta, "reason": "receipt"}


def _reserve(rid: str, sku: str, qty: int) -> dict:
    return {"type": "reserved", "rid": rid, "lines": [{"sku": sku, "loc": "w", "qty": qty}], "ttl_ms": 0, "expires_at_ms": None, "ref": None}


def _release(rid: str, sku: str, qty: int) -> dict:
    return {"type": "released", "rid": rid, "lines": [{"sku": sku, "loc": "w", "qty": qty}]}


def _apply(state: State, events: list[dict]) -> State:
    for event in events:
        apply_event(state, event)
    return state


@pytest.fixture
def checked() -> tuple[State, TailCheck]:
    state = _apply(State(), _events(1, _adjust("k1", "a", 10), _adjust("k2", "b", 10), _reserve("r1", "a", 3), _reserve("r2", "b", 2)))
    check_invariants(state)  # what a TailCheck is made on
    return state, TailCheck(state)


def test_a_correct_tail_passes_and_only_what_it_touched_is_checked(checked):
    state, check = checked
    _apply(state, _events(5, _release("r1", "a", 3), _reserve("r3", "a", 4)))
    assert check.check(state) == 1  # ("a", "w") only
    _apply(state, _events(7, {"type": "forgotten", "rids": ["r1"], "keys": ["k1"]}))
    assert check.check(state) == 0
    assert check.check(state) == 0  # nothing new


def test_reserved_out_of_step_with_the_held_lines_is_found(checked):
    state, check = checked
    _apply(state, _events(5, _reserve("r3", "a", 1)))
    state.stocks[("a", "w")].reserved += 1
    with pytest.raises(AssertionError, match="reserved 5 != held lines 4"):
        check.check(state)


def test_a_record_changed_behind_its_stock_is_found(checked):
    state, check = checked
    record = state.reservations["r2"]
    state.seq = 5  # as an event 5 that changed the hold and not the stock would leave it
    state.reservations["r2"] = record[:RECORD_LAST_SEQ] + (5,) + record[RECORD_LAST_SEQ + 1 : -3] + (5,) + record[-2:]  # qty 2 -> 5
    with pytest.raises(AssertionError, match=r"\('b', 'w'\): reserved 2 != held lines 5"):
        check.check(state)


def test_held_counts_out_of_step_are_found(checked):
    state, check = checked
    _apply(state, _events(5, _release("r1", "a", 3)))
    state.held_units += 1
    with pytest.raises(AssertionError, match="held counts"):
        check.check(state)


def test_a_forgotten_held_reservation_is_found(checked):
    state, check = checked
    del state.reservations["r2"]
    with pytest.raises(AssertionError, match=r"reserved 2 != held lines 0"):
        check.check(state)

"""Example tests of each op's rules (shared/PROTOCOL.md) against the pure core, `engine.core.apply`."""

from __future__ import annotations

import pytest

from engine.core import (
    COMMITTED,
    EXPIRED,
    HELD,
    RELEASED,
    Expire,
    Forget,
    State,
    apply,
    apply_event,
    check_event,
    check_invariants,
    held_by_stock,
)
from protocol import Adjust, Commit, Count, Extend, Get, Line, Lookup, Query, Release, Reserve, Transfer

NOW = 1_000


def do(state: State, command, now: int = NOW):
    """Apply one command; check what must always hold; return (reply without seq/message, events)."""
    seq_before = state.seq
    _, events, reply = apply(state, command, now)
    check_invariants(state)
    for offset, event in enumerate(events, start=1):
        check_event(event)
        assert event["seq"] == seq_before + offset
        assert event["ts_ms"] == now
    assert state.seq == seq_before + len(events)
    assert reply["seq"] <= state.seq
    if events:
        assert reply["seq"] == events[-1]["seq"]
    if reply["ok"]:
        assert "error" not in reply
    else:
        assert isinstance(reply["message"], str) and reply["message"]
    return plain(reply), events


def plain(reply: dict) -> dict:
    return {name: value for name, value in reply.items() if name not in ("seq", "message")}


def ok(state: State, command, now: int = NOW) -> dict:
    reply, _ = do(state, command, now)
    assert reply["ok"] is True, reply
    return reply


def L(sku: str, loc: str, qty: int) -> Line:  # noqa: N802 - reads like the wire's line map
    return Line(sku, loc, qty)


def stocked(*figures: tuple[str, str, int]) -> State:
    state = State()
    for index, (sku, loc, qty) in enumerate(figures):
        ok(state, Adjust(f"receipt-{index}", sku, loc, qty, "receipt"))
    return state


def figures(state: State, sku: str, loc: str) -> tuple[int, int, int]:
    reply = ok(state, Get(sku, loc))
    assert (reply["sku"], reply["loc"]) == (sku, loc)
    return reply["on_hand"], reply["reserved"], reply["available"]


def types(events) -> list[str]:
    return [event["type"] for event in events]


# -- reserve -----------------------------------------------------------------------------------


def test_reserve_holds_every_line_and_reports_available_after_the_hold():
    state = stocked(("A", "X", 10), ("B", "X", 5))
    reply, events = do(state, Reserve("r1", (L("A", "X", 3), L("B", "X", 5)), ref="order-1"))
    assert reply == {
        "ok": True,
        "rid": "r1",
        "lines": [
            {"sku": "A", "loc": "X", "qty": 3, "available": 7},
            {"sku": "B", "loc": "X", "qty": 5, "available": 0},
        ],
        "expires_at_ms": None,
    }
    assert types(events) == ["reserved"]
    assert events[0]["rid"] == "r1" and events[0]["ref"] == "order-1"
    assert figures(state, "A", "X") == (10, 3, 7)
    assert figures(state, "B", "X") == (5, 5, 0)
    assert held_by_stock(state) == {("A", "X"): 3, ("B", "X"): 5}


def test_reserve_with_ttl_expires_at_now_plus_ttl():
    state = stocked(("A", "X", 10))
    reply = ok(state, Reserve("r1", (L("A", "X", 1),), ttl_ms=500), now=1_234)
    assert reply["expires_at_ms"] == 1_734


def test_reserve_is_all_or_nothing_and_lists_every_short_line():
    state = stocked(("A", "X", 10), ("B", "X", 2))
    ok(state, Reserve("r0", (L("A", "X", 4),)))  # A/X available 6
    seq = state.seq
    reply, events = do(state, Reserve("r1", (L("A", "X", 6), L("B", "X", 3), L("C", "X", 1), L("A", "Y", 2))))
    assert reply == {
        "ok": False,
        "error": "insufficient",
        "lines": [
            {"sku": "B", "loc": "X", "requested": 3, "available": 2},
            {"sku": "C", "loc": "X", "requested": 1, "available": 0},
            {"sku": "A", "loc": "Y", "requested": 2, "available": 0},
        ],
    }
    assert events == [] and state.seq == seq
    # Nothing is held, not even the lines that fit.
    assert figures(state, "A", "X") == (10, 4, 6)
    assert figures(state, "B", "X") == (2, 0, 2)
    assert "r1" not in state.reservations
    assert ("C", "X") not in state.stocks and ("A", "Y") not in state.stocks


def test_reserve_exactly_the_available_quantity_is_granted_one_more_is_not():
    state = stocked(("A", "X", 5))
    reply, _ = do(state, Reserve("r1", (L("A", "X", 6),)))
    assert reply["error"] == "insufficient"
    assert reply["lines"] == [{"sku": "A", "loc": "X", "requested": 6, "available": 5}]
    assert ok(state, Reserve("r1", (L("A", "X", 5),)))["lines"][0]["available"] == 0
    reply, _ = do(state, Reserve("r2", (L("A", "X", 1),)))
    assert reply["lines"] == [{"sku": "A", "loc": "X", "requested": 1, "available": 0}]


def test_failed_reserve_leaves_no_trace_so_its_rid_can_be_retried():
    state = stocked(("A", "X", 2))
    reply, _ = do(state, Reserve("r1", (L("A", "X", 5),)))
    assert reply["error"] == "insufficient"
    assert do(state, Lookup("r1"))[0]["error"] == "not_found"
    ok(state, Adjust("more", "A", "X", 3, "receipt"))
    # Same rid, even with a different payload, is a fresh request: no conflict, no duplicate.
    reply, events = do(state, Reserve("r1", (L("A", "X", 5),), ttl_ms=100))
    assert reply == {"ok": True, "rid": "r1", "lines": [{"sku": "A", "loc": "X", "qty": 5, "available": 0}], "expires_at_ms": NOW + 100}
    assert types(events) == ["reserved"]


def test_reserve_retry_with_same_payload_returns_the_original_reply_as_duplicate():
    state = stocked(("A", "X", 10), ("B", "X", 10))
    command = Reserve("r1", (L("A", "X", 3), L("B", "X", 4)), ttl_ms=1_000, ref="o-1")
    original = ok(state, command)
    ok(state, Reserve("r2", (L("A", "X", 2),)))  # availability moves on; the retry still shows the original
    seq = state.seq
    reply, events = do(state, command, now=NOW + 10)
    assert reply == {**original, "duplicate": True}
    assert events == [] and state.seq == seq
    # Same lines in another order name the same reservation.
    reordered = Reserve("r1", (L("B", "X", 4), L("A", "X", 3)), ttl_ms=1_000, ref="o-1")
    assert do(state, reordered, now=NOW + 10)[0] == {**original, "duplicate": True}
    assert figures(state, "A", "X") == (10, 5, 5)


@pytest.mark.parametrize(
    "other",
    [
        Reserve("r1", (L("A", "X", 4),), ttl_ms=1_000, ref="o-1"),  # qty
        Reserve("r1", (L("A", "X", 3), L("B", "X", 1)), ttl_ms=1_000, ref="o-1"),  # extra line
        Reserve("r1", (L("A", "Y", 3),), ttl_ms=1_000, ref="o-1"),  # location
        Reserve("r1", (L("A", "X", 3),), ttl_ms=0, ref="o-1"),  # ttl
        Reserve("r1", (L("A", "X", 3),), ttl_ms=1_000, ref=None),  # ref
    ],
)
def test_reserve_retry_with_a_different_payload_is_a_conflict(other):
    state = stocked(("A", "X", 10), ("B", "X", 10), ("A", "Y", 10))
    ok(state, Reserve("r1", (L("A", "X", 3),), ttl_ms=1_000, ref="o-1"))
    seq = state.seq
    reply, events = do(state, other)
    assert reply == {"ok": False, "error": "conflict"}
    assert events == [] and state.seq == seq
    assert figures(state, "A", "X") == (10, 3, 7)


def test_reserve_retry_after_the_reservation_closed_is_still_a_duplicate():
    state = stocked(("A", "X", 10))
    command = Reserve("r1", (L("A", "X", 3),), ttl_ms=500)
    original = ok(state, command)
    ok(state, Release("r1"))
    reply, events = do(state, command, now=NOW + 1)
    assert reply == {**original, "duplicate": True}
    assert events == []
    assert figures(state, "A", "X") == (10, 0, 10)  # not held again


def test_reserve_retry_after_extend_is_still_a_duplicate_of_the_original_reply():
    state = stocked(("A", "X", 10))
    command = Reserve("r1", (L("A", "X", 3),), ttl_ms=500)
    original = ok(state, command)
    assert original["expires_at_ms"] == NOW + 500
    assert ok(state, Extend("r1", 2_000), now=NOW + 100)["expires_at_ms"] == NOW + 2_100
    reply, events = do(state, command, now=NOW + 200)
    assert reply == {**original, "duplicate": True}
    assert events == []
    # A retry with the extension's ttl is not the original request.
    assert do(state, Reserve("r1", (L("A", "X", 3),), ttl_ms=2_000))[0]["error"] == "conflict"


# -- release -----------------------------------------------------------------------------------


def test_release_returns_the_hold_and_a_second_release_is_a_duplicate():
    state = stocked(("A", "X", 10))
    ok(state, Reserve("r1", (L("A", "X", 4),)))
    reply, events = do(state, Release("r1"))
    assert reply == {"ok": True, "rid": "r1", "state": "released"}
    assert types(events) == ["released"]
    assert figures(state, "A", "X") == (10, 0, 10)
    reply, events = do(state, Release("r1"))
    assert reply == {"ok": True, "rid": "r1", "state": "released", "duplicate": True}
    assert events == []
    assert figures(state, "A", "X") == (10, 0, 10)


@pytest.mark.parametrize(
    "close, at, closed_state",
    [(Commit("r1"), NOW + 10, COMMITTED), (Expire("r1"), NOW + 60, EXPIRED)],
)
def test_release_from_another_closed_state_is_invalid_state(close, at, closed_state):
    state = stocked(("A", "X", 10))
    ok(state, Reserve("r1", (L("A", "X", 4),), ttl_ms=50))
    assert ok(state, close, now=at)["state"] == closed_state
    on_hand = figures(state, "A", "X")
    reply, events = do(state, Release("r1"), now=NOW + 70)
    assert reply == {"ok": False, "error": "invalid_state", "state": closed_state}
    assert events == []
    assert figures(state, "A", "X") == on_hand


def test_release_of_an_unknown_rid_is_not_found():
    reply, events = do(State(), Release("nope"))
    assert reply == {"ok": False, "error": "not_found"}
    assert events == []


# -- commit ------------------------------------------------------------------------------------


def test_commit_in_full_ships_every_line_and_a_second_commit_is_a_duplicate():
    state = stocked(("A", "X", 10), ("B", "Y", 6))
    ok(state, Reserve("r1", (L("A", "X", 4), L("B", "Y", 6))))
    ok(state, Reserve("r2", (L("A", "X", 1),)))
    reply, events = do(state, Commit("r1"))
    committed = [{"sku": "A", "loc": "X", "qty": 4}, {"sku": "B", "loc": "Y", "qty": 6}]
    assert reply == {"ok": True, "rid": "r1", "state": "committed", "lines": committed}
    assert types(events) == ["committed"]
    assert figures(state, "A", "X") == (6, 1, 5)
    assert figures(state, "B", "Y") == (0, 0, 0)
    reply, events = do(state, Commit("r1"))
    assert reply == {"ok": True, "rid": "r1", "state": "committed", "lines": committed, "duplicate": True}
    assert events == []
    assert figures(state, "A", "X") == (6, 1, 5)


def test_commit_with_a_short_pick_ships_what_was_picked_and_releases_the_rest():
    state = stocked(("A", "X", 10), ("B", "X", 5), ("C", "X", 7))
    ok(state, Reserve("r1", (L("A", "X", 5), L("B", "X", 3), L("C", "X", 2))))
    reply, events = do(state, Commit("r1", (L("A", "X", 2), L("C", "X", 0))))
    assert reply == {
        "ok": True,
        "rid": "r1",
        "state": "committed",
        "lines": [
            {"sku": "A", "loc": "X", "qty": 2},
            {"sku": "B", "loc": "X", "qty": 0},  # not named: nothing picked, hold released
            {"sku": "C", "loc": "X", "qty": 0},
        ],
    }
    assert types(events) == ["committed"]
    assert figures(state, "A", "X") == (8, 0, 8)
    assert figures(state, "B", "X") == (5, 0, 5)
    assert figures(state, "C", "X") == (7, 0, 7)
    lookup = ok(state, Lookup("r1"))
    assert lookup["state"] == "committed"
    assert lookup["lines"] == [{"sku": "A", "loc": "X", "qty": 5}, {"sku": "B", "loc": "X", "qty": 3}, {"sku": "C", "loc": "X", "qty": 2}]
    assert lookup["committed"] == reply["lines"]


def test_commit_lines_at_exactly_the_held_qty_ship_in_full():
    state = stocked(("A", "X", 10))
    ok(state, Reserve("r1", (L("A", "X", 5),)))
    assert ok(state, Commit("r1", (L("A", "X", 5),)))["lines"] == [{"sku": "A", "loc": "X", "qty": 5}]
    assert figures(state, "A", "X") == (5, 0, 5)


def test_commit_retried_with_its_short_pick_is_a_duplicate_of_the_original():
    state = stocked(("A", "X", 10), ("B", "X", 10))
    ok(state, Reserve("r1", (L("A", "X", 5), L("B", "X", 3))))
    command = Commit("r1", (L("A", "X", 2),))
    original = ok(state, command)
    reply, events = do(state, command)
    assert reply == {**original, "duplicate": True}
    assert reply["lines"] == [{"sku": "A", "loc": "X", "qty": 2}, {"sku": "B", "loc": "X", "qty": 0}]
    assert events == []
    assert figures(state, "A", "X") == (8, 0, 8)


@pytest.mark.parametrize(
    "lines",
    [
        (L("A", "Y", 1),),  # a location the reservation does not hold
        (L("B", "X", 1),),  # a SKU the reservation does not hold
        (L("A", "X", 6),),  # more than held
        (L("A", "X", 1), L("B", "X", 0)),  # one good line does not excuse a foreign one
    ],
)
def test_commit_lines_naming_a_foreign_sku_location_or_above_the_held_qty_are_invalid(lines):
    state = stocked(("A", "X", 10), ("A", "Y", 10), ("B", "X", 10))
    ok(state, Reserve("r1", (L("A", "X", 5),)))
    seq = state.seq
    reply, events = do(state, Commit("r1", lines))
    assert reply == {"ok": False, "error": "invalid"}
    assert events == [] and state.seq == seq
    assert state.reservation("r1").state == HELD
    assert figures(state, "A", "X") == (10, 5, 5)
    assert ok(state, Commit("r1"))["lines"] == [{"sku": "A", "loc": "X", "qty": 5}]


def test_commit_cannot_ship_more_than_is_on_hand_after_a_shortage():
    state = stocked(("A", "X", 10))
    ok(state, Reserve("r1", (L("A", "X", 8),)))
    ok(state, Adjust("damage", "A", "X", -5, "damage"))
    assert figures(state, "A", "X") == (5, 8, -3)
    reply, events = do(state, Commit("r1"))
    assert reply == {"ok": False, "error": "invalid"}
    assert events == []
    assert ok(state, Commit("r1", (L("A", "X", 5),)))["lines"] == [{"sku": "A", "loc": "X", "qty": 5}]
    assert figures(state, "A", "X") == (0, 0, 0)


@pytest.mark.parametrize(
    "close, at, closed_state",
    [(Release("r1"), NOW + 10, RELEASED), (Expire("r1"), NOW + 60, EXPIRED)],
)
def test_commit_from_another_closed_state_is_invalid_state(close, at, closed_state):
    state = stocked(("A", "X", 10))
    ok(state, Reserve("r1", (L("A", "X", 4),), ttl_ms=50))
    assert ok(state, close, now=at)["state"] == closed_state
    reply, events = do(state, Commit("r1"), now=NOW + 70)
    assert reply == {"ok": False, "error": "invalid_state", "state": closed_state}
    assert events == []
    assert figures(state, "A", "X") == (10, 0, 10)


def test_commit_of_an_unknown_rid_is_not_found():
    assert do(State(), Commit("nope"))[0] == {"ok": False, "error": "not_found"}


# -- extend ------------------------------------------------------------------------------------


def test_extend_a_held_reservation_moves_its_expiry_to_now_plus_ttl():
    state = stocked(("A", "X", 10))
    ok(state, Reserve("r1", (L("A", "X", 1),), ttl_ms=100))
    reply, events = do(state, Extend("r1", 1_000), now=NOW + 50)
    assert reply == {"ok": True, "rid": "r1", "expires_at_ms": NOW + 1_050}
    assert types(events) == ["extended"]
    assert ok(state, Lookup("r1"), now=NOW + 500)["expires_at_ms"] == NOW + 1_050
    # Past the original expiry, it is still held.
    assert ok(state, Expire("r1"), now=NOW + 500) == {"ok": True, "rid": "r1", "state": "held"}
    assert ok(state, Expire("r1"), now=NOW + 1_050) == {"ok": True, "rid": "r1", "state": "expired"}


def test_extend_gives_an_unlimited_reservation_an_expiry():
    state = stocked(("A", "X", 10))
    ok(state, Reserve("r1", (L("A", "X", 1),)))
    assert ok(state, Extend("r1", 10))["expires_at_ms"] == NOW + 10
    assert ok(state, Lookup("r1"), now=NOW + 10)["state"] == "expired"


@pytest.mark.parametrize(
    "close, at, closed_state",
    [(Release("r1"), NOW + 10, RELEASED), (Commit("r1"), NOW + 10, COMMITTED), (Expire("r1"), NOW + 50, EXPIRED)],
)
def test_extend_only_a_held_reservation(close, at, closed_state):
    state = stocked(("A", "X", 10))
    ok(state, Reserve("r1", (L("A", "X", 1),), ttl_ms=50))
    assert ok(state, close, now=at)["state"] == closed_state
    reply, events = do(state, Extend("r1", 1_000), now=NOW + 60)
    assert reply == {"ok": False, "error": "invalid_state", "state": closed_state}
    assert events == []
    assert do(state, Extend("nope", 1_000))[0] == {"ok": False, "error": "not_found"}


# -- expiry ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command, expected",
    [
        (Release("r1"), {"ok": False, "error": "invalid_state", "state": "expired"}),
        (Commit("r1"), {"ok": False, "error": "invalid_state", "state": "expired"}),
        (Extend("r1", 1_000), {"ok": False, "error": "invalid_state", "state": "expired"}),
        (Lookup("r1"), {"ok": True, "rid": "r1", "state": "expired", "lines": [{"sku": "A", "loc": "X", "qty": 4}], "ref": None, "expires_at_ms": NOW + 100}),
        (Expire("r1"), {"ok": True, "rid": "r1", "state": "expired"}),
    ],
)
def test_a_rid_op_past_expires_at_expires_the_reservation_first(command, expected):
    state = stocked(("A", "X", 10))
    ok(state, Reserve("r1", (L("A", "X", 4),), ttl_ms=100))
    # One millisecond before: still held, nothing happens.
    reply, events = do(state, Lookup("r1"), now=NOW + 99)
    assert reply["state"] == "held" and events == []
    reply, events = do(state, command, now=NOW + 100)
    assert reply == expected
    assert types(events) == ["expired"]
    assert events[0]["rid"] == "r1" and events[0]["lines"] == [{"sku": "A", "loc": "X", "qty": 4}]
    assert state.reservation("r1").state == EXPIRED
    assert figures(state, "A", "X") == (10, 0, 10)


def test_expire_before_the_time_or_without_ttl_changes_nothing():
    state = stocked(("A", "X", 10))
    ok(state, Reserve("r1", (L("A", "X", 4),), ttl_ms=100))
    ok(state, Reserve("r2", (L("A", "X", 1),)))
    reply, events = do(state, Expire("r1"), now=NOW + 99)
    assert reply == {"ok": True, "rid": "r1", "state": "held"} and events == []
    reply, events = do(state, Expire("r2"), now=NOW + 10**9)
    assert reply == {"ok": True, "rid": "r2", "state": "held"} and events == []
    reply, events = do(state, Expire("r1"), now=NOW + 100)
    assert reply == {"ok": True, "rid": "r1", "state": "expired"} and types(events) == ["expired"]
    reply, events = do(state, Expire("r1"), now=NOW + 200)
    assert reply == {"ok": True, "rid": "r1", "state": "expired"} and events == []
    assert figures(state, "A", "X") == (10, 1, 9)
    assert do(state, Expire("nope"))[0] == {"ok": False, "error": "not_found"}


def test_expire_of_a_closed_reservation_leaves_it_closed():
    state = stocked(("A", "X", 10))
    ok(state, Reserve("r1", (L("A", "X", 4),), ttl_ms=100))
    ok(state, Commit("r1"), now=NOW + 50)
    reply, events = do(state, Expire("r1"), now=NOW + 500)
    assert reply == {"ok": True, "rid": "r1", "state": "committed"} and events == []
    assert figures(state, "A", "X") == (6, 0, 6)


# -- adjust ------------------------------------------------------------------------------------


def test_adjust_changes_on_hand_and_reports_figures():
    state = State()
    reply, events = do(state, Adjust("k1", "A", "X", 10, "receipt"))
    assert reply == {"ok": True, "sku": "A", "loc": "X", "on_hand": 10, "reserved": 0, "available": 10}
    assert types(events) == ["adjusted"]
    ok(state, Reserve("r1", (L("A", "X", 4),)))
    reply = ok(state, Adjust("k2", "A", "X", -3, "damage"))
    assert reply == {"ok": True, "sku": "A", "loc": "X", "on_hand": 7, "reserved": 4, "available": 3}


def test_adjust_may_leave_available_negative_a_shortage():
    state = stocked(("A", "X", 10))
    ok(state, Reserve("r1", (L("A", "X", 8),)))
    reply = ok(state, Adjust("k1", "A", "X", -7, "damage"))
    assert reply == {"ok": True, "sku": "A", "loc": "X", "on_hand": 3, "reserved": 8, "available": -5}
    # Nothing new can be held in a shortage.
    assert do(state, Reserve("r2", (L("A", "X", 1),)))[0]["lines"] == [{"sku": "A", "loc": "X", "requested": 1, "available": -5}]


def test_adjust_that_would_make_on_hand_negative_is_invalid_and_leaves_no_trace():
    state = stocked(("A", "X", 3))
    seq = state.seq
    reply, events = do(state, Adjust("k1", "A", "X", -4, "damage"))
    assert reply == {"ok": False, "error": "invalid"}
    assert events == [] and state.seq == seq and "k1" not in state.keys
    assert figures(state, "A", "X") == (3, 0, 3)
    reply, _ = do(state, Adjust("k2", "B", "X", -1, "correction"))  # unknown SKU-location: on_hand 0
    assert reply == {"ok": False, "error": "invalid"}
    assert ("B", "X") not in state.stocks
    # The key was not used, so it may carry another request.
    assert ok(state, Adjust("k1", "A", "X", -3, "damage"))["on_hand"] == 0


def test_adjust_retry_is_a_duplicate_and_a_reused_key_a_conflict():
    state = State()
    original = ok(state, Adjust("k1", "A", "X", 5, "receipt"))
    ok(state, Adjust("k2", "A", "X", 5, "receipt"))
    seq = state.seq
    reply, events = do(state, Adjust("k1", "A", "X", 5, "receipt"))
    assert reply == {**original, "duplicate": True} and reply["on_hand"] == 5
    assert events == [] and state.seq == seq
    for other in (Adjust("k1", "A", "X", 6, "receipt"), Adjust("k1", "A", "X", 5, "return"), Adjust("k1", "A", "Y", 5, "receipt"),
                  Count("k1", "A", "X", 5), Transfer("k1", "A", "X", "Y", 1)):
        assert do(state, other)[0] == {"ok": False, "error": "conflict"}
    assert figures(state, "A", "X") == (10, 0, 10)


# -- count -------------------------------------------------------------------------------------


def test_count_sets_on_hand_and_reports_the_variance():
    state = stocked(("A", "X", 10))
    ok(state, Reserve("r1", (L("A", "X", 6),)))
    reply, events = do(state, Count("c1", "A", "X", 4, "cycle"))
    assert reply == {"ok": True, "sku": "A", "loc": "X", "on_hand": 4, "reserved": 6, "available": -2, "variance": -6}
    assert types(events) == ["counted"] and events[0]["variance"] == -6
    reply = ok(state, Count("c2", "A", "X", 9))
    assert reply == {"ok": True, "sku": "A", "loc": "X", "on_hand": 9, "reserved": 6, "available": 3, "variance": 5}
    reply = ok(state, Count("c3", "A", "X", 9))
    assert reply["variance"] == 0 and reply["on_hand"] == 9


def test_count_of_an_unknown_sku_location_starts_from_zero():
    state = State()
    assert ok(state, Count("c1", "A", "X", 7)) == {"ok": True, "sku": "A", "loc": "X", "on_hand": 7, "reserved": 0, "available": 7, "variance": 7}
    assert ok(state, Count("c2", "B", "X", 0))["variance"] == 0
    assert ok(state, Query("B"))["locations"] == [{"loc": "X", "on_hand": 0, "reserved": 0, "available": 0}]


def test_count_retry_is_a_duplicate_and_a_reused_key_a_conflict():
    state = stocked(("A", "X", 10))
    original = ok(state, Count("c1", "A", "X", 8, "cycle"))
    ok(state, Adjust("k", "A", "X", 5, "receipt"))
    reply, events = do(state, Count("c1", "A", "X", 8, "cycle"))
    assert reply == {**original, "duplicate": True} and reply["variance"] == -2
    assert events == []
    assert do(state, Count("c1", "A", "X", 8))[0]["error"] == "conflict"  # reason differs
    assert do(state, Count("c1", "A", "X", 9, "cycle"))[0]["error"] == "conflict"
    assert figures(state, "A", "X") == (13, 0, 13)


# -- transfer ----------------------------------------------------------------------------------


def test_transfer_moves_on_hand_and_reports_both_ends():
    state = stocked(("A", "X", 10), ("A", "Y", 1))
    ok(state, Reserve("r1", (L("A", "X", 3),)))
    reply, events = do(state, Transfer("t1", "A", "X", "Y", 7))
    assert reply == {
        "ok": True,
        "from": {"loc": "X", "on_hand": 3, "reserved": 3, "available": 0},
        "to": {"loc": "Y", "on_hand": 8, "reserved": 0, "available": 8},
    }
    assert types(events) == ["transferred"]
    assert figures(state, "A", "X") == (3, 3, 0)
    assert figures(state, "A", "Y") == (8, 0, 8)
    reply = ok(state, Transfer("t2", "A", "Y", "Z", 8))  # to a new location
    assert reply["to"] == {"loc": "Z", "on_hand": 8, "reserved": 0, "available": 8}
    assert reply["from"] == {"loc": "Y", "on_hand": 0, "reserved": 0, "available": 0}


def test_transfer_needs_available_at_from():
    state = stocked(("A", "X", 10))
    ok(state, Reserve("r1", (L("A", "X", 4),)))
    seq = state.seq
    reply, events = do(state, Transfer("t1", "A", "X", "Y", 7))
    assert reply == {"ok": False, "error": "insufficient", "lines": [{"sku": "A", "loc": "X", "requested": 7, "available": 6}]}
    assert events == [] and state.seq == seq and "t1" not in state.keys
    assert figures(state, "A", "X") == (10, 4, 6)
    assert ("A", "Y") not in state.stocks
    reply, _ = do(state, Transfer("t2", "A", "W", "X", 1))  # unknown source: nothing there
    assert reply == {"ok": False, "error": "insufficient", "lines": [{"sku": "A", "loc": "W", "requested": 1, "available": 0}]}
    assert ok(state, Transfer("t1", "A", "X", "Y", 6))["from"]["available"] == 0


def test_transfer_to_the_same_location_is_invalid():
    state = stocked(("A", "X", 10))
    reply, events = do(state, Transfer("t1", "A", "X", "X", 1))
    assert reply == {"ok": False, "error": "invalid"}
    assert events == [] and "t1" not in state.keys
    assert figures(state, "A", "X") == (10, 0, 10)


def test_transfer_retry_is_a_duplicate_and_a_reused_key_a_conflict():
    state = stocked(("A", "X", 10))
    original = ok(state, Transfer("t1", "A", "X", "Y", 4))
    ok(state, Transfer("t2", "A", "X", "Y", 1))
    reply, events = do(state, Transfer("t1", "A", "X", "Y", 4))
    assert reply == {**original, "duplicate": True} and reply["to"]["on_hand"] == 4
    assert events == []
    assert do(state, Transfer("t1", "A", "Y", "X", 4))[0]["error"] == "conflict"
    assert do(state, Transfer("t1", "A", "X", "Y", 5))[0]["error"] == "conflict"
    assert do(state, Adjust("t1", "A", "X", 4, "receipt"))[0]["error"] == "conflict"
    assert figures(state, "A", "X") == (5, 0, 5) and figures(state, "A", "Y") == (5, 0, 5)


# -- reads -------------------------------------------------------------------------------------


def test_an_unknown_sku_location_reads_as_zeros_and_is_not_created():
    state = stocked(("A", "X", 10))
    seq = state.seq
    assert ok(state, Get("A", "Y")) == {"ok": True, "sku": "A", "loc": "Y", "on_hand": 0, "reserved": 0, "available": 0}
    assert ok(state, Get("Q", "X")) == {"ok": True, "sku": "Q", "loc": "X", "on_hand": 0, "reserved": 0, "available": 0}
    assert ok(state, Query("Q")) == {"ok": True, "sku": "Q", "locations": [], "total": {"on_hand": 0, "reserved": 0, "available": 0}}
    assert set(state.stocks) == {("A", "X")} and state.seq == seq


def test_query_lists_every_location_and_sums_the_totals():
    state = stocked(("A", "Z", 5), ("A", "X", 10), ("A", "Y", 2), ("B", "X", 100))
    ok(state, Reserve("r1", (L("A", "X", 4), L("A", "Y", 2))))
    ok(state, Adjust("damage", "A", "Y", -1, "damage"))  # A/Y in shortage: available -1
    reply = ok(state, Query("A"))
    assert reply == {
        "ok": True,
        "sku": "A",
        "locations": [
            {"loc": "X", "on_hand": 10, "reserved": 4, "available": 6},
            {"loc": "Y", "on_hand": 1, "reserved": 2, "available": -1},
            {"loc": "Z", "on_hand": 5, "reserved": 0, "available": 5},
        ],
        "total": {"on_hand": 16, "reserved": 6, "available": 10},
    }


def test_lookup_reports_state_lines_ref_expiry_and_what_was_committed():
    state = stocked(("A", "X", 10), ("B", "X", 10))
    ok(state, Reserve("r1", (L("A", "X", 2), L("B", "X", 3)), ttl_ms=5_000, ref="order-9"))
    expected = {
        "ok": True, "rid": "r1", "state": "held",
        "lines": [{"sku": "A", "loc": "X", "qty": 2}, {"sku": "B", "loc": "X", "qty": 3}],
        "ref": "order-9", "expires_at_ms": NOW + 5_000,
    }
    assert ok(state, Lookup("r1")) == expected
    ok(state, Commit("r1", (L("B", "X", 1),)))
    assert ok(state, Lookup("r1")) == {
        **expected, "state": "committed",
        "committed": [{"sku": "A", "loc": "X", "qty": 0}, {"sku": "B", "loc": "X", "qty": 1}],
    }
    assert do(state, Lookup("r2"))[0] == {"ok": False, "error": "not_found"}


# -- forget ------------------------------------------------------------------------------------


def test_forget_drops_closed_reservations_and_old_keys_only():
    state = stocked(("A", "X", 100))  # key receipt-0 at NOW
    ok(state, Reserve("held", (L("A", "X", 1),)), now=NOW)
    ok(state, Reserve("released-early", (L("A", "X", 1),)), now=NOW)
    ok(state, Release("released-early"), now=NOW + 10)
    ok(state, Reserve("committed-early", (L("A", "X", 1),)), now=NOW)
    ok(state, Commit("committed-early"), now=NOW + 20)
    ok(state, Reserve("expired-early", (L("A", "X", 1),), ttl_ms=5), now=NOW)
    ok(state, Expire("expired-early"), now=NOW + 30)
    ok(state, Reserve("released-late", (L("A", "X", 1),)), now=NOW)
    ok(state, Release("released-late"), now=NOW + 500)
    ok(state, Adjust("late-key", "A", "X", 1, "receipt"), now=NOW + 500)
    on_hand = figures(state, "A", "X")

    reply, events = do(state, Forget(closed_before_ms=NOW + 100, limit=100), now=NOW + 600)
    assert reply == {"ok": True, "rids": 3, "keys": 1}
    assert types(events) == ["forgotten"]
    assert sorted(events[0]["rids"]) == ["committed-early", "expired-early", "released-early"]
    assert events[0]["keys"] == ["receipt-0"]
    assert sorted(state.reservations) == ["held", "released-late"]
    assert sorted(state.keys) == ["late-key"]
    assert figures(state, "A", "X") == on_hand  # stock is untouched
    assert do(state, Lookup("released-early"))[0] == {"ok": False, "error": "not_found"}
    assert ok(state, Lookup("held"))["state"] == "held"
    # Forgotten ids are free again: a new request, not a duplicate.
    reply, events = do(state, Reserve("released-early", (L("A", "X", 2),)), now=NOW + 700)
    assert "duplicate" not in reply and types(events) == ["reserved"]
    assert "duplicate" not in ok(state, Adjust("receipt-0", "A", "X", 1, "receipt"), now=NOW + 700)
    # Nothing left to forget: no event.
    reply, events = do(state, Forget(closed_before_ms=NOW + 100, limit=100), now=NOW + 800)
    assert reply == {"ok": True, "rids": 0, "keys": 0} and events == []


def test_forget_keeps_what_closed_or_was_used_exactly_at_the_cutoff():
    state = State()
    ok(state, Adjust("k-old", "A", "X", 5, "receipt"), now=NOW - 1)
    ok(state, Adjust("k-cutoff", "A", "X", 5, "receipt"), now=NOW)
    for rid, closed_at in (("r-old", NOW - 1), ("r-cutoff", NOW)):
        ok(state, Reserve(rid, (L("A", "X", 1),)), now=NOW - 10)
        ok(state, Release(rid), now=closed_at)
    reply, events = do(state, Forget(closed_before_ms=NOW, limit=10), now=NOW + 5)
    assert reply == {"ok": True, "rids": 1, "keys": 1}
    assert events[0]["rids"] == ["r-old"] and events[0]["keys"] == ["k-old"]
    assert sorted(state.reservations) == ["r-cutoff"] and sorted(state.keys) == ["k-cutoff"]


class _CountingReservations(dict):
    """Counts the reservations forgetting looks at, by key or by iteration."""

    looked_at = 0

    def get(self, key, default=None):
        _CountingReservations.looked_at += 1
        return super().get(key, default)

    def items(self):
        for item in super().items():
            _CountingReservations.looked_at += 1
            yield item

    def values(self):
        for value in super().values():
            _CountingReservations.looked_at += 1
            yield value


def test_forget_looks_only_at_reservations_closed_long_enough_ago():
    state = stocked(("A", "X", 10_000))
    for index in range(1_000):  # held: never forgotten, and never looked at by forgetting
        ok(state, Reserve(f"held-{index}", (L("A", "X", 1),)), now=NOW)
    for rid, closed_at in (("early-1", NOW + 1), ("early-2", NOW + 2), ("early-3", NOW + 3), ("late-1", NOW + 500), ("late-2", NOW + 501)):
        ok(state, Reserve(rid, (L("A", "X", 1),)), now=NOW)
        ok(state, Release(rid), now=closed_at)
    state.reservations = _CountingReservations(state.reservations)
    _CountingReservations.looked_at = 0
    _, events, reply = apply(state, Forget(closed_before_ms=NOW + 100, limit=100), NOW + 600)
    # A handful (the three, the first one too recent, the front of the close order after),
    # not the 1,000 held ones.
    assert _CountingReservations.looked_at < 20
    check_invariants(state)
    assert (reply["rids"], reply["keys"]) == (3, 1)
    assert events[0]["rids"] == ["early-1", "early-2", "early-3"]  # oldest first
    assert list(state.closed_order) == ["late-1", "late-2"]


def test_forget_a_rid_reserved_again_after_it_was_forgotten():
    state = stocked(("A", "X", 100))
    ok(state, Reserve("r", (L("A", "X", 1),)), now=NOW)
    ok(state, Release("r"), now=NOW + 10)
    assert ok(state, Forget(closed_before_ms=NOW + 11, limit=10), now=NOW + 11)["rids"] == 1
    ok(state, Reserve("r", (L("A", "X", 2),)), now=NOW + 20)
    ok(state, Reserve("other", (L("A", "X", 1),)), now=NOW + 20)
    assert ok(state, Forget(closed_before_ms=NOW + 1_000, limit=10), now=NOW + 1_000)["rids"] == 0  # both held
    ok(state, Release("other"), now=NOW + 30)
    ok(state, Release("r"), now=NOW + 40)
    assert ok(state, Forget(closed_before_ms=NOW + 35, limit=10), now=NOW + 1_000)["rids"] == 1  # only "other"
    assert sorted(state.reservations) == ["r"]
    reply, events = do(state, Forget(closed_before_ms=NOW + 41, limit=10), now=NOW + 1_000)
    assert reply["rids"] == 1 and events[0]["rids"] == ["r"]
    assert state.reservations == {} and not state.closed_order


def test_a_state_from_a_snapshot_forgets_in_the_order_reservations_closed():
    state = stocked(("A", "X", 100))
    for rid, closed_at in (("c", NOW + 30), ("a", NOW + 10), ("b", NOW + 20)):
        ok(state, Reserve(rid, (L("A", "X", 1),)), now=NOW)
    for rid, closed_at in (("b", NOW + 20), ("a", NOW + 10), ("c", NOW + 30)):
        ok(state, Release(rid), now=closed_at)
    restored = State.from_snapshot(state.to_snapshot())
    assert list(restored.closed_order) == ["a", "b", "c"]
    reply, events = do(restored, Forget(closed_before_ms=NOW + 25, limit=10), now=NOW + 100)
    assert events[0]["rids"] == ["a", "b"] and sorted(restored.reservations) == ["c"]


def test_forget_respects_its_limit():
    state = State()
    for index in range(5):
        ok(state, Adjust(f"k{index}", "A", "X", 1, "receipt"), now=NOW)
    for index in range(4):
        ok(state, Reserve(f"r{index}", (L("A", "X", 1),)), now=NOW)
        ok(state, Release(f"r{index}"), now=NOW)
    reply = ok(state, Forget(closed_before_ms=NOW + 1, limit=2), now=NOW + 1)
    assert reply == {"ok": True, "rids": 2, "keys": 2}
    assert len(state.reservations) == 2 and len(state.keys) == 3
    reply = ok(state, Forget(closed_before_ms=NOW + 1, limit=10), now=NOW + 1)
    assert reply == {"ok": True, "rids": 2, "keys": 3}
    assert state.reservations == {} and state.keys == {}
    assert figures(state, "A", "X") == (5, 0, 5)


# -- reply seq: what the shell waits to be durable before replying ----------------------------


def test_a_reply_seq_covers_the_last_change_it_reflects():
    state = stocked(("A", "X", 10), ("B", "X", 10))  # seqs 1, 2
    _, _, reply = apply(state, Get("A", "X"), NOW)
    assert reply["seq"] == 1
    apply(state, Count("c1", "A", "X", 9), NOW)  # seq 3
    assert apply(state, Get("A", "X"), NOW)[2]["seq"] == 3
    assert apply(state, Query("A"), NOW)[2]["seq"] == 3
    assert apply(state, Get("B", "X"), NOW)[2]["seq"] == 2
    # A refusal reflects the figures it refused on.
    assert apply(state, Reserve("r9", (L("A", "X", 50),)), NOW)[2]["seq"] == 3
    assert apply(state, Transfer("t9", "A", "X", "Y", 50), NOW)[2]["seq"] == 3
    assert apply(state, Adjust("a9", "B", "X", -50, "damage"), NOW)[2]["seq"] == 2
    # A duplicate or conflict reflects the original request.
    assert apply(state, Count("c1", "A", "X", 9), NOW)[2]["seq"] == 3
    assert apply(state, Count("c1", "A", "X", 8), NOW)[2]["seq"] == 3


def test_a_commit_refused_for_lack_of_goods_reflects_an_extend_too():
    state = stocked(("A", "X", 5))  # seq 1
    ok(state, Reserve("r1", (L("A", "X", 5),), ttl_ms=100))  # seq 2
    ok(state, Adjust("damage", "A", "X", -3, "damage"))  # seq 3
    ok(state, Extend("r1", 1_000), now=NOW + 50)  # seq 4: without it, r1 would be expired at NOW + 150
    _, events, reply = apply(state, Commit("r1"), NOW + 150)
    assert events == []
    assert (reply["ok"], reply["error"]) == (False, "invalid")
    assert reply["seq"] == 4


# -- events and snapshots ----------------------------------------------------------------------


def test_replaying_the_events_reproduces_the_state_and_snapshots_round_trip():
    state = State()
    log = []
    script = [
        Adjust("k1", "A", "X", 10, "receipt"),
        Adjust("k2", "B", "Y", 4, "receipt"),
        Reserve("r1", (L("A", "X", 3), L("B", "Y", 4)), ttl_ms=100, ref="o"),
        Reserve("r2", (L("A", "X", 2),)),
        Extend("r2", 50),
        Commit("r1", (L("A", "X", 1),)),
        Transfer("t1", "A", "X", "Z", 5),
        Count("c1", "B", "Y", 2, "cycle"),
        Expire("r2"),
        Forget(closed_before_ms=NOW + 200, limit=1),
    ]
    for step, command in enumerate(script):
        _, events, _ = apply(state, command, NOW + 30 * step)
        log.extend(events)
    assert [event["seq"] for event in log] == list(range(1, len(log) + 1))
    assert [event["type"] for event in log] == [
        "adjusted", "adjusted", "reserved", "reserved", "extended", "committed", "transferred", "counted", "expired", "forgotten",
    ]
    replayed = State()
    for event in log:
        apply_event(replayed, event)
    assert replayed.to_snapshot() == state.to_snapshot()
    assert State.from_snapshot(state.to_snapshot()).to_snapshot() == state.to_snapshot()
    assert figures(state, "A", "X") == (4, 0, 4)
    assert figures(state, "A", "Z") == (5, 0, 5)

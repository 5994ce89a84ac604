"""Batch `count`/`adjust` (`lines` under one key) and the compact idempotency memory.

The codec (every bad field is `bad_request` naming it), the core's rules (all-or-nothing, one
event, one key: duplicate and conflict, replay, snapshots), the byte-exact duplicate replies of
the single keyed ops, and the conversion of format 1 snapshots.
"""

from __future__ import annotations

import struct
import sys
from typing import Any

import msgpack
import pytest

from engine.core import KeyRecord, State, apply, apply_event, check_event, check_invariants
from engine.core.state import SHARED_INT_MAX, SNAPSHOT_FORMAT, packed_key_at_ms
from engine.shell.verify import contents_of_snapshot, contents_of_state
from protocol import (
    LINES_PER_BATCH_MAX,
    MAX_FRAME_BYTES,
    NAME_BYTES_MAX,
    QTY_MAX,
    Adjust,
    AdjustBatch,
    Count,
    CountBatch,
    Get,
    Line,
    Query,
    Reserve,
    Transfer,
    pack,
    parse_request,
)
from protocol import RequestError

NOW = 5_000


def do(state: State, command, now: int = NOW) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Apply one command, check the invariants and events; return (reply, events)."""
    seq_before = state.seq
    _, events, reply = apply(state, command, now)
    check_invariants(state)
    for event in events:
        check_event(event)
    assert state.seq == seq_before + len(events)
    if events:
        assert reply["seq"] == events[-1]["seq"]
    return reply, events


def plain(reply: dict[str, Any]) -> dict[str, Any]:
    return {name: value for name, value in reply.items() if name not in ("seq", "message")}


def figures(state: State, sku: str, loc: str) -> tuple[int, int, int]:
    stock = state.stock(sku, loc)
    return stock.on_hand, stock.reserved, stock.available


# -- codec -------------------------------------------------------------------------------------


def request(op: str, **fields: Any) -> dict[str, Any]:
    return {"id": 7, "op": op, **fields}


def test_count_and_adjust_with_lines_parse_into_batches() -> None:
    lines = [{"sku": "A", "loc": "X", "on_hand": 5}, {"sku": "A", "loc": "Y", "on_hand": 0, "note": "ignored"}]
    assert parse_request(request("count", key="k", lines=lines)) == (7, CountBatch("k", (("A", "X", 5), ("A", "Y", 0)), None))
    assert parse_request(request("count", key="k", lines=lines, reason="cycle")) == (7, CountBatch("k", (("A", "X", 5), ("A", "Y", 0)), "cycle"))
    adjust_lines = [{"sku": "A", "loc": "X", "delta": -3}, {"sku": "B", "loc": "X", "delta": QTY_MAX}]
    assert parse_request(request("adjust", key="k", lines=adjust_lines, reason="receipt")) == (
        7, AdjustBatch("k", (("A", "X", -3), ("B", "X", QTY_MAX)), "receipt"),
    )
    # `lines` nil reads as absent: the single form.
    assert parse_request(request("count", key="k", sku="A", loc="X", on_hand=1, lines=None)) == (7, Count("k", "A", "X", 1))


def test_batch_of_exactly_the_bound_is_accepted_one_more_is_not() -> None:
    lines = [{"sku": f"S{index}", "loc": "X", "on_hand": 1} for index in range(LINES_PER_BATCH_MAX + 1)]
    _, command = parse_request(request("count", key="k", lines=lines[:LINES_PER_BATCH_MAX]))
    assert len(command.lines) == LINES_PER_BATCH_MAX
    with pytest.raises(RequestError) as raised:
        parse_request(request("count", key="k", lines=lines))
    assert raised.value.code == "bad_request" and str(LINES_PER_BATCH_MAX) in raised.value.message


GOOD_COUNT_LINE = {"sku": "A", "loc": "X", "on_hand": 1}
GOOD_ADJUST_LINE = {"sku": "A", "loc": "X", "delta": 1}
LONG_NAME = "é" * 65  # 130 UTF-8 bytes, 65 characters: past the fast path, refused by the exact one


@pytest.mark.parametrize(
    "op, fields, expected",
    [
        # Both forms at once.
        ("count", {"key": "k", "lines": [GOOD_COUNT_LINE], "sku": "A"}, "'sku'"),
        ("count", {"key": "k", "lines": [GOOD_COUNT_LINE], "on_hand": 3}, "'on_hand'"),
        ("adjust", {"key": "k", "lines": [GOOD_ADJUST_LINE], "reason": "r", "loc": "X", "delta": 1}, "'loc', 'delta'"),
        # The list itself.
        ("count", {"key": "k", "lines": []}, "1 to 3000 lines"),
        ("count", {"key": "k", "lines": {"sku": "A"}}, "field 'lines' must be a list"),
        ("count", {"key": "k", "lines": "A"}, "field 'lines' must be a list"),
        ("count", {"key": "k", "lines": [GOOD_COUNT_LINE, 3]}, "lines[1] must be a map"),
        # Each line's fields.
        ("count", {"key": "k", "lines": [{"loc": "X", "on_hand": 1}]}, "lines[0]: missing field 'sku'"),
        ("count", {"key": "k", "lines": [{"sku": "A", "on_hand": 1}]}, "lines[0]: missing field 'loc'"),
        ("count", {"key": "k", "lines": [{"sku": "A", "loc": "X"}]}, "lines[0]: missing field 'on_hand'"),
        ("count", {"key": "k", "lines": [{"sku": "", "loc": "X", "on_hand": 1}]}, "lines[0]: field 'sku' must be 1 to 128"),
        ("count", {"key": "k", "lines": [{"sku": LONG_NAME, "loc": "X", "on_hand": 1}]}, "lines[0]: field 'sku' must be 1 to 128"),
        ("count", {"key": "k", "lines": [{"sku": "A", "loc": 5, "on_hand": 1}]}, "lines[0]: field 'loc' must be a string"),
        ("count", {"key": "k", "lines": [GOOD_COUNT_LINE, {"sku": "B", "loc": "X", "on_hand": -1}]}, "lines[1]: field 'on_hand' must be between 0"),
        ("count", {"key": "k", "lines": [{"sku": "A", "loc": "X", "on_hand": QTY_MAX + 1}]}, "lines[0]: field 'on_hand' must be between"),
        ("count", {"key": "k", "lines": [{"sku": "A", "loc": "X", "on_hand": True}]}, "lines[0]: field 'on_hand' must be an integer"),
        ("count", {"key": "k", "lines": [{"sku": "A", "loc": "X", "on_hand": 1.5}]}, "lines[0]: field 'on_hand' must be an integer"),
        ("adjust", {"key": "k", "reason": "r", "lines": [{"sku": "A", "loc": "X", "delta": 0}]}, "lines[0]: field 'delta' must be non-zero"),
        ("adjust", {"key": "k", "reason": "r", "lines": [{"sku": "A", "loc": "X", "delta": -QTY_MAX - 1}]}, "lines[0]: field 'delta' must be between"),
        ("adjust", {"key": "k", "reason": "r", "lines": [{"sku": "A", "loc": "X", "on_hand": 1}]}, "lines[0]: missing field 'delta'"),
        # Each SKU-location at most once.
        ("count", {"key": "k", "lines": [GOOD_COUNT_LINE, {"sku": "A", "loc": "X", "on_hand": 2}]}, "lines[1]: SKU-location ('A', 'X') appears more than once"),
        # The batch's own fields.
        ("count", {"lines": [GOOD_COUNT_LINE]}, "missing field 'key'"),
        ("count", {"key": "k", "lines": [GOOD_COUNT_LINE], "reason": ""}, "field 'reason'"),
        ("adjust", {"key": "k", "lines": [GOOD_ADJUST_LINE]}, "missing field 'reason'"),
    ],
)
def test_every_bad_batch_field_is_bad_request_naming_it(op: str, fields: dict[str, Any], expected: str) -> None:
    with pytest.raises(RequestError) as raised:
        parse_request(request(op, **fields))
    assert raised.value.code == "bad_request"
    assert raised.value.request_id == 7
    assert expected in raised.value.message, raised.value.message


def test_names_of_up_to_128_bytes_with_multibyte_characters_are_accepted_in_lines() -> None:
    name = "é" * 64  # 128 bytes: beyond the fast path's character count, within the byte bound
    _, command = parse_request(request("count", key="k", lines=[{"sku": name, "loc": name, "on_hand": 1}]))
    assert command.lines == ((name, name, 1),)


def test_the_largest_possible_batch_reply_fits_in_the_default_frame() -> None:
    """The bound on lines is chosen so that: the worst names, the widest integers."""
    name = "x" * NAME_BYTES_MAX
    lines = [
        {"sku": name, "loc": name, "on_hand": 2**62, "reserved": 2**62, "available": -(2**62), "variance": -(2**62)}
        for _ in range(LINES_PER_BATCH_MAX)
    ]
    reply = {"ok": True, "lines": lines, "duplicate": True, "seq": 2**63 - 1, "id": 2**64 - 1}
    assert len(pack(reply)) <= MAX_FRAME_BYTES


# -- core: count batch -------------------------------------------------------------------------


def test_count_batch_sets_every_line_in_one_event_and_replies_per_line() -> None:
    state = State()
    do(state, Adjust("opening", "A", "X", 10, "receipt"))
    do(state, Reserve("r1", (Line("A", "X", 4),)))
    reply, events = do(state, CountBatch("load-1", (("A", "X", 7), ("A", "Y", 3), ("B", "X", 0)), "initial"))
    assert [event["type"] for event in events] == ["counted_batch"]
    assert events[0]["key"] == "load-1" and events[0]["reason"] == "initial"
    assert events[0]["lines"] == [
        {"sku": "A", "loc": "X", "on_hand": 7, "variance": -3},
        {"sku": "A", "loc": "Y", "on_hand": 3, "variance": 3},
        {"sku": "B", "loc": "X", "on_hand": 0, "variance": 0},
    ]
    assert plain(reply) == {"ok": True, "lines": [
        {"sku": "A", "loc": "X", "on_hand": 7, "reserved": 4, "available": 3, "variance": -3},
        {"sku": "A", "loc": "Y", "on_hand": 3, "reserved": 0, "available": 3, "variance": 3},
        {"sku": "B", "loc": "X", "on_hand": 0, "reserved": 0, "available": 0, "variance": 0},
    ]}
    assert figures(state, "A", "Y") == (3, 0, 3)
    assert state.locations_of("A") == ["X", "Y"]
    # Every line's SKU-location carries the batch's seq.
    assert state.stock("B", "X").last_seq == state.stock("A", "X").last_seq == reply["seq"] == state.seq


def test_count_batch_retry_is_a_duplicate_of_the_original_reply_and_changes_nothing() -> None:
    state = State()
    command = CountBatch("load-1", (("A", "X", 7), ("A", "Y", 3)), None)
    original, _ = do(state, command)
    do(state, Adjust("damage", "A", "X", -2, "damage"))  # the stock moves on; the retry's reply does not
    seq = state.seq
    again, events = do(state, command)
    assert events == [] and state.seq == seq
    assert again == {**original, "duplicate": True}
    assert list(again) == ["ok", "lines", "duplicate", "seq"]
    assert figures(state, "A", "X") == (5, 0, 5)


@pytest.mark.parametrize(
    "other",
    [
        CountBatch("load-1", (("A", "X", 7), ("A", "Y", 4)), None),  # another figure
        CountBatch("load-1", (("A", "X", 7),), None),  # fewer lines
        CountBatch("load-1", (("A", "Y", 3), ("A", "X", 7)), None),  # another order: another payload
        CountBatch("load-1", (("A", "X", 7), ("A", "Y", 3)), "cycle"),  # another reason
        AdjustBatch("load-1", (("A", "X", 7), ("A", "Y", 3)), "receipt"),  # another op
        Count("load-1", "A", "X", 7),
        Adjust("load-1", "A", "X", 7, "receipt"),
        Transfer("load-1", "A", "X", "Y", 1),
    ],
)
def test_a_batch_key_reused_with_another_payload_is_a_conflict(other) -> None:
    state = State()
    do(state, CountBatch("load-1", (("A", "X", 7), ("A", "Y", 3)), None))
    seq = state.seq
    reply, events = do(state, other)
    assert plain(reply) == {"ok": False, "error": "conflict"} and events == [] and state.seq == seq
    assert reply["seq"] == seq
    assert figures(state, "A", "X") == (7, 0, 7)


def test_a_single_key_reused_by_a_batch_is_a_conflict() -> None:
    state = State()
    do(state, Count("k", "A", "X", 7))
    reply, _ = do(state, CountBatch("k", (("A", "X", 7),), None))
    assert plain(reply) == {"ok": False, "error": "conflict"}


# -- core: adjust batch ------------------------------------------------------------------------


def test_adjust_batch_changes_every_line_and_replies_per_line() -> None:
    state = State()
    do(state, Adjust("opening", "A", "X", 10, "receipt"))
    do(state, Reserve("r1", (Line("A", "X", 4),)))
    reply, events = do(state, AdjustBatch("receipts-1", (("A", "X", -6), ("B", "Y", 5)), "correction"))
    assert [event["type"] for event in events] == ["adjusted_batch"]
    assert events[0]["lines"] == [{"sku": "A", "loc": "X", "delta": -6}, {"sku": "B", "loc": "Y", "delta": 5}]
    assert plain(reply) == {"ok": True, "lines": [
        {"sku": "A", "loc": "X", "on_hand": 4, "reserved": 4, "available": 0},
        {"sku": "B", "loc": "Y", "on_hand": 5, "reserved": 0, "available": 5},
    ]}
    # A retry: the original reply, duplicate, nothing changes.
    seq = state.seq
    again, events = do(state, AdjustBatch("receipts-1", (("A", "X", -6), ("B", "Y", 5)), "correction"))
    assert events == [] and state.seq == seq and again == {**reply, "duplicate": True}
    assert figures(state, "A", "X") == (4, 4, 0)


def test_adjust_batch_is_all_or_nothing_and_names_every_line_that_would_go_negative() -> None:
    state = State()
    do(state, Adjust("opening-a", "A", "X", 3, "receipt"))
    do(state, Adjust("opening-b", "B", "X", 1, "receipt"))
    stock_seq = state.stock("B", "X").last_seq
    do(state, Adjust("elsewhere", "C", "X", 1, "receipt"))
    seq = state.seq
    command = AdjustBatch("damage-1", (("A", "X", -3), ("B", "X", -2), ("C", "Y", 4), ("D", "X", -1)), "damage")
    reply, events = do(state, command)
    assert events == [] and state.seq == seq
    assert reply["ok"] is False and reply["error"] == "invalid"
    assert "lines[1]" in reply["message"] and "'B'" in reply["message"] and "nothing was applied" in reply["message"]
    assert reply["lines"] == [
        {"line": 1, "sku": "B", "loc": "X", "delta": -2, "on_hand": 1},
        {"line": 3, "sku": "D", "loc": "X", "delta": -1, "on_hand": 0},
    ]
    # The refusal reflects the refused lines' stock (and nothing newer).
    assert reply["seq"] == stock_seq
    assert figures(state, "A", "X") == (3, 0, 3) and ("C", "Y") not in state.stocks and ("D", "X") not in state.stocks
    # A refused batch leaves no trace: its key is free, and a corrected batch goes through.
    assert "damage-1" not in state.keys
    fixed = AdjustBatch("damage-1", (("A", "X", -3), ("B", "X", -1), ("C", "Y", 4)), "damage")
    reply, events = do(state, fixed)
    assert reply["ok"] is True and [event["type"] for event in events] == ["adjusted_batch"]
    assert figures(state, "A", "X") == (0, 0, 0) and figures(state, "C", "Y") == (4, 0, 4)


# -- replay and snapshots ----------------------------------------------------------------------


def run_script(state: State, script, log: list) -> None:
    for step, command in enumerate(script):
        _, events, _ = apply(state, command, NOW + 10 * step)
        log.extend(events)


SCRIPT = [
    CountBatch("load-1", tuple((f"S{index}", loc, index) for index in range(50) for loc in ("X", "Y")), "initial"),
    AdjustBatch("receipts-1", (("S1", "X", 5), ("S2", "Z", 7)), "receipt"),
    Reserve("r1", (Line("S3", "X", 2), Line("S2", "Z", 1))),
    AdjustBatch("damage-1", (("S3", "X", -1), ("S0", "X", -1)), "damage"),  # refused: S0 has none
    CountBatch("recount", (("S3", "X", 1), ("S4", "Y", 9)), None),  # counts below what is held
    Adjust("single", "S9", "Q", 3, "receipt"),
    Count("single-count", "S9", "Q", 2, "cycle"),
    Transfer("move", "S9", "Q", "X", 1),
    CountBatch("load-1", tuple((f"S{index}", loc, index) for index in range(50) for loc in ("X", "Y")), "initial"),  # retry
]


def test_replay_of_batch_events_reproduces_the_state_and_snapshots_round_trip() -> None:
    state, log = State(), []
    run_script(state, SCRIPT, log)
    assert [event["type"] for event in log] == ["counted_batch", "adjusted_batch", "reserved", "counted_batch", "adjusted", "counted", "transferred"]
    replayed = State()
    for event in msgpack.unpackb(msgpack.packb(log)):  # the log stores events as msgpack
        check_event(event)
        apply_event(replayed, event)
    assert replayed.to_snapshot() == state.to_snapshot()
    snapshot = msgpack.unpackb(msgpack.packb(state.to_snapshot(), use_bin_type=True), raw=False, strict_map_key=False)
    assert snapshot["format"] == SNAPSHOT_FORMAT == 4
    restored = State.from_snapshot(snapshot)
    assert restored.to_snapshot() == state.to_snapshot()
    # The restored state answers retries exactly as the original does.
    for command in SCRIPT:
        assert apply(restored, command, NOW + 999)[2] == apply(state, command, NOW + 999)[2]


# -- compact key records -----------------------------------------------------------------------


def test_a_key_record_packs_and_unpacks_and_costs_no_more_than_its_figures() -> None:
    record = KeyRecord(b"\x01" * 16, 1_700_000_000_000, 12, (5, -3))
    packed = record.pack()
    assert isinstance(packed, bytes) and len(packed) == 30 + 16
    assert KeyRecord.unpack(packed) == record and packed_key_at_ms(packed) == record.at_ms
    for at_ms in (0, (1 << 32) - 1, 1 << 32, (1 << 48) - 1):  # the 6 bytes of at_ms, at their edges
        assert KeyRecord.unpack(record._replace(at_ms=at_ms).pack()).at_ms == at_ms
    with pytest.raises(AssertionError):
        record._replace(at_ms=1 << 48).pack()
    state = State()
    do(state, Adjust("k", "A", "X", 5, "receipt"))
    assert isinstance(state.keys["k"], bytes) and len(state.keys["k"]) == 46
    # 46 bytes: a bytes object of 79, one 80-byte block of the allocator (48: 81, a 96-byte block).
    assert sys.getsizeof(state.keys["k"]) <= 80


def test_the_locations_of_a_sku_share_one_string_object_for_it() -> None:
    state = State()
    skus = ["".join(["SKU-", "1"]) for _ in range(3)]  # equal and distinct, as decoded from frames
    assert skus[0] is not skus[1]
    for index, (sku, loc) in enumerate(zip(skus, ("X", "Y", "Z"))):
        do(state, Adjust(f"k{index}", sku, loc, 1, "receipt"))
    (first, *others) = state.stocks
    assert all(key[0] is first[0] for key in others) and len(others) == 2
    assert state.stock_keys_by_sku["SKU-1"] == list(state.stocks) and state.locations_of("SKU-1") == ["X", "Y", "Z"]
    check_invariants(state)


def test_on_hand_up_to_the_shared_bound_is_one_int_object_whatever_set_it() -> None:
    state = State()
    thousand = [int(str(1000)) for _ in range(4)]  # equal and distinct, as decoded from frames
    assert thousand[0] is not thousand[1]
    do(state, CountBatch("k1", (("A", "X", thousand[0]),), None))
    do(state, AdjustBatch("k2", (("B", "X", thousand[1]),), "receipt"))
    do(state, Adjust("k3", "C", "X", thousand[2], "receipt"))
    do(state, Count("k4", "D", "X", thousand[3]))
    restored = State.from_snapshot(msgpack.unpackb(msgpack.packb(state.to_snapshot()), strict_map_key=False))
    values = [s.stock(sku, "X").on_hand for s in (state, restored) for sku in "ABCD"]
    assert values == [1000] * 8 and all(value is values[0] for value in values)
    beyond = SHARED_INT_MAX + 1
    do(state, Adjust("k5", "E", "X", beyond, "receipt"))
    assert state.stock("E", "X").on_hand == beyond


@pytest.mark.parametrize(
    "command",
    [
        Adjust("k", "A", "X", 5, "receipt"),
        Count("k", "A", "Y", 7, "cycle"),
        Count("k", "A", "Y", 7),
        Transfer("k", "A", "X", "Y", 2),
    ],
)
def test_a_single_op_duplicate_reply_is_byte_for_byte_the_original_plus_duplicate(command) -> None:
    state = State()
    do(state, Adjust("opening", "A", "X", 10, "receipt"))
    do(state, Reserve("r1", (Line("A", "X", 3),)))
    original, _ = do(state, command)
    do(state, Adjust("later", "A", "X", 1, "receipt"))
    again, _ = do(state, command)
    # What the server sent for a duplicate before key records were compact: the original reply's
    # fields in their order, then `duplicate`, then the seq of the original change.
    expected = {**{name: value for name, value in original.items() if name != "seq"}, "duplicate": True, "seq": original["seq"]}
    assert msgpack.packb(again) == msgpack.packb(expected)


# Written by the engine before snapshot format 2 (the key records held the fingerprint tuple and
# the whole reply): adjust 10 at A/X, reserve 3 of it, count A/Y to 7, transfer 2 from X to Y.
FORMAT_1_SNAPSHOT = {
    "format": 1, "seq": 4,
    "stocks": [["A", "X", 8, 3, 4], ["A", "Y", 9, 0, 4]],
    "reservations": [["r1", [["A", "X", 3]], 0, None, None, 1000, [7], "held", None, None, 2]],
    "keys": [
        ["k-adjust", ["adjust", "A", "X", 10, "receipt"], {"sku": "A", "loc": "X", "on_hand": 10, "reserved": 0, "available": 10}, 1000, 1],
        ["k-count", ["count", "A", "Y", 7, None], {"sku": "A", "loc": "Y", "on_hand": 7, "reserved": 0, "available": 7, "variance": 7}, 1000, 3],
        ["k-transfer", ["transfer", "A", "X", "Y", 2], {"from": {"loc": "X", "on_hand": 8, "reserved": 3, "available": 5}, "to": {"loc": "Y", "on_hand": 9, "reserved": 0, "available": 9}}, 1000, 4],
    ],
}


def test_a_format_1_snapshot_is_converted_and_its_keys_still_answer_retries() -> None:
    state = State.from_snapshot(FORMAT_1_SNAPSHOT)
    assert state.seq == 4 and figures(state, "A", "X") == (8, 3, 5)
    assert state.to_snapshot()["format"] == SNAPSHOT_FORMAT
    retries = {
        Adjust("k-adjust", "A", "X", 10, "receipt"): {"ok": True, "sku": "A", "loc": "X", "on_hand": 10, "reserved": 0, "available": 10, "duplicate": True, "seq": 1},
        Count("k-count", "A", "Y", 7): {"ok": True, "sku": "A", "loc": "Y", "on_hand": 7, "reserved": 0, "available": 7, "variance": 7, "duplicate": True, "seq": 3},
        Transfer("k-transfer", "A", "X", "Y", 2): {
            "ok": True, "from": {"loc": "X", "on_hand": 8, "reserved": 3, "available": 5},
            "to": {"loc": "Y", "on_hand": 9, "reserved": 0, "available": 9}, "duplicate": True, "seq": 4,
        },
    }
    for command, expected in retries.items():
        reply, events = do(state, command)
        assert events == [] and msgpack.packb(reply) == msgpack.packb(expected)
    for other in (Adjust("k-adjust", "A", "X", 11, "receipt"), Count("k-count", "A", "Y", 7, "cycle"), Transfer("k-transfer", "A", "X", "Y", 1)):
        assert plain(do(state, other)[0]) == {"ok": False, "error": "conflict"}
    # Round trip through format 2.
    assert State.from_snapshot(state.to_snapshot()).to_snapshot() == state.to_snapshot()


def test_a_format_3_snapshot_is_converted_and_its_keys_still_answer_retries() -> None:
    state = State()
    run_script(state, SCRIPT, [])
    snapshot = state.to_snapshot()
    # Format 3 packed the key records with an 8-byte at_ms.
    old_keys = []
    for key, packed in snapshot["keys"]:
        record = KeyRecord.unpack(packed)
        old_keys.append((key, struct.pack(f"<16sqq{len(record.figures)}q", record.fingerprint, record.at_ms, record.last_seq, *record.figures)))
    format_3 = msgpack.unpackb(msgpack.packb({**snapshot, "format": 3, "keys": old_keys}), strict_map_key=False)
    restored = State.from_snapshot(format_3)
    assert restored.to_snapshot() == snapshot
    assert contents_of_snapshot(format_3) == contents_of_state(state)  # what the shell's `verify` compares
    for command in SCRIPT:
        assert apply(restored, command, NOW + 999)[2] == apply(state, command, NOW + 999)[2]


def test_an_unknown_snapshot_format_is_refused() -> None:
    with pytest.raises(ValueError, match="unsupported snapshot format"):
        State.from_snapshot({**FORMAT_1_SNAPSHOT, "format": SNAPSHOT_FORMAT + 1})


def test_query_lists_locations_sorted_whatever_order_they_appeared_in() -> None:
    state = State()
    do(state, CountBatch("k", (("A", "Z", 1), ("A", "X", 2), ("A", "Y", 3)), None))
    reply, _ = do(state, Query("A"))
    assert [location["loc"] for location in reply["locations"]] == ["X", "Y", "Z"]
    assert reply["total"] == {"on_hand": 6, "reserved": 0, "available": 6}
    assert plain(do(state, Get("A", "Y"))[0]) == {"ok": True, "sku": "A", "loc": "Y", "on_hand": 3, "reserved": 0, "available": 3}

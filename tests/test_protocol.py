"""Unit tests of the sans-IO codec: framing, request validation, and the protocol objects.

No sockets here: bytes go in, events and bytes come out.
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol import (
    LINES_PER_RESERVATION_MAX,
    MAX_FRAME_BYTES,
    OPS,
    QTY_MAX,
    Adjust,
    ClientProtocol,
    Commit,
    Count,
    Extend,
    FrameDecoder,
    FrameTooLarge,
    Get,
    Hello,
    Line,
    Lookup,
    Ping,
    ProtocolViolation,
    Query,
    Release,
    RequestReceived,
    RequestRejected,
    Reserve,
    ServerError,
    ServerProtocol,
    Snapshot,
    Stats,
    Transfer,
    Watch,
    error_reply,
    frame,
    pack,
)
from protocol import _requests as requests

# ------------------------------------------------------------------------------------------------
# Helpers


def packed_body(message: Any) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def events_for(data: bytes, max_frame_bytes: int = MAX_FRAME_BYTES) -> list:
    return ServerProtocol(max_frame_bytes).receive_data(data)


def parse(message: dict[str, Any]) -> RequestReceived:
    """The one event a well-formed request produces; fails the test if it was rejected."""
    (event,) = events_for(pack(message))
    assert isinstance(event, RequestReceived), event
    return event


def rejection_of_body(body: bytes) -> RequestRejected:
    """The rejection of one frame holding `body` as it is; fails the test if it was accepted."""
    (event,) = events_for(frame(body))
    assert isinstance(event, RequestRejected), event
    return event


def rejection(message: Any) -> RequestRejected:
    return rejection_of_body(packed_body(message))


def assert_bad_request(message: dict[str, Any], field: str) -> None:
    event = rejection(message)
    assert event.close is False
    assert event.reply["id"] == message["id"]
    assert event.reply["ok"] is False
    assert event.reply["error"] == "bad_request"
    assert field in event.reply["message"]


def lines_of(count: int) -> list[dict[str, Any]]:
    return [{"sku": f"sku-{index}", "loc": "dock", "qty": 1} for index in range(count)]


PING_FRAME = pack({"id": 99, "op": "ping"})

# The properties do not depend on speed: a loaded CI machine must not turn them into failures.
tolerant_of_slow_machines = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ------------------------------------------------------------------------------------------------
# Framing


def test_frame_prefixes_the_big_endian_length() -> None:
    assert frame(b"abc") == b"\x00\x00\x00\x03abc"
    assert frame(b"x" * 258)[:4] == b"\x00\x00\x01\x02"


@tolerant_of_slow_machines
@given(
    bodies=st.lists(st.binary(min_size=1, max_size=300), min_size=1, max_size=20),
    cut_fractions=st.lists(st.floats(min_value=0.0, max_value=1.0), max_size=30),
)
def test_decoder_reassembles_frames_split_at_any_boundary(bodies: list[bytes], cut_fractions: list[float]) -> None:
    stream = b"".join(frame(body) for body in bodies)
    cuts = sorted({int(fraction * len(stream)) for fraction in cut_fractions} | {0, len(stream)})
    decoder = FrameDecoder(max_frame_bytes=300)
    decoded = []
    for start, end in zip(cuts, cuts[1:]):
        decoder.feed(stream[start:end])
        while (body := decoder.next_body()) is not None:
            decoded.append(body)
    assert decoded == bodies
    assert decoder.buffered_bytes == 0


@tolerant_of_slow_machines
@given(
    request_ids=st.lists(st.integers(min_value=0, max_value=2**64 - 1), min_size=1, max_size=20),
    cut_fractions=st.lists(st.floats(min_value=0.0, max_value=1.0), max_size=30),
)
def test_server_protocol_parses_pipelined_requests_split_at_any_boundary(
    request_ids: list[int], cut_fractions: list[float]
) -> None:
    stream = b"".join(pack({"id": request_id, "op": "get", "sku": "s", "loc": "l"}) for request_id in request_ids)
    cuts = sorted({int(fraction * len(stream)) for fraction in cut_fractions} | {0, len(stream)})
    server = ServerProtocol()
    events = []
    for start, end in zip(cuts, cuts[1:]):
        events.extend(server.receive_data(stream[start:end]))
    assert events == [RequestReceived(request_id, Get(sku="s", loc="l")) for request_id in request_ids]


def test_decoder_needs_the_whole_header_and_body() -> None:
    decoder = FrameDecoder(max_frame_bytes=10)
    decoder.feed(b"\x00\x00\x00")
    assert decoder.next_body() is None
    decoder.feed(b"\x03ab")
    assert decoder.next_body() is None
    decoder.feed(b"c")
    assert decoder.next_body() == b"abc"
    assert decoder.next_body() is None


def test_frame_of_exactly_max_bytes_is_accepted_and_one_more_is_not() -> None:
    decoder = FrameDecoder(max_frame_bytes=8)
    decoder.feed(frame(b"12345678"))
    assert decoder.next_body() == b"12345678"
    decoder.feed(frame(b"123456789"))
    with pytest.raises(FrameTooLarge) as raised:
        decoder.next_body()
    assert (raised.value.length, raised.value.limit) == (9, 8)


@pytest.mark.parametrize("length", [0, 65, 2**32 - 1])
def test_frame_length_zero_or_above_max_closes_and_nothing_after_is_parsed(length: int) -> None:
    server = ServerProtocol(max_frame_bytes=64)
    # Only the header of the bad frame is needed: its body is never buffered.
    data = PING_FRAME + struct.pack(">I", length) + PING_FRAME
    events = server.receive_data(data)
    assert events[0] == RequestReceived(99, Ping())
    assert len(events) == 2
    rejected = events[1]
    assert isinstance(rejected, RequestRejected)
    assert rejected.close is True
    assert rejected.reply["id"] is None
    assert rejected.reply["ok"] is False
    assert rejected.reply["error"] == "frame_too_large"
    assert server.broken is True
    assert server.receive_data(PING_FRAME) == []


def test_client_protocol_refuses_a_frame_too_large() -> None:
    client = ClientProtocol(max_frame_bytes=16)
    with pytest.raises(ProtocolViolation):
        client.receive_data(struct.pack(">I", 17))


# ------------------------------------------------------------------------------------------------
# Malformed bodies: bad_request, and the connection goes on


@pytest.mark.parametrize(
    ("body", "expected_id"),
    [
        pytest.param(packed_body([1, 2, 3]), None, id="array"),
        pytest.param(packed_body(7), None, id="integer"),
        pytest.param(packed_body("ping"), None, id="string"),
        pytest.param(packed_body(None), None, id="nil"),
        pytest.param(b"\xc1", None, id="never-used-byte"),
        pytest.param(b"\x82\xa2id\x01", None, id="truncated-map"),
        pytest.param(b"\x82\xa2id\x05\xa2op\xa2\xff\xfe", None, id="invalid-utf8-string"),
        pytest.param(packed_body({"id": 5, "op": "ping"}) + b"\x00", 5, id="trailing-bytes-with-readable-id"),
        pytest.param(packed_body({"op": "ping"}) + b"\x00", None, id="trailing-bytes-without-id"),
        pytest.param(packed_body({"id": 6, 1: "x", "op": "ping"}), 6, id="non-string-key"),
        pytest.param(packed_body({"id": 8, "op": 3}), 8, id="op-not-a-string"),
        pytest.param(packed_body({"id": 8}), 8, id="op-missing"),
    ],
)
def test_malformed_body_is_bad_request_and_following_frames_still_parse(body: bytes, expected_id: int | None) -> None:
    server = ServerProtocol()
    events = server.receive_data(frame(body) + PING_FRAME)
    assert len(events) == 2
    rejected, following = events
    assert isinstance(rejected, RequestRejected)
    assert rejected.close is False
    assert rejected.reply["id"] == expected_id
    assert rejected.reply["error"] == "bad_request"
    assert rejected.reply["ok"] is False
    assert isinstance(rejected.reply["message"], str) and rejected.reply["message"]
    assert following == RequestReceived(99, Ping())
    assert server.broken is False


def test_trailing_bytes_message_names_the_problem() -> None:
    event = rejection_of_body(packed_body({"id": 5, "op": "ping"}) + b"\x01\x02")
    assert "trailing" in event.reply["message"]


@pytest.mark.parametrize(
    "request_id",
    [None, -1, -(2**63), True, False, "7", 1.0, [1]],
    ids=["missing", "negative", "int64-min", "true", "false", "string", "float", "list"],
)
def test_unreadable_id_is_bad_request_with_id_none(request_id: Any) -> None:
    message: dict[str, Any] = {"op": "ping"}
    if request_id is not None:
        message["id"] = request_id
    event = rejection(message)
    assert event.reply["id"] is None
    assert event.reply["error"] == "bad_request"
    assert "id" in event.reply["message"]


@pytest.mark.parametrize("request_id", [0, 1, 2**32, 2**64 - 1])
def test_every_uint64_id_is_echoed(request_id: int) -> None:
    assert parse({"id": request_id, "op": "ping"}).request_id == request_id


def test_unknown_op_is_unknown_op_with_the_id() -> None:
    event = rejection({"id": 12, "op": "reserve_all_the_things"})
    assert event.close is False
    assert event.reply["id"] == 12
    assert event.reply["error"] == "unknown_op"
    assert "reserve_all_the_things" in event.reply["message"]


@tolerant_of_slow_machines
@given(st.binary(min_size=1, max_size=200))
def test_any_body_bytes_give_exactly_one_event_and_keep_the_connection(body: bytes) -> None:
    server = ServerProtocol()
    events = server.receive_data(frame(body))
    assert len(events) == 1
    assert server.broken is False
    if isinstance(events[0], RequestRejected):
        assert events[0].close is False
        assert events[0].reply["ok"] is False


# Field values near the edges the validators care about, and lines that are nearly right.
scalar_values = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-2, max_value=200)
    | st.sampled_from([2**31 - 1, 2**31, 2**63 - 1, -(2**63), 2**64 - 1])
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=3)
    | st.binary(max_size=2)
)
line_like_values = st.fixed_dictionaries({}, optional={"sku": scalar_values, "loc": scalar_values, "qty": scalar_values})
field_values = scalar_values | st.lists(line_like_values | scalar_values, max_size=3) | line_like_values


@tolerant_of_slow_machines
@given(
    op=st.sampled_from(sorted(OPS) + ["nope"]),
    fields=st.dictionaries(
        st.sampled_from(["rid", "lines", "ttl_ms", "ref", "sku", "loc", "qty", "key", "delta", "reason",
                         "on_hand", "from", "to", "version", "token", "client", "from_seq", "extra"]),
        field_values,
        max_size=6,
    ),
)
def test_validation_is_total_any_map_becomes_a_command_or_an_error_reply(op: str, fields: dict[str, Any]) -> None:
    message = {**fields, "id": 3, "op": op}
    (event,) = events_for(pack(message))
    if isinstance(event, RequestRejected):
        assert event.reply["id"] == 3
        assert event.reply["error"] in {"bad_request", "unknown_op"}
    else:
        assert event.request_id == 3


# ------------------------------------------------------------------------------------------------
# Every op parsed into its dataclass


@pytest.mark.parametrize(
    ("fields", "command"),
    [
        pytest.param({"op": "hello", "version": 1}, Hello(version=1), id="hello"),
        pytest.param(
            {"op": "hello", "version": 1, "token": "secret", "client": "order-service"},
            Hello(version=1, token="secret", client="order-service"),
            id="hello-all-fields",
        ),
        pytest.param({"op": "ping"}, Ping(), id="ping"),
        pytest.param(
            {"op": "reserve", "rid": "r-1", "lines": [{"sku": "s1", "loc": "a", "qty": 3}, {"sku": "s1", "loc": "b", "qty": 4}]},
            Reserve(rid="r-1", lines=(Line("s1", "a", 3), Line("s1", "b", 4)), ttl_ms=0, ref=None),
            id="reserve",
        ),
        pytest.param(
            {"op": "reserve", "rid": "r-1", "lines": [{"sku": "s", "loc": "l", "qty": QTY_MAX}], "ttl_ms": 30_000, "ref": "order-9"},
            Reserve(rid="r-1", lines=(Line("s", "l", QTY_MAX),), ttl_ms=30_000, ref="order-9"),
            id="reserve-all-fields",
        ),
        pytest.param(
            {"op": "reserve", "rid": "r-1", "lines": [{"sku": "s", "loc": "l", "qty": 1}], "ttl_ms": 0},
            Reserve(rid="r-1", lines=(Line("s", "l", 1),), ttl_ms=0),
            id="reserve-ttl-zero",
        ),
        pytest.param({"op": "release", "rid": "r-2"}, Release(rid="r-2"), id="release"),
        pytest.param({"op": "commit", "rid": "r-3"}, Commit(rid="r-3", lines=None), id="commit-in-full"),
        pytest.param(
            {"op": "commit", "rid": "r-3", "lines": [{"sku": "s", "loc": "a", "qty": 0}, {"sku": "s", "loc": "b", "qty": 2}]},
            Commit(rid="r-3", lines=(Line("s", "a", 0), Line("s", "b", 2))),
            id="commit-short-pick-with-qty-zero",
        ),
        pytest.param({"op": "extend", "rid": "r-4", "ttl_ms": 1}, Extend(rid="r-4", ttl_ms=1), id="extend"),
        pytest.param(
            {"op": "adjust", "key": "k-1", "sku": "s", "loc": "l", "delta": -7, "reason": "damage"},
            Adjust(key="k-1", sku="s", loc="l", delta=-7, reason="damage"),
            id="adjust",
        ),
        pytest.param(
            {"op": "count", "key": "k-2", "sku": "s", "loc": "l", "on_hand": 0},
            Count(key="k-2", sku="s", loc="l", on_hand=0, reason=None),
            id="count",
        ),
        pytest.param(
            {"op": "count", "key": "k-2", "sku": "s", "loc": "l", "on_hand": 12, "reason": "cycle"},
            Count(key="k-2", sku="s", loc="l", on_hand=12, reason="cycle"),
            id="count-with-reason",
        ),
        pytest.param(
            {"op": "transfer", "key": "k-3", "sku": "s", "from": "a", "to": "b", "qty": 5},
            Transfer(key="k-3", sku="s", from_loc="a", to_loc="b", qty=5),
            id="transfer",
        ),
        pytest.param({"op": "get", "sku": "s", "loc": "l"}, Get(sku="s", loc="l"), id="get"),
        pytest.param({"op": "query", "sku": "s"}, Query(sku="s"), id="query"),
        pytest.param({"op": "lookup", "rid": "r-5"}, Lookup(rid="r-5"), id="lookup"),
        pytest.param({"op": "watch"}, Watch(from_seq=None), id="watch"),
        pytest.param({"op": "watch", "from_seq": 0}, Watch(from_seq=0), id="watch-from-zero"),
        pytest.param({"op": "watch", "from_seq": 41}, Watch(from_seq=41), id="watch-from-seq"),
        pytest.param({"op": "snapshot"}, Snapshot(), id="snapshot"),
        pytest.param({"op": "stats"}, Stats(), id="stats"),
    ],
)
def test_every_op_is_parsed_into_its_command(fields: dict[str, Any], command: Any) -> None:
    assert parse({"id": 21, **fields}) == RequestReceived(21, command)


def test_the_op_table_covers_exactly_the_contract() -> None:
    assert OPS == {
        "hello", "ping", "reserve", "release", "commit", "extend", "adjust", "count", "transfer",
        "get", "query", "lookup", "watch", "snapshot", "stats",
    }


def test_unknown_fields_are_ignored_at_top_level_and_in_lines() -> None:
    event = parse(
        {
            "id": 4,
            "op": "reserve",
            "rid": "r",
            "lines": [{"sku": "s", "loc": "l", "qty": 2, "note": "fragile"}],
            "priority": [1, {"x": None}],
            "trace": b"\x00\x01",
        }
    )
    assert event == RequestReceived(4, Reserve(rid="r", lines=(Line("s", "l", 2),)))


def test_optional_field_sent_as_nil_reads_as_absent() -> None:
    event = parse({"id": 4, "op": "reserve", "rid": "r", "lines": lines_of(1), "ttl_ms": None, "ref": None})
    assert event.command == Reserve(rid="r", lines=(Line("sku-0", "dock", 1),), ttl_ms=0, ref=None)


# ------------------------------------------------------------------------------------------------
# Field validation: bad_request naming the field, with the id echoed


def reserve_with(**overrides: Any) -> dict[str, Any]:
    message = {"id": 31, "op": "reserve", "rid": "r", "lines": lines_of(1)}
    message.update(overrides)
    return {key: value for key, value in message.items() if value is not ...}


@pytest.mark.parametrize(
    ("message", "field"),
    [
        pytest.param(reserve_with(rid=...), "rid", id="reserve-missing-rid"),
        pytest.param(reserve_with(lines=...), "lines", id="reserve-missing-lines"),
        pytest.param(reserve_with(lines={"sku": "s", "loc": "l", "qty": 1}), "lines", id="lines-not-a-list"),
        pytest.param(reserve_with(lines=[]), "lines", id="no-lines"),
        pytest.param(reserve_with(lines=lines_of(LINES_PER_RESERVATION_MAX + 1)), "lines", id="101-lines"),
        pytest.param(reserve_with(lines=["s", "l", 1]), "lines[0]", id="line-not-a-map"),
        pytest.param(reserve_with(lines=[{"sku": "s", "qty": 1}]), "loc", id="line-missing-loc"),
        pytest.param(
            reserve_with(lines=[{"sku": "s", "loc": "l", "qty": 1}, {"sku": "s", "loc": "l", "qty": 2}]),
            "lines[1]",
            id="duplicate-sku-location",
        ),
        pytest.param(reserve_with(lines=[{"sku": "s", "loc": "l", "qty": 0}]), "qty", id="qty-zero"),
        pytest.param(reserve_with(lines=[{"sku": "s", "loc": "l", "qty": -1}]), "qty", id="qty-negative"),
        pytest.param(reserve_with(lines=[{"sku": "s", "loc": "l", "qty": 2**31}]), "qty", id="qty-2^31"),
        pytest.param(reserve_with(lines=[{"sku": "s", "loc": "l", "qty": True}]), "qty", id="qty-true"),
        pytest.param(reserve_with(lines=[{"sku": "s", "loc": "l", "qty": 1.0}]), "qty", id="qty-float"),
        pytest.param(reserve_with(lines=[{"sku": "s", "loc": "l", "qty": "1"}]), "qty", id="qty-string"),
        pytest.param(reserve_with(rid=""), "rid", id="rid-0-bytes"),
        pytest.param(reserve_with(rid="r" * 129), "rid", id="rid-129-bytes"),
        pytest.param(reserve_with(rid="é" * 65), "rid", id="rid-65-chars-130-bytes"),
        pytest.param(reserve_with(rid="€" * 43), "rid", id="rid-43-chars-129-bytes"),
        pytest.param(reserve_with(rid=17), "rid", id="rid-integer"),
        pytest.param(reserve_with(rid=b"r"), "rid", id="rid-binary"),
        pytest.param(reserve_with(lines=[{"sku": "s" * 129, "loc": "l", "qty": 1}]), "sku", id="sku-129-bytes"),
        pytest.param(reserve_with(ref="x" * 257), "ref", id="ref-257-bytes"),
        pytest.param(reserve_with(ttl_ms=-1), "ttl_ms", id="ttl-negative"),
        pytest.param(reserve_with(ttl_ms=True), "ttl_ms", id="ttl-true"),
        pytest.param({"id": 32, "op": "commit", "rid": "r", "lines": []}, "lines", id="commit-empty-lines"),
        pytest.param(
            {"id": 32, "op": "commit", "rid": "r", "lines": [{"sku": "s", "loc": "l", "qty": -1}]},
            "qty",
            id="commit-qty-negative",
        ),
        pytest.param({"id": 33, "op": "extend", "rid": "r", "ttl_ms": 0}, "ttl_ms", id="extend-ttl-zero"),
        pytest.param({"id": 33, "op": "extend", "rid": "r"}, "ttl_ms", id="extend-missing-ttl"),
        pytest.param(
            {"id": 34, "op": "adjust", "key": "k", "sku": "s", "loc": "l", "delta": 0, "reason": "receipt"},
            "delta",
            id="adjust-delta-zero",
        ),
        pytest.param(
            {"id": 34, "op": "adjust", "key": "k", "sku": "s", "loc": "l", "delta": True, "reason": "receipt"},
            "delta",
            id="adjust-delta-true",
        ),
        pytest.param({"id": 34, "op": "adjust", "key": "k", "sku": "s", "loc": "l", "delta": 3}, "reason", id="adjust-without-reason"),
        pytest.param(
            {"id": 34, "op": "adjust", "key": "k", "sku": "s", "loc": "l", "delta": 3, "reason": ""},
            "reason",
            id="adjust-empty-reason",
        ),
        pytest.param({"id": 35, "op": "count", "key": "k", "sku": "s", "loc": "l", "on_hand": -1}, "on_hand", id="count-negative"),
        pytest.param({"id": 35, "op": "count", "key": "k", "sku": "s", "loc": "l"}, "on_hand", id="count-missing-on-hand"),
        pytest.param({"id": 36, "op": "transfer", "key": "k", "sku": "s", "from": "a", "qty": 1}, "to", id="transfer-missing-to"),
        pytest.param({"id": 36, "op": "transfer", "key": "k", "sku": "s", "from": "a", "to": "b", "qty": 0}, "qty", id="transfer-qty-zero"),
        pytest.param({"id": 37, "op": "get", "sku": "s"}, "loc", id="get-missing-loc"),
        pytest.param({"id": 37, "op": "query", "sku": None}, "sku", id="query-nil-sku"),
        pytest.param({"id": 37, "op": "lookup", "rid": ["r"]}, "rid", id="lookup-rid-list"),
        pytest.param({"id": 38, "op": "hello"}, "version", id="hello-missing-version"),
        pytest.param({"id": 38, "op": "hello", "version": "1"}, "version", id="hello-version-string"),
        pytest.param({"id": 39, "op": "watch", "from_seq": -1}, "from_seq", id="watch-negative-seq"),
        pytest.param({"id": 39, "op": "watch", "from_seq": False}, "from_seq", id="watch-seq-false"),
    ],
)
def test_invalid_fields_are_bad_request_naming_the_field(message: dict[str, Any], field: str) -> None:
    assert_bad_request(message, field)


@pytest.mark.parametrize(
    "rid",
    ["r", "r" * 128, "é" * 64, "€" * 42, "𝄞" * 32],
    ids=["1-byte", "128-ascii", "64-two-byte-chars", "42-three-byte-chars", "32-four-byte-chars"],
)
def test_names_up_to_128_utf8_bytes_are_accepted(rid: str) -> None:
    assert parse({"id": 1, "op": "lookup", "rid": rid}).command == Lookup(rid=rid)


def test_limits_at_the_edge_are_accepted() -> None:
    event = parse(reserve_with(lines=lines_of(LINES_PER_RESERVATION_MAX), ref="x" * 256))
    assert len(event.command.lines) == LINES_PER_RESERVATION_MAX
    assert event.command.ref == "x" * 256


@tolerant_of_slow_machines
@given(st.text(max_size=140))
def test_a_name_is_accepted_exactly_when_it_is_1_to_128_utf8_bytes(sku: str) -> None:
    (event,) = events_for(pack({"id": 2, "op": "query", "sku": sku}))
    size = len(sku.encode("utf-8"))
    if 1 <= size <= 128:
        assert event == RequestReceived(2, Query(sku=sku))
    else:
        assert isinstance(event, RequestRejected)
        assert event.reply["error"] == "bad_request"


# ------------------------------------------------------------------------------------------------
# ClientProtocol, and a round trip through ServerProtocol


def test_client_requests_round_trip_through_the_server_protocol() -> None:
    client = ClientProtocol()
    server = ServerProtocol()
    built = [
        (requests.hello_request(token="t", client="tests"), Hello(version=1, token="t", client="tests")),
        (requests.ping_request(), Ping()),
        (
            requests.reserve_request("r", [("s", "a", 2), {"sku": "s", "loc": "b", "qty": 3}, Line("t", "a", 1)], ttl_ms=500, ref="o-1"),
            Reserve(rid="r", lines=(Line("s", "a", 2), Line("s", "b", 3), Line("t", "a", 1)), ttl_ms=500, ref="o-1"),
        ),
        (requests.release_request("r"), Release(rid="r")),
        (requests.commit_request("r"), Commit(rid="r")),
        (requests.commit_request("r", [("s", "a", 0)]), Commit(rid="r", lines=(Line("s", "a", 0),))),
        (requests.extend_request("r", 1000), Extend(rid="r", ttl_ms=1000)),
        (requests.adjust_request("k", "s", "a", 5, "receipt"), Adjust(key="k", sku="s", loc="a", delta=5, reason="receipt")),
        (requests.count_request("k2", "s", "a", 9), Count(key="k2", sku="s", loc="a", on_hand=9)),
        (requests.transfer_request("k3", "s", "a", "b", 4), Transfer(key="k3", sku="s", from_loc="a", to_loc="b", qty=4)),
        (requests.get_request("s", "a"), Get(sku="s", loc="a")),
        (requests.query_request("s"), Query(sku="s")),
        (requests.lookup_request("r"), Lookup(rid="r")),
        (requests.watch_request(), Watch()),
        (requests.watch_request(from_seq=7), Watch(from_seq=7)),
        (requests.snapshot_request(), Snapshot()),
        (requests.stats_request(), Stats()),
    ]
    data = b""
    sent_ids = []
    for (op, fields), _ in built:
        request_id, encoded = client.request(op, **fields)
        sent_ids.append(request_id)
        data += encoded
    assert sent_ids == list(range(1, len(built) + 1))
    events = server.receive_data(data)
    assert events == [RequestReceived(request_id, command) for request_id, (_, command) in zip(sent_ids, built)]


def test_client_decodes_replies_and_pushed_events_split_across_reads() -> None:
    client = ClientProtocol()
    data = (
        ServerProtocol.send({"id": 2, "ok": True, "seq": 10})
        + ServerProtocol.send({"event": {"seq": 11, "type": "reserved"}})
        + ServerProtocol.send(error_reply(1, "insufficient", "short", lines=[]))
    )
    messages = []
    for index in range(len(data)):
        messages.extend(client.receive_data(data[index : index + 1]))
    assert messages == [
        {"id": 2, "ok": True, "seq": 10},
        {"event": {"seq": 11, "type": "reserved"}},
        {"id": 1, "ok": False, "error": "insufficient", "message": "short", "lines": []},
    ]
    assert requests.pushed_event(messages[1]) == {"seq": 11, "type": "reserved"}
    assert requests.pushed_event(messages[0]) is None


def test_client_leaves_none_fields_off_the_wire() -> None:
    request_id, data = ClientProtocol(first_id=40).request("reserve", rid="r", ttl_ms=None, ref=None)
    assert request_id == 40
    assert msgpack.unpackb(data[4:]) == {"id": 40, "op": "reserve", "rid": "r"}


def test_client_refuses_an_id_field_that_would_hide_the_real_id() -> None:
    with pytest.raises(ValueError):
        ClientProtocol().request("ping", id=5)


@pytest.mark.parametrize(
    "body",
    [b"\xc1", packed_body([1]), packed_body({"id": 1}) + b"\x00", b"\xa2\xff\xfe"],
    ids=["invalid-msgpack", "array", "trailing-bytes", "invalid-utf8"],
)
def test_client_treats_a_malformed_reply_as_a_protocol_violation(body: bytes) -> None:
    with pytest.raises(ProtocolViolation):
        ClientProtocol().receive_data(frame(body))


def test_server_error_exposes_code_message_and_reply() -> None:
    reply = error_reply(9, "invalid_state", "already expired", state="expired")
    error = ServerError(reply)
    assert (error.code, error.message, error.reply["state"]) == ("invalid_state", "already expired", "expired")
    assert str(error) == "invalid_state: already expired"


# ------------------------------------------------------------------------------------------------
# The shared request builders


def test_request_builders_use_the_wire_field_names_and_drop_absent_options() -> None:
    assert requests.transfer_request("k", "s", "a", "b", 2) == (
        "transfer",
        {"key": "k", "sku": "s", "from": "a", "to": "b", "qty": 2},
    )
    assert requests.reserve_request("r", [("s", "l", 1)]) == ("reserve", {"rid": "r", "lines": [{"sku": "s", "loc": "l", "qty": 1}]})
    assert requests.reserve_request("r", [], ttl_ms=0) == ("reserve", {"rid": "r", "lines": [], "ttl_ms": 0})
    assert requests.commit_request("r") == ("commit", {"rid": "r"})
    assert requests.count_request("k", "s", "l", 0) == ("count", {"key": "k", "sku": "s", "loc": "l", "on_hand": 0})
    assert requests.hello_request() == ("hello", {"version": 1})
    assert requests.watch_request() == ("watch", {})

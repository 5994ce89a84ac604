"""Hostile input against a live in-process server over real TCP (127.0.0.1).

Each hypothesis example runs its own `trio.run` with a fresh server (own data directory) in the
same nursery as the test code, so any exception that escapes the server's nursery (a crashed
connection handler, owner task or log writer) fails the example. After every case a NEW connection
must still `ping` and `get`, and the server must not have stopped on its own.

Properties (see shared/PROTOCOL.md, docs/PROTOCOL.md):
- pipelined frames of length 1..max_frame holding anything (random bytes, random msgpack values,
  near-valid requests, truncated or over-long bodies) get exactly one well-formed reply each, with
  the request's `id` echoed when it is a uint below 2^64 and nil otherwise; the connection stays
  open (a `ping` after the batch answers, and nothing stray comes before it);
- splitting the same bytes at arbitrary points (with small pauses) gives the same replies;
- a byte stream with random headers gets one reply per complete frame, and on a header of 0 or
  above max_frame exactly one `frame_too_large` (id nil) and a close;
- random valid operations on a small universe, pipelined on one or more connections, keep the
  invariants: reserved == held lines, no oversell, on_hand conserved per SKU.

msgpack cannot encode integers >= 2^64, so ids "above 2^64" are sent as floats (2.0**64, 1e300).
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import struct
import tempfile
from collections import Counter, deque
from pathlib import Path
from typing import Any, Awaitable, Callable

import msgpack
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.config import Config
from engine.core import State, apply_event, check_invariants
from engine.server import RunningServer, run_server
from protocol import ERROR_CODES, OPS, FrameDecoder, frame

MAX_FRAME = 4096  # configured on the fuzzed servers, so that hypothesis reaches the bound
CASE_TIMEOUT = 15  # seconds for one example, server start and stop included
REPLY_TIMEOUT = 5
SENTINEL_ID = 2**64 - 7  # the ping after a batch; never generated as a request id
SERVER_TOKEN = "fuzz-token-never-generated"  # some servers require it; no fuzzed hello carries it
UINT64_MAX = 2**64 - 1

# FUZZ_SCALE=10 multiplies every example count (a longer bug hunt); the default keeps the file
# well under 20 s.
FUZZ_SCALE = float(os.environ.get("FUZZ_SCALE", "1"))


def fuzz_settings(max_examples: int) -> settings:
    """Bounded example counts; no deadline (a loaded CI machine must not turn a slow example
    into a failure)."""
    return settings(
        max_examples=max(1, int(max_examples * FUZZ_SCALE)),
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


# ------------------------------------------------------------------------------------------------
# A fresh server per example


def config_for(data_dir: Path, **overrides: Any) -> Config:
    """Like conftest.test_config: any free port, a small LMDB map; plus a small max_frame."""
    base = Config(port=0, data_dir=str(data_dir), map_size_bytes=256 * 1024**2, max_frame_bytes=MAX_FRAME, freeze_after_slow_full_collections=False)
    return dataclasses.replace(base, **overrides)


def with_servers(case: Callable[..., Awaitable[None]], count: int = 1, **overrides: Any) -> None:
    """Run `case(*servers)` in a new trio run against `count` fresh servers, then check that each
    still serves a new connection. A server crash propagates out of the nursery and fails the call."""

    async def main() -> None:
        failure: Exception | None = None
        with tempfile.TemporaryDirectory(prefix="fuzz-") as tmp:
            with trio.fail_after(CASE_TIMEOUT):
                async with trio.open_nursery() as nursery:
                    servers = [
                        await nursery.start(run_server, config_for(Path(tmp) / f"data{index}", **overrides))
                        for index in range(count)
                    ]
                    try:
                        await case(*servers)
                        for server in servers:
                            await assert_serves_new_connection(server)
                    except Exception as error:  # an assertion: report it bare, not in a group
                        failure = error
                    finally:
                        for server in servers:
                            server.stop()
        if failure is not None:
            raise failure

    trio.run(main)


class Peer:
    """A raw TCP client: send any bytes, read reply maps (asserting each one decodes to a map)."""

    def __init__(self, stream: trio.SocketStream, server: RunningServer | None = None):
        self.stream = stream
        self.server = server  # when known: every reply is checked to reflect only durable changes
        self.decoder = FrameDecoder(1 << 24)
        self.inbox: deque[dict[str, Any]] = deque()
        self.closed_by_server = False

    @classmethod
    async def open(cls, server: RunningServer) -> "Peer":
        return cls(await trio.open_tcp_stream(server.host, server.port), server)

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def read_one(self) -> dict[str, Any] | None:
        """The next reply, or None once the server closed (EOF or reset) with nothing more."""
        while not self.inbox:
            if self.closed_by_server:
                return None
            try:
                data = await self.stream.receive_some(65536)
            except trio.BrokenResourceError:
                data = b""
            if not data:
                self.closed_by_server = True
                assert self.decoder.buffered_bytes == 0, "the server closed in the middle of a reply frame"
                return None
            self.decoder.feed(data)
            while (body := self.decoder.next_body()) is not None:
                message = msgpack.unpackb(body, raw=False)  # strict_map_key: reply keys must be strings
                assert isinstance(message, dict), f"reply is not a map: {message!r}"
                if self.server is not None and isinstance(message.get("seq"), int):
                    # In process, the log's durable position is known when the reply arrives.
                    durable_seq = self.server.engine.wal.durable_seq
                    assert message["seq"] <= durable_seq, f"reply reflects seq {message['seq']} before it is durable ({durable_seq}): {message!r}"
                self.inbox.append(message)
        return self.inbox.popleft()

    async def collect(self, count: int, timeout: float = REPLY_TIMEOUT) -> list[dict[str, Any]]:
        """Up to `count` replies; fewer if the server closes or `timeout` passes first."""
        replies: list[dict[str, Any]] = []
        with trio.move_on_after(timeout):
            while len(replies) < count:
                reply = await self.read_one()
                if reply is None:
                    break
                replies.append(reply)
        return replies

    async def collect_until_closed(self, timeout: float = REPLY_TIMEOUT) -> list[dict[str, Any]]:
        replies = await self.collect(1 << 30, timeout)
        assert self.closed_by_server, f"the server did not close the connection within {timeout} s (got {len(replies)} replies)"
        return replies

    async def assert_only_sentinel_follows(self, unauthorized: bool = False) -> None:
        """A ping after a batch: the very next reply must be its own (no stray or duplicate reply):
        ok, or `unauthorized` on a connection that never said hello with the server's token."""
        await self.send(pack({"id": SENTINEL_ID, "op": "ping"}))
        replies = await self.collect(1)
        assert replies, "no reply to a ping sent after the batch: the connection is stuck or closed"
        outcome = (replies[0].get("id"), replies[0].get("ok"), replies[0].get("error"))
        expected = (SENTINEL_ID, False, "unauthorized") if unauthorized else (SENTINEL_ID, True, None)
        assert outcome == expected, f"expected the reply to the ping after the batch, got: {replies[0]!r}"

    async def aclose(self) -> None:
        await self.stream.aclose()


def pack(message: Any) -> bytes:
    return frame(msgpack.packb(message, use_bin_type=True))


def body_of(message: Any) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


async def assert_serves_new_connection(server: RunningServer) -> None:
    assert not server.stopped.is_set(), "the server stopped on its own"
    peer = await Peer.open(server)
    try:
        token = server.engine.config.token
        hello = pack({"id": 0, "op": "hello", "version": 1, "token": token}) if token is not None else b""
        await peer.send(hello + pack({"id": 1, "op": "ping"}) + pack({"id": 2, "op": "get", "sku": "probe", "loc": "probe"}))
        replies = {reply.get("id"): reply for reply in await peer.collect(3 if hello else 2)}
        assert set(replies) == ({0, 1, 2} if hello else {1, 2}), f"a new connection did not get its replies: {replies!r}"
        assert replies[1]["ok"] is True, replies[1]
        get = replies[2]
        assert get["ok"] is True, get
        assert (get["sku"], get["loc"], get["on_hand"], get["reserved"], get["available"]) == ("probe", "probe", 0, 0, 0), get
    finally:
        await peer.aclose()


# ------------------------------------------------------------------------------------------------
# Oracles


def expected_id(body: bytes) -> int | None:
    """What the contract says the reply's `id` must be: the request's `id` when the body decodes
    to a map (possibly followed by trailing bytes) whose `id` is a uint below 2^64, else nil."""
    try:
        message = msgpack.unpackb(body, raw=False, strict_map_key=False)
    except msgpack.ExtraData as extra:
        message = extra.unpacked
    except Exception:
        return None
    if not isinstance(message, dict):
        return None
    value = message.get("id")
    if type(value) is int and 0 <= value <= UINT64_MAX:
        return value
    return None


def check_reply_shape(reply: dict[str, Any]) -> None:
    assert isinstance(reply.get("ok"), bool), f"`ok` is not a bool: {reply!r}"
    assert "id" in reply, f"reply without `id`: {reply!r}"
    reply_id = reply["id"]
    assert reply_id is None or (type(reply_id) is int and 0 <= reply_id <= UINT64_MAX), f"bad `id`: {reply!r}"
    if reply["ok"]:
        assert "error" not in reply, reply
        assert reply_id is not None, f"a success reply must echo a request id: {reply!r}"
    else:
        assert reply.get("error") in ERROR_CODES, f"not a contract error code: {reply!r}"
        assert isinstance(reply.get("message"), str) and reply["message"], f"error without a message: {reply!r}"


def check_batch_replies(bodies: list[bytes], replies: list[dict[str, Any]]) -> None:
    """One well-formed reply per body, ids echoed as the contract says (replies may be reordered)."""
    assert len(replies) == len(bodies), f"{len(bodies)} frames sent, {len(replies)} replies received"
    for reply in replies:
        check_reply_shape(reply)
        assert reply.get("error") != "frame_too_large", f"frame_too_large for a frame of length 1..max_frame: {reply!r}"
    expected = Counter(expected_id(body) for body in bodies)
    received = Counter(reply["id"] for reply in replies)
    assert received == expected, f"reply ids {received} != request ids {expected}"
    for reply in replies:
        if reply["id"] is None:  # no readable id: malformed by definition
            assert reply["error"] == "bad_request", reply


def canonical(reply: dict[str, Any]) -> str:
    return json.dumps(reply, sort_keys=True, default=repr)


def cut(data: bytes, fractions: list[float]) -> list[bytes]:
    points = sorted({int(fraction * len(data)) for fraction in fractions} | {0, len(data)})
    return [data[start:end] for start, end in zip(points, points[1:])]


PAUSES_TOTAL_MAX = 0.2  # seconds of pauses per stream, so that 1-byte chunks stay fast


async def send_chunks(peer: Peer, chunks: list[bytes], pauses: list[float], tolerate_close: bool = False) -> None:
    """Send each chunk in its own write, pausing between them as `pauses` says (cyclically)."""
    paused = 0.0
    try:
        for index, chunk in enumerate(chunks):
            await peer.send(chunk)
            pause = pauses[index % len(pauses)] if pauses else 0.0
            if pause and paused < PAUSES_TOTAL_MAX:
                paused += pause
                await trio.sleep(pause)
            else:
                await trio.sleep(0)  # let the server read this chunk on its own
    except trio.BrokenResourceError:
        if not tolerate_close:
            raise


# ------------------------------------------------------------------------------------------------
# Strategies

# NaN never equals itself: Counter-based id comparisons stay correct (NaN is never a valid id).
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=UINT64_MAX),
    st.floats(),
    st.text(max_size=16),
    st.binary(max_size=16),
    # Python's ExtType takes codes 0..127; the reserved -1 (timestamp) comes as a real Timestamp
    # here, and malformed as raw bytes (random bodies, HOSTILE_BODIES).
    st.builds(msgpack.ExtType, st.integers(min_value=0, max_value=127), st.binary(max_size=12)),
    st.builds(msgpack.Timestamp, st.integers(min_value=-(2**33), max_value=2**34), st.integers(min_value=0, max_value=999_999_999)),
)
non_string_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**63), max_value=UINT64_MAX), st.floats(), st.binary(max_size=16)
)
map_keys = st.one_of(
    st.text(max_size=8),
    st.integers(min_value=-(2**63), max_value=UINT64_MAX),
    st.booleans(),
    st.none(),
    st.binary(max_size=8),
    st.floats(allow_nan=False),
)
msgpack_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(map_keys, children, max_size=4),
    max_leaves=16,
)

valid_ids = st.one_of(
    st.integers(min_value=0, max_value=UINT64_MAX),
    st.sampled_from([0, 1, 2**32, 2**63, UINT64_MAX]),
).filter(lambda value: value != SENTINEL_ID)
invalid_ids = st.one_of(
    st.integers(min_value=-(2**63), max_value=-1),
    st.sampled_from([2.0**64, 2.0**65, 1e300, float("inf"), float("nan"), 1.0, 0.0, -1.0]),
    st.floats(),
    st.booleans(),
    st.none(),
    st.text(max_size=8),
    st.binary(max_size=8),
    st.lists(st.integers(min_value=0, max_value=9), max_size=2),
    st.just({"id": 1}),
)

names = st.one_of(
    st.sampled_from(["s0", "s1", "l0", "l1", "r0", "r1", "k0", "k1"]),
    st.text(max_size=12),
    st.sampled_from(["", "x" * 128, "x" * 129, "é" * 64, "é" * 65]),  # the 1..128 UTF-8 byte bound
)
small_ints = st.one_of(
    st.integers(min_value=-3, max_value=20),
    st.sampled_from([2**31 - 1, 2**31, -(2**31), 2**63 - 1, UINT64_MAX, -(2**63)]),
)


def lines_of(qty: st.SearchStrategy) -> st.SearchStrategy:
    line = st.fixed_dictionaries({"sku": names, "loc": names, "qty": qty})
    field_soup = st.dictionaries(st.sampled_from(["sku", "loc", "qty", "x"]), msgpack_values, max_size=3)
    return st.lists(st.one_of(line, line, field_soup, msgpack_values), min_size=0, max_size=4)


FIELD_STRATEGIES: dict[str, st.SearchStrategy] = {
    "version": st.one_of(st.just(1), small_ints),
    "token": st.text(max_size=10).filter(lambda token: token != SERVER_TOKEN),
    "client": st.text(max_size=10),
    "rid": names,
    "key": names,
    "sku": names,
    "loc": names,
    "from": names,
    "to": names,
    "lines": lines_of(small_ints),
    "ttl_ms": st.one_of(st.sampled_from([0, 1, 5, 600_000, 366 * 24 * 3600 * 1000 + 1]), small_ints),
    "ref": st.one_of(st.text(max_size=12), st.sampled_from(["", "r" * 256, "r" * 257])),
    "delta": small_ints,
    "reason": st.one_of(st.sampled_from(["receipt", "damage"]), st.text(max_size=8)),
    "on_hand": small_ints,
    "qty": small_ints,
    "from_seq": small_ints,
}
OP_FIELDS: dict[str, list[str]] = {
    "hello": ["version", "token", "client"],
    "ping": [],
    "reserve": ["rid", "lines", "ttl_ms", "ref"],
    "release": ["rid"],
    "commit": ["rid", "lines"],
    "extend": ["rid", "ttl_ms"],
    "adjust": ["key", "sku", "loc", "delta", "reason"],
    "count": ["key", "sku", "loc", "on_hand", "reason"],
    "transfer": ["key", "sku", "from", "to", "qty"],
    "get": ["sku", "loc"],
    "query": ["sku"],
    "lookup": ["rid"],
    "snapshot": [],
    "stats": [],
}
assert set(OP_FIELDS) | {"watch"} == set(OPS), "the fuzzer must know every op of the protocol"
# `watch` turns the connection into an event stream (no more replies): fuzzed separately.
FUZZ_OPS = sorted(OP_FIELDS)
# Ops whose replies cannot depend on timing or on what else ran: for the chunking comparison.
DETERMINISTIC_OPS = ["hello", "ping", "get", "query", "lookup"]


@st.composite
def near_valid_requests(draw: st.DrawFn, ops: list[str] = FUZZ_OPS) -> dict[Any, Any]:
    """A request of a real op with each field valid, of a random type, or missing; random extras;
    an id that is valid, invalid (any type) or missing."""
    op = draw(st.one_of(
        st.sampled_from(ops),
        st.sampled_from(ops),
        st.text(max_size=10).filter(lambda name: name not in OPS),
        non_string_scalars,
    ))
    message: dict[Any, Any] = {}
    id_kind = draw(st.sampled_from(["valid", "valid", "invalid", "missing"]))
    if id_kind == "valid":
        message["id"] = draw(valid_ids)
    elif id_kind == "invalid":
        message["id"] = draw(invalid_ids)
    message["op"] = op
    for field in OP_FIELDS.get(op, []) if isinstance(op, str) else []:
        choice = draw(st.integers(min_value=0, max_value=9))
        if choice == 0:
            continue  # missing
        message[field] = draw(msgpack_values if choice == 1 else FIELD_STRATEGIES[field])
    extras = draw(st.dictionaries(map_keys, msgpack_values, max_size=3))
    for key, value in extras.items():
        if key not in ("id", "op"):
            message[key] = value
    return message


def frame_bodies(ops: list[str] = FUZZ_OPS) -> st.SearchStrategy[bytes]:
    requests = near_valid_requests(ops).map(body_of)
    return st.one_of(
        st.binary(min_size=1, max_size=64),
        st.binary(min_size=1, max_size=MAX_FRAME),
        st.sampled_from([1, MAX_FRAME]).flatmap(lambda size: st.binary(min_size=size, max_size=size)),
        msgpack_values.map(body_of),
        requests,
        requests,
        requests,
        st.tuples(requests, st.binary(min_size=1, max_size=8)).map(lambda parts: parts[0] + parts[1]),  # trailing bytes
        requests.flatmap(lambda body: st.integers(min_value=1, max_value=len(body)).map(lambda size: body[:size])),  # truncated
    ).filter(lambda body: 1 <= len(body) <= MAX_FRAME)


# Back-pressure bounds, from tiny (every path that pauses reading or sheds load) to the defaults.
server_limits = st.fixed_dictionaries({
    "in_flight_per_connection_max": st.sampled_from([1, 2, 4096]),
    "mailbox_messages_max": st.sampled_from([1, 2, 4096]),
    "wal_backlog_max": st.sampled_from([1, 3, 200_000]),
    "records_per_commit_max": st.sampled_from([1, 20_000]),
})


# ------------------------------------------------------------------------------------------------
# 1. Pipelined hostile frames: one well-formed reply each, connection stays usable


@fuzz_settings(150)
@given(
    bodies=st.lists(frame_bodies(), min_size=1, max_size=25),
    limits=server_limits,
    half_close=st.booleans(),
    token=st.sampled_from([None, None, SERVER_TOKEN]),
)
def test_pipelined_hostile_frames_get_one_well_formed_reply_each(
    bodies: list[bytes], limits: dict[str, int], half_close: bool, token: str | None
) -> None:
    """With a token configured (never generated in the bodies), nothing may succeed."""

    async def case(server: RunningServer) -> None:
        peer = await Peer.open(server)

        async def send_batch() -> None:
            await peer.send(b"".join(frame(body) for body in bodies))
            if half_close:  # the replies owed must still come, then the server closes
                await peer.stream.send_eof()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_batch)
            replies = await (peer.collect_until_closed() if half_close else peer.collect(len(bodies)))
        check_batch_replies(bodies, replies)
        if token is not None:
            assert not [reply for reply in replies if reply["ok"]], f"succeeded without the token: {replies!r}"
        if not half_close:
            await peer.assert_only_sentinel_follows(unauthorized=token is not None)
        await peer.aclose()

    with_servers(case, token=token, **limits)


# ------------------------------------------------------------------------------------------------
# 2. The same bytes split anywhere give the same replies


# Where to cut a stream: anywhere (fractions of its length), or into pieces of a fixed small size
# (every header and body split, down to one byte at a time).
cuts = st.one_of(
    st.lists(st.floats(min_value=0.0, max_value=1.0), max_size=40),
    st.integers(min_value=1, max_value=9),
)


CHUNKS_MAX = 1500  # pieces per stream (one write each): bounds the run time of tiny pieces


def split(data: bytes, how: list[float] | int) -> list[bytes]:
    if isinstance(how, int):
        size = max(how, -(-len(data) // CHUNKS_MAX))
        return [data[start : start + size] for start in range(0, len(data), size)]
    return cut(data, how)


@fuzz_settings(60)
@given(
    bodies=st.lists(frame_bodies(DETERMINISTIC_OPS), min_size=1, max_size=15),
    how=cuts,
    pauses=st.lists(st.sampled_from([0.0, 0.0, 0.0, 0.001]), max_size=8),
)
def test_bytes_split_at_any_point_give_the_same_replies(bodies: list[bytes], how: list[float] | int, pauses: list[float]) -> None:
    data = b"".join(frame(body) for body in bodies)
    chunks = split(data, how)
    assert b"".join(chunks) == data

    async def case(whole_server: RunningServer, chunked_server: RunningServer) -> None:
        results = []
        for server, pieces in ((whole_server, [data]), (chunked_server, chunks)):
            peer = await Peer.open(server)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_chunks, peer, pieces, pauses)
                replies = await peer.collect(len(bodies))
            check_batch_replies(bodies, replies)
            await peer.assert_only_sentinel_follows()
            await peer.aclose()
            results.append(sorted(canonical(reply) for reply in replies))
        assert results[0] == results[1], "chunking changed the replies"

    with_servers(case, count=2)


# ------------------------------------------------------------------------------------------------
# 3. Streams that are not framed sensibly: replies, or frame_too_large and a close; never a crash


def header(length: int) -> bytes:
    return struct.pack(">I", length)


stream_segments = st.one_of(
    near_valid_requests().map(body_of).filter(lambda body: len(body) <= MAX_FRAME).map(frame),
    st.binary(min_size=1, max_size=64).map(frame),
    st.binary(min_size=4, max_size=4),  # a random header
    st.integers(min_value=0, max_value=2**32 - 1).map(header),
    st.sampled_from([0, 1, MAX_FRAME, MAX_FRAME + 1, 2**31, 2**32 - 1]).map(header),
    st.binary(min_size=1, max_size=40),  # unframed junk
)


def reference_framing(data: bytes) -> tuple[list[bytes], bool]:
    """The complete frame bodies before the first bad header, and whether a bad header was reached."""
    bodies, offset = [], 0
    while len(data) - offset >= 4:
        (length,) = struct.unpack_from(">I", data, offset)
        if length == 0 or length > MAX_FRAME:
            return bodies, True
        if len(data) - offset - 4 < length:
            break
        bodies.append(data[offset + 4 : offset + 4 + length])
        offset += 4 + length
    return bodies, False


@fuzz_settings(120)
@given(
    segments=st.lists(stream_segments, min_size=1, max_size=10),
    how=cuts,
    limits=server_limits,
)
def test_badly_framed_stream_gets_replies_or_frame_too_large_and_close(
    segments: list[bytes], how: list[float] | int, limits: dict[str, int]
) -> None:
    data = b"".join(segments)
    bodies, too_large = reference_framing(data)

    async def case(server: RunningServer) -> None:
        peer = await Peer.open(server)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_chunks, peer, split(data, how), [0.0], True)
            if too_large:
                # We do not close our side: the server must close on its own after frame_too_large.
                replies = await peer.collect_until_closed()
            else:
                replies = await peer.collect(len(bodies))
        for reply in replies:
            check_reply_shape(reply)
        rejected = [reply for reply in replies if reply.get("error") == "frame_too_large"]
        if too_large:
            assert len(rejected) == 1, f"expected exactly one frame_too_large, got {replies!r}"
            assert rejected[0]["id"] is None, rejected[0]
            answered = [reply for reply in replies if reply is not rejected[0]]
        else:
            assert not rejected, replies
            answered = replies
            await peer.stream.send_eof()
            rest = await peer.collect_until_closed()  # EOF from us: the server finishes and closes
            assert not rest, f"replies beyond one per complete frame: {rest!r}"
        check_batch_replies(bodies, answered)
        await peer.aclose()

    with_servers(case, **limits)


# ------------------------------------------------------------------------------------------------
# 4. Random valid operations: the invariants hold, every request is answered exactly once

SKUS = ["s0", "s1"]
LOCS = ["l0", "l1", "l2"]
RIDS = [f"r{index}" for index in range(6)]
KEYS = [f"k{index}" for index in range(5)]
SHORT_TTLS = [2, 15]
SHORT_EXTEND_TTL = 10
LONG_TTL = 600_000
sku_locs = st.tuples(st.sampled_from(SKUS), st.sampled_from(LOCS))


def unique_lines(qty: st.SearchStrategy, max_size: int) -> st.SearchStrategy:
    return st.lists(st.tuples(sku_locs, qty), min_size=1, max_size=max_size, unique_by=lambda line: line[0]).map(
        lambda lines: [{"sku": sku, "loc": loc, "qty": qty} for (sku, loc), qty in lines]
    )


valid_ops = st.one_of(
    st.fixed_dictionaries(
        {"op": st.just("reserve"), "rid": st.sampled_from(RIDS), "lines": unique_lines(st.integers(1, 6), 3)},
        optional={"ttl_ms": st.sampled_from([0, LONG_TTL, *SHORT_TTLS]), "ref": st.sampled_from(["", "order-1"])},
    ),
    st.fixed_dictionaries({"op": st.just("release"), "rid": st.sampled_from(RIDS)}),
    st.fixed_dictionaries(
        {"op": st.just("commit"), "rid": st.sampled_from(RIDS)},
        optional={"lines": unique_lines(st.integers(0, 6), 2)},
    ),
    st.fixed_dictionaries({"op": st.just("extend"), "rid": st.sampled_from(RIDS), "ttl_ms": st.sampled_from([SHORT_EXTEND_TTL, LONG_TTL])}),
    st.fixed_dictionaries({
        "op": st.just("adjust"), "key": st.sampled_from(KEYS), "sku": st.sampled_from(SKUS), "loc": st.sampled_from(LOCS),
        "delta": st.integers(-6, 10).filter(bool), "reason": st.sampled_from(["receipt", "damage"]),
    }),
    st.fixed_dictionaries(
        {"op": st.just("count"), "key": st.sampled_from(KEYS), "sku": st.sampled_from(SKUS), "loc": st.sampled_from(LOCS),
         "on_hand": st.integers(0, 12)},
        optional={"reason": st.just("cycle")},
    ),
    st.fixed_dictionaries({
        "op": st.just("transfer"), "key": st.sampled_from(KEYS), "sku": st.sampled_from(SKUS),
        "from": st.sampled_from(LOCS), "to": st.sampled_from(LOCS), "qty": st.integers(1, 6),
    }),
    st.fixed_dictionaries({"op": st.just("get"), "sku": st.sampled_from(SKUS), "loc": st.sampled_from(LOCS)}),
    st.fixed_dictionaries({"op": st.just("query"), "sku": st.sampled_from(SKUS)}),
    st.fixed_dictionaries({"op": st.just("lookup"), "rid": st.sampled_from(RIDS)}),
)

# Refusals the contract allows for each op when the request is well formed (`overloaded` always).
ALLOWED_ERRORS = {
    "reserve": {"insufficient", "conflict"},
    "release": {"not_found", "invalid_state"},
    "commit": {"not_found", "invalid_state", "invalid"},
    "extend": {"not_found", "invalid_state"},
    "adjust": {"conflict", "invalid"},
    "count": {"conflict"},
    "transfer": {"conflict", "invalid", "insufficient"},
    "get": set(),
    "query": set(),
    "lookup": {"not_found"},
}


def line_set(lines: list[dict[str, Any]]) -> set[tuple[str, str, int]]:
    return {(line["sku"], line["loc"], line["qty"]) for line in lines}


def check_valid_op_reply(request: dict[str, Any], reply: dict[str, Any]) -> None:
    check_reply_shape(reply)
    op = request["op"]
    if not reply["ok"]:
        assert reply["error"] in ALLOWED_ERRORS[op] | {"overloaded"}, f"{request!r} -> {reply!r}"
        if reply["error"] == "insufficient" and op == "reserve":
            requested = {(line["sku"], line["loc"]): line["qty"] for line in request["lines"]}
            assert reply["lines"], reply
            for line in reply["lines"]:
                key = (line["sku"], line["loc"])
                assert key in requested and line["requested"] == requested[key], f"{request!r} -> {reply!r}"
                assert line["available"] < line["requested"], f"refused a line that fits: {request!r} -> {reply!r}"
        return
    if op == "reserve":
        assert line_set(reply["lines"]) == line_set(request["lines"]), f"{request!r} -> {reply!r}"
        for line in reply["lines"]:
            assert line["available"] >= 0, f"oversell: {request!r} -> {reply!r}"
    elif op == "transfer":
        assert reply["from"]["available"] >= 0, f"transfer oversold its source: {request!r} -> {reply!r}"
    elif op in ("get", "adjust", "count"):
        assert (reply["sku"], reply["loc"]) == (request["sku"], request["loc"]), reply
        assert reply["available"] == reply["on_hand"] - reply["reserved"], reply


class LogHistory:
    """The figures of every SKU-location after each logged event, rebuilt from the durable log."""

    def __init__(self, events: list[dict[str, Any]]):
        self.state = State()
        self.history: dict[tuple[str, str], list[tuple[int, int, int]]] = {}
        for event in events:
            apply_event(self.state, event)
            for key, stock in self.state.stocks.items():
                if stock.last_seq == event["seq"]:
                    self.history.setdefault(key, []).append((event["seq"], stock.on_hand, stock.reserved))

    def figures_at(self, sku: str, loc: str, seq: int) -> dict[str, int]:
        on_hand = reserved = 0
        for at, value_on_hand, value_reserved in self.history.get((sku, loc), ()):
            if at > seq:
                break
            on_hand, reserved = value_on_hand, value_reserved
        return {"on_hand": on_hand, "reserved": reserved, "available": on_hand - reserved}


def check_reply_against_log(log: LogHistory, request: dict[str, Any], reply: dict[str, Any]) -> None:
    """A reply's figures are the state of the log at the reply's `seq` (linearizable reads and refusals)."""
    op, seq = request["op"], reply["seq"]
    where = f"{request!r} -> {reply!r}"

    def same(sku: str, loc: str, figures: dict[str, Any], names: tuple[str, ...] = ("on_hand", "reserved", "available")) -> None:
        logged = log.figures_at(sku, loc, seq)
        assert {name: figures[name] for name in names} == {name: logged[name] for name in names}, f"log at seq {seq} says {logged}: {where}"

    if reply["ok"]:
        if op in ("get", "adjust", "count"):
            same(request["sku"], request["loc"], reply)
        elif op == "transfer":
            same(request["sku"], request["from"], reply["from"])
            same(request["sku"], request["to"], reply["to"])
        elif op == "reserve" and not reply.get("duplicate"):
            for line in reply["lines"]:
                same(line["sku"], line["loc"], line, ("available",))
        elif op == "query":
            for location in reply["locations"]:
                same(request["sku"], location["loc"], location)
    elif reply["error"] == "insufficient":
        for line in reply["lines"]:
            same(line["sku"], line["loc"], line, ("available",))


@fuzz_settings(150)
@given(
    seeds=st.dictionaries(sku_locs, st.integers(1, 12), max_size=6),
    requests=st.lists(valid_ops, min_size=1, max_size=40),
    connections=st.integers(1, 3),
    limits=server_limits,
)
def test_random_valid_operations_keep_the_invariants(
    seeds: dict[tuple[str, str], int], requests: list[dict[str, Any]], connections: int, limits: dict[str, int]
) -> None:
    async def case(server: RunningServer) -> None:
        # Seed stock (before any reservation: not a shortage source).
        setup = await Peer.open(server)
        seed_requests = [
            {"id": index, "op": "adjust", "key": f"seed-{sku}-{loc}", "sku": sku, "loc": loc, "delta": qty, "reason": "receipt"}
            for index, ((sku, loc), qty) in enumerate(sorted(seeds.items()))
        ]
        for request in seed_requests:  # one at a time, retried while shed (tiny limits)
            while True:
                await setup.send(pack(request))
                (reply,) = await setup.collect(1)
                if reply.get("error") != "overloaded":
                    break
                await trio.sleep(0.001)
            assert reply["ok"] is True and reply["id"] == request["id"], reply

        # The random mix, ids unique, pipelined round-robin over `connections` connections.
        numbered = {1000 + index: request for index, request in enumerate(requests)}
        shares = [{i: request for i, request in numbered.items() if i % connections == n} for n in range(connections)]
        peers = [await Peer.open(server) for _ in range(connections)]
        replies: dict[int, list[dict[str, Any]]] = {}

        async def run_share(peer: Peer, share: dict[int, dict[str, Any]]) -> None:
            await peer.send(b"".join(pack({"id": request_id, **request}) for request_id, request in share.items()))
            got = await peer.collect(len(share))
            ids = Counter(reply.get("id") for reply in got)
            assert ids == Counter(list(share)), f"replies by id {ids} != requests {sorted(share)}"
            for reply in got:
                replies.setdefault(reply["id"], []).append(reply)
            await peer.assert_only_sentinel_follows()

        async with trio.open_nursery() as nursery:
            for peer, share in zip(peers, shares):
                nursery.start_soon(run_share, peer, share)
        assert sorted(replies) == sorted(numbered) and all(len(got) == 1 for got in replies.values())
        for request_id, request in numbered.items():
            check_valid_op_reply(request, replies[request_id][0])

        # The engine's own view: reserved == held lines, on_hand >= 0, ...
        state = server.engine.state
        check_invariants(state)

        # The durable log, replayed, is the engine's state; and every reply shows the state of
        # the log at its seq.
        with trio.fail_after(REPLY_TIMEOUT):
            while server.engine.wal.durable_seq < state.seq:  # an expiry may still be committing
                await trio.sleep(0.001)
        log = LogHistory(server.engine.storage.read(1, 1 << 30, state.seq))
        assert log.state.seq == state.seq, f"log replays to seq {log.state.seq}, engine is at {state.seq}"
        assert {key: (stock.on_hand, stock.reserved) for key, stock in log.state.stocks.items()} == {
            key: (stock.on_hand, stock.reserved) for key, stock in state.stocks.items()
        }, "replaying the log does not give the engine's stock"
        assert {rid: log.state.reservation(rid).state for rid in log.state.reservations} == {rid: state.reservation(rid).state for rid in state.reservations}
        for request_id, request in numbered.items():
            check_reply_against_log(log, request, replies[request_id][0])
        shortage_allowed = {(request["sku"], request["loc"]) for request in requests if request["op"] in ("adjust", "count")}
        for key, stock in state.stocks.items():
            if key not in shortage_allowed:
                assert stock.available >= 0, f"{key} oversold though no adjust/count touched it: {stock!r}"

        # on_hand is conserved per SKU: seeds + adjusts + count variances - committed.
        expected_on_hand = Counter()
        for (sku, _), qty in seeds.items():
            expected_on_hand[sku] += qty
        for request_id, request in numbered.items():
            reply = replies[request_id][0]
            if not reply["ok"] or reply.get("duplicate"):
                continue
            if request["op"] == "adjust":
                expected_on_hand[request["sku"]] += request["delta"]
            elif request["op"] == "count":
                expected_on_hand[request["sku"]] += reply["variance"]
            elif request["op"] == "commit":
                for line in reply["lines"]:
                    expected_on_hand[line["sku"]] -= line["qty"]

        # The wire's view, once no short TTL is pending (lookups force any due expiry first).
        if any(request.get("ttl_ms") in (*SHORT_TTLS, SHORT_EXTEND_TTL) for request in requests):
            await trio.sleep(max(*SHORT_TTLS, SHORT_EXTEND_TTL) / 1000 + 0.03)
        probe = peers[0]
        wire = [{"id": index, "op": "lookup", "rid": rid} for index, rid in enumerate(RIDS)]
        wire += [{"id": 100 + index, "op": "query", "sku": sku} for index, sku in enumerate(SKUS)]
        await probe.send(b"".join(pack(request) for request in wire))
        answers = {reply["id"]: reply for reply in await probe.collect(len(wire))}
        assert sorted(answers) == sorted(request["id"] for request in wire), answers
        held = Counter()
        for index, rid in enumerate(RIDS):
            lookup = answers[index]
            if lookup["ok"] and lookup["state"] == "held":
                for line in lookup["lines"]:
                    held[(line["sku"], line["loc"])] += line["qty"]
        for index, sku in enumerate(SKUS):
            query = answers[100 + index]
            assert query["ok"], query
            for location in query["locations"]:
                key = (sku, location["loc"])
                assert location["reserved"] == held[key], f"{key}: reserved {location['reserved']} != held lines {held[key]}"
                assert location["available"] == location["on_hand"] - location["reserved"], location
                if key not in shortage_allowed:
                    assert location["available"] >= 0, f"{key} oversold: {location!r}"
            assert query["total"]["on_hand"] == expected_on_hand[sku], (
                f"{sku}: on_hand {query['total']['on_hand']} != seeds + adjusts + variances - commits {expected_on_hand[sku]}"
            )
        assert sum(held.values()) == sum(stock.reserved for stock in state.stocks.values())
        for peer in peers:
            await peer.aclose()
        await setup.aclose()

    with_servers(case, **limits)


# ------------------------------------------------------------------------------------------------
# 5. Clients that vanish, reset, stall or half-close: the connection bound recovers, nothing leaks

CONNECTIONS_MAX = 3

client_actions = st.lists(
    st.one_of(
        st.just(("open",)),
        st.tuples(st.just("partial_frame"), st.integers(0, 7)),  # a header promising more than comes
        st.tuples(st.just("garbage"), st.integers(0, 7), st.binary(min_size=1, max_size=64)),
        st.tuples(st.just("requests"), st.integers(0, 7), st.integers(1, 20)),  # pipelined, never read
        st.tuples(st.just("reset"), st.integers(0, 7)),  # close with RST (SO_LINGER 0)
        st.tuples(st.just("close"), st.integers(0, 7)),
        st.tuples(st.just("half_close"), st.integers(0, 7)),
    ),
    min_size=1,
    max_size=14,
)


async def stats_of(server: RunningServer) -> dict[str, Any]:
    peer = await Peer.open(server)
    try:
        await peer.send(pack({"id": 1, "op": "stats"}))
        replies = await peer.collect(1)
    finally:
        await peer.aclose()
    return replies[0] if replies else {"ok": False, "error": "no reply"}


@fuzz_settings(40)
@given(actions=client_actions)
def test_vanishing_and_stalling_clients_never_leak_connection_slots(actions: list[tuple]) -> None:
    async def case(server: RunningServer) -> None:
        open_peers: list[Peer] = []
        for action in actions:
            kind = action[0]
            if kind == "open":
                open_peers.append(await Peer.open(server))
                continue
            if not open_peers:
                continue
            peer = open_peers[action[1] % len(open_peers)]
            try:
                if kind == "partial_frame":
                    await peer.send(header(MAX_FRAME) + b"\x81")
                elif kind == "garbage":
                    await peer.send(action[2])
                elif kind == "requests":
                    await peer.send(b"".join(
                        pack({"id": index, "op": "adjust", "key": f"k{id(peer)}-{index}", "sku": "s", "loc": "l", "delta": 1, "reason": "receipt"})
                        for index in range(action[2])
                    ))
                elif kind == "half_close":
                    await peer.stream.send_eof()
                elif kind == "reset":
                    peer.stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    await peer.aclose()
                    open_peers.remove(peer)
                elif kind == "close":
                    await peer.aclose()
                    open_peers.remove(peer)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the server closed it first (refused over the bound, or after frame_too_large)
            await trio.sleep(0)
        for peer in open_peers:
            peer.stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            await peer.aclose()
        # Every slot comes back: eventually only the probe itself is open.
        with trio.move_on_after(REPLY_TIMEOUT):
            while True:
                stats = await stats_of(server)
                if stats.get("ok") and stats["connections"].get("open") == 1:
                    break
                await trio.sleep(0.01)
        assert stats.get("ok") and stats["connections"].get("open") == 1, f"connection slots leaked: {stats!r}"
        # on_hand is exactly what was acknowledged or not: never negative, never corrupt.
        check_invariants(server.engine.state)

    with_servers(case, connections_max=CONNECTIONS_MAX, in_flight_per_connection_max=4)


async def test_a_client_that_never_reads_does_not_stall_others_and_gets_every_reply_later(start_server) -> None:
    server = await start_server(max_frame_bytes=MAX_FRAME, in_flight_per_connection_max=8)
    with trio.fail_after(30):
        sock = trio.socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        await sock.connect((server.host, server.port))
        stalled = Peer(trio.SocketStream(sock))
        count = 20_000
        data = b"".join(pack({"id": index, "op": "ping"}) for index in range(count))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stalled.send, data)  # blocks: the server stops reading us
            await trio.sleep(0.3)
            for attempt in range(3):
                other = await Peer.open(server)
                with trio.fail_after(2):
                    await other.assert_only_sentinel_follows()
                await other.aclose()
            stats = await stats_of(server)
            assert stats["connections"].get("reading_paused", 0) >= 1, f"the stalled client was never paused: {stats!r}"
            replies = await stalled.collect(count, timeout=20)
        ids = Counter(reply["id"] for reply in replies)
        assert len(replies) == count and set(ids) == set(range(count)) and max(ids.values()) == 1, (
            f"{len(replies)} replies for {count} pipelined pings, {len(ids)} distinct ids"
        )
        await stalled.assert_only_sentinel_follows()
        await stalled.aclose()
        await assert_serves_new_connection(server)


# ------------------------------------------------------------------------------------------------
# Hand-picked hostile bodies (edge cases hypothesis rarely builds)

HOSTILE_BODIES = {
    "deep array nesting": b"\x91" * (MAX_FRAME - 1) + b"\xc0",
    "deep map nesting": b"\x81\xa1a" * ((MAX_FRAME - 1) // 3) + b"\xc0",
    "request with deep nesting": b"\x83\xa2id\x07\xa2op\xa4ping\xa1x" + b"\x91" * 3000 + b"\xc0",
    "array32 claiming 2^32-1 items": b"\xdd\xff\xff\xff\xff",
    "map32 claiming 2^32-1 pairs": b"\xdf\xff\xff\xff\xff",
    "bin32 claiming 4 GiB": b"\xc6\xff\xff\xff\xff",
    "str32 claiming 4 GiB": b"\xdb\xff\xff\xff\xff",
    "invalid UTF-8 string": b"\x82\xa2id\x01\xa2op\xa2\xff\xfe",
    "surrogate in UTF-8": b"\x82\xa2id\x01\xa2op\xa3\xed\xa0\x80",
    "bad timestamp ext": b"\x82\xa2id\x01\xa2op\xd6\xff\x00",
    "reserved byte 0xc1": b"\xc1",
    "map with array key": b"\x82\xa2id\x01\x91\x01\xc0",
    "map with map key": b"\x82\xa2id\x01\x81\x01\x01\xc0",
    "non-string key, valid id": body_of({"id": 8, 1: "x", "op": "ping"}),
    "trailing bytes, valid id": body_of({"id": 9, "op": "ping"}) + b"\x00",
    "trailing map, valid id": body_of({"id": 10, "op": "ping"}) + body_of({"id": 11, "op": "ping"}),
    "id 2^64-1, unknown op": body_of({"id": UINT64_MAX, "op": "nope"}),
    "id float 2^64": body_of({"id": 2.0**64, "op": "ping"}),
    "id true": body_of({"id": True, "op": "ping"}),
    "id -1": body_of({"id": -1, "op": "ping"}),
    "id nan": body_of({"id": float("nan"), "op": "ping"}),
    "id binary": body_of({"id": b"\x01", "op": "ping"}),
    "id ext": body_of({"id": msgpack.ExtType(1, b"\x01"), "op": "ping"}),
    "op is bytes": body_of({"id": 12, "op": b"ping"}),
    "lines of 101 lines": body_of({"id": 13, "op": "reserve", "rid": "r", "lines": [{"sku": "s", "loc": f"l{i}", "qty": 1} for i in range(101)]}),
    "lines as map": body_of({"id": 14, "op": "reserve", "rid": "r", "lines": {"sku": "s", "loc": "l", "qty": 1}}),
    "qty true": body_of({"id": 15, "op": "reserve", "rid": "r", "lines": [{"sku": "s", "loc": "l", "qty": True}]}),
    "qty float": body_of({"id": 16, "op": "transfer", "key": "k", "sku": "s", "from": "a", "to": "b", "qty": 1.0}),
    "qty uint64 max": body_of({"id": 17, "op": "transfer", "key": "k", "sku": "s", "from": "a", "to": "b", "qty": UINT64_MAX}),
    "delta int64 min": body_of({"id": 18, "op": "adjust", "key": "k", "sku": "s", "loc": "l", "delta": -(2**63), "reason": "x"}),
    "hello version uint64 max": body_of({"id": 19, "op": "hello", "version": UINT64_MAX}),
    "watch from_seq uint64 max": body_of({"id": 20, "op": "watch", "from_seq": UINT64_MAX}),
    "nil": b"\xc0",
    "empty map": b"\x80",
    "a string": body_of("ping"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE_BODIES))
async def test_hand_picked_hostile_body_gets_bad_request_and_connection_stays_open(start_server, name: str) -> None:
    body = HOSTILE_BODIES[name]
    assert 1 <= len(body) <= MAX_FRAME, len(body)
    server = await start_server(max_frame_bytes=MAX_FRAME)
    with trio.fail_after(REPLY_TIMEOUT + 5):
        peer = await Peer.open(server)
        await peer.send(frame(body))
        replies = await peer.collect(1)
        check_batch_replies([body], replies)
        assert replies[0]["ok"] is False and replies[0]["error"] in {"bad_request", "unknown_op"}, replies[0]
        await peer.assert_only_sentinel_follows()
        await peer.aclose()
        await assert_serves_new_connection(server)


async def test_frame_of_exactly_max_frame_is_served_and_one_byte_more_closes(start_server) -> None:
    server = await start_server(max_frame_bytes=MAX_FRAME)
    with trio.fail_after(REPLY_TIMEOUT + 5):
        base = body_of({"id": 1, "op": "ping", "pad": ""})
        padded = body_of({"id": 1, "op": "ping", "pad": "x" * (MAX_FRAME - len(base) - 2)})  # str16 header: 2 more bytes
        assert len(padded) == MAX_FRAME
        peer = await Peer.open(server)
        await peer.send(frame(padded))
        (reply,) = await peer.collect(1)
        assert (reply["id"], reply["ok"]) == (1, True), reply
        over = body_of({"id": 2, "op": "ping", "pad": "x" * (MAX_FRAME - len(base) - 1)})
        assert len(over) == MAX_FRAME + 1
        await peer.send(frame(over) + pack({"id": 3, "op": "ping"}))
        replies = await peer.collect_until_closed()
        assert [(r["id"], r["ok"], r.get("error")) for r in replies] == [(None, False, "frame_too_large")], replies
        await assert_serves_new_connection(server)


async def test_snapshots_pipelined_with_changes_all_succeed_and_cover_what_they_say(start_server) -> None:
    server = await start_server(max_frame_bytes=MAX_FRAME)
    with trio.fail_after(REPLY_TIMEOUT + 10):
        peers = [await Peer.open(server) for _ in range(3)]
        batch: dict[int, dict[str, Any]] = {}
        for index in range(60):
            if index % 3 == 0:
                batch[index] = {"op": "snapshot"}
            else:
                batch[index] = {"op": "adjust", "key": f"k{index}", "sku": "s", "loc": f"l{index % 4}", "delta": 1, "reason": "receipt"}
        shares = [{i: request for i, request in batch.items() if i % len(peers) == n} for n in range(len(peers))]
        replies: dict[int, dict[str, Any]] = {}

        async def run_share(peer: Peer, share: dict[int, dict[str, Any]]) -> None:
            await peer.send(b"".join(pack({"id": i, **request}) for i, request in share.items()))
            for reply in await peer.collect(len(share), timeout=REPLY_TIMEOUT + 5):
                check_reply_shape(reply)
                assert reply["id"] not in replies, f"two replies for id {reply['id']}"
                replies[reply["id"]] = reply
            await peer.assert_only_sentinel_follows()

        async with trio.open_nursery() as nursery:
            for peer, share in zip(peers, shares):
                nursery.start_soon(run_share, peer, share)
        assert sorted(replies) == sorted(batch), f"missing replies: {sorted(set(batch) - set(replies))}"
        for i, reply in replies.items():
            assert reply["ok"] is True, (batch[i], reply)
            if batch[i]["op"] == "snapshot":
                assert 0 <= reply["seq"] <= server.engine.state.seq, reply
        check_invariants(server.engine.state)
        await peers[0].send(pack({"id": 1000, "op": "query", "sku": "s"}))
        (query,) = await peers[0].collect(1)
        assert query["total"]["on_hand"] == sum(1 for request in batch.values() if request["op"] == "adjust"), query
        for peer in peers:
            await peer.aclose()
        await assert_serves_new_connection(server)


async def test_input_on_a_watching_connection_is_ignored_and_server_survives(start_server) -> None:
    server = await start_server(max_frame_bytes=MAX_FRAME)
    with trio.fail_after(REPLY_TIMEOUT + 5):
        peer = await Peer.open(server)
        await peer.send(pack({"id": 1, "op": "watch"}))
        (reply,) = await peer.collect(1)
        assert (reply["id"], reply["ok"]) == (1, True), reply
        junk = [frame(b"\xc1"), pack({"id": 2, "op": "ping"}), b"\xff" * 64, header(0), header(2**32 - 1)]
        await peer.send(b"".join(junk))
        extra = await peer.collect(1, timeout=0.3)
        assert extra == [] or all("event" in message for message in extra), f"a watching connection answered: {extra!r}"
        await assert_serves_new_connection(server)
        await peer.aclose()

"""Every error code of shared/PROTOCOL.md over real TCP against the in-process server, and the
framing rules: which failures keep the connection open, which close it, and what `id` they echo.
"""

from __future__ import annotations

import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio

import protocol
from protocol import Client, ServerError, open_trio_client
from raw_connection import open_raw

TIMEOUT = 5


def connect(server):
    return open_trio_client(server.host, server.port)


async def stock(client, sku: str, loc: str, qty: int) -> None:
    await client.adjust(f"receipt-{sku}-{loc}-{qty}", sku, loc, qty, "receipt")


async def figures(client, sku: str, loc: str) -> tuple[int, int, int]:
    reply = await client.get(sku, loc)
    return reply["on_hand"], reply["reserved"], reply["available"]


async def expect_error(call, code: str) -> dict[str, Any]:
    """Await a TrioClient call that must fail with `code`; return the error reply."""
    try:
        reply = await call
    except ServerError as error:
        assert error.code == code, error.reply
        reply = error.reply
    else:
        raise AssertionError(f"expected {code}, got {reply!r}")
    assert reply["ok"] is False
    assert reply["error"] == code
    assert isinstance(reply["message"], str) and reply["message"]
    return reply


def body(message: Any) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


# -- bad_request ------------------------------------------------------------------------------


BAD_FIELDS = [
    # (request without id, why it is bad)
    ({"op": "get", "sku": "a"}, "missing loc"),
    ({"op": "get", "sku": 5, "loc": "b"}, "sku not a string"),
    ({"op": "get", "sku": "", "loc": "b"}, "empty sku"),
    ({"op": "get", "sku": b"abc", "loc": "b"}, "sku as msgpack bin, not str"),
    ({"op": "get", "sku": None, "loc": "b"}, "sku nil"),
    ({"op": "get", "sku": "x" * 129, "loc": "b"}, "sku of 129 bytes"),
    ({"op": "get", "sku": "é" * 65, "loc": "b"}, "sku of 130 UTF-8 bytes (65 chars)"),
    ({"op": "query"}, "missing sku"),
    ({"op": "reserve", "lines": [{"sku": "a", "loc": "b", "qty": 1}]}, "missing rid"),
    ({"op": "reserve", "rid": "r"}, "missing lines"),
    ({"op": "reserve", "rid": "r", "lines": []}, "no lines"),
    ({"op": "reserve", "rid": "r", "lines": [{"sku": f"s{n}", "loc": "b", "qty": 1} for n in range(101)]}, "101 lines"),
    ({"op": "reserve", "rid": "r", "lines": {"sku": "a", "loc": "b", "qty": 1}}, "lines not a list"),
    ({"op": "reserve", "rid": "r", "lines": [["a", "b", 1]]}, "line not a map"),
    ({"op": "reserve", "rid": "r", "lines": [{"sku": "a", "loc": "b", "qty": "3"}]}, "qty a string"),
    ({"op": "reserve", "rid": "r", "lines": [{"sku": "a", "loc": "b", "qty": 1.5}]}, "qty a float"),
    ({"op": "reserve", "rid": "r", "lines": [{"sku": "a", "loc": "b", "qty": True}]}, "qty a boolean"),
    ({"op": "reserve", "rid": "r", "lines": [{"sku": "a", "loc": "b", "qty": 0}]}, "qty 0"),
    ({"op": "reserve", "rid": "r", "lines": [{"sku": "a", "loc": "b", "qty": 2**31}]}, "qty 2^31"),
    ({"op": "reserve", "rid": "r", "lines": [{"sku": "a", "loc": "b", "qty": 1}, {"sku": "a", "loc": "b", "qty": 2}]}, "same SKU-location twice"),
    ({"op": "reserve", "rid": "r", "lines": [{"sku": "a", "loc": "b", "qty": 1}], "ttl_ms": "soon"}, "ttl_ms a string"),
    ({"op": "reserve", "rid": "r", "lines": [{"sku": "a", "loc": "b", "qty": 1}], "ttl_ms": -1}, "negative ttl_ms"),
    ({"op": "reserve", "rid": "r", "lines": [{"sku": "a", "loc": "b", "qty": 1}], "ref": "x" * 257}, "ref of 257 bytes"),
    ({"op": "reserve", "rid": "r" * 129, "lines": [{"sku": "a", "loc": "b", "qty": 1}]}, "rid of 129 bytes"),
    ({"op": "release"}, "missing rid"),
    ({"op": "commit", "rid": 7}, "rid an integer"),
    ({"op": "commit", "rid": "r", "lines": [{"sku": "a", "loc": "b", "qty": -1}]}, "commit qty -1"),
    ({"op": "extend", "rid": "r"}, "missing ttl_ms"),
    ({"op": "extend", "rid": "r", "ttl_ms": 0}, "ttl_ms 0"),
    ({"op": "adjust", "key": "k", "sku": "a", "loc": "b", "delta": 0, "reason": "x"}, "delta 0"),
    ({"op": "adjust", "key": "k", "sku": "a", "loc": "b", "delta": 1}, "missing reason"),
    ({"op": "adjust", "sku": "a", "loc": "b", "delta": 1, "reason": "x"}, "missing key"),
    ({"op": "count", "key": "k", "sku": "a", "loc": "b", "on_hand": -1}, "negative on_hand"),
    ({"op": "count", "key": "k", "sku": "a", "loc": "b"}, "missing on_hand"),
    ({"op": "transfer", "key": "k", "sku": "a", "from": "b", "qty": 1}, "missing to"),
    ({"op": "transfer", "key": "k", "sku": "a", "from": "b", "to": "c", "qty": 0}, "qty 0"),
    ({"op": "lookup", "rid": ["r"]}, "rid a list"),
    ({"op": "hello"}, "missing version"),
    ({"op": "hello", "version": "1"}, "version a string"),
    ({"op": "watch", "from_seq": -1}, "negative from_seq"),
    ({"op": 5}, "op not a string"),
    ({}, "missing op"),
]


async def test_bad_fields_get_bad_request_with_the_id_and_keep_the_connection(server):
    with trio.fail_after(TIMEOUT):
        raw = await open_raw(server)
        async with raw.stream:
            await raw.send({"id": 1, "op": "hello", "version": 1})
            assert (await raw.receive())["ok"] is True
            requests = {100 + index: {"id": 100 + index, **message} for index, (message, _) in enumerate(BAD_FIELDS)}
            await raw.send(*requests.values())
            replies = {reply["id"]: reply for reply in await raw.receive_n(len(requests))}
            assert set(replies) == set(requests)
            for index, (_, why) in enumerate(BAD_FIELDS):
                reply = replies[100 + index]
                assert (reply["ok"], reply["error"]) == (False, "bad_request"), (why, reply)
                assert isinstance(reply["message"], str) and reply["message"], why
            await raw.ping_ok()
        async with connect(server) as client:
            # Nothing was applied.
            assert (await client.stats())["applied_seq"] == 0


async def test_limits_are_inclusive(server):
    with trio.fail_after(TIMEOUT):
        async with connect(server) as client:
            await client.hello()
            sku, loc, rid = "s" * 128, "é" * 64, "r" * 128
            await client.adjust("k" * 128, sku, loc, 2**31 - 1, "receipt")
            reply = await client.reserve(rid, [(sku, loc, 2**31 - 1)], ref="x" * 256)
            assert reply["lines"] == [{"sku": sku, "loc": loc, "qty": 2**31 - 1, "available": 0}]
            many = [(f"sku-{n}", "loc", 1) for n in range(100)]
            for line_sku, line_loc, _ in many:
                await client.adjust(f"k-{line_sku}", line_sku, line_loc, 1, "receipt")
            hundred = await client.reserve("r-100", many)
            assert len(hundred["lines"]) == 100 and all(line["available"] == 0 for line in hundred["lines"])


async def test_unreadable_id_gives_bad_request_with_id_nil(server):
    with trio.fail_after(TIMEOUT):
        raw = await open_raw(server)
        async with raw.stream:
            for message in ({"op": "ping"}, {"id": "7", "op": "ping"}, {"id": -1, "op": "ping"}, {"id": 1.0, "op": "ping"}, {"id": True, "op": "ping"}):
                await raw.send(message)
                reply = await raw.receive()
                assert (reply["id"], reply["ok"], reply["error"]) == (None, False, "bad_request"), (message, reply)
            await raw.ping_ok()


@pytest.mark.parametrize(
    "frame_body, readable_id",
    [
        (body([1, 2, 3]), None),  # not a map
        (body("ping"), None),
        (body(42), None),
        (b"\xc1\xc1\xc1", None),  # garbage: 0xc1 is never used in msgpack
        (b"\x85\x01", None),  # a map cut short
        (b"\x81\xa2id\xa3\xff\xfe\xfd", None),  # invalid UTF-8 in a string
        (body({1: 2, "id": 3, "op": "ping"}), 3),  # a non-string key
        (body({"id": 5, "op": "ping"}) + b"\x00", 5),  # trailing bytes, id readable
        (body({"id": 6, "op": "ping"}) + body({"id": 8, "op": "ping"}), 6),  # two maps in one frame
    ],
)
async def test_malformed_frames_get_bad_request_and_the_connection_stays_open(server, frame_body, readable_id):
    with trio.fail_after(TIMEOUT):
        raw = await open_raw(server)
        async with raw.stream:
            await raw.send(protocol.frame(frame_body))
            reply = await raw.receive()
            assert (reply["id"], reply["ok"], reply["error"]) == (readable_id, False, "bad_request")
            assert isinstance(reply["message"], str) and reply["message"]
            await raw.ping_ok()


async def test_bad_frames_between_good_ones_in_one_pipeline(server):
    with trio.fail_after(TIMEOUT):
        raw = await open_raw(server)
        async with raw.stream:
            await raw.send(
                {"id": 1, "op": "ping"},
                protocol.frame(b"\xc1"),
                {"id": 2, "op": "get", "sku": "a", "loc": "b"},
                protocol.frame(body([1])),
                {"id": 3, "op": "get", "sku": "a"},
                {"id": 4, "op": "ping"},
            )
            replies = await raw.receive_n(6)
            by_id: dict[Any, list] = {}
            for reply in replies:
                by_id.setdefault(reply["id"], []).append(reply)
            assert sorted(by_id, key=str) == sorted([1, 2, 3, 4, None], key=str)
            assert [reply["error"] for reply in by_id[None]] == ["bad_request", "bad_request"]
            assert by_id[1][0]["ok"] is True and by_id[4][0]["ok"] is True
            assert by_id[2][0]["on_hand"] == 0
            assert by_id[3][0]["error"] == "bad_request"


# -- unknown_op -------------------------------------------------------------------------------


async def test_unknown_op(server):
    with trio.fail_after(TIMEOUT):
        raw = await open_raw(server)
        async with raw.stream:
            await raw.send({"id": 31, "op": "frobnicate", "sku": "a"})
            reply = await raw.receive()
            assert (reply["id"], reply["ok"], reply["error"]) == (31, False, "unknown_op")
            await raw.ping_ok()


# -- insufficient -----------------------------------------------------------------------------


async def test_insufficient_lists_every_short_line_and_holds_nothing(server):
    with trio.fail_after(TIMEOUT):
        async with connect(server) as client:
            await client.hello()
            await stock(client, "sku-a", "loc-1", 10)
            await stock(client, "sku-b", "loc-1", 1)
            await stock(client, "sku-c", "loc-1", 4)
            reply = await expect_error(
                client.reserve("r-1", [("sku-a", "loc-1", 5), ("sku-b", "loc-1", 3), ("sku-c", "loc-1", 6), ("sku-d", "loc-1", 1)]),
                "insufficient",
            )
            assert sorted(reply["lines"], key=lambda line: line["sku"]) == [
                {"sku": "sku-b", "loc": "loc-1", "requested": 3, "available": 1},
                {"sku": "sku-c", "loc": "loc-1", "requested": 6, "available": 4},
                {"sku": "sku-d", "loc": "loc-1", "requested": 1, "available": 0},
            ]
            assert await figures(client, "sku-a", "loc-1") == (10, 0, 10)
            assert await figures(client, "sku-b", "loc-1") == (1, 0, 1)
            assert await figures(client, "sku-c", "loc-1") == (4, 0, 4)
            stats = await client.stats()
            assert (stats["reservations"], stats["held"], stats["tentative_holds"]) == (0, 0, 0)


async def test_insufficient_single_line_and_in_shortage(server):
    with trio.fail_after(TIMEOUT):
        async with connect(server) as client:
            await client.hello()
            await stock(client, "sku-s", "loc-1", 5)
            await client.reserve("r-held", [("sku-s", "loc-1", 4)])
            reply = await expect_error(client.reserve("r-more", [("sku-s", "loc-1", 2)]), "insufficient")
            assert reply["lines"] == [{"sku": "sku-s", "loc": "loc-1", "requested": 2, "available": 1}]
            await client.adjust("damage-1", "sku-s", "loc-1", -3, "damage")  # shortage: available -2
            short = await expect_error(client.reserve("r-more", [("sku-s", "loc-1", 1)]), "insufficient")
            assert short["lines"] == [{"sku": "sku-s", "loc": "loc-1", "requested": 1, "available": -2}]
            assert await figures(client, "sku-s", "loc-1") == (2, 4, -2)


async def test_transfer_needs_available_at_the_source(server):
    with trio.fail_after(TIMEOUT):
        async with connect(server) as client:
            await client.hello()
            await stock(client, "sku-t", "loc-1", 10)
            await client.reserve("r-t", [("sku-t", "loc-1", 8)])
            reply = await expect_error(client.transfer("tr-1", "sku-t", "loc-1", "loc-2", 5), "insufficient")
            assert reply["lines"] == [{"sku": "sku-t", "loc": "loc-1", "requested": 5, "available": 2}]
            assert await figures(client, "sku-t", "loc-1") == (10, 8, 2)
            assert await figures(client, "sku-t", "loc-2") == (0, 0, 0)
            # A failed transfer leaves its key unused.
            ok = await client.transfer("tr-1", "sku-t", "loc-1", "loc-2", 2)
            assert ok.get("duplicate", False) is False
            assert ok["from"]["on_hand"] == 8 and ok["to"]["on_hand"] == 2


# -- not_found --------------------------------------------------------------------------------


async def test_not_found(server):
    with trio.fail_after(TIMEOUT):
        async with connect(server) as client:
            await client.hello()
            for call in (client.release("nope"), client.commit("nope"), client.extend("nope", 1000), client.lookup("nope")):
                await expect_error(call, "not_found")
            raw = await open_raw(server)
            async with raw.stream:
                await raw.send({"id": 77, "op": "lookup", "rid": "nope"})
                reply = await raw.receive()
                assert (reply["id"], reply["error"]) == (77, "not_found")


# -- conflict ---------------------------------------------------------------------------------


async def test_conflict_on_reused_rid(server):
    with trio.fail_after(TIMEOUT):
        async with connect(server) as client:
            await client.hello()
            await stock(client, "sku-c", "loc-1", 10)
            await client.reserve("r-c", [("sku-c", "loc-1", 2)], ttl_ms=60_000, ref="order-1")
            await expect_error(client.reserve("r-c", [("sku-c", "loc-1", 3)], ttl_ms=60_000, ref="order-1"), "conflict")
            await expect_error(client.reserve("r-c", [("sku-c", "loc-2", 2)], ttl_ms=60_000, ref="order-1"), "conflict")
            await expect_error(client.reserve("r-c", [("sku-c", "loc-1", 2)], ttl_ms=30_000, ref="order-1"), "conflict")
            await expect_error(client.reserve("r-c", [("sku-c", "loc-1", 2)], ttl_ms=60_000, ref="order-2"), "conflict")
            await client.release("r-c")
            await expect_error(client.reserve("r-c", [("sku-c", "loc-1", 1)]), "conflict")
            assert await figures(client, "sku-c", "loc-1") == (10, 0, 10)
            assert (await client.lookup("r-c"))["state"] == "released"


async def test_conflict_on_reused_key(server):
    with trio.fail_after(TIMEOUT):
        async with connect(server) as client:
            await client.hello()
            await client.adjust("k-1", "sku-k", "loc-1", 10, "receipt")
            await expect_error(client.adjust("k-1", "sku-k", "loc-1", 11, "receipt"), "conflict")
            await expect_error(client.adjust("k-1", "sku-k", "loc-1", 10, "return"), "conflict")
            await expect_error(client.count("k-1", "sku-k", "loc-1", 10), "conflict")
            await expect_error(client.transfer("k-1", "sku-k", "loc-1", "loc-2", 1), "conflict")
            await client.count("k-2", "sku-k", "loc-1", 9)
            await expect_error(client.count("k-2", "sku-k", "loc-1", 8), "conflict")
            await client.transfer("k-3", "sku-k", "loc-1", "loc-2", 4)
            await expect_error(client.transfer("k-3", "sku-k", "loc-1", "loc-2", 5), "conflict")
            await expect_error(client.transfer("k-3", "sku-k", "loc-1", "loc-3", 4), "conflict")
            assert await figures(client, "sku-k", "loc-1") == (5, 0, 5)
            assert await figures(client, "sku-k", "loc-2") == (4, 0, 4)


# -- invalid_state ----------------------------------------------------------------------------


async def test_invalid_state(server):
    with trio.fail_after(TIMEOUT):
        async with connect(server) as client:
            await client.hello()
            await stock(client, "sku-v", "loc-1", 10)
            await client.reserve("r-released", [("sku-v", "loc-1", 1)])
            await client.reserve("r-committed", [("sku-v", "loc-1", 2)])
            await client.reserve("r-expired", [("sku-v", "loc-1", 3)], ttl_ms=50)
            await client.release("r-released")
            await client.commit("r-committed")
            await trio.sleep(0.2)
            for call, state in (
                (client.commit("r-released"), "released"),
                (client.extend("r-released", 1000), "released"),
                (client.release("r-committed"), "committed"),
                (client.extend("r-committed", 1000), "committed"),
                (client.commit("r-expired"), "expired"),
                (client.release("r-expired"), "expired"),
                (client.extend("r-expired", 1000), "expired"),
            ):
                reply = await expect_error(call, "invalid_state")
                assert reply["state"] == state
            assert await figures(client, "sku-v", "loc-1") == (8, 0, 8)


async def test_commit_just_after_expiry_is_refused_even_before_the_timer(start_server):
    """A commit at or after `expires_at_ms` must not go through: the reservation is expired."""
    with trio.fail_after(TIMEOUT):
        server = await start_server()
        async with connect(server) as client:
            await client.hello()
            await stock(client, "sku-late", "loc-1", 5)
            await client.reserve("r-late", [("sku-late", "loc-1", 5)], ttl_ms=60)
            await trio.sleep(0.07)
            try:
                reply = await client.commit("r-late")
            except ServerError as error:
                assert (error.code, error.reply["state"]) == ("invalid_state", "expired")
                assert await figures(client, "sku-late", "loc-1") == (5, 0, 5)
            else:
                raise AssertionError(f"commit after expiry succeeded: {reply!r}")


# -- invalid ----------------------------------------------------------------------------------


async def test_invalid_commit_lines(server):
    with trio.fail_after(TIMEOUT):
        async with connect(server) as client:
            await client.hello()
            await stock(client, "sku-i", "loc-1", 10)
            await stock(client, "sku-i", "loc-2", 10)
            await client.reserve("r-i", [("sku-i", "loc-1", 3)])
            await expect_error(client.commit("r-i", [("sku-i", "loc-2", 1)]), "invalid")
            await expect_error(client.commit("r-i", [("sku-i", "loc-1", 4)]), "invalid")
            await expect_error(client.commit("r-i", [("sku-i", "loc-1", 1), ("other", "loc-1", 1)]), "invalid")
            # Nothing changed: still held in full.
            assert (await client.lookup("r-i"))["state"] == "held"
            assert await figures(client, "sku-i", "loc-1") == (10, 3, 7)
            exact = await client.commit("r-i", [("sku-i", "loc-1", 3)])
            assert exact["lines"] == [{"sku": "sku-i", "loc": "loc-1", "qty": 3}]


async def test_invalid_adjust_below_zero(server):
    with trio.fail_after(TIMEOUT):
        async with connect(server) as client:
            await client.hello()
            await stock(client, "sku-n", "loc-1", 4)
            await expect_error(client.adjust("neg-1", "sku-n", "loc-1", -5, "damage"), "invalid")
            await expect_error(client.adjust("neg-2", "sku-n", "nowhere", -1, "correction"), "invalid")
            assert await figures(client, "sku-n", "loc-1") == (4, 0, 4)
            # The refused key was not used up.
            reply = await client.adjust("neg-1", "sku-n", "loc-1", -4, "damage")
            assert (reply["on_hand"], reply.get("duplicate", False)) == (0, False)


# -- unauthorized, unsupported_version --------------------------------------------------------


async def test_unauthorized_until_hello_with_the_token(start_server):
    with trio.fail_after(TIMEOUT):
        server = await start_server(token="s3cret")
        async with connect(server) as client:
            for call in (client.ping(), client.get("a", "b"), client.reserve("r", [("a", "b", 1)]), client.stats(), client.watch()):
                await expect_error(call, "unauthorized")
            await expect_error(client.hello(token="wrong"), "unauthorized")
            await expect_error(client.ping(), "unauthorized")
            await expect_error(client.hello(), "unauthorized")  # no token at all
            hello = await client.hello(token="s3cret")
            assert (hello["ok"], hello["version"]) == (True, 1)
            assert (await client.ping())["ok"] is True
            await client.adjust("k-auth", "a", "b", 1, "receipt")
            assert await figures(client, "a", "b") == (1, 0, 1)
        async with connect(server) as other:
            # Authorization belongs to a connection.
            await expect_error(other.get("a", "b"), "unauthorized")
        raw = await open_raw(server)
        async with raw.stream:
            await raw.send({"id": 12, "op": "get", "sku": "a", "loc": "b"})
            reply = await raw.receive()
            assert (reply["id"], reply["error"]) == (12, "unauthorized")


async def test_unsupported_version(server):
    with trio.fail_after(TIMEOUT):
        raw = await open_raw(server)
        async with raw.stream:
            await raw.send({"id": 4, "op": "hello", "version": 2})
            reply = await raw.receive()
            assert (reply["id"], reply["ok"], reply["error"]) == (4, False, "unsupported_version")
            await raw.send({"id": 5, "op": "hello", "version": 1})
            hello = await raw.receive()
            assert (hello["id"], hello["ok"], hello["version"]) == (5, True, 1)


# -- overloaded -------------------------------------------------------------------------------


async def test_overloaded_when_a_mailbox_is_full(start_server):
    with trio.fail_after(TIMEOUT):
        server = await start_server(mailbox_messages_max=1)
        async with connect(server) as client:
            await client.hello()
            await stock(client, "sku-hot", "loc-1", 1000)
        raw = await open_raw(server)
        async with raw.stream:
            count = 50
            await raw.send(*(
                {"id": n, "op": "reserve", "rid": f"hot-{n}", "lines": [{"sku": "sku-hot", "loc": "loc-1", "qty": 1}]}
                for n in range(1, count + 1)
            ))
            replies = await raw.receive_n(count)
            assert sorted(reply["id"] for reply in replies) == list(range(1, count + 1))
            granted = [reply for reply in replies if reply["ok"]]
            shed = [reply for reply in replies if not reply["ok"]]
            assert shed, "no request was shed with a mailbox of 1"
            assert granted, "every request was shed"
            assert all(reply["error"] == "overloaded" for reply in shed)
            await raw.ping_ok()
        async with connect(server) as client:
            # Shed requests left no trace: only the granted ones hold stock, and a shed rid is free.
            assert await figures(client, "sku-hot", "loc-1") == (1000, len(granted), 1000 - len(granted))
            retry = await client.reserve(f"hot-{shed[0]['id']}", [("sku-hot", "loc-1", 1)])
            assert retry.get("duplicate", False) is False


async def test_overloaded_when_connections_are_at_their_bound(start_server):
    with trio.fail_after(TIMEOUT):
        server = await start_server(connections_max=1)
        async with connect(server) as first:
            await first.hello()
            raw = await open_raw(server)
            async with raw.stream:
                reply = await raw.receive()
                assert (reply["id"], reply["ok"], reply["error"]) == (None, False, "overloaded")
                await raw.expect_closed()
            assert (await first.ping())["ok"] is True
        # Once the first connection is gone, a new one is served.
        while True:
            raw = await open_raw(server)
            async with raw.stream:
                await raw.send({"id": 1, "op": "ping"})
                reply = await raw.receive()
            if reply["ok"]:
                break
            assert reply["error"] == "overloaded"
            await trio.sleep(0.02)


# -- frame_too_large --------------------------------------------------------------------------


@pytest.mark.parametrize("length", [0, 1024 + 1, 2**32 - 1])
async def test_frame_too_large_replies_then_closes(start_server, length):
    with trio.fail_after(TIMEOUT):
        server = await start_server(max_frame_bytes=1024)
        raw = await open_raw(server)
        async with raw.stream:
            await raw.send({"id": 1, "op": "ping"})
            assert (await raw.receive())["id"] == 1
            await raw.send(struct.pack(">I", length))
            reply = await raw.receive()
            assert (reply["id"], reply["ok"], reply["error"]) == (None, False, "frame_too_large")
            assert isinstance(reply["message"], str) and reply["message"]
            await raw.expect_closed()


async def test_frame_of_exactly_max_frame_bytes_is_accepted(start_server):
    with trio.fail_after(TIMEOUT):
        server = await start_server(max_frame_bytes=1024)
        raw = await open_raw(server)
        async with raw.stream:
            padding = 1024 - len(body({"id": 9, "op": "ping", "pad": ""})) - 2  # str8 header grows by 2 past 31 chars
            message = {"id": 9, "op": "ping", "pad": "x" * padding}
            assert len(body(message)) == 1024
            await raw.send(message)
            reply = await raw.receive()
            assert (reply["id"], reply["ok"]) == (9, True)


async def test_default_max_frame_is_one_mebibyte(server):
    with trio.fail_after(TIMEOUT):
        raw = await open_raw(server)
        async with raw.stream:
            await raw.send(struct.pack(">I", 1024 * 1024 + 1))
            reply = await raw.receive()
            assert (reply["id"], reply["error"]) == (None, "frame_too_large")
            await raw.expect_closed()
        raw = await open_raw(server)
        async with raw.stream:
            message = {"id": 3, "op": "ping", "pad": "x" * (1024 * 1024 - 100)}
            await raw.send(message)
            assert (await raw.receive())["id"] == 3


async def test_requests_before_a_too_large_frame_are_answered(server):
    with trio.fail_after(TIMEOUT):
        async with connect(server) as client:
            await client.hello()
            await stock(client, "sku-f", "loc-1", 5)
        raw = await open_raw(server)
        async with raw.stream:
            await raw.send(
                {"id": 1, "op": "reserve", "rid": "r-f", "lines": [{"sku": "sku-f", "loc": "loc-1", "qty": 2}]},
                {"id": 2, "op": "get", "sku": "sku-f", "loc": "loc-1"},
                struct.pack(">I", 0),
                {"id": 3, "op": "ping"},  # after the bad header: never read
            )
            replies = await raw.receive_n(3)
            by_id = {reply["id"]: reply for reply in replies}
            assert set(by_id) == {1, 2, None}
            assert by_id[1]["ok"] is True and by_id[2]["reserved"] == 2
            assert by_id[None]["error"] == "frame_too_large"
            await raw.expect_closed()


async def test_frame_too_large_reply_survives_input_the_server_never_reads(server):
    """Closing a socket with unread input makes the kernel send a reset, which can destroy the
    reply in flight: the server must half-close and discard the rest, so the reply arrives."""
    with trio.fail_after(TIMEOUT):
        for _ in range(5):
            raw = await open_raw(server)
            async with raw.stream:
                # The header and 512 kB after it in one write, then the client only reads.
                await raw.send(struct.pack(">I", 2**31) + b"x" * (512 * 1024))
                reply = await raw.receive()
                assert (reply["id"], reply["error"]) == (None, "frame_too_large")
                await raw.expect_closed()


# -- framing over a byte stream ---------------------------------------------------------------


async def test_frames_split_across_reads_and_glued_together(server):
    with trio.fail_after(TIMEOUT):
        raw = await open_raw(server)
        async with raw.stream:
            data = protocol.pack({"id": 1, "op": "ping"}) + protocol.pack({"id": 2, "op": "get", "sku": "a", "loc": "b"})
            for index in range(len(data)):
                await raw.stream.send_all(data[index : index + 1])
                await trio.sleep(0.001)
            replies = {reply["id"]: reply for reply in await raw.receive_n(2)}
            assert replies[1]["ok"] is True
            assert (replies[2]["sku"], replies[2]["on_hand"]) == ("a", 0)


async def test_a_client_vanishing_mid_frame_does_not_hurt_the_server(server):
    with trio.fail_after(TIMEOUT):
        raw = await open_raw(server)
        async with raw.stream:
            data = protocol.pack({"id": 1, "op": "adjust", "key": "k-half", "sku": "a", "loc": "b", "delta": 3, "reason": "receipt"})
            await raw.stream.send_all(data[: len(data) // 2])
        async with connect(server) as client:
            assert (await client.ping())["ok"] is True
            assert await figures(client, "a", "b") == (0, 0, 0)
            await client.adjust("k-half", "a", "b", 3, "receipt")
            assert await figures(client, "a", "b") == (3, 0, 3)


async def test_count_to_zero_is_allowed(server):
    with trio.fail_after(TIMEOUT):
        async with connect(server) as client:
            await stock(client, "sku-0", "loc-1", 4)
            reply = await client.count("c-zero", "sku-0", "loc-1", 0)
            assert (reply["on_hand"], reply["variance"], reply["available"]) == (0, -4, 0)


async def test_replies_still_come_after_the_client_half_closes(server):
    with trio.fail_after(TIMEOUT):
        raw = await open_raw(server)
        async with raw.stream:
            await raw.send(
                {"id": 1, "op": "adjust", "key": "k-eof", "sku": "a", "loc": "b", "delta": 5, "reason": "receipt"},
                {"id": 2, "op": "reserve", "rid": "r-eof", "lines": [{"sku": "a", "loc": "b", "qty": 2}]},
                {"id": 3, "op": "get", "sku": "a", "loc": "b"},
            )
            await raw.stream.send_eof()
            replies = {reply["id"]: reply for reply in await raw.receive_n(3)}
            assert replies[1]["on_hand"] == 5
            assert replies[2]["ok"] is True
            assert replies[3]["ok"] is True and replies[3]["on_hand"] == 5
            await raw.expect_closed()
        async with connect(server) as client:
            assert await figures(client, "a", "b") == (5, 2, 3)


@pytest.mark.parametrize("owner_tasks", ["0", "1025"])
def test_owner_tasks_out_of_bounds_is_refused_at_start(tmp_path, owner_tasks):
    completed = subprocess.run(
        [sys.executable, "-m", "engine", "serve", "--port", "0", "--data", str(tmp_path / "data"), "--owner-tasks", owner_tasks],
        cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, timeout=30,
    )
    assert completed.returncode == 2, completed.stderr
    assert "--owner-tasks must be between 1 and 1024" in completed.stderr
    assert not (tmp_path / "data").exists()


def test_one_owner_task_serves_every_sku_location(server_process):
    process = server_process("--owner-tasks", "1")
    with Client("127.0.0.1", process.port) as client:
        for index in range(20):
            assert client.adjust(f"k{index}", f"SKU-{index}", "DC-1", 5, "receipt")["ok"]
            assert client.reserve(f"r{index}", [(f"SKU-{index}", "DC-1", 3)])["ok"]
        assert client.get("SKU-7", "DC-1")["available"] == 2
        stats = client.stats()
        assert stats["owners"] == 1 and stats["owner_messages"] >= 40
    assert process.terminate() == 0


def test_a_second_sigint_during_shutdown_exits_quietly_and_loses_nothing(server_process, monkeypatch):
    # The shutdown snapshot pauses (a pause point), so the second SIGINT surely lands while the
    # first one's shutdown runs: trio redelivers it when the signal receiver closes.
    monkeypatch.setenv("ENGINE_PAUSE_AT", "snapshot-write:1.5")
    process = server_process()
    with Client("127.0.0.1", process.port) as client:
        assert client.adjust("k-sigint", "SKU-S", "DC-1", 9, "receipt")["ok"]
    process.process.send_signal(signal.SIGINT)
    deadline = time.monotonic() + 10
    while "pause point snapshot-write" not in process.log_text():
        assert time.monotonic() < deadline, process.log_text()
        time.sleep(0.02)
    process.process.send_signal(signal.SIGINT)
    assert process.process.wait(timeout=15) == 130
    log_text = process.log_text()
    assert "interrupted again while stopping" in log_text
    assert "Traceback" not in log_text, log_text
    monkeypatch.delenv("ENGINE_PAUSE_AT")
    restarted = server_process()
    with Client("127.0.0.1", restarted.port) as client:
        assert client.get("SKU-S", "DC-1")["on_hand"] == 9
    assert restarted.terminate() == 0

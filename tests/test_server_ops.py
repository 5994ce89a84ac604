"""Every op of shared/PROTOCOL.md over real TCP against the in-process server.

Covers the ok replies of each op, idempotency (duplicates, conflicts are in test_server_errors),
pipelining, expiry, watch, and the durability contract as visible from outside (every reply's
`seq` is covered by the server's `wal.durable_seq`). Error codes and framing live in
test_server_errors.py.
"""

from __future__ import annotations

import time
from typing import Any

import trio

import protocol
from engine.config import DAY_MS, Config
from protocol import ServerError, open_trio_client
from raw_connection import open_raw

TIMEOUT = 5


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def connect(server):
    return open_trio_client(server.host, server.port)


async def stock(client, sku: str, loc: str, qty: int, key: str | None = None) -> dict[str, Any]:
    """Receive `qty` units at a SKU-location (adjust with a fresh key)."""
    return await client.adjust(key or f"receipt-{sku}-{loc}-{qty}-{time.monotonic_ns()}", sku, loc, qty, "receipt")


async def figures(client, sku: str, loc: str) -> tuple[int, int, int]:
    reply = await client.get(sku, loc)
    return reply["on_hand"], reply["reserved"], reply["available"]


def by_loc(lines: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(line["sku"], line["loc"]): line for line in lines}


def without(reply: dict[str, Any], *names: str) -> dict[str, Any]:
    return {name: value for name, value in reply.items() if name not in names}




# -- defaults ---------------------------------------------------------------------------------


def test_defaults_match_the_contract():
    config = Config()
    assert (config.host, config.port) == ("127.0.0.1", 7440)
    assert config.max_frame_bytes == 1024 * 1024
    assert config.id_retention_ms >= DAY_MS


# -- hello, ping, stats, snapshot -------------------------------------------------------------


async def test_hello_and_ping(server):
    with trio.fail_after(TIMEOUT):
        async with connect(server) as client:
            hello = await client.hello(client="test-suite")
            assert hello["ok"] is True
            assert hello["version"] == 1
            assert isinstance(hello["server"], str) and hello["server"]
            ping = await client.ping()
            assert ping["ok"] is True
            assert "error" not in ping


async def test_ids_are_echoed_exactly(server):
    with trio.fail_after(TIMEOUT):
        raw = await open_raw(server)
        async with raw.stream:
            for request_id in (0, 1, 2**32 + 7, 2**64 - 1):
                await raw.send({"id": request_id, "op": "ping"})
                reply = await raw.receive()
                assert reply["id"] == request_id
                assert reply["ok"] is True


async def test_stats_and_snapshot(server):
    with trio.fail_after(TIMEOUT):
        async with connect(server) as client:
            await client.hello()
            adjusted = await stock(client, "sku-s", "loc-1", 5)
            reserved = await client.reserve("r-snap", [("sku-s", "loc-1", 2)])
            assert reserved["seq"] == adjusted["seq"] + 1
            snapshot = await client.snapshot()
            assert snapshot["ok"] is True
            assert snapshot["seq"] == reserved["seq"]
            stats = await client.stats()
            assert stats["ok"] is True
            assert stats["wal"]["durable_seq"] == reserved["seq"]
            assert stats["reservations"] == 1
            assert stats["held"] == 1
            assert stats["last_snapshot_seq"] == reserved["seq"]
            assert stats["requests"]["reserve"] == 1
            assert stats["requests"]["adjust"] == 1


# -- reserve, release, commit, extend, lookup -------------------------------------------------


async def test_reserve_reports_available_after_the_hold(server):
    with trio.fail_after(TIMEOUT):
        async with connect(server) as client:
            await client.hello()
            await stock(client, "sku-a", "loc-1", 10)
            await stock(client, "sku-b", "loc-1", 5)
            reply = await client.reserve("r-1", [("sku-a", "loc-1", 3), ("sku-b", "loc-1", 2)], ref="order-1")
            assert reply["ok"] is True
            assert reply["rid"] == "r-1"
            assert reply["expires_at_ms"] is None
            assert reply.get("duplicate", False) is False
            assert by_loc(reply["lines"]) == {
                ("sku-a", "loc-1"): {"sku": "sku-a", "loc": "loc-1", "qty": 3, "available": 7},
                ("sku-b", "loc-1"): {"sku": "sku-b", "loc": "loc-1", "qty": 2, "available": 3},
            }
            assert await figures(client, "sku-a", "loc-1") == (10, 3, 7)
            assert await figures(client, "sku-b", "loc-1") == (5, 2, 3)
            # A second reservation sees what the first holds.
            second = await client.reserve("r-2", [("sku-a", "loc-1", 7)])
            assert second["lines"] == [{"sku": "sku-a", "loc": "loc-1", "qty": 7, "available": 0}]
            assert await figures(client, "sku-a", "loc-1") == (10, 10, 0)


async def test_reserve_with_ttl_sets_expires_at(server):
    with trio.fail_after(TIMEOUT):
        async with connect(server) as client:
            await client.hello()
            await stock(client, "sku-t", "loc-1", 4)
            before = now_ms()
            reply = await client.reserve("r-ttl", [("sku-t", "loc-1", 1)], ttl_ms=60_000)
            after = now_ms()
            assert before + 60_000 <= reply["expires_at_ms"] <= after + 60_000
            zero = await client.reserve("r-ttl0", [("sku-t", "loc-1", 1)], ttl_ms=0)
            assert zero["expires_at_ms"] is None
            lookup = await client.lookup("r-ttl")
            assert lookup["expires_at_ms"] == reply["expires_at_ms"]


async def test_unknown_fields_are_ignored(server):
    with trio.fail_after(TIMEOUT):
        async with connect(server) as client:
            await client.hello()
            await stock(client, "sku-u", "loc-1", 2)
            reply = await client.request(
                "reserve", rid="r-u", lines=[{"sku": "sku-u", "loc": "loc-1", "qty": 1, "colour": "red"}],
                priority="high", extra={"nested": [1, 2]},
            )
            assert reply["ok"] is True
            assert reply["lines"] == [{"sku": "sku-u", "loc": "loc-1", "qty": 1, "available": 1}]
            ping = await client.request("ping", whatever=1)
            assert ping["ok"] is True


async def test_release_frees_the_stock(server):
    with trio.fail_after(TIMEOUT):
        async with connect(server) as client:
            await client.hello()
            await stock(client, "sku-r", "loc-1", 6)
            await client.reserve("r-rel", [("sku-r", "loc-1", 4)])
            assert await figures(client, "sku-r", "loc-1") == (6, 4, 2)
            reply = await client.release("r-rel")
            assert reply["ok"] is True
            assert reply["rid"] == "r-rel"
            assert reply["state"] == "released"
            assert reply.get("duplicate", False) is False
            assert await figures(client, "sku-r", "loc-1") == (6, 0, 6)
            lookup = await client.lookup("r-rel")
            assert lookup["state"] == "released"


async def test_commit_in_full(server):
    with trio.fail_after(TIMEOUT):
        async with connect(server) as client:
            await client.hello()
            await stock(client, "sku-c", "loc-1", 10)
            await stock(client, "sku-c", "loc-2", 3)
            await client.reserve("r-com", [("sku-c", "loc-1", 3), ("sku-c", "loc-2", 1)])
            reply = await client.commit("r-com")
            assert reply["ok"] is True
            assert reply["rid"] == "r-com"
            assert reply["state"] == "committed"
            assert by_loc(reply["lines"]) == {
                ("sku-c", "loc-1"): {"sku": "sku-c", "loc": "loc-1", "qty": 3},
                ("sku-c", "loc-2"): {"sku": "sku-c", "loc": "loc-2", "qty": 1},
            }
            assert await figures(client, "sku-c", "loc-1") == (7, 0, 7)
            assert await figures(client, "sku-c", "loc-2") == (2, 0, 2)
            lookup = await client.lookup("r-com")
            assert lookup["state"] == "committed"


async def test_commit_short_pick_releases_the_remainder(server):
    with trio.fail_after(TIMEOUT):
        async with connect(server) as client:
            await client.hello()
            await stock(client, "sku-p", "loc-a", 10)
            await stock(client, "sku-p", "loc-b", 10)
            await stock(client, "sku-p", "loc-c", 10)
            await client.reserve("r-short", [("sku-p", "loc-a", 4), ("sku-p", "loc-b", 2), ("sku-p", "loc-c", 5)])
            assert await figures(client, "sku-p", "loc-a") == (10, 4, 6)
            # loc-a: 3 of 4 picked; loc-b: explicitly 0; loc-c: not named (nothing committed).
            reply = await client.commit("r-short", [("sku-p", "loc-a", 3), ("sku-p", "loc-b", 0)])
            assert reply["ok"] is True
            assert reply["state"] == "committed"
            committed = {key: line["qty"] for key, line in by_loc(reply["lines"]).items() if line["qty"]}
            assert committed == {("sku-p", "loc-a"): 3}
            assert await figures(client, "sku-p", "loc-a") == (7, 0, 7)
            assert await figures(client, "sku-p", "loc-b") == (10, 0, 10)
            assert await figures(client, "sku-p", "loc-c") == (10, 0, 10)


async def test_extend(server):
    with trio.fail_after(TIMEOUT):
        async with connect(server) as client:
            await client.hello()
            await stock(client, "sku-e", "loc-1", 3)
            await client.reserve("r-ext", [("sku-e", "loc-1", 1)], ttl_ms=10_000)
            before = now_ms()
            reply = await client.extend("r-ext", 120_000)
            after = now_ms()
            assert reply["ok"] is True
            assert reply["rid"] == "r-ext"
            assert before + 120_000 <= reply["expires_at_ms"] <= after + 120_000
            assert (await client.lookup("r-ext"))["expires_at_ms"] == reply["expires_at_ms"]
            # A reservation without expiry can be given one.
            await client.reserve("r-ext2", [("sku-e", "loc-1", 1)])
            extended = await client.extend("r-ext2", 50_000)
            assert (await client.lookup("r-ext2"))["expires_at_ms"] == extended["expires_at_ms"]
            assert (await client.lookup("r-ext2"))["state"] == "held"


async def test_lookup_reports_every_state(server):
    with trio.fail_after(TIMEOUT):
        async with connect(server) as client:
            await client.hello()
            await stock(client, "sku-l", "loc-1", 10)
            await client.reserve("r-held", [("sku-l", "loc-1", 1)], ref="order-9", ttl_ms=60_000)
            await client.reserve("r-commit", [("sku-l", "loc-1", 2)])
            await client.reserve("r-release", [("sku-l", "loc-1", 3)])
            await client.reserve("r-expire", [("sku-l", "loc-1", 4)], ttl_ms=50)
            await client.commit("r-commit")
            await client.release("r-release")
            await trio.sleep(0.2)
            held = await client.lookup("r-held")
            assert held["ok"] is True
            assert held["rid"] == "r-held"
            assert held["state"] == "held"
            assert held["lines"] == [{"sku": "sku-l", "loc": "loc-1", "qty": 1}]
            assert held["ref"] == "order-9"
            assert isinstance(held["expires_at_ms"], int) and held["expires_at_ms"] > now_ms()
            committed = await client.lookup("r-commit")
            assert (committed["state"], committed["lines"], committed["ref"], committed["expires_at_ms"]) == (
                "committed", [{"sku": "sku-l", "loc": "loc-1", "qty": 2}], None, None,
            )
            assert (await client.lookup("r-release"))["state"] == "released"
            expired = await client.lookup("r-expire")
            assert expired["state"] == "expired"
            assert expired["lines"] == [{"sku": "sku-l", "loc": "loc-1", "qty": 4}]
            # on_hand 10 - 2 committed; only r-held still holds.
            assert await figures(client, "sku-l", "loc-1") == (8, 1, 7)


# -- adjust, count, transfer, get, query ------------------------------------------------------


async def test_adjust(server):
    with trio.fail_after(TIMEOUT):
        async with connect(server) as client:
            await client.hello()
            reply = await client.adjust("adj-1", "sku-j", "loc-1", 12, "receipt")
            assert without(reply, "id", "seq") == {"ok": True, "sku": "sku-j", "loc": "loc-1", "on_hand": 12, "reserved": 0, "available": 12}
            await client.reserve("r-j", [("sku-j", "loc-1", 5)])
            damage = await client.adjust("adj-2", "sku-j", "loc-1", -9, "damage")
            # Reality wins: available may go negative through adjust (a shortage).
            assert without(damage, "id", "seq") == {"ok": True, "sku": "sku-j", "loc": "loc-1", "on_hand": 3, "reserved": 5, "available": -2}
            assert await figures(client, "sku-j", "loc-1") == (3, 5, -2)


async def test_count_reports_variance(server):
    with trio.fail_after(TIMEOUT):
        async with connect(server) as client:
            await client.hello()
            await stock(client, "sku-k", "loc-1", 10)
            await client.reserve("r-k", [("sku-k", "loc-1", 4)])
            low = await client.count("cnt-1", "sku-k", "loc-1", 7, "cycle count")
            assert without(low, "id", "seq") == {
                "ok": True, "sku": "sku-k", "loc": "loc-1", "on_hand": 7, "reserved": 4, "available": 3, "variance": -3,
            }
            high = await client.count("cnt-2", "sku-k", "loc-1", 12)
            assert (high["on_hand"], high["variance"], high["available"]) == (12, 5, 8)
            short = await client.count("cnt-3", "sku-k", "loc-1", 1)
            assert (short["on_hand"], short["reserved"], short["available"], short["variance"]) == (1, 4, -3, -11)
            unknown = await client.count("cnt-4", "sku-k", "loc-new", 6)
            assert (unknown["on_hand"], unknown["variance"]) == (6, 6)
            assert await figures(client, "sku-k", "loc-1") == (1, 4, -3)


async def test_transfer(server):
    with trio.fail_after(TIMEOUT):
        async with connect(server) as client:
            await client.hello()
            await stock(client, "sku-x", "dock", 10)
            await stock(client, "sku-x", "shelf", 1)
            await client.reserve("r-x", [("sku-x", "shelf", 1)])
            reply = await client.transfer("tr-1", "sku-x", "dock", "shelf", 6)
            assert reply["ok"] is True
            assert reply["from"] == {"loc": "dock", "on_hand": 4, "reserved": 0, "available": 4}
            assert reply["to"] == {"loc": "shelf", "on_hand": 7, "reserved": 1, "available": 6}
            assert await figures(client, "sku-x", "dock") == (4, 0, 4)
            assert await figures(client, "sku-x", "shelf") == (7, 1, 6)
            fresh = await client.transfer("tr-2", "sku-x", "dock", "overflow", 4)
            assert fresh["from"] == {"loc": "dock", "on_hand": 0, "reserved": 0, "available": 0}
            assert fresh["to"] == {"loc": "overflow", "on_hand": 4, "reserved": 0, "available": 4}


async def test_get_unknown_reads_as_zeros(server):
    with trio.fail_after(TIMEOUT):
        async with connect(server) as client:
            await client.hello()
            reply = await client.get("nothing-here", "nowhere")
            assert without(reply, "id", "seq") == {"ok": True, "sku": "nothing-here", "loc": "nowhere", "on_hand": 0, "reserved": 0, "available": 0}
            await stock(client, "sku-g", "loc-1", 3)
            assert without(await client.get("sku-g", "loc-1"), "id", "seq") == {
                "ok": True, "sku": "sku-g", "loc": "loc-1", "on_hand": 3, "reserved": 0, "available": 3,
            }


async def test_query(server):
    with trio.fail_after(TIMEOUT):
        async with connect(server) as client:
            await client.hello()
            await stock(client, "sku-q", "loc-b", 5)
            await stock(client, "sku-q", "loc-a", 8)
            await stock(client, "other-sku", "loc-a", 100)
            await client.reserve("r-q", [("sku-q", "loc-a", 3), ("sku-q", "loc-b", 5)])
            reply = await client.query("sku-q")
            assert reply["ok"] is True
            assert reply["sku"] == "sku-q"
            assert sorted(reply["locations"], key=lambda entry: entry["loc"]) == [
                {"loc": "loc-a", "on_hand": 8, "reserved": 3, "available": 5},
                {"loc": "loc-b", "on_hand": 5, "reserved": 5, "available": 0},
            ]
            assert reply["total"] == {"on_hand": 13, "reserved": 8, "available": 5}
            empty = await client.query("no-such-sku")
            assert (empty["locations"], empty["total"]) == ([], {"on_hand": 0, "reserved": 0, "available": 0})


# -- idempotency ------------------------------------------------------------------------------


async def test_reserve_retry_returns_the_original_reply(server):
    with trio.fail_after(TIMEOUT):
        async with connect(server) as client:
            await client.hello()
            await stock(client, "sku-i", "loc-1", 10)
            first = await client.reserve("r-i", [("sku-i", "loc-1", 3)], ref="order-i")
            await client.reserve("r-other", [("sku-i", "loc-1", 2)])
            again = await client.reserve("r-i", [("sku-i", "loc-1", 3)], ref="order-i")
            assert again["duplicate"] is True
            assert without(again, "id", "duplicate", "seq") == without(first, "id", "duplicate", "seq")
            assert again["lines"] == [{"sku": "sku-i", "loc": "loc-1", "qty": 3, "available": 7}]
            assert await figures(client, "sku-i", "loc-1") == (10, 5, 5)
            # Still the original reply once the reservation has ended.
            await client.release("r-i")
            late = await client.reserve("r-i", [("sku-i", "loc-1", 3)], ref="order-i")
            assert late["duplicate"] is True
            assert late["lines"] == first["lines"]
            assert await figures(client, "sku-i", "loc-1") == (10, 2, 8)
            stats = await client.stats()
            assert stats["reservations"] == 2


async def test_multi_line_reserve_retry_in_another_line_order_is_a_duplicate(server):
    with trio.fail_after(TIMEOUT):
        async with connect(server) as client:
            await client.hello()
            await stock(client, "sku-o", "loc-1", 5)
            await stock(client, "sku-o", "loc-2", 5)
            first = await client.reserve("r-o", [("sku-o", "loc-1", 1), ("sku-o", "loc-2", 2)])
            again = await client.reserve("r-o", [("sku-o", "loc-2", 2), ("sku-o", "loc-1", 1)])
            assert again["duplicate"] is True
            assert by_loc(again["lines"]) == by_loc(first["lines"])
            assert await figures(client, "sku-o", "loc-1") == (5, 1, 4)
            assert await figures(client, "sku-o", "loc-2") == (5, 2, 3)


async def test_reserve_retry_after_extend_returns_the_original_expiry(server):
    with trio.fail_after(TIMEOUT):
        async with connect(server) as client:
            await client.hello()
            await stock(client, "sku-v", "loc-1", 5)
            first = await client.reserve("r-v", [("sku-v", "loc-1", 1)], ttl_ms=60_000)
            extended = await client.extend("r-v", 600_000)
            assert extended["expires_at_ms"] != first["expires_at_ms"]
            again = await client.reserve("r-v", [("sku-v", "loc-1", 1)], ttl_ms=60_000)
            assert again["duplicate"] is True
            assert again["expires_at_ms"] == first["expires_at_ms"]
            assert again["lines"] == first["lines"]
            assert (await client.lookup("r-v"))["expires_at_ms"] == extended["expires_at_ms"]
            assert await figures(client, "sku-v", "loc-1") == (5, 1, 4)


async def test_stock_op_retries_return_the_original_reply(server):
    with trio.fail_after(TIMEOUT):
        async with connect(server) as client:
            await client.hello()
            adjust = await client.adjust("k-adj", "sku-d", "loc-1", 10, "receipt")
            count = await client.count("k-cnt", "sku-d", "loc-1", 8, "cycle")
            transfer = await client.transfer("k-tr", "sku-d", "loc-1", "loc-2", 3)
            await client.adjust("k-adj-2", "sku-d", "loc-1", 1, "return")
            state = (await figures(client, "sku-d", "loc-1"), await figures(client, "sku-d", "loc-2"))
            assert state == ((6, 0, 6), (3, 0, 3))
            seq_before = (await client.stats())["applied_seq"]
            for original, retry in (
                (adjust, client.adjust("k-adj", "sku-d", "loc-1", 10, "receipt")),
                (count, client.count("k-cnt", "sku-d", "loc-1", 8, "cycle")),
                (transfer, client.transfer("k-tr", "sku-d", "loc-1", "loc-2", 3)),
            ):
                again = await retry
                assert again["duplicate"] is True
                assert without(again, "id", "duplicate") == without(original, "id", "duplicate")
            assert (await figures(client, "sku-d", "loc-1"), await figures(client, "sku-d", "loc-2")) == state
            assert (await client.stats())["applied_seq"] == seq_before


async def test_failed_reserve_leaves_no_trace_and_its_rid_can_be_retried(server):
    with trio.fail_after(TIMEOUT):
        async with connect(server) as client:
            await client.hello()
            await stock(client, "sku-f", "loc-1", 2)
            seq_before = (await client.stats())["applied_seq"]
            try:
                await client.reserve("r-f", [("sku-f", "loc-1", 5)])
            except ServerError as error:
                assert error.code == "insufficient"
            else:
                raise AssertionError("reserve of 5 with 2 on hand succeeded")
            assert (await client.stats())["applied_seq"] == seq_before
            assert await figures(client, "sku-f", "loc-1") == (2, 0, 2)
            lookup = await client.request("lookup", rid="r-f")
            assert lookup["error"] == "not_found"
            # Same rid, same payload, once stock arrived: a fresh success, not a duplicate.
            await stock(client, "sku-f", "loc-1", 3)
            reply = await client.reserve("r-f", [("sku-f", "loc-1", 5)])
            assert reply.get("duplicate", False) is False
            assert reply["lines"] == [{"sku": "sku-f", "loc": "loc-1", "qty": 5, "available": 0}]
            # A failed rid may also be reused with a different payload.
            refused = await client.request("reserve", rid="r-g", lines=[{"sku": "sku-f", "loc": "loc-1", "qty": 99}])
            assert refused["error"] == "insufficient"
            await stock(client, "sku-f", "loc-1", 1)
            other = await client.reserve("r-g", [("sku-f", "loc-1", 1)])
            assert other.get("duplicate", False) is False
            assert await figures(client, "sku-f", "loc-1") == (6, 6, 0)


async def test_release_and_commit_repeated_are_ok_duplicates(server):
    with trio.fail_after(TIMEOUT):
        async with connect(server) as client:
            await client.hello()
            await stock(client, "sku-z", "loc-1", 10)
            await client.reserve("r-rel", [("sku-z", "loc-1", 2)])
            await client.reserve("r-com", [("sku-z", "loc-1", 3)])
            await client.release("r-rel")
            committed = await client.commit("r-com", [("sku-z", "loc-1", 2)])
            before = await figures(client, "sku-z", "loc-1")
            assert before == (8, 0, 8)
            release_again = await client.release("r-rel")
            assert (release_again["ok"], release_again["rid"], release_again["state"], release_again["duplicate"]) == (True, "r-rel", "released", True)
            commit_again = await client.commit("r-com")
            assert (commit_again["ok"], commit_again["state"], commit_again["duplicate"]) == (True, "committed", True)
            assert commit_again["lines"] == committed["lines"] == [{"sku": "sku-z", "loc": "loc-1", "qty": 2}]
            assert await figures(client, "sku-z", "loc-1") == before


# -- pipelining -------------------------------------------------------------------------------


async def test_pipelined_raw_requests_each_get_exactly_one_reply(server):
    with trio.fail_after(TIMEOUT):
        async with connect(server) as client:
            await client.hello()
            for loc in range(10):
                await stock(client, "sku-pipe", f"loc-{loc}", 100)
        raw = await open_raw(server)
        async with raw.stream:
            requests: dict[int, dict[str, Any]] = {}
            for request_id in range(1, 201):
                kind = request_id % 4
                if kind == 0:
                    message = {"op": "reserve", "rid": f"pipe-{request_id}", "lines": [{"sku": "sku-pipe", "loc": f"loc-{request_id % 10}", "qty": 1}]}
                elif kind == 1:
                    message = {"op": "get", "sku": "sku-pipe", "loc": f"loc-{request_id % 10}"}
                elif kind == 2:
                    message = {"op": "ping"}
                else:
                    message = {"op": "lookup", "rid": f"missing-{request_id}"}
                requests[request_id] = {"id": request_id, **message}
            await raw.send(*requests.values())
            replies = await raw.receive_n(200)
            assert sorted(reply["id"] for reply in replies) == list(range(1, 201))
            for reply in replies:
                request = requests[reply["id"]]
                if request["op"] == "reserve":
                    assert reply["ok"] is True and reply["rid"] == request["rid"]
                elif request["op"] == "get":
                    assert reply["ok"] is True and reply["loc"] == request["loc"] and reply["on_hand"] == 100
                elif request["op"] == "ping":
                    assert reply["ok"] is True
                else:
                    assert reply["ok"] is False and reply["error"] == "not_found"
            # Exactly one reply each: nothing more arrives.
            with trio.move_on_after(0.2):
                extra = await raw.stream.receive_some(65536)
                raise AssertionError(f"unexpected bytes after the last reply: {extra!r}")
        async with connect(server) as client:
            reserved = [(await client.get("sku-pipe", f"loc-{loc}"))["reserved"] for loc in range(10)]
            assert reserved == [10, 0, 10, 0, 10, 0, 10, 0, 10, 0]  # ids 4, 8, ..., 200 reserve 1 at loc id % 10


async def test_pipelined_trio_client_tasks_get_their_own_replies(server):
    with trio.fail_after(TIMEOUT):
        async with connect(server) as client:
            await client.hello()
            await stock(client, "sku-tasks", "loc-1", 1000)
            results: dict[int, dict[str, Any]] = {}

            async def one(number: int) -> None:
                if number % 2:
                    results[number] = await client.reserve(f"task-{number}", [("sku-tasks", "loc-1", number % 7 + 1)])
                else:
                    results[number] = await client.request("lookup", rid=f"absent-{number}")

            async with trio.open_nursery() as nursery:
                for number in range(200):
                    nursery.start_soon(one, number)
            assert len(results) == 200
            for number, reply in results.items():
                if number % 2:
                    assert reply["rid"] == f"task-{number}"
                    assert reply["lines"][0]["qty"] == number % 7 + 1
                else:
                    assert reply["error"] == "not_found"
            held = sum(number % 7 + 1 for number in range(1, 200, 2))
            assert await figures(client, "sku-tasks", "loc-1") == (1000, held, 1000 - held)


# -- expiry -----------------------------------------------------------------------------------


async def test_reservation_expires_on_its_own_and_frees_the_stock(server):
    with trio.fail_after(TIMEOUT):
        async with connect(server) as client:
            await client.hello()
            await stock(client, "sku-exp", "loc-1", 5)
            reply = await client.reserve("r-exp", [("sku-exp", "loc-1", 3)], ttl_ms=100)
            assert await figures(client, "sku-exp", "loc-1") == (5, 3, 2)
            await trio.sleep(0.4)
            # `get` does not look at the reservation: the server's own timer released it.
            assert await figures(client, "sku-exp", "loc-1") == (5, 0, 5)
            lookup = await client.lookup("r-exp")
            assert (lookup["state"], lookup["expires_at_ms"]) == ("expired", reply["expires_at_ms"])
            stats = await client.stats()
            assert stats["held"] == 0


async def test_extend_keeps_a_reservation_alive(server):
    with trio.fail_after(TIMEOUT):
        async with connect(server) as client:
            await client.hello()
            await stock(client, "sku-ext", "loc-1", 5)
            await client.reserve("r-keep", [("sku-ext", "loc-1", 2)], ttl_ms=150)
            await client.extend("r-keep", 10_000)
            await trio.sleep(0.35)
            assert (await client.lookup("r-keep"))["state"] == "held"
            assert await figures(client, "sku-ext", "loc-1") == (5, 2, 3)


async def test_a_closed_reservation_does_not_expire(server):
    with trio.fail_after(TIMEOUT):
        async with connect(server) as client:
            await client.hello()
            await stock(client, "sku-ce", "loc-1", 10)
            await client.reserve("r-ce", [("sku-ce", "loc-1", 3)], ttl_ms=100)
            await client.reserve("r-re", [("sku-ce", "loc-1", 2)], ttl_ms=100)
            committed = await client.commit("r-ce")
            released = await client.release("r-re")
            await trio.sleep(0.3)
            assert (await client.lookup("r-ce"))["state"] == "committed"
            assert (await client.lookup("r-re"))["state"] == "released"
            assert (await client.stats())["applied_seq"] == released["seq"] == committed["seq"] + 1
            assert await figures(client, "sku-ce", "loc-1") == (7, 0, 7)


async def test_watch_shows_the_expired_event(server):
    with trio.fail_after(TIMEOUT):
        async with connect(server) as client, connect(server) as watcher:
            await client.hello()
            await watcher.hello()
            watching = await watcher.watch()
            await stock(client, "sku-we", "loc-1", 4)
            reserved = await client.reserve("r-we", [("sku-we", "loc-1", 4)], ttl_ms=100, ref="order-we")
            events = [await watcher.next_event() for _ in range(3)]
            assert [event["type"] for event in events] == ["adjusted", "reserved", "expired"]
            assert [event["seq"] for event in events] == [watching["seq"] + 1, watching["seq"] + 2, watching["seq"] + 3]
            assert events[1]["seq"] == reserved["seq"]
            expired = events[2]
            assert expired["rid"] == "r-we"
            assert expired["lines"] == [{"sku": "sku-we", "loc": "loc-1", "qty": 4}]
            assert expired["ts_ms"] >= reserved["expires_at_ms"]
            assert await figures(client, "sku-we", "loc-1") == (4, 0, 4)


# -- watch ------------------------------------------------------------------------------------


async def make_history(client) -> list[dict[str, Any]]:
    """Three logged changes: adjusted (seq 1), reserved (seq 2), released (seq 3)."""
    return [
        await client.adjust("h-adj", "sku-w", "loc-1", 9, "receipt"),
        await client.reserve("h-res", [("sku-w", "loc-1", 2)], ttl_ms=60_000, ref="order-w"),
        await client.release("h-res"),
    ]


async def test_watch_from_seq_replays_then_follows(server):
    with trio.fail_after(TIMEOUT):
        async with connect(server) as client:
            await client.hello()
            before = now_ms()
            history = await make_history(client)
            after = now_ms()
            assert [reply["seq"] for reply in history] == [1, 2, 3]
            async with connect(server) as watcher:
                await watcher.hello()
                watching = await watcher.watch(from_seq=1)
                assert watching["ok"] is True
                assert watching["seq"] == 3
                events = [await watcher.next_event() for _ in range(3)]
                assert [event["seq"] for event in events] == [1, 2, 3]
                assert all(before <= event["ts_ms"] <= after for event in events)
                adjusted, reserved, released = events
                assert without(adjusted, "seq", "ts_ms") == {
                    "type": "adjusted", "key": "h-adj", "sku": "sku-w", "loc": "loc-1", "delta": 9, "reason": "receipt",
                }
                assert reserved["type"] == "reserved"
                assert (reserved["rid"], reserved["lines"], reserved["ttl_ms"], reserved["ref"]) == (
                    "h-res", [{"sku": "sku-w", "loc": "loc-1", "qty": 2}], 60_000, "order-w",
                )
                assert reserved["expires_at_ms"] == history[1]["expires_at_ms"]
                assert (released["type"], released["rid"]) == ("released", "h-res")
                assert released["lines"] == [{"sku": "sku-w", "loc": "loc-1", "qty": 2}]
                # Then new changes follow, in log order.
                count = await client.count("h-cnt", "sku-w", "loc-1", 7)
                transfer = await client.transfer("h-tr", "sku-w", "loc-1", "loc-2", 3)
                live = [await watcher.next_event(), await watcher.next_event()]
                assert [event["seq"] for event in live] == [count["seq"], transfer["seq"]] == [4, 5]
                assert (live[0]["type"], live[0]["on_hand"], live[0]["variance"]) == ("counted", 7, -2)
                assert (live[1]["type"], live[1]["from"], live[1]["to"], live[1]["qty"]) == ("transferred", "loc-1", "loc-2", 3)


async def test_watch_from_a_middle_seq(server):
    with trio.fail_after(TIMEOUT):
        async with connect(server) as client:
            await client.hello()
            await make_history(client)
            async with connect(server) as watcher:
                watching = await watcher.watch(from_seq=2)
                assert watching["seq"] == 3
                events = [await watcher.next_event(), await watcher.next_event()]
                assert [(event["seq"], event["type"]) for event in events] == [(2, "reserved"), (3, "released")]


async def test_watch_without_from_seq_gives_only_new_events(server):
    with trio.fail_after(TIMEOUT):
        async with connect(server) as client:
            await client.hello()
            await make_history(client)
            async with connect(server) as watcher:
                await watcher.hello()
                watching = await watcher.watch()
                assert watching["seq"] == 3
                with trio.move_on_after(0.2):
                    old = await watcher.next_event()
                    raise AssertionError(f"watch without from_seq pushed an old event: {old!r}")
                commit_target = await client.reserve("h-new", [("sku-w", "loc-1", 1)])
                committed = await client.commit("h-new")
                events = [await watcher.next_event(), await watcher.next_event()]
                assert [(event["seq"], event["type"]) for event in events] == [
                    (commit_target["seq"], "reserved"), (committed["seq"], "committed"),
                ] == [(4, "reserved"), (5, "committed")]
                assert events[1]["lines"] == [{"sku": "sku-w", "loc": "loc-1", "qty": 1}]


# -- durability as visible from outside -------------------------------------------------------


async def test_every_reply_is_covered_by_the_durable_log(server):
    with trio.fail_after(TIMEOUT):
        async with connect(server) as client:
            await client.hello()
            mutations = [
                await client.adjust("d-1", "sku-dur", "loc-1", 20, "receipt"),
                await client.reserve("d-r1", [("sku-dur", "loc-1", 5)], ttl_ms=60_000),
                await client.extend("d-r1", 120_000),
                await client.reserve("d-r2", [("sku-dur", "loc-1", 4)]),
                await client.release("d-r2"),
                await client.commit("d-r1", [("sku-dur", "loc-1", 3)]),
                await client.count("d-2", "sku-dur", "loc-1", 18),
                await client.transfer("d-3", "sku-dur", "loc-1", "loc-2", 6),
            ]
            seqs = [reply["seq"] for reply in mutations]
            assert seqs == list(range(1, 9))
            durable = (await client.stats())["wal"]["durable_seq"]
            assert durable >= seqs[-1]
            # Reads and refusals reflect only durable changes too.
            get = await client.get("sku-dur", "loc-2")
            refused = await client.request("reserve", rid="d-r3", lines=[{"sku": "sku-dur", "loc": "loc-2", "qty": 7}])
            assert refused["error"] == "insufficient"
            assert get["seq"] == refused["seq"] == 8
            assert (await client.stats())["wal"]["durable_seq"] >= 8

            # Many mutations in flight at once: each reply's seq is durable once it is answered.
            replies: list[dict[str, Any]] = []

            async def adjust_one(number: int) -> None:
                replies.append(await client.adjust(f"d-many-{number}", "sku-dur", f"bin-{number % 5}", 1, "receipt"))

            async with trio.open_nursery() as nursery:
                for number in range(50):
                    nursery.start_soon(adjust_one, number)
            assert sorted(reply["seq"] for reply in replies) == list(range(9, 59))
            assert (await client.stats())["wal"]["durable_seq"] >= 58
            assert [(await client.get("sku-dur", f"bin-{b}"))["on_hand"] for b in range(5)] == [10] * 5
        # The log holds exactly the acknowledged changes, in the order of their seqs.
        async with connect(server) as watcher:
            await watcher.watch(from_seq=1)
            events = [await watcher.next_event() for _ in range(8)]
            assert [event["type"] for event in events] == [
                "adjusted", "reserved", "extended", "reserved", "released", "committed", "counted", "transferred",
            ]


# -- pipelining under the server's bounds, and no oversell -------------------------------------


async def test_pipelining_past_the_in_flight_bound_answers_everything(start_server):
    with trio.fail_after(TIMEOUT):
        server = await start_server(in_flight_per_connection_max=4)
        raw = await open_raw(server)
        async with raw.stream:
            messages: list[dict[str, Any] | bytes] = []
            for request_id in range(1, 201):
                if request_id % 50 == 0:
                    messages.append(protocol.frame(b"\xc1"))  # a bad frame among them: answered with id nil
                messages.append({"id": request_id, "op": "adjust", "key": f"k-{request_id}", "sku": "sku-b", "loc": f"loc-{request_id % 3}", "delta": 1, "reason": "receipt"})
            async with trio.open_nursery() as nursery:
                nursery.start_soon(raw.send, *messages)  # the server stops reading while 4 are owed
                replies = await raw.receive_n(204)
            ids = [reply["id"] for reply in replies]
            assert sorted(i for i in ids if i is not None) == list(range(1, 201))
            assert ids.count(None) == 4
            assert all(reply["ok"] for reply in replies if reply["id"] is not None)
        async with connect(server) as client:
            assert [(await client.get("sku-b", f"loc-{loc}"))["on_hand"] for loc in range(3)] == [66, 67, 67]


async def test_no_oversell_under_pipelined_single_and_multi_line_reserves(server):
    with trio.fail_after(TIMEOUT):
        async with connect(server) as client:
            await client.hello()
            await stock(client, "sku-n", "loc-a", 10)
            await stock(client, "sku-n", "loc-b", 7)
        raw = await open_raw(server)
        async with raw.stream:
            messages = []
            for request_id in range(1, 61):
                if request_id % 2:
                    lines = [{"sku": "sku-n", "loc": "loc-a", "qty": 1}, {"sku": "sku-n", "loc": "loc-b", "qty": 1}]
                else:
                    lines = [{"sku": "sku-n", "loc": "loc-a", "qty": 1}]
                messages.append({"id": request_id, "op": "reserve", "rid": f"n-{request_id}", "lines": lines})
            await raw.send(*messages)
            replies = await raw.receive_n(60)
        granted = [reply for reply in replies if reply["ok"]]
        refused = [reply for reply in replies if not reply["ok"]]
        assert all(reply["error"] == "insufficient" for reply in refused)
        granted_a = len(granted)
        granted_b = sum(1 for reply in granted if len(reply["lines"]) == 2)
        assert granted_a <= 10 and granted_b <= 7
        async with connect(server) as client:
            assert await figures(client, "sku-n", "loc-a") == (10, granted_a, 10 - granted_a)
            assert await figures(client, "sku-n", "loc-b") == (7, granted_b, 7 - granted_b)
        for reply in refused:
            assert reply["lines"] and all(line["requested"] == 1 and line["available"] < 1 for line in reply["lines"])


async def test_refusals_are_linearizable_with_a_failing_multi_line_reserve(server):
    with trio.fail_after(TIMEOUT):
        async with connect(server) as client:
            await client.hello()
            for round_number in range(20):
                await stock(client, f"sku-lin-{round_number}", "loc-a", 5)
        raw = await open_raw(server)
        async with raw.stream:
            outcomes = []
            for round_number in range(20):
                sku = f"sku-lin-{round_number}"
                # loc-b has nothing: the multi-line reserve must fail; loc-a keeps 5 available all along.
                await raw.send(
                    {"id": 2 * round_number + 1, "op": "reserve", "rid": f"multi-{round_number}",
                     "lines": [{"sku": sku, "loc": "loc-a", "qty": 5}, {"sku": sku, "loc": "loc-b", "qty": 1}]},
                    {"id": 2 * round_number + 2, "op": "reserve", "rid": f"single-{round_number}",
                     "lines": [{"sku": sku, "loc": "loc-a", "qty": 1}]},
                )
                replies = {reply["id"]: reply for reply in await raw.receive_n(2)}
                assert replies[2 * round_number + 1]["error"] == "insufficient"
                outcomes.append(replies[2 * round_number + 2])
        refused = [reply for reply in outcomes if not reply["ok"]]
        assert refused == [], f"{len(refused)} of 20 single-line reserves refused, e.g. {refused[:1]!r}"


# -- pipelined requests naming the same rid or key ---------------------------------------------


async def test_pipelined_reserve_then_commit_of_the_same_rid(server):
    with trio.fail_after(TIMEOUT):
        async with connect(server) as client:
            await client.hello()
            await stock(client, "sku-rc", "loc-1", 10)
            await stock(client, "sku-rc", "loc-2", 10)
        raw = await open_raw(server)
        async with raw.stream:
            two_lines = [{"sku": "sku-rc", "loc": "loc-1", "qty": 2}, {"sku": "sku-rc", "loc": "loc-2", "qty": 3}]
            await raw.send(
                {"id": 1, "op": "reserve", "rid": "rc-1", "lines": [{"sku": "sku-rc", "loc": "loc-1", "qty": 4}]},
                {"id": 2, "op": "commit", "rid": "rc-1"},
                {"id": 3, "op": "lookup", "rid": "rc-1"},
                {"id": 4, "op": "reserve", "rid": "rc-2", "lines": two_lines},
                {"id": 5, "op": "release", "rid": "rc-2"},
                {"id": 6, "op": "lookup", "rid": "rc-2"},
            )
            replies = {reply["id"]: reply for reply in await raw.receive_n(6)}
            assert replies[1]["ok"] is True
            assert (replies[2]["ok"], replies[2]["state"]) == (True, "committed")
            assert replies[3]["state"] == "committed"
            assert replies[4]["ok"] is True
            assert (replies[5]["ok"], replies[5]["state"]) == (True, "released")
            assert replies[6]["state"] == "released"
            assert replies[1]["seq"] < replies[2]["seq"] and replies[4]["seq"] < replies[5]["seq"]
        async with connect(server) as client:
            assert await figures(client, "sku-rc", "loc-1") == (6, 0, 6)
            assert await figures(client, "sku-rc", "loc-2") == (10, 0, 10)


async def test_pipelined_repeats_of_the_same_rid_and_key(server):
    with trio.fail_after(TIMEOUT):
        async with connect(server) as client:
            await client.hello()
            await stock(client, "sku-rr", "loc-1", 10)
            await stock(client, "sku-rr", "loc-2", 10)
        raw = await open_raw(server)
        async with raw.stream:
            line = [{"sku": "sku-rr", "loc": "loc-1", "qty": 2}]
            await raw.send(
                {"id": 1, "op": "reserve", "rid": "rr-1", "lines": line},
                {"id": 2, "op": "reserve", "rid": "rr-1", "lines": line},
                {"id": 3, "op": "reserve", "rid": "rr-1", "lines": [{"sku": "sku-rr", "loc": "loc-2", "qty": 2}]},
                {"id": 4, "op": "adjust", "key": "kk-1", "sku": "sku-rr", "loc": "loc-1", "delta": 5, "reason": "receipt"},
                {"id": 5, "op": "adjust", "key": "kk-1", "sku": "sku-rr", "loc": "loc-1", "delta": 5, "reason": "receipt"},
                {"id": 6, "op": "adjust", "key": "kk-1", "sku": "sku-rr", "loc": "loc-2", "delta": 5, "reason": "receipt"},
            )
            replies = {reply["id"]: reply for reply in await raw.receive_n(6)}
            assert replies[1]["ok"] is True and replies[1].get("duplicate", False) is False
            assert replies[2]["ok"] is True and replies[2]["duplicate"] is True
            assert replies[2]["lines"] == replies[1]["lines"]
            assert replies[3]["error"] == "conflict"
            # Ids 4 and 6 touch different SKU-locations, so either may be applied first; exactly
            # one of them uses the key, and id 5 (same payload as 4) follows whichever did.
            if replies[4]["ok"]:
                assert replies[4].get("duplicate", False) is False
                assert replies[5]["ok"] is True and replies[5]["duplicate"] is True
                assert replies[5]["on_hand"] == replies[4]["on_hand"] == 15
                assert replies[6]["error"] == "conflict"
                expected = ((15, 2, 13), (10, 0, 10))
            else:
                assert replies[4]["error"] == replies[5]["error"] == "conflict"
                assert replies[6]["ok"] is True and replies[6]["on_hand"] == 15
                expected = ((10, 2, 8), (15, 0, 15))
        async with connect(server) as client:
            assert (await figures(client, "sku-rr", "loc-1"), await figures(client, "sku-rr", "loc-2")) == expected


async def test_nothing_is_shown_before_it_is_durable(server, monkeypatch):
    """With every log commit slowed to 0.3 s, no reply and no pushed event may arrive while the
    change it reflects is still waiting for its fsync."""
    storage = server.engine.storage
    original_append = storage.append_entry

    def slow_append(first_seq, last_seq, data):
        time.sleep(0.3)  # runs in the log's commit thread
        return original_append(first_seq, last_seq, data)

    with trio.fail_after(TIMEOUT):
        async with connect(server) as client, connect(server) as reader, connect(server) as watcher:
            await client.hello()
            await stock(client, "sku-slow", "loc-1", 10)
            await watcher.watch()
            monkeypatch.setattr(storage, "append_entry", slow_append)
            wal = server.engine.wal
            seen: list[tuple[str, int, int]] = []  # (what, its seq, durable_seq when it arrived)

            async def reserve() -> None:
                reply = await client.reserve("r-slow", [("sku-slow", "loc-1", 4)])
                seen.append(("reserve", reply["seq"], wal.durable_seq))

            async def read_after_the_change() -> None:
                await trio.sleep(0.05)  # the reserve is applied, its commit is under way
                assert wal.appended_seq > wal.durable_seq
                # A read of a SKU-location with no change in flight is not delayed at all.
                other = await reader.get("sku-slow", "loc-other")
                assert other["on_hand"] == 0
                assert wal.appended_seq > wal.durable_seq, "an unrelated read waited for the commit"
                get = await reader.get("sku-slow", "loc-1")
                assert (get["reserved"], get["available"]) == (4, 6)
                seen.append(("get", get["seq"], wal.durable_seq))
                lookup = await reader.lookup("r-slow")
                assert lookup["state"] == "held"
                seen.append(("lookup", lookup["seq"], wal.durable_seq))
                refused = await reader.request("reserve", rid="r-big", lines=[{"sku": "sku-slow", "loc": "loc-1", "qty": 7}])
                assert refused["lines"] == [{"sku": "sku-slow", "loc": "loc-1", "requested": 7, "available": 6}]
                seen.append(("insufficient", refused["seq"], wal.durable_seq))

            async def watch() -> None:
                event = await watcher.next_event()
                assert (event["type"], event["rid"]) == ("reserved", "r-slow")
                seen.append(("event", event["seq"], wal.durable_seq))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(reserve)
                nursery.start_soon(read_after_the_change)
                nursery.start_soon(watch)
            assert sorted(what for what, _, _ in seen) == ["event", "get", "insufficient", "lookup", "reserve"]
            for what, seq, durable_seq in seen:
                assert seq == 2, (what, seq)
                assert durable_seq >= seq, f"{what} reflecting seq {seq} arrived when only {durable_seq} was durable"


async def test_stats_shows_nothing_that_is_not_durable(server, monkeypatch):
    storage = server.engine.storage
    original_append = storage.append_entry

    def slow_append(first_seq, last_seq, data):
        time.sleep(0.3)
        return original_append(first_seq, last_seq, data)

    with trio.fail_after(TIMEOUT):
        async with connect(server) as client, connect(server) as admin:
            await stock(client, "sku-st", "loc-1", 5)
            monkeypatch.setattr(storage, "append_entry", slow_append)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.reserve, "r-st", [("sku-st", "loc-1", 1)])
                await trio.sleep(0.05)
                stats = await admin.stats()
                durable_seq = server.engine.wal.durable_seq
            assert stats["applied_seq"] <= durable_seq
            assert stats["held"] == 0 or durable_seq >= 2

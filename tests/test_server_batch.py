"""Batch `count`/`adjust` over real TCP: both clients, idempotency, all-or-nothing, the largest
batch in both directions, `watch`, and kill -9 recovery of a batch and its key."""

from __future__ import annotations

from typing import Any

import trio

from protocol import LINES_PER_BATCH_MAX, NAME_BYTES_MAX, Client, ServerError, open_trio_client

TIMEOUT = 10


def connect(server):
    return open_trio_client(server.host, server.port)


def without(reply: dict[str, Any], *names: str) -> dict[str, Any]:
    return {name: value for name, value in reply.items() if name not in names}


async def test_count_many_sets_every_line_and_a_retry_is_a_duplicate(server):
    with trio.fail_after(TIMEOUT):
        async with connect(server) as client:
            await client.hello()
            await client.adjust("opening", "A", "X", 10, "receipt")
            await client.reserve("r1", [("A", "X", 4)])
            lines = [("A", "X", 7), {"sku": "A", "loc": "Y", "on_hand": 3}, ("B", "X", 0)]
            reply = await client.count_many("load-1", lines, reason="initial")
            assert reply["lines"] == [
                {"sku": "A", "loc": "X", "on_hand": 7, "reserved": 4, "available": 3, "variance": -3},
                {"sku": "A", "loc": "Y", "on_hand": 3, "reserved": 0, "available": 3, "variance": 3},
                {"sku": "B", "loc": "X", "on_hand": 0, "reserved": 0, "available": 0, "variance": 0},
            ]
            assert "duplicate" not in reply
            assert (await client.get("A", "Y"))["on_hand"] == 3
            assert (await client.query("A"))["total"] == {"on_hand": 10, "reserved": 4, "available": 6}
            seq = (await client.stats())["applied_seq"]
            again = await client.count_many("load-1", lines, reason="initial")
            assert again["duplicate"] is True
            assert without(again, "id", "duplicate") == without(reply, "id")
            assert (await client.stats())["applied_seq"] == seq
            try:
                await client.count_many("load-1", lines[:2], reason="initial")
                raise AssertionError("a reused key with another payload must be refused")
            except ServerError as error:
                assert error.code == "conflict"


async def test_adjust_many_is_all_or_nothing_over_tcp(server):
    with trio.fail_after(TIMEOUT):
        async with connect(server) as client:
            await client.adjust_many("receipts", [("A", "X", 5), ("B", "X", 2)], "receipt")
            seq = (await client.stats())["applied_seq"]
            try:
                await client.adjust_many("damage", [("A", "X", -5), ("B", "X", -3)], "damage")
                raise AssertionError("a line going negative must refuse the batch")
            except ServerError as error:
                assert error.code == "invalid"
                assert "lines[1]" in error.message
                assert error.reply["lines"] == [{"line": 1, "sku": "B", "loc": "X", "delta": -3, "on_hand": 2}]
            assert (await client.get("A", "X"))["on_hand"] == 5
            assert (await client.stats())["applied_seq"] == seq
            reply = await client.adjust_many("damage", [("A", "X", -5), ("B", "X", -2)], "damage")
            assert [line["on_hand"] for line in reply["lines"]] == [0, 0]


async def test_both_forms_in_one_request_is_bad_request_and_the_connection_stays(server):
    with trio.fail_after(TIMEOUT):
        async with connect(server) as client:
            try:
                await client.call("count", key="k", sku="A", loc="X", on_hand=1, lines=[{"sku": "A", "loc": "X", "on_hand": 1}])
                raise AssertionError("both forms must be refused")
            except ServerError as error:
                assert error.code == "bad_request" and "'sku'" in error.message and "'on_hand'" in error.message
            await client.ping()


async def test_a_batch_is_one_event_on_watch(server):
    with trio.fail_after(TIMEOUT):
        async with connect(server) as client, connect(server) as watcher:
            await watcher.watch()
            await client.count_many("load-1", [("A", "X", 2), ("A", "Y", 1)])
            event = await watcher.next_event()
            assert event["type"] == "counted_batch" and event["key"] == "load-1" and event["reason"] is None
            assert event["lines"] == [
                {"sku": "A", "loc": "X", "on_hand": 2, "variance": 2},
                {"sku": "A", "loc": "Y", "on_hand": 1, "variance": 1},
            ]


def test_the_largest_batch_with_the_longest_names_fits_both_ways(server_process):
    server = server_process()
    name = "é" * (NAME_BYTES_MAX // 2 - 3)  # 122 bytes; 6 more for a distinct suffix
    lines = [(f"{name}{index:06d}", name, 2**31 - 1) for index in range(LINES_PER_BATCH_MAX)]
    with Client("127.0.0.1", server.port) as client:
        reply = client.count_many("big", lines)
        assert len(reply["lines"]) == LINES_PER_BATCH_MAX
        assert reply["lines"][-1] == {"sku": lines[-1][0], "loc": name, "on_hand": 2**31 - 1, "reserved": 0, "available": 2**31 - 1, "variance": 2**31 - 1}
        assert client.count_many("big", lines)["duplicate"] is True
        assert client.stats()["stocks"] == LINES_PER_BATCH_MAX


def test_a_batch_and_its_key_survive_kill_9(server_process):
    server = server_process()
    lines = [(f"sku-{index}", "dc-1", index + 1) for index in range(500)]
    with Client("127.0.0.1", server.port) as client:
        original = client.count_many("load-1", lines, reason="initial")
        client.adjust_many("receipts", [("sku-0", "dc-1", 5)], "receipt")
    server.kill()
    restarted = server_process()
    with Client("127.0.0.1", restarted.port) as client:
        assert client.get("sku-499", "dc-1")["on_hand"] == 500
        assert client.get("sku-0", "dc-1")["on_hand"] == 6
        again = client.count_many("load-1", lines, reason="initial")
        assert again["duplicate"] is True and without(again, "id", "duplicate") == without(original, "id")
        # A snapshot (format 2) and a restart from it answer the same.
        client.snapshot()
    restarted.terminate()
    from_snapshot = server_process()
    with Client("127.0.0.1", from_snapshot.port) as client:
        assert client.get("sku-0", "dc-1")["on_hand"] == 6
        again = client.count_many("load-1", lines, reason="initial")
        assert again["duplicate"] is True and without(again, "id", "duplicate") == without(original, "id")

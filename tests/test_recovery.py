"""Recovery: kill -9 a real server mid-stream; restart; everything acknowledged is there."""

from __future__ import annotations

import gc
import random
import re

import lmdb
import msgpack
import pytest
import trio

from protocol import Client, ServerError, open_trio_client
from engine.core import State, apply_event
from engine.recovery import recover
from engine.server import GC_GENERATION0_THRESHOLD, RunningServer
from engine.storage import LmdbStorage

SKUS = [("sku-1", "w1"), ("sku-2", "w1"), ("sku-3", "w2"), ("sku-4", "w2")]
STOCK = 400


def _figures(client: Client) -> dict:
    return {key: client.get(*key) for key in SKUS}


def test_kill_9_mid_stream_loses_nothing_acknowledged(server_process):
    server = server_process()
    chooser = random.Random(7)
    with Client("127.0.0.1", server.port) as client:
        for index, (sku, loc) in enumerate(SKUS):
            client.adjust(f"stock-{index}", sku, loc, STOCK, "receipt")
        sent: dict[int, tuple[str, list]] = {}
        for number in range(3000):
            lines = [(sku, loc, chooser.randint(1, 3)) for sku, loc in chooser.sample(SKUS, chooser.randint(1, 3))]
            rid = f"order-{number}"
            sent[client.send("reserve", rid=rid, lines=[{"sku": s, "loc": l, "qty": q} for s, l, q in lines])] = (rid, lines)
        acked: dict[str, list] = {}
        refused: set[str] = set()
        # Read a part of the replies, then kill the server while the rest are in flight.
        while len(acked) + len(refused) < 400:
            reply = client.receive_any()
            rid, lines = sent[reply["id"]]
            if reply["ok"]:
                acked[rid] = lines
            else:
                assert reply["error"] == "insufficient"
                refused.add(rid)
        server.kill()
    assert acked, "some reserves must have been acknowledged before the kill"

    restarted = server_process()
    with Client("127.0.0.1", restarted.port) as client:
        held_by_stock = {key: 0 for key in SKUS}
        for rid, lines in sent.values():
            try:
                reservation = client.lookup(rid)
            except ServerError as error:
                assert error.code == "not_found"
                assert rid not in acked, f"acknowledged {rid} was lost"
                continue
            # All or nothing per reservation: every line, exactly as requested.
            assert reservation["state"] == "held"
            assert [(line["sku"], line["loc"], line["qty"]) for line in reservation["lines"]] == lines
            for sku, loc, qty in lines:
                held_by_stock[(sku, loc)] += qty
        for key, figures in _figures(client).items():
            assert figures["on_hand"] == STOCK
            assert figures["reserved"] == held_by_stock[key]
            assert figures["available"] >= 0
        for rid, lines in acked.items():
            assert client.lookup(rid)["state"] == "held"
        # The server goes on serving from the recovered state.
        next_rid = "after-restart"
        reply = client.reserve(next_rid, [(SKUS[0][0], SKUS[0][1], 1)]) if _figures(client)[SKUS[0]]["available"] > 0 else None
        if reply is not None:
            assert reply["rid"] == next_rid
    assert restarted.terminate() == 0


def test_expired_while_down_is_expired_on_recovery(server_process):
    server = server_process()
    with Client("127.0.0.1", server.port) as client:
        client.adjust("stock", "sku", "w", 5, "receipt")
        reply = client.reserve("short-lived", [("sku", "w", 5)], ttl_ms=300)
        assert reply["expires_at_ms"] is not None
    server.kill()
    import time

    time.sleep(0.5)
    restarted = server_process()
    with Client("127.0.0.1", restarted.port) as client:
        deadline = time.monotonic() + 5
        while client.lookup("short-lived")["state"] != "expired":
            assert time.monotonic() < deadline, "reservation not expired after restart"
            time.sleep(0.02)
        assert client.get("sku", "w")["available"] == 5
    assert restarted.terminate() == 0


def test_restart_logs_its_start_up_time_and_replay_rate(server_process):
    server = server_process()
    with Client("127.0.0.1", server.port) as client:
        client.adjust("stock", "sku", "w", 5, "receipt")
        client.reserve("r", [("sku", "w", 2)])
    server.kill()
    restarted = server_process()
    with Client("127.0.0.1", restarted.port) as client:
        assert client.get("sku", "w")["reserved"] == 2
    match = re.search(
        r"started in (\d+\.\d+) s \((\d+) records/s from process start\): recovered seq 2 "
        r"\(snapshot at 0, replayed 2 records in (\d+\.\d+) s, \d+ records/s\)",
        restarted.log_text(),
    )
    assert match, restarted.log_text()
    started_seconds, recovery_seconds = float(match.group(1)), float(match.group(3))
    # Counted from the process's start: the interpreter and the imports come before recovery.
    assert 0 < started_seconds < 20 and recovery_seconds <= started_seconds
    assert restarted.terminate() == 0


async def test_recovery_leaves_the_state_frozen_and_the_collector_tuned(start_server):
    frozen_before = gc.get_freeze_count()
    running = await start_server()
    assert gc.isenabled()
    assert gc.get_threshold()[0] == GC_GENERATION0_THRESHOLD
    assert gc.get_freeze_count() > frozen_before
    assert running.engine.state.seq == 0


def test_clean_shutdown_writes_a_snapshot_and_restart_replays_nothing(server_process):
    server = server_process()
    with Client("127.0.0.1", server.port) as client:
        client.adjust("stock", "sku", "w", 5, "receipt")
        client.reserve("r", [("sku", "w", 2)])
    assert server.terminate() == 0
    assert "snapshot at seq 2" in server.log_text()
    restarted = server_process()
    assert "0 records replayed" in restarted.log_text()
    with Client("127.0.0.1", restarted.port) as client:
        assert client.get("sku", "w")["reserved"] == 2
    assert restarted.terminate() == 0


async def _exercise(running: RunningServer, rounds: int, seed: int) -> None:
    chooser = random.Random(seed)
    async with open_trio_client(running.host, running.port) as client:
        for number in range(rounds):
            sku, loc = chooser.choice(SKUS)
            action = chooser.random()
            try:
                if action < 0.2:
                    await client.adjust(f"{seed}-adj-{number}", sku, loc, chooser.randint(1, 20), "receipt")
                elif action < 0.6:
                    await client.reserve(f"{seed}-r-{number}", [(sku, loc, chooser.randint(1, 5))], ttl_ms=chooser.choice([0, 60_000]))
                elif action < 0.75:
                    await client.release(f"{seed}-r-{chooser.randrange(max(number, 1))}")
                elif action < 0.9:
                    await client.commit(f"{seed}-r-{chooser.randrange(max(number, 1))}")
                else:
                    await client.count(f"{seed}-cnt-{number}", sku, loc, chooser.randint(0, 50))
            except ServerError as error:
                assert error.code in {"insufficient", "not_found", "invalid_state", "invalid"}, error.reply


def _comparable(snapshot: dict) -> dict:
    return {name: sorted(map(repr, value)) if isinstance(value, list) else value for name, value in snapshot.items()}


async def test_restart_from_snapshot_plus_log_has_exactly_the_same_state(start_server, data_dir):
    with trio.fail_after(30):
        first = await start_server()
        await _exercise(first, 300, seed=1)
        async with open_trio_client(first.host, first.port) as client:
            snapshot_seq = (await client.snapshot())["seq"]
        await _exercise(first, 300, seed=2)  # this tail is only in the log
        before = first.engine.state.to_snapshot()
        assert before["seq"] > snapshot_seq
        # Stop without the shutdown snapshot: cancel like a crash after the last ack.
        await first.engine.wal.flush()
        first.engine.snapshot = None  # any snapshot attempt from here on would fail loudly
        await _stop_without_snapshot(first)

        second = await start_server()
        after = second.engine.state.to_snapshot()
        assert _comparable(after) == _comparable(before)
        assert second.engine.storage.latest_snapshot()["seq"] == snapshot_seq


async def _stop_without_snapshot(running: RunningServer) -> None:
    running.engine.snapshots.last_seq = running.engine.state.seq  # nothing new to snapshot
    await running.aclose()


# -- replay straight from the log's entries ------------------------------------------------------


def _reserved(seq: int, rid: str, qty: int = 1) -> dict:
    return {
        "seq": seq, "ts_ms": 1000 + seq, "type": "reserved", "rid": rid, "lines": [{"sku": "s", "loc": "l", "qty": qty}],
        "ttl_ms": 0, "expires_at_ms": None, "ref": None,
    }


def _released(seq: int, rid: str) -> dict:
    return {"seq": seq, "ts_ms": 1000 + seq, "type": "released", "rid": rid, "lines": [{"sku": "s", "loc": "l", "qty": 1}]}


def _adjusted(seq: int) -> dict:
    return {"seq": seq, "ts_ms": 1000 + seq, "type": "adjusted", "key": f"k{seq}", "sku": "s", "loc": "l", "delta": 100, "reason": "receipt"}


def _mixed_log() -> list[list[dict]]:
    """Entries as different versions wrote them: single event maps (one entry per event) and
    arrays (one entry per group commit), interleaved."""
    return [
        [_adjusted(1)],
        [_reserved(2, "a"), _reserved(3, "b"), _reserved(4, "c")],
        [_released(5, "a")],
        [_reserved(6, "d")],
        [_released(7, "b"), _reserved(8, "e", 2)],
    ]


def _write_entries(path: str, entries: list[list[dict]], single_map_entries: set[int]) -> None:
    """Write log entries directly through LMDB, the way `LmdbStorage` lays them out."""
    env = lmdb.open(path, map_size=64 * 1024**2, subdir=True, max_dbs=4)
    log_db = env.open_db(b"log")
    with env.begin(write=True, db=log_db) as txn:
        for index, events in enumerate(entries):
            value = events[0] if index in single_map_entries else events
            assert index not in single_map_entries or len(events) == 1
            txn.put(events[0]["seq"].to_bytes(8, "big"), msgpack.packb(value, use_bin_type=True))
    env.close()


def _expected_state(entries: list[list[dict]], through_seq: int):
    state = State()
    for events in entries:
        for event in events:
            if event["seq"] <= through_seq:
                apply_event(state, event)
    return state


def test_replay_reads_old_single_event_entries_mixed_with_batch_entries(tmp_path):
    path = str(tmp_path / "lmdb")
    entries = _mixed_log()
    _write_entries(path, entries, single_map_entries={0, 2, 3})
    storage = LmdbStorage(path, 64 * 1024**2)
    try:
        assert storage.last_seq == 8
        assert [event["seq"] for event in storage.read(1, 100)] == list(range(1, 9))
        assert [len(entry) for entry in storage.read_entries(3)] == [2, 1, 1, 2]  # from inside an entry
        state, replayed = recover(storage)
        assert replayed == 8 and state.seq == 8
        assert state.to_snapshot() == _expected_state(entries, 8).to_snapshot()
        assert state.stock("s", "l").reserved == 1 + 1 + 2  # c, d, e held
        # A snapshot taken inside a batch entry: replay starts in the middle of that entry.
        storage.save_snapshot(_expected_state(entries, 3).to_snapshot())
        state, replayed = recover(storage)
        assert replayed == 5 and state.to_snapshot() == _expected_state(entries, 8).to_snapshot()
    finally:
        storage.close()


def test_replay_refuses_a_gap_between_entries(tmp_path):
    path = str(tmp_path / "lmdb")
    entries = _mixed_log()
    del entries[2]  # seq 5 is missing
    _write_entries(path, entries, single_map_entries={0})
    storage = LmdbStorage(path, 64 * 1024**2)
    try:
        with pytest.raises(RuntimeError, match="gap: replay needs seq 5"):
            recover(storage)
    finally:
        storage.close()


def test_replay_checks_every_event_it_reads_back(tmp_path):
    path = str(tmp_path / "lmdb")
    entries = _mixed_log()
    del entries[3][0]["ttl_ms"]  # a malformed record in the middle of the log
    _write_entries(path, entries, single_map_entries={3})
    storage = LmdbStorage(path, 64 * 1024**2)
    try:
        with pytest.raises(AssertionError, match="lacks field 'ttl_ms'"):
            recover(storage)
    finally:
        storage.close()

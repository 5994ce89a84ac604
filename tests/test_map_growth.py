"""The LMDB map grows when full (up to a ceiling), and at the ceiling the server refuses changes
but still answers reads of durable state: through real server processes, kill -9 included."""

from __future__ import annotations

import re

import pytest

from engine.storage import LmdbStorage, MapFullAtCeiling
from protocol import Client

MIB = 1024**2
LINES_PER_BATCH = 1000
SKU_PADDING = "x" * 90  # long names: each batch count is ~120 KB in the log


def _event(seq: int) -> dict:
    return {"seq": seq, "ts_ms": 1000, "type": "adjusted", "key": f"k{seq}", "sku": "s", "loc": "l", "delta": 1, "reason": "r" * 200}


def test_storage_grows_a_tiny_map_and_keeps_every_entry(tmp_path):
    path = str(tmp_path / "lmdb")
    storage = LmdbStorage(path, 1 * MIB, map_size_max_bytes=64 * MIB)
    try:
        for first in range(1, 40_001, 1000):
            storage.append([_event(seq) for seq in range(first, first + 1000)])
        assert storage.map_growths >= 3, storage.map_stats()
        assert storage.map_stats()["map_size_bytes"] > 1 * MIB and not storage.map_full_at_ceiling
        assert [event["seq"] for event in storage.read(39_990, 100)] == list(range(39_990, 40_001))
    finally:
        storage.close()
    reopened = LmdbStorage(path, 1 * MIB, map_size_max_bytes=64 * MIB)  # starts at the data's size
    try:
        assert reopened.last_seq == 40_000 and reopened.first_seq() == 1
    finally:
        reopened.close()


def test_storage_at_its_ceiling_raises_and_writes_nothing(tmp_path):
    storage = LmdbStorage(str(tmp_path / "lmdb"), 1 * MIB, map_size_max_bytes=2 * MIB)
    try:
        with pytest.raises(MapFullAtCeiling, match="ceiling of 2 MiB"):
            for first in range(1, 100_001, 1000):
                storage.append([_event(seq) for seq in range(first, first + 1000)])
        written = storage.last_seq
        assert storage.map_full_at_ceiling and storage.map_growths == 1
        assert written % 1000 == 0 and storage.read(written + 1, 10) == []
    finally:
        storage.close()


def _batch(number: int) -> list[dict]:
    return [{"sku": f"{SKU_PADDING}-{number}-{line}", "loc": "w1", "on_hand": number + line + 1} for line in range(LINES_PER_BATCH)]


def _write_batches(client: Client, first: int, count: int, in_flight: int = 8) -> tuple[list[int], list[dict]]:
    """Send `count` batch counts pipelined; return the numbers acknowledged and the refusals."""
    acked: list[int] = []
    refused: list[dict] = []
    pending: dict[int, int] = {}
    numbers = iter(range(first, first + count))
    for number in numbers:
        pending[client.send("count", key=f"batch-{number}", lines=_batch(number))] = number
        if len(pending) >= in_flight:
            break
    while pending:
        reply = client.receive_any()
        number = pending.pop(reply["id"])
        if reply["ok"]:
            acked.append(number)
        else:
            refused.append(reply)
        following = next(numbers, None)
        if following is not None:
            pending[client.send("count", key=f"batch-{following}", lines=_batch(following))] = following
    return acked, refused


def _assert_durable(client: Client, acked: list[int]) -> None:
    for number in acked:
        for line in (0, LINES_PER_BATCH - 1):
            figures = client.get(f"{SKU_PADDING}-{number}-{line}", "w1")
            assert figures["on_hand"] == number + line + 1, f"acknowledged batch {number} was lost"


def test_a_tiny_map_grows_many_times_under_load_and_every_ack_survives_kill_9(server_process):
    server = server_process("--map-size-mb", "1", "--map-size-max-mb", "64")
    with Client("127.0.0.1", server.port) as client:
        acked, refused = _write_batches(client, 0, 160)  # ~19 MB of log: 1 -> 32 MiB
        wal = client.call("stats")["wal"]
    assert refused == [] and len(acked) == 160
    print(f"\nmap growth over TCP: {len(acked)} batch counts acknowledged; wal: map_size_bytes={wal['map_size_bytes']}, "
          f"map_growths={wal['map_growths']}, map_full_at_ceiling={wal['map_full_at_ceiling']}")
    assert wal["map_growths"] >= 4 and wal["map_size_bytes"] >= 16 * MIB and not wal["map_full_at_ceiling"]
    growths = re.findall(r"LMDB map full at \d+ MiB: grown to \d+ MiB .*", server.log_text())
    print("\n".join(growths))
    assert len(growths) == wal["map_growths"]
    server.kill()
    restarted = server_process("--map-size-mb", "1", "--map-size-max-mb", "64")
    with Client("127.0.0.1", restarted.port) as client:
        _assert_durable(client, acked)
        assert client.call("stats")["stocks"] == len(acked) * LINES_PER_BATCH
    assert restarted.terminate() == 0


def test_at_the_ceiling_changes_are_refused_reads_answered_and_a_larger_ceiling_recovers_all(server_process):
    server = server_process("--map-size-mb", "1", "--map-size-max-mb", "4")
    with Client("127.0.0.1", server.port) as client:
        acked, refused = _write_batches(client, 0, 100)
        assert acked and refused, "the load must fill the map up to its ceiling"
        assert all(reply["error"] == "internal" for reply in refused)
        ceiling_message = next(reply["message"] for reply in refused if "ceiling" in reply["message"])
        print(f"\nat the ceiling: {ceiling_message}")
        assert "LMDB map is full at its ceiling of 4 MiB" in ceiling_message and "--map-size-max-mb" in ceiling_message
        # Changes are refused, naming the cause ...
        with pytest.raises(Exception) as change:
            client.adjust("after-full", "sku", "w1", 5, "receipt")
        assert "ceiling of 4 MiB" in str(change.value)
        # ... reads of durable state are answered, and stats tell the operator.
        _assert_durable(client, acked)
        wal = client.call("stats")["wal"]
        assert wal["map_full_at_ceiling"] is True and wal["failure"] and wal["map_size_bytes"] == 4 * MIB
    assert "LMDB map is full at its ceiling of 4 MiB" in server.log_text()
    server.kill()
    restarted = server_process("--map-size-mb", "1", "--map-size-max-mb", "64")
    with Client("127.0.0.1", restarted.port) as client:
        _assert_durable(client, acked)
        client.adjust("after-restart", "sku", "w1", 5, "receipt")  # it writes again
    assert restarted.terminate() == 0

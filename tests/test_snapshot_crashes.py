"""kill -9 at every step of a snapshot (the builder's write, the log trimming) and during
start-up replay; kill the builder alone: the next start recovers exactly what was acknowledged.

Each test drives a real server process. A pause point (`engine.pause_points`, via
ENGINE_PAUSE_AT) holds the process at the step, and the kill lands there deterministically.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.builder_protocol import parse_reply
from engine.storage import LmdbStorage
from protocol import Client
from conftest import ROOT

SKUS = [(f"sku-{number}", f"w{number % 3}") for number in range(20)]
WAIT_SECONDS_MAX = 20.0


def _load(client: Client, reserves: int, seed: int = 0) -> list[str]:
    """Stock every SKU-location, then `reserves` single-line reserves pipelined, a third of
    them released and a third committed. Every reply must be ok. Returns the rids."""
    client.pipeline([("adjust", {"key": f"stock-{seed}-{index}", "sku": sku, "loc": loc, "delta": 10 * reserves, "reason": "receipt"})
                     for index, (sku, loc) in enumerate(SKUS)])
    rids = [f"r-{seed}-{number}" for number in range(reserves)]
    requests = []
    for number, rid in enumerate(rids):
        sku, loc = SKUS[number % len(SKUS)]
        requests.append(("reserve", {"rid": rid, "lines": [{"sku": sku, "loc": loc, "qty": 1 + number % 3}]}))
    follow_ups = [("release" if number % 3 == 0 else "commit", {"rid": rid}) for number, rid in enumerate(rids) if number % 3 != 2]
    replies = client.pipeline(requests) + client.pipeline(follow_ups)
    assert all(reply["ok"] for reply in replies), next(reply for reply in replies if not reply["ok"])
    return rids


def _observed(client: Client, rids: list[str]) -> dict:
    """Everything a client can read of the state the load left."""
    stocks = client.pipeline([("get", {"sku": sku, "loc": loc}) for sku, loc in SKUS])
    lookups = client.pipeline([("lookup", {"rid": rid}) for rid in rids])
    return {
        "stocks": [(reply["on_hand"], reply["reserved"]) for reply in stocks],
        "reservations": [(reply["state"], repr(reply["lines"])) for reply in lookups],
        "applied_seq": client.call("stats")["applied_seq"],
    }


def _wait_for(path: Path, pattern: str) -> re.Match:
    deadline = time.monotonic() + WAIT_SECONDS_MAX
    while time.monotonic() < deadline:
        match = re.search(pattern, path.read_text())
        if match:
            return match
        time.sleep(0.02)
    raise AssertionError(f"no {pattern!r} in {path} within {WAIT_SECONDS_MAX} s:\n{path.read_text()[-3000:]}")


def _gone(pid: int) -> bool:
    """The process ended (a zombie counts: a container's init may not reap it at once)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")


def _wait_gone(pid: int) -> None:
    deadline = time.monotonic() + 5
    while not _gone(pid):
        assert time.monotonic() < deadline, f"process {pid} outlived its server"
        time.sleep(0.02)


def _partial_files(data_dir: Path) -> list[str]:
    folder = data_dir / "lmdb" / "snapshots"
    return [name for name in os.listdir(folder) if ".partial-" in name] if folder.exists() else []


def _restart_and_compare(server_process, data_dir: Path, rids: list[str], expected: dict, *args: str):
    restarted = server_process(*args)
    with Client("127.0.0.1", restarted.port) as client:
        assert _observed(client, rids) == expected
        client.reserve("after-restart", [(SKUS[0][0], SKUS[0][1], 1)])  # and it serves on
    assert _partial_files(data_dir) == [], "the partial file a killed builder left is removed at start"
    return restarted


def test_kill_9_while_the_builder_writes_the_snapshot_file(server_process, data_dir, monkeypatch):
    monkeypatch.setenv("ENGINE_PAUSE_AT", "snapshot-write:30")
    server = server_process()
    monkeypatch.delenv("ENGINE_PAUSE_AT")
    with Client("127.0.0.1", server.port) as client, Client("127.0.0.1", server.port) as admin:
        rids = _load(client, 2000)
        expected = _observed(client, rids)
        admin.send("snapshot")
        builder_pid = int(_wait_for(server.log_path, r"snapshot builder started \(pid (\d+)\)").group(1))
        _wait_for(server.log_path, r"pause point snapshot-write")
        assert _partial_files(data_dir), "the builder is mid-write"
        server.kill()
    _wait_gone(builder_pid)  # the builder dies with its server, even on kill -9
    restarted = _restart_and_compare(server_process, data_dir, rids, expected)
    assert "snapshot at 0, replayed" in restarted.log_text()  # the half-written snapshot was never used
    assert restarted.terminate() == 0


def test_the_builder_killed_alone_loses_nothing_and_the_next_snapshot_works(server_process, data_dir, monkeypatch, tmp_path):
    flag = tmp_path / "pause-once"
    flag.touch()
    monkeypatch.setenv("ENGINE_PAUSE_AT", f"snapshot-write:30@{flag}")  # only the first builder pauses
    server = server_process()
    monkeypatch.delenv("ENGINE_PAUSE_AT")
    with Client("127.0.0.1", server.port) as client, Client("127.0.0.1", server.port) as admin:
        rids = _load(client, 1000)
        request_id = admin.send("snapshot")
        builder_pid = int(_wait_for(server.log_path, r"snapshot builder started \(pid (\d+)\)").group(1))
        _wait_for(server.log_path, r"pause point snapshot-write")
        os.kill(builder_pid, signal.SIGKILL)
        reply = admin.receive(request_id)
        assert not reply["ok"] and reply["error"] == "internal" and "builder exited with status -9" in reply["message"]
        rids += _load(client, 500, seed=1)  # serving goes on
        snapshot_seq = admin.snapshot()["seq"]
        expected = _observed(client, rids)
        assert expected["applied_seq"] == snapshot_seq
        stats = admin.call("stats")["snapshots"]
        assert stats["failures"] == 1 and stats["builds"] == 1 and stats["last_seq"] == snapshot_seq
        server.kill()
    restarted = _restart_and_compare(server_process, data_dir, rids, expected)
    assert f"snapshot at {snapshot_seq}, replayed 0 records" in restarted.log_text()
    assert restarted.terminate() == 0


def test_the_second_snapshot_continues_the_live_builder_replaying_only_the_records_since(server_process, data_dir):
    server = server_process()
    with Client("127.0.0.1", server.port) as client, Client("127.0.0.1", server.port) as admin:
        rids = _load(client, 500)
        first_seq = admin.snapshot()["seq"]
        first = admin.call("stats")["snapshots"]
        rids += _load(client, 300, seed=1)
        second_seq = admin.snapshot()["seq"]
        second = admin.call("stats")["snapshots"]
        expected = _observed(client, rids)
    assert first["last_builder"]["loaded_base"] and first["last_builder"]["start_seq"] == 0 and first["last_builder"]["replayed"] == first_seq
    assert second["last_builder"] == {**second["last_builder"], "loaded_base": False, "start_seq": first_seq, "replayed": second_seq - first_seq,
                                      "load_seconds": 0, "builds": 2}
    assert second["builder_pid"] == first["builder_pid"] is not None and second["builder_starts"] == 1
    assert (second["builder_base_loads"], second["builder_replayed_records"], second["builds"]) == (1, second_seq, 2)
    assert re.search(rf"snapshot at seq {second_seq} written .* continued its state at seq {first_seq}, replayed {second_seq - first_seq} records", server.log_text())
    assert server.terminate() == 0
    _wait_gone(first["builder_pid"])  # the shutdown stopped the idle builder
    restarted = _restart_and_compare(server_process, data_dir, rids, expected)
    assert restarted.terminate() == 0


def test_a_live_builder_killed_while_idle_is_replaced_by_the_next_snapshot(server_process, data_dir):
    server = server_process()
    with Client("127.0.0.1", server.port) as client, Client("127.0.0.1", server.port) as admin:
        rids = _load(client, 500)
        admin.snapshot()
        builder_pid = admin.call("stats")["snapshots"]["builder_pid"]
        os.kill(builder_pid, signal.SIGKILL)
        _wait_for(server.log_path, rf"snapshot builder \(pid {builder_pid}\) exited while idle, with status -9")
        assert admin.call("stats")["snapshots"]["builder_pid"] is None
        rids += _load(client, 300, seed=1)
        snapshot_seq = admin.snapshot()["seq"]  # a new builder, which loads the newest snapshot
        stats = admin.call("stats")["snapshots"]
        expected = _observed(client, rids)
        server.kill()
    assert stats["builder_pid"] not in (None, builder_pid) and stats["builder_starts"] == 2 and stats["failures"] == 0
    assert stats["last_builder"]["loaded_base"] and stats["last_builder"]["seq"] == snapshot_seq and stats["builder_base_loads"] == 2
    _wait_gone(stats["builder_pid"])  # and it died with its server
    restarted = _restart_and_compare(server_process, data_dir, rids, expected)
    assert f"snapshot at {snapshot_seq}, replayed 0 records" in restarted.log_text()
    assert restarted.terminate() == 0


def test_kill_9_while_the_log_is_trimmed(server_process, data_dir, monkeypatch):
    monkeypatch.setenv("ENGINE_PAUSE_AT", "trim:30")
    server = server_process("--log-retention-days", "0")
    monkeypatch.delenv("ENGINE_PAUSE_AT")
    with Client("127.0.0.1", server.port) as client, Client("127.0.0.1", server.port) as admin:
        rids = _load(client, 15_000)  # ~25k records: trimmed 10,000 per transaction
        expected = _observed(client, rids)
        admin.send("snapshot")
        _wait_for(server.log_path, r"pause point trim")
        server.kill()
    reader = LmdbStorage(str(data_dir / "lmdb"), 0, read_only=True)
    try:
        first_seq, snapshot_seq = reader.first_seq(), reader.snapshot_seqs()[-1]
    finally:
        reader.close()
    assert 1 < first_seq <= snapshot_seq, "killed between two trimming transactions"
    restarted = _restart_and_compare(server_process, data_dir, rids, expected, "--log-retention-days", "0")
    assert f"snapshot at {snapshot_seq}, replayed" in restarted.log_text()
    assert restarted.terminate() == 0


def test_kill_9_during_start_up_replay(server_process, data_dir, monkeypatch):
    server = server_process()
    with Client("127.0.0.1", server.port) as client:
        rids = _load(client, 3000)
        expected = _observed(client, rids)
    server.kill()
    log_path = data_dir.parent / "replay-paused.log"
    with open(log_path, "w") as log_file:
        replaying = subprocess.Popen(
            [sys.executable, "-m", "engine", "serve", "--port", "0", "--data", str(data_dir), "--map-size-mb", "256"],
            cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT, env={**os.environ, "ENGINE_PAUSE_AT": "replay:30"},
        )
        try:
            _wait_for(log_path, r"pause point replay")
            assert "listening" not in log_path.read_text()
        finally:
            replaying.kill()
            replaying.wait(timeout=10)
    restarted = _restart_and_compare(server_process, data_dir, rids, expected)
    assert restarted.terminate() == 0


def test_a_builder_started_from_a_thread_that_ends_keeps_running(tmp_path):
    """trio starts processes from a worker thread that ends when idle; the builder must outlive
    that thread (it dies with its parent process only)."""
    import threading

    path = tmp_path / "lmdb"
    storage = LmdbStorage(str(path), 64 * 1024**2)
    storage.append([{"seq": 1, "ts_ms": 1, "type": "adjusted", "key": "k", "sku": "s", "loc": "l", "delta": 3, "reason": "receipt"}])
    storage.close()
    started: list[subprocess.Popen] = []

    def spawn() -> None:  # the thread ends right after the spawn
        started.append(subprocess.Popen(
            [sys.executable, "-m", "engine.snapshot_builder", str(path), str(os.getpid())],
            cwd=ROOT, env={**os.environ, "ENGINE_PAUSE_AT": "snapshot-write:1.5"},
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        ))

    spawner = threading.Thread(target=spawn)
    spawner.start()
    spawner.join()
    try:
        reply, _ = started[0].communicate(b"build 1\n", timeout=20)  # then the end of its input: it exits
        assert started[0].returncode == 0
        figures = parse_reply(reply.rstrip(b"\n"))
        assert figures["seq"] == 1 and figures["loaded_base"] and figures["replayed"] == 1
    finally:
        if started[0].poll() is None:
            started[0].kill()
            started[0].wait(timeout=10)
    reader = LmdbStorage(str(path), 0, read_only=True)
    try:
        assert reader.snapshot_seqs() == [1] and reader.latest_snapshot()["stocks"] == [["s", "l", 3, 0, 1]]
    finally:
        reader.close()

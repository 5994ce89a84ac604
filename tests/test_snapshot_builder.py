"""The long-lived snapshot builder: its protocol (sans IO), the builder process driven through its
pipes as the server drives it, and the server's side (`BuilderRunner`): the idle limit, a build
that takes too long. (Kills at every step: `test_snapshot_crashes.py`.)"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import trio

from engine.builder_protocol import (
    REPLY_FIELDS,
    REQUEST_LINE_BYTES_MAX,
    BuilderProtocolError,
    LineBuffer,
    parse_reply,
    parse_request,
    reply_line,
    request_line,
)
from engine.core import State, apply_event
from engine.snapshot_builder import FULL_CHECK_EVERY_BUILDS
from engine.storage import LmdbStorage
from protocol import ServerError, open_trio_client
from conftest import ROOT

FIGURES = {
    "seq": 7, "start_seq": 5, "loaded_base": False, "replayed": 2, "check": "tail", "bytes": 900, "load_seconds": 0.0,
    "replay_seconds": 0.001, "check_seconds": 0.002, "write_seconds": 0.01, "seconds": 0.02, "builds": 2,
}


# -- the protocol --------------------------------------------------------------------------------


def test_a_request_and_a_reply_read_back_as_written():
    assert parse_request(request_line(12345)) == 12345
    assert FIGURES.keys() == REPLY_FIELDS.keys()
    assert parse_reply(reply_line(FIGURES).rstrip(b"\n")) == FIGURES


@pytest.mark.parametrize("line", [b"build 12\n" + b" " * REQUEST_LINE_BYTES_MAX, b"build 12", b"build -1\n", b"build 1 2\n", b"snap 3\n",
                                  b"build " + b"9" * 21 + b"\n", b""])
def test_a_request_that_is_not_one_is_refused(line):
    with pytest.raises(BuilderProtocolError):
        parse_request(line)


@pytest.mark.parametrize("line", [b"{}", b"not json", b"[1]", reply_line({**FIGURES, "replayed": True}).rstrip(),
                                  reply_line({**FIGURES, "check": 3}).rstrip(), b'{"seq": 1}'])
def test_a_reply_that_is_not_one_is_refused(line):
    with pytest.raises(BuilderProtocolError):
        parse_reply(line)


def test_lines_come_whole_and_a_line_over_the_bound_is_refused():
    lines = LineBuffer(10)
    assert lines.feed(b"abc") == [] and lines.feed(b"de\nfg\nh") == [b"abcde", b"fg"] and lines.feed(b"\n") == [b"h"]
    with pytest.raises(BuilderProtocolError):
        lines.feed(b"x" * 11)  # no newline yet, and already too long
    with pytest.raises(BuilderProtocolError):
        LineBuffer(10).feed(b"x" * 11 + b"\n")


# -- the builder process, driven through its pipes -----------------------------------------------


def _event(seq: int) -> dict:
    return {"seq": seq, "ts_ms": seq, "type": "adjusted", "key": f"k{seq}", "sku": f"s{seq % 4}", "loc": "l", "delta": 2, "reason": "receipt"}


class BuilderProcess:
    """`python -m engine.snapshot_builder` with its pipes, as the server runs it."""

    def __init__(self, lmdb_path: str):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "engine.snapshot_builder", lmdb_path, str(os.getpid())],
            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )

    def build(self, seq: int) -> dict:
        self.process.stdin.write(request_line(seq))
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        assert line, self.finish()[1]
        return parse_reply(line.rstrip(b"\n"))

    def finish(self, send: bytes = b"") -> tuple[int, str]:
        """Send `send`, then the end of input; the exit status and the log."""
        _, log = self.process.communicate(send, timeout=20)
        return self.process.returncode, log.decode()


@pytest.fixture
def writer(tmp_path):
    storage = LmdbStorage(str(tmp_path / "lmdb"), 64 * 1024**2)
    yield storage
    storage.close()


@pytest.fixture
def builder(writer):
    started = BuilderProcess(writer.path)
    yield started
    if started.process.poll() is None:
        started.process.kill()
        started.process.wait(timeout=10)


def test_the_builder_continues_its_state_and_replays_only_the_records_after_it(writer, builder):
    writer.append([_event(seq) for seq in range(1, 4)])
    first = builder.build(3)
    assert (first["loaded_base"], first["start_seq"], first["replayed"], first["builds"]) == (True, 0, 3, 1)
    writer.append([_event(4)])
    writer.append([_event(5)])
    second = builder.build(5)
    assert (second["loaded_base"], second["start_seq"], second["replayed"], second["check"], second["builds"]) == (False, 3, 2, "tail", 2)
    assert writer.snapshot_seqs() == [3, 5]
    expected = State()
    for event in writer.read(1, 100):
        apply_event(expected, event)
    assert State.from_snapshot(writer.latest_snapshot()).to_snapshot() == expected.to_snapshot()
    status, log = builder.finish()
    assert status == 0 and "no more requests after 2 builds" in log


def test_the_builder_loads_again_when_the_log_no_longer_continues_its_state(writer, builder):
    writer.append([_event(seq) for seq in range(1, 4)])
    assert builder.build(3)["loaded_base"]
    writer.append([_event(seq) for seq in range(4, 11)])
    state = State()
    for event in writer.read(1, 100, through_seq=8):
        apply_event(state, event)
    writer.save_snapshot(state.to_snapshot(), keep=1)  # as another writer of snapshots would
    writer.trim(8, before_ts_ms=10**15, limit=100)
    assert writer.first_seq() == 9  # the builder's state (seq 3) is no longer continued by the log
    again = builder.build(10)
    assert (again["loaded_base"], again["start_seq"], again["replayed"]) == (True, 8, 2)
    assert builder.finish()[0] == 0


def test_a_full_check_every_so_many_builds_and_the_tail_check_between(writer, builder):
    checks = []
    for seq in range(1, FULL_CHECK_EVERY_BUILDS + 2):
        writer.append([_event(seq)])
        checks.append(builder.build(seq)["check"])
    assert checks == ["tail"] * (FULL_CHECK_EVERY_BUILDS - 1) + ["full", "tail"]
    assert builder.finish()[0] == 0


def test_a_failed_build_ends_the_builder_without_a_reply(writer, builder):
    writer.append([_event(1)])
    status, log = builder.finish(request_line(2))  # beyond the log
    assert status == 1 and "snapshot at seq 2 failed" in log and "beyond the log" in log
    assert writer.snapshot_seqs() == []


def test_a_request_off_the_protocol_ends_the_builder(builder):
    status, log = builder.finish(b"x" * (REQUEST_LINE_BYTES_MAX + 10) + b"\n")
    assert status == 2 and "not a request" in log


# -- the server's side -------------------------------------------------------------------------


def _gone(pid: int) -> bool:
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")


async def _wait_until(predicate, timeout_seconds: float = 10.0) -> None:
    with trio.fail_after(timeout_seconds):
        while not predicate():
            await trio.sleep(0.02)


async def test_an_idle_builder_is_stopped_and_the_next_snapshot_loads_again(start_server):
    server = await start_server(snapshot_builder_idle_seconds=0.5)
    snapshots = server.engine.snapshots
    with trio.fail_after(30):
        async with open_trio_client(server.host, server.port) as client:
            await client.adjust("k1", "sku", "w", 3, "receipt")
            await client.snapshot()
            builder_pid = snapshots.builder_pid
            assert builder_pid is not None
            await _wait_until(lambda: snapshots.builder_pid is None)
            assert _gone(builder_pid) and snapshots.stats()["builder_idle_stops"] == 1
            await client.adjust("k2", "sku", "w", 3, "receipt")
            await client.snapshot()
    stats = snapshots.stats()
    assert (stats["builder_starts"], stats["builder_base_loads"], stats["builds"], stats["failures"]) == (2, 2, 2, 0)
    assert stats["last_builder"]["loaded_base"] and stats["last_builder"]["start_seq"] == 1


async def test_a_build_over_its_time_limit_fails_and_its_builder_is_terminated(start_server, monkeypatch, tmp_path):
    flag = tmp_path / "pause-once"
    flag.touch()
    monkeypatch.setenv("ENGINE_PAUSE_AT", f"snapshot-write:30@{flag}")  # read by the builder processes only
    server = await start_server(snapshot_builder_seconds_max=1.0)
    snapshots = server.engine.snapshots
    with trio.fail_after(30):
        async with open_trio_client(server.host, server.port) as client:
            await client.adjust("k1", "sku", "w", 3, "receipt")
            pids: list[int] = []

            async def note_the_builder() -> None:
                await _wait_until(lambda: snapshots.builder_pid is not None)
                pids.append(snapshots.builder_pid)

            started = time.monotonic()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(note_the_builder)
                with pytest.raises(ServerError, match="the builder took longer than 1 s"):
                    await client.snapshot()
            assert time.monotonic() - started < 10
            (builder_pid,) = pids
            await _wait_until(lambda: _gone(builder_pid))
            assert (await client.snapshot())["seq"] == 1  # a new builder (the flag is gone: it does not pause)
    stats = snapshots.stats()
    assert (stats["failures"], stats["builds"], stats["builder_starts"]) == (1, 1, 2)

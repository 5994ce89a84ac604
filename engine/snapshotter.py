"""Taking snapshots: one at a time, of durable state only, without pausing the event loop.

A snapshot covers a seq that is durable already. By default (`snapshot_builder="process"`) a
long-lived builder process (`snapshot_builder`, run by `builder_runner`) derives it from the
previous snapshot and the log, through the same core, while the server goes on serving; the
event loop only waits for its reply. The builder keeps its state between snapshots, so each one
after its first replays only the log since the previous one. On the loop (`"loop"`, and the final
snapshot at shutdown when nothing is served) the state is copied there (~0.3 s per 100k
reservations: a pause for every client) and written in a worker thread.

Afterwards the server drops all but the newest `snapshots_kept` snapshots and trims the log
through the oldest one it keeps (so a damaged newest snapshot can still fall back to the one
before it), in short transactions (`trim_records_per_transaction`): each holds LMDB's writer
lock, and so the log's commits, only briefly. A builder that fails or is killed loses nothing:
the log has it all; it is logged and the next snapshot starts a new builder, which loads the
newest snapshot.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import trio

from .builder_runner import BuilderRunner, BuildFailed
from .config import Config
from .core import State
from .pause_points import pause_point
from .storage import LmdbStorage, StorageError
from .wal import WriteAheadLog

log = logging.getLogger("engine.snapshots")


class SnapshotFailed(RuntimeError):
    """No snapshot was made (the log has everything: nothing is lost)."""


class Snapshotter:
    def __init__(self, config: Config, state: State, storage: LmdbStorage, wal: WriteAheadLog, clock_ms: Callable[[], int]):
        assert config.snapshot_builder in ("process", "loop"), config.snapshot_builder
        assert config.trim_records_per_transaction >= 1 and config.snapshots_kept >= 1
        self._config = config
        self._state = state
        self._storage = storage
        self._wal = wal
        self._clock_ms = clock_ms
        self._one_at_a_time = trio.Lock()
        seqs = storage.snapshot_seqs()
        self.last_seq = seqs[-1] if seqs else 0  # the newest snapshot's seq
        self.builds = 0
        self.failures = 0
        self.last_build_seconds = 0.0
        self._builder = (
            BuilderRunner(storage.path, build_seconds_max=config.snapshot_builder_seconds_max, idle_seconds=config.snapshot_builder_idle_seconds)
            if config.snapshot_builder == "process" else None
        )
        # What the builders reported: snapshots they built from a loaded snapshot (a builder's
        # first, or one whose state did not continue the log), and log records they replayed.
        self.builder_base_loads = 0
        self.builder_replayed_records = 0
        self.last_builder_figures: dict[str, Any] | None = None

    async def run_builder(self) -> None:
        """Run the builder process's task (in the service nursery) until cancelled, which
        terminates the builder; returns at once when snapshots are built on the loop."""
        if self._builder is not None:
            await self._builder.run()

    @property
    def builder_pid(self) -> int | None:
        """The builder process's pid while one is alive (building, or idle holding its state)."""
        return self._builder.pid if self._builder is not None else None

    async def take(self, *, on_loop: bool = False) -> int:
        """Make a snapshot covering at least every change applied so far; return its seq once
        it is durable. `SnapshotFailed` when none could be made."""
        async with self._one_at_a_time:
            target_seq = self._wal.appended_seq
            if target_seq <= self.last_seq:
                return self.last_seq  # one taken meanwhile covers it
            started = time.monotonic()
            if on_loop or self._config.snapshot_builder == "loop":
                target_seq = await self._build_on_loop()
            else:
                await self._wait_durable(target_seq)
                await self._build_in_process(target_seq)
            self.builds += 1
            self.last_build_seconds = time.monotonic() - started
            self.last_seq = target_seq
            try:
                kept = await trio.to_thread.run_sync(self._storage.prune_snapshots, self._config.snapshots_kept)
                trimmed = await self._trim(kept[0])
            except StorageError as error:  # the snapshot is durable; trimming waits for the next one
                log.error("after the snapshot at seq %d: %s", target_seq, error)
                trimmed = 0
            log.info("snapshot at seq %d in %.2f s; %d log records trimmed", target_seq, self.last_build_seconds, trimmed)
            return target_seq

    async def _wait_durable(self, seq: int) -> None:
        await self._wal.wait_durable(seq)
        if self._wal.failure is not None:
            raise SnapshotFailed(f"no snapshot: {self._wal.failure}")

    async def _build_on_loop(self) -> int:
        snapshot = self._state.to_snapshot()  # the copy: on the loop, consistent by construction
        await self._wait_durable(snapshot["seq"])
        try:
            await trio.to_thread.run_sync(self._storage.write_snapshot_file, snapshot)
        except OSError as error:
            self.failures += 1
            raise SnapshotFailed(f"snapshot at seq {snapshot['seq']} failed: {error}") from error
        return snapshot["seq"]

    async def _build_in_process(self, through_seq: int) -> None:
        assert self._builder is not None
        try:
            figures = await self._builder.build(through_seq)
        except BuildFailed as failure:
            self.failures += 1
            log.error("snapshot builder for seq %d %s: no snapshot (nothing is lost: the log has it all)", through_seq, failure)
            raise SnapshotFailed(f"snapshot at seq {through_seq} failed: the builder {failure}") from None
        if through_seq not in self._storage.snapshot_seqs():  # a programmer error, but the server goes on serving
            self.failures += 1
            log.error("snapshot builder answered for seq %d, and there is no snapshot file at that seq", through_seq)
            raise SnapshotFailed(f"snapshot at seq {through_seq} failed: the builder's file is not there")
        self.builder_base_loads += figures["loaded_base"]
        self.builder_replayed_records += figures["replayed"]
        self.last_builder_figures = figures
        log.info(
            "snapshot builder (pid %s) wrote seq %d in %.2f s: %s at seq %d, replayed %d records",
            self.builder_pid, through_seq, figures["seconds"], "loaded the snapshot" if figures["loaded_base"] else "continued its state",
            figures["start_seq"], figures["replayed"],
        )

    async def _trim(self, through_seq: int) -> int:
        """Trim the log through `through_seq` (older than the log retention), a short
        transaction at a time. Returns the records deleted."""
        cutoff_ms = self._clock_ms() - self._config.log_retention_ms
        chunk = self._config.trim_records_per_transaction
        trimmed = 0
        while True:
            deleted = await trio.to_thread.run_sync(self._storage.trim, through_seq, cutoff_ms, chunk)
            trimmed += deleted
            if deleted < chunk:
                return trimmed
            await trio.to_thread.run_sync(pause_point, "trim")  # crash tests: a kill lands mid-trim

    def stats(self) -> dict[str, Any]:
        return {
            "last_seq": self.last_seq,
            "builds": self.builds,
            "failures": self.failures,
            "last_build_seconds": round(self.last_build_seconds, 3),
            "builder_pid": self.builder_pid,
            "builder_starts": self._builder.starts if self._builder is not None else 0,
            "builder_idle_stops": self._builder.idle_stops if self._builder is not None else 0,
            "builder_base_loads": self.builder_base_loads,
            "builder_replayed_records": self.builder_replayed_records,
            "last_builder": self.last_builder_figures,  # the last build's figures (`builder_protocol.REPLY_FIELDS`)
        }

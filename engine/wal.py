"""Group commit: one writer task turns everything applied since the last fsync into one LMDB
transaction, run in a worker thread so the event loop never waits on the disk.

Records are applied to the in-memory state before they are durable; replies wait for
`durable_seq` to reach the seq they reflect. There is one ordered log, so what is durable is
always a prefix of what was applied, and no reply ever shows more than that prefix.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from functools import partial
from typing import Any, Callable, Protocol

import outcome
import trio

from .core import Event
from .metrics import COMMIT_RECORDS_BUCKETS, COMMIT_SECONDS_BUCKETS, Histogram
from .outbox import Outbox
from .storage import LmdbStorage

log = logging.getLogger("engine.wal")


def _refuse_cancel(_raise_cancel: Any) -> trio.lowlevel.Abort:
    return trio.lowlevel.Abort.FAILED


class _CommitThread:
    """One long-lived thread for the log's commits. Cheaper per commit than a pooled worker
    thread (`trio.to_thread`), which names and hands over a thread for every call."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], Callable[[Any, BaseException | None], None]] | None] = queue.SimpleQueue()
        self._token = trio.lowlevel.current_trio_token()
        self._thread = threading.Thread(target=self._work, name="wal-commit", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            call, report = job
            try:
                result, error = call(), None
            except BaseException as caught:  # handed to the waiting task, raised there
                result, error = None, caught
            self._token.run_sync_soon(report, result, error)

    async def run(self, call: Callable[[], Any]) -> Any:
        """Run `call()` in the thread; return its result or raise its exception. Not
        cancellable: a commit in flight finishes (or fails) before shutdown goes on."""
        task = trio.lowlevel.current_task()

        def report(result: Any, error: BaseException | None) -> None:
            trio.lowlevel.reschedule(task, outcome.Value(result) if error is None else outcome.Error(error))

        self._jobs.put((call, report))
        # Parked without a cancel scope or an Event: one reschedule per commit. A cancel is
        # refused (FAILED) and takes effect at the writer's next checkpoint, after the commit.
        return await trio.lowlevel.wait_task_rescheduled(_refuse_cancel)

    def stop(self) -> None:
        self._jobs.put(None)


class CommitRunner(Protocol):
    """Where a log commit (a blocking storage call) runs: `_CommitThread` in the server; the
    deterministic simulation runs it inside trio after a simulated fsync delay."""

    async def run(self, call: Callable[[], Any]) -> Any:
        """Run `call()`; return its result or raise its exception. Not cancellable."""

    def stop(self) -> None:
        """No more commits will be asked for."""


class WriteAheadLog:
    def __init__(
        self, storage: LmdbStorage, records_per_commit_max: int, outbox: Outbox,
        commit_runner: Callable[[], CommitRunner] = _CommitThread,
    ):
        """`commit_runner` makes the `CommitRunner` when the writer starts (in its trio run)."""
        assert records_per_commit_max >= 1
        self._new_commit_runner = commit_runner
        self._storage = storage
        self._records_per_commit_max = records_per_commit_max
        self._queue: deque[Event] = deque()
        self._work = trio.Event()
        self._durable_changed = trio.Event()
        self._outbox = outbox
        self.appended_seq = storage.last_seq  # last seq handed to append()
        self.durable_seq = storage.last_seq
        outbox.release(self.durable_seq)
        self.failure: str | None = None  # set once a commit fails; nothing is acked after it
        self.commits = 0
        self.records_committed = 0
        self.commit_seconds_total = 0.0
        self.commit_records_max = 0
        self.commit_seconds = Histogram(COMMIT_SECONDS_BUCKETS)
        self.commit_records = Histogram(COMMIT_RECORDS_BUCKETS)

    @property
    def backlog(self) -> int:
        """Records applied in memory and not yet durable."""
        return self.appended_seq - self.durable_seq

    def append(self, events: list[Event]) -> None:
        """Queue records for the next commit. Synchronous: called where the events were applied,
        so that log order is exactly the order in which the state changed."""
        for event in events:
            assert event["seq"] == self.appended_seq + 1, f"seq {event['seq']} after {self.appended_seq}"
            self.appended_seq = event["seq"]
            self._queue.append(event)
        self._work.set()

    async def wait_durable_changed(self) -> None:
        """Return after the next change of `durable_seq` (or of `failure`)."""
        await self._durable_changed.wait()

    async def wait_durable(self, seq: int) -> None:
        while self.durable_seq < seq and self.failure is None:
            await self._durable_changed.wait()

    def _broadcast(self) -> None:
        """Hand out what became durable (or that nothing more will): replies first, then wake
        whoever waits for the log (watchers, flush, snapshots)."""
        if self.failure is None:
            self._outbox.release(self.durable_seq)
        else:
            self._outbox.fail()
        event, self._durable_changed = self._durable_changed, trio.Event()
        event.set()

    async def run(self) -> None:
        """The writer loop. Runs until cancelled; on a failed commit it records why and stops."""
        self._commit_thread = self._new_commit_runner()
        try:
            await self._write_until_failed()
        finally:
            self._commit_thread.stop()

    async def _write_until_failed(self) -> None:
        while True:
            await self._work.wait()
            self._work = trio.Event()
            while self.failure is None and self._queue:
                await self._commit_batch()
            if self.failure is not None:
                self._broadcast()
                return

    async def _commit_batch(self) -> None:
        count = min(len(self._queue), self._records_per_commit_max)
        batch = [self._queue.popleft() for _ in range(count)]
        started = time.perf_counter()
        try:
            data = self._storage.encode_entry(batch)
            await self._commit_thread.run(partial(self._storage.append_entry, batch[0]["seq"], batch[-1]["seq"], data))
        except Exception as error:  # StorageError, or a bug in a record: stop acknowledging
            self.failure = f"write-ahead log stopped at seq {self.durable_seq}: {error}"
            log.critical("%s; the server acknowledges nothing more and must be restarted", self.failure)
            return
        elapsed = time.perf_counter() - started
        self.commits += 1
        self.records_committed += count
        self.commit_seconds_total += elapsed
        self.commit_records_max = max(self.commit_records_max, count)
        self.commit_seconds.observe(elapsed)
        self.commit_records.observe(count)
        self.durable_seq = batch[-1]["seq"]
        self._broadcast()

    async def flush(self) -> None:
        """Wait until everything appended so far is durable (or the log failed)."""
        await self.wait_durable(self.appended_seq)

    def stats(self) -> dict[str, Any]:
        return {
            "durable_seq": self.durable_seq,
            "appended_seq": self.appended_seq,
            "backlog": self.backlog,
            "commits": self.commits,
            "records_committed": self.records_committed,
            "commit_seconds_total": round(self.commit_seconds_total, 6),
            "commit_records_max": self.commit_records_max,
            "failure": self.failure,
            # map_size_bytes, map_size_max_bytes, map_growths, map_full_at_ceiling
            **self._storage.map_stats(),
        }

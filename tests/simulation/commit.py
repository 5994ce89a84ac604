"""The log's commits inside trio: a simulated fsync of seeded duration, then the storage call.

Stands in for the WAL's `_CommitThread` (a real thread would make the interleavings depend on
the operating system's scheduler). Like the thread, a commit in flight is not cancellable.
"""

from __future__ import annotations

import random
from typing import Any, Callable

import trio

FSYNC_SECONDS_MIN = 0.0002
FSYNC_SECONDS_MAX = 0.004
SLOW_FSYNC_SECONDS_MAX = 0.05  # now and then a slow disk
SLOW_FSYNC_PROBABILITY = 0.05


class SimulatedCommitRunner:
    """A `engine.wal.CommitRunner` whose fsync takes a seeded simulated time."""

    def __init__(self, chooser: random.Random):
        self._chooser = chooser
        self.commits = 0

    async def run(self, call: Callable[[], Any]) -> Any:
        """Sleep the fsync's simulated duration (shielded), then run `call()`."""
        chooser = self._chooser
        if chooser.random() < SLOW_FSYNC_PROBABILITY:
            delay_seconds = chooser.uniform(FSYNC_SECONDS_MAX, SLOW_FSYNC_SECONDS_MAX)
        else:
            delay_seconds = chooser.uniform(FSYNC_SECONDS_MIN, FSYNC_SECONDS_MAX)
        with trio.CancelScope(shield=True):
            await trio.sleep(delay_seconds)
        self.commits += 1
        return call()

    def stop(self) -> None:
        pass

"""Keep the cyclic garbage collector's full collections short while the state grows.

Every `Stock` is an object the collector tracks (a class with slots), and a full (generation-2)
collection scans every tracked object that is not frozen. A restarted server freezes what
recovery built (`server._recover_without_cyclic_gc`), but a live server that grows to 1M
SKU-locations (a bulk load, a new catalogue) rescans them all each time the tracked
population grows by a quarter: full collections of 0.3-0.7 s were measured while a server
grew to 1M SKU-locations and 1M reservations (`bench/snapshot_pause.py` with a step and GC
timer in the server).

So after a full collection that took longer than `slow_seconds`, the survivors are frozen:
they are live (a full collection just ran, so no cyclic garbage is left among them), and the
next full collections scan only what was allocated after. The price: a frozen object that later
becomes part of a garbage cycle is never collected (acyclic garbage is still freed by reference
counting). Such cycles come from a few objects per open connection, and freezing happens only
after slow collections, i.e. after the tracked population has grown by ~100k objects or more,
so what can leak is bounded by the connections open at those few moments.

The freeze itself runs on the event loop (`run`), never inside the collector's callback.
"""

from __future__ import annotations

import gc
import logging
import time
from typing import Any, Callable

import trio

log = logging.getLogger("engine.gc")

SLOW_FULL_COLLECTION_SECONDS = 0.05  # a full collection this long scans ~100k+ objects
FREEZE_CHECK_INTERVAL_SECONDS = 1.0


class FullCollectionFreezer:
    """Watches the collector (`gc.callbacks`) and freezes the survivors of a slow full collection."""

    def __init__(
        self, slow_seconds: float = SLOW_FULL_COLLECTION_SECONDS, *,
        freeze: Callable[[], None] = gc.freeze, frozen_count: Callable[[], int] = gc.get_freeze_count,
        clock: Callable[[], float] = time.perf_counter,
    ):
        """`freeze`, `frozen_count` and `clock` are the gc module's and the process's; tests pass fakes."""
        assert slow_seconds >= 0
        self._slow_seconds = slow_seconds
        self._freeze, self._frozen_count, self._clock = freeze, frozen_count, clock
        self._started: float | None = None
        self._slow_collection_seconds: float | None = None  # set by the callback, taken by `freeze_if_wanted`
        self.freezes = 0
        self.frozen_objects = 0

    def on_collection(self, phase: str, info: dict[str, Any]) -> None:
        """A `gc.callbacks` entry: notes how long each full collection took."""
        if info.get("generation") != 2:
            return
        if phase == "start":
            self._started = self._clock()
        elif phase == "stop" and self._started is not None:
            elapsed = self._clock() - self._started
            self._started = None
            if elapsed >= self._slow_seconds:
                self._slow_collection_seconds = elapsed

    def freeze_if_wanted(self) -> bool:
        """Freeze now if a slow full collection happened since the last call; True if it did."""
        elapsed = self._slow_collection_seconds
        if elapsed is None:
            return False
        self._slow_collection_seconds = None
        before = self._frozen_count()
        self._freeze()
        self.freezes += 1
        self.frozen_objects = self._frozen_count()
        log.info(
            "a full garbage collection took %.0f ms: froze its %d survivors (%d frozen in all)",
            elapsed * 1000, self.frozen_objects - before, self.frozen_objects,
        )
        return True

    async def run(self) -> None:
        """Watch until cancelled, freezing after slow full collections."""
        gc.callbacks.append(self.on_collection)
        try:
            while True:
                await trio.sleep(FREEZE_CHECK_INTERVAL_SECONDS)
                self.freeze_if_wanted()
        finally:
            gc.callbacks.remove(self.on_collection)

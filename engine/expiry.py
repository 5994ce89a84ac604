"""Reservation expiry: a heap of deadlines and one task that fires them on time.

Firing only proposes: the pure core expires a reservation if, at that moment, it is held and
due (an `extend` since then makes the stale heap entry a no-op).
"""

from __future__ import annotations

import heapq
import math
from typing import Callable

import trio


class ExpiryScheduler:
    def __init__(self, clock_ms: Callable[[], int], on_due: Callable[[str], None], batch_max: int = 1000):
        self._clock_ms = clock_ms
        self._on_due = on_due
        self._batch_max = batch_max
        self._heap: list[tuple[int, str]] = []
        self._changed = trio.Event()

    def __len__(self) -> int:
        return len(self._heap)

    def schedule(self, expires_at_ms: int, rid: str) -> None:
        earliest = self._heap[0][0] if self._heap else None
        heapq.heappush(self._heap, (expires_at_ms, rid))
        if earliest is None or expires_at_ms < earliest:
            self._changed.set()

    async def run(self) -> None:
        while True:
            now_ms = self._clock_ms()
            fired = 0
            while self._heap and self._heap[0][0] <= now_ms and fired < self._batch_max:
                _, rid = heapq.heappop(self._heap)
                self._on_due(rid)
                fired += 1
            if fired == self._batch_max:
                await trio.sleep(0)  # a burst of deadlines must not starve the connections
                continue
            self._changed = trio.Event()
            # +1 ms: the wall clock and trio's clock may differ by a hair; never spin on it.
            delay_seconds = (self._heap[0][0] - now_ms + 1) / 1000 if self._heap else math.inf
            with trio.move_on_after(delay_seconds):
                await self._changed.wait()

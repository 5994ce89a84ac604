"""Multi-line reserves: all-or-nothing across SKU-locations without a global lock.

Each line's owner, in its turn, places a tentative hold if the line fits (what other requests see
as unavailable meanwhile). When every owner has answered, the holds are lifted and the pure core
decides the whole reservation at once against the current state: it is granted, and logged as
one record, only if every line fits at that moment. The tentative holds never decide anything;
they keep stock a multi-line request is about to take from being promised to someone else
while its other lines wait for their owners.
"""

from __future__ import annotations

from typing import Callable, Sequence

from .owners import Owners
from .core import StockKey


class MultiLineHold:
    def __init__(
        self,
        lines: list[tuple[StockKey, int]],
        tentative: dict[StockKey, int],
        available: Callable[[StockKey], int],
        on_all_answered: Callable[[], None],
    ):
        assert len(lines) >= 2
        self._lines = lines
        self._tentative = tentative
        self._available = available
        self._on_all_answered = on_all_answered
        self._held: list[tuple[StockKey, int]] = []
        self._unanswered = len(lines)

    def start(self, owners: Owners) -> None:
        """Send a hold to every line's owner (the caller checked `owners.has_room`)."""
        for key, qty in self._lines:
            owners.send(key, lambda key=key, qty=qty: self._hold(key, qty))

    def _hold(self, key: StockKey, qty: int) -> None:
        if self._available(key) - self._tentative.get(key, 0) >= qty:
            self._tentative[key] = self._tentative.get(key, 0) + qty
            self._held.append((key, qty))
        self._unanswered -= 1
        if self._unanswered == 0:
            self._lift_holds()
            self._on_all_answered()

    def _lift_holds(self) -> None:
        for key, qty in self._held:
            remaining = self._tentative[key] - qty
            assert remaining >= 0, f"tentative hold at {key} below zero"
            if remaining:
                self._tentative[key] = remaining
            else:
                del self._tentative[key]
        self._held.clear()


def run_after_owners(owners: Owners, keys: Sequence[StockKey], job: Callable[[], None]) -> None:
    """Run `job` once the owner of each of `keys` has handled everything queued there before
    this call (in the task of the last one to get there). The caller checked `owners.has_room`."""
    assert keys
    unreached = len(keys)

    def reached() -> None:
        nonlocal unreached
        unreached -= 1
        if unreached == 0:
            job()

    for key in keys:
        owners.send(key, reached)

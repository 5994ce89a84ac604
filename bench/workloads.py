"""The workloads: which SKU-locations, how much stock, and what each lane asks next.

A *lane* is one logical client with at most one request in flight: a pooled connection has one
lane, a pipelined connection `depth` lanes. A workload is a small state machine over a lane:
`start(lane)` and `after(lane, status)` return the next request's bytes (encoded by the system's
driver). `History` counts what the system acknowledged, per SKU-location, so the final stock can
be checked against it.

Lean on purpose (the generator must not be the bottleneck): lanes are `__slots__` objects reused
for the whole run, line encodings are cached by the drivers, no per-request objects.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

# Reply status, as every driver reports it.
OK = 0          # granted / done
REFUSED = 1     # a reserve that was not granted (insufficient stock)
ERROR = 2       # anything else (the driver gives the code)

# Operations, as lanes record them.
RESERVE, RELEASE, COMMIT, ADJUST = range(4)
OP_NAMES = ("reserve", "release", "commit", "adjust")


@dataclass(frozen=True)
class Workload:
    name: str
    key_count: int
    stock_per_key: int
    lines_max: int          # lines per reserve: 1..lines_max
    qty_max: int            # qty per line: 1..qty_max
    ttl_ms: int             # 0: no expiry
    commit_share: float     # of granted reserves: committed
    release_share: float    # of granted reserves: released (the rest is left to expire)
    adjust_share: float     # of new actions: a receipt instead of a reserve
    exact_reserved: bool    # final reserved must equal the acknowledged history (no expiry)
    description: str

    def keys(self, sku_prefix: str = "") -> list[tuple[str, str]]:
        """The SKU-locations, in index order; `sku_prefix` gives a run SKU-locations of its own."""
        return [(f"{sku_prefix}{self.name}-{index:05d}", "DC-1") for index in range(self.key_count)]


WORKLOADS = {
    "hot": Workload("hot", 10, 1_000_000, 1, 1, 0, 0.0, 1.0, 0.0, True,
                    "single-line reserves over 10 SKU-locations, each granted one released again"),
    "uniform": Workload("uniform", 10_000, 1_000_000, 1, 1, 0, 0.0, 1.0, 0.0, True,
                        "single-line reserves over 10,000 SKU-locations, each granted one released again"),
    "orders": Workload("orders", 1_000, 1_000_000, 5, 3, 0, 0.0, 1.0, 0.0, True,
                       "reserves of 1-5 lines (qty 1-3) over 1,000 SKU-locations, then release"),
    "mixed": Workload("mixed", 1_000, 20_000, 3, 3, 2_000, 0.45, 0.40, 0.05, False,
                      "reserve (ttl 2 s) then commit 45% / release 40% / let expire 15%, plus 5% receipts (adjust +20)"),
}

# Which systems each workload runs on (the peers implement what they can do the same way).
WORKLOAD_SYSTEMS = {
    "hot": ("echo", "redis", "postgres", "engine", "baseline"),
    "uniform": ("echo", "redis", "postgres", "engine", "baseline"),
    "orders": ("echo", "redis", "postgres", "engine", "baseline"),
    "mixed": ("engine", "baseline"),
}


class History:
    """Acknowledged quantities per SKU-location index (from ok replies only)."""

    def __init__(self, key_count: int) -> None:
        self.granted = [0] * key_count
        self.released = [0] * key_count
        self.committed = [0] * key_count
        self.adjusted = [0] * key_count

    def merge(self, other: "History") -> None:
        for mine, theirs in ((self.granted, other.granted), (self.released, other.released),
                             (self.committed, other.committed), (self.adjusted, other.adjusted)):
            for index, value in enumerate(theirs):
                mine[index] += value


class Lane:
    __slots__ = ("op", "rid", "lines", "sent_at", "counter", "prefix")

    def __init__(self, prefix: str) -> None:
        self.op = RESERVE
        self.rid = ""
        self.lines: tuple = ()
        self.sent_at = 0.0
        self.counter = 0
        self.prefix = prefix


class LaneMachine:
    """Drives lanes through one workload with one driver; records the history of ok replies."""

    def __init__(self, workload: Workload, driver, history: History, seed: int) -> None:
        self.workload = workload
        self.driver = driver
        self.history = history
        self.random = random.Random(seed)
        self.key_count = workload.key_count
        self.adjust_counter = 0
        self.adjust_prefix = f"adj-{seed}-"

    def start(self, lane: Lane) -> bytes:
        return self._new_action(lane)

    def after(self, lane: Lane, status: int) -> bytes:
        """Record the reply to `lane`'s request; return the lane's next request."""
        op = lane.op
        history = self.history
        if op == RESERVE:
            if status == OK:
                for index, qty in lane.lines:
                    history.granted[index] += qty
                return self._close(lane)
        elif status == OK:
            if op == RELEASE:
                for index, qty in lane.lines:
                    history.released[index] += qty
            elif op == COMMIT:
                for index, qty in lane.lines:
                    history.committed[index] += qty
            else:
                for index, qty in lane.lines:
                    history.adjusted[index] += qty
        return self._new_action(lane)

    def _close(self, lane: Lane) -> bytes:
        workload = self.workload
        if workload.release_share >= 1.0:
            lane.op = RELEASE
            return self.driver.release(lane, lane.rid, lane.lines)
        draw = self.random.random()
        if draw < workload.commit_share:
            lane.op = COMMIT
            return self.driver.commit(lane, lane.rid, lane.lines)
        if draw < workload.commit_share + workload.release_share:
            lane.op = RELEASE
            return self.driver.release(lane, lane.rid, lane.lines)
        return self._new_action(lane)  # left to expire

    def _new_action(self, lane: Lane) -> bytes:
        workload = self.workload
        chooser = self.random
        if workload.adjust_share and chooser.random() < workload.adjust_share:
            index = chooser.randrange(self.key_count)
            self.adjust_counter += 1
            lane.op = ADJUST
            lane.lines = ((index, 20),)
            return self.driver.adjust(lane, f"{self.adjust_prefix}{self.adjust_counter}", index, 20)
        lane.counter += 1
        lane.rid = f"{lane.prefix}{lane.counter}"
        lane.op = RESERVE
        if workload.lines_max == 1:
            qty = 1 if workload.qty_max == 1 else chooser.randint(1, workload.qty_max)
            lane.lines = ((chooser.randrange(self.key_count), qty),)
        else:
            count = chooser.randint(1, workload.lines_max)
            # Sorted by SKU-location: the peers lock rows in this order (no deadlocks).
            indexes = sorted(chooser.sample(range(self.key_count), count))
            lane.lines = tuple((index, chooser.randint(1, workload.qty_max)) for index in indexes)
        return self.driver.reserve(lane, lane.rid, lane.lines, workload.ttl_ms)

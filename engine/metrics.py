"""Counting for Prometheus metrics in plain structures: the ops and their indexes, bucket lists
for what is observed now and then (`Histogram`) and per request (`RequestLatency`).

The request path never touches prometheus_client: no lock, no label lookup per request. It adds
to plain ints, Counters keyed by command type and these bucket lists; `metrics_collector.py`
reads them when `/metrics` is scraped (`metrics_http.py`, on the event loop between two steps,
so a scrape always sees one consistent moment of the engine). Nothing here imports
prometheus_client: a server without `--metrics-port` does not load it (~20 ms of start-up).
"""

from __future__ import annotations

import time
from bisect import bisect_left
from typing import Sequence

from protocol import (
    Adjust, AdjustBatch, Commit, Count, CountBatch, Extend, Get, Hello, Lookup, Ping, Query, Release, Reserve, Snapshot, Stats,
    Transfer, Watch,
)

# The ops as the wire names them; a batch adjust/count is the op `adjust`/`count` with `lines`.
# A frame that is not a valid request counts as `invalid`.
OPS = (
    "reserve", "release", "commit", "extend", "lookup", "get", "adjust", "count", "transfer", "query",
    "hello", "ping", "stats", "snapshot", "watch", "invalid",
)
OP_INDEX = {name: index for index, name in enumerate(OPS)}
INVALID_OP_INDEX = OP_INDEX["invalid"]
OP_OF_COMMAND: dict[type, str] = {
    Reserve: "reserve", Release: "release", Commit: "commit", Extend: "extend", Lookup: "lookup", Get: "get",
    Adjust: "adjust", AdjustBatch: "adjust", Count: "count", CountBatch: "count", Transfer: "transfer", Query: "query",
    Hello: "hello", Ping: "ping", Stats: "stats", Snapshot: "snapshot", Watch: "watch",
}
OP_INDEX_OF_COMMAND: dict[type, int] = {kind: OP_INDEX[name] for kind, name in OP_OF_COMMAND.items()}

# Upper bounds (le) of the request latency buckets. Replies wait for the group commit's fsync, so
# the interesting range is 0.1 ms to a second; anything slower is an incident.
REQUEST_SECONDS_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
COMMIT_SECONDS_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
COMMIT_RECORDS_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10_000, 20_000)


class Histogram:
    """Bucket counts for values observed now and then (a commit, a snapshot): not per request."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]):
        assert list(bounds) == sorted(bounds) and len(set(bounds)) == len(bounds), "bucket bounds must increase"
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        """Count one value (in the bucket of the first bound >= value: Prometheus' `le`)."""
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)


class RequestLatency:
    """Per-op latency from the read of a request's frame to the write of its reply.

    The connection reads the clock once per chunk it receives and tags every request of that
    chunk with a shared *stamp*: the tuple `(read_ns, op_index)`, one per op in the chunk. The
    stamp travels with the waiting reply; when a connection writes its ready replies it calls
    `observe` once, which reads the clock once and counts each run of replies sharing a stamp
    with one bucket search (pipelined replies of one chunk arrive together). Per request that is
    a dict lookup and a list append, not a label lookup or a lock."""

    __slots__ = ("bounds_ns", "counts", "sum_ns")

    def __init__(self, bounds_seconds: Sequence[float] = REQUEST_SECONDS_BUCKETS):
        self.bounds_ns = tuple(int(bound * 1e9) for bound in bounds_seconds)
        self.counts = [[0] * (len(bounds_seconds) + 1) for _ in OPS]
        self.sum_ns = [0] * len(OPS)

    def observe(self, stamps: list[tuple[int, int]]) -> None:
        """Count the replies tagged `stamps` as written now."""
        now_ns = time.monotonic_ns()
        bounds_ns, counts, sum_ns = self.bounds_ns, self.counts, self.sum_ns
        previous = None
        run = 0
        for stamp in stamps:
            if stamp is previous:
                run += 1
                continue
            if run:
                latency_ns = now_ns - previous[0]
                counts[previous[1]][bisect_left(bounds_ns, latency_ns)] += run
                sum_ns[previous[1]] += latency_ns * run
            previous = stamp
            run = 1
        if run:
            latency_ns = now_ns - previous[0]
            counts[previous[1]][bisect_left(bounds_ns, latency_ns)] += run
            sum_ns[previous[1]] += latency_ns * run


# Rejected frames are counted in the connection counters as this prefix + their error code.
INVALID_FRAME_PREFIX = "invalid:"
OVERLOADED_WAL_BACKLOG = "wal_backlog"
OVERLOADED_OWNER_MAILBOX = "owner_mailbox"
OVERLOADED_CONNECTIONS = "connections"  # counted by the server as refused connections
OVERLOADED_CAUSES = (OVERLOADED_WAL_BACKLOG, OVERLOADED_OWNER_MAILBOX, OVERLOADED_CONNECTIONS)

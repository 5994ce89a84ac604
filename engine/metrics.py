"""Prometheus metrics: plain counting structures for the shell, and a collector that turns them
into metric families when `/metrics` is scraped.

The request path never touches prometheus_client: no lock, no label lookup per request. It adds
to plain ints, Counters keyed by command type and per-op bucket lists (see `RequestLatency`);
`EngineCollector.collect` reads them. The scrape runs on the event loop between two steps
(`metrics_http.py`), so it always sees one consistent moment of the engine.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from protocol import (
    Adjust, AdjustBatch, Commit, Count, CountBatch, Extend, Get, Hello, Lookup, Ping, Query, Release, Reserve, Snapshot, Stats,
    Transfer, Watch,
)

if TYPE_CHECKING:
    from collections import Counter

    from .service import Engine

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


def _cumulative_buckets(bounds: Iterable[float], counts: Sequence[int]) -> list[tuple[str, int]]:
    buckets = []
    total = 0
    for bound, count in zip(bounds, counts):
        total += count
        buckets.append((_le(bound), total))
    buckets.append(("+Inf", total + counts[-1]))
    return buckets


def _le(bound: float) -> str:
    return repr(float(bound))


def _histogram(name: str, documentation: str, histogram: Histogram) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, documentation)
    family.add_metric([], _cumulative_buckets(histogram.bounds, histogram.counts), histogram.sum)
    return family


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)


class EngineCollector:
    """A prometheus_client collector reading the engine's plain counters at scrape time.

    Call `collect` only from the event loop (it reads live engine state)."""

    def __init__(self, engine: "Engine", connection_counters: "Counter[str]", recovery_seconds: float, replayed_records: int):
        self._engine = engine
        self._connection_counters = connection_counters
        self._recovery_seconds = recovery_seconds
        self._replayed_records = replayed_records
        self._started_monotonic = time.monotonic()

    def describe(self) -> list[Metric]:
        # Registering must not call `collect` (it would run outside the loop's control).
        return []

    def collect(self) -> Iterator[Metric]:
        """The engine's metric families, read at this moment."""
        engine = self._engine
        yield from self._requests(engine)
        yield from self._log(engine)
        yield from self._state(engine)
        yield from self._shell(engine)

    def _requests(self, engine: "Engine") -> Iterator[Metric]:
        requests = CounterMetricFamily("engine_requests", "Requests answered, by op and result (ok or the error code).", labels=["op", "result"])
        ok_by_op = [0] * len(OPS)
        for kind, count in engine.ok_replies.items():
            index = OP_INDEX_OF_COMMAND.get(kind)
            if index is not None:  # not the engine's own expire/forget
                ok_by_op[index] += count
        for index, count in enumerate(ok_by_op):
            requests.add_metric([OPS[index], "ok"], count)
        errors: dict[tuple[str, str], int] = {}
        for (kind, code), count in engine.errors.items():
            op = OP_OF_COMMAND.get(kind)
            if op is not None:
                errors[(op, code)] = errors.get((op, code), 0) + count
        for code, count in self._connection_counters.items():
            if code.startswith(INVALID_FRAME_PREFIX):
                key = ("invalid", code[len(INVALID_FRAME_PREFIX):])
                errors[key] = errors.get(key, 0) + count
        for (op, code), count in sorted(errors.items()):
            requests.add_metric([op, code], count)
        yield requests

        latency = engine.request_latency
        duration = HistogramMetricFamily(
            "engine_request_duration_seconds",
            "Time from reading a request's frame to writing its reply (includes the wait for the log to be durable).",
            labels=["op"],
        )
        bounds_seconds = [bound / 1e9 for bound in latency.bounds_ns]
        for index, op in enumerate(OPS):
            duration.add_metric([op], _cumulative_buckets(bounds_seconds, latency.counts[index]), latency.sum_ns[index] / 1e9)
        yield duration

        duplicates = CounterMetricFamily("engine_duplicates", "Retries answered from memory with the original reply, by op.", labels=["op"])
        duplicates_by_op: dict[str, int] = {}
        for kind, count in engine.duplicates.items():
            op = OP_OF_COMMAND[kind]
            duplicates_by_op[op] = duplicates_by_op.get(op, 0) + count
        for op in ("reserve", "release", "commit", "adjust", "count", "transfer"):
            duplicates.add_metric([op], duplicates_by_op.get(op, 0))
        yield duplicates

        overloaded = CounterMetricFamily("engine_overloaded", "Requests and connections refused with `overloaded`, by cause.", labels=["cause"])
        causes = dict(engine.overloaded)
        causes[OVERLOADED_CONNECTIONS] = causes.get(OVERLOADED_CONNECTIONS, 0) + self._connection_counters["refused"]
        for cause in OVERLOADED_CAUSES:
            overloaded.add_metric([cause], causes.get(cause, 0))
        yield overloaded

    def _log(self, engine: "Engine") -> Iterator[Metric]:
        wal = engine.wal
        yield _histogram("engine_wal_commit_duration_seconds", "Wall time of one group commit (encode, LMDB write, fsync).", wal.commit_seconds)
        yield _histogram("engine_wal_commit_records", "Records (events) per group commit.", wal.commit_records)
        yield _gauge("engine_wal_failed", "1 once a log commit failed: nothing more is acknowledged until a restart.", 0 if wal.failure is None else 1)
        yield _gauge("engine_wal_backlog_records", "Records applied in memory and not yet durable.", wal.backlog)
        yield _gauge("engine_applied_seq", "Seq of the last change applied in memory.", engine.state.seq)
        yield _gauge("engine_durable_seq", "Seq up to which the log is durable (fsync'd).", wal.durable_seq)
        yield _gauge("engine_last_snapshot_seq", "Seq covered by the newest snapshot (0: none).", engine.last_snapshot_seq)
        snapshot_at = engine.last_snapshot_monotonic if engine.last_snapshot_monotonic is not None else self._started_monotonic
        yield _gauge(
            "engine_last_snapshot_age_seconds",
            "Seconds since this process last wrote a snapshot (since it started, if it has not written one).",
            time.monotonic() - snapshot_at,
        )
        yield _histogram("engine_snapshot_duration_seconds", "Time to build and store one snapshot.", engine.snapshot_seconds)
        yield _gauge("engine_recovery_duration_seconds", "Time the start-up recovery took (snapshot load and log replay).", self._recovery_seconds)
        yield _gauge("engine_recovery_replayed_records", "Log records replayed at start-up.", self._replayed_records)

    def _state(self, engine: "Engine") -> Iterator[Metric]:
        state = engine.state
        yield _gauge("engine_reservations_held", "Reservations currently held.", state.held_reservations)
        yield _gauge("engine_units_held", "Units held by reservations (sum of reserved over SKU-locations).", state.held_units)
        yield _gauge("engine_reservations", "Reservations in memory (held, and closed ones kept for retries).", len(state.reservations))
        yield _gauge("engine_sku_locations", "SKU-locations known.", len(state.stocks))
        yield _gauge("engine_idempotency_keys", "Adjust/count/transfer keys remembered for retries.", len(state.keys))
        yield _gauge("engine_shortage_sku_locations", "SKU-locations with available < 0 (on hand below reserved).", engine.shortage_count())
        yield _counter("engine_expiries", "Reservations expired by their ttl.", engine.expiries)

    def _shell(self, engine: "Engine") -> Iterator[Metric]:
        owners = engine.owners
        counters = self._connection_counters
        yield _gauge("engine_owner_tasks", "Owner tasks (each owns a partition of the SKU-locations).", owners.owner_count)
        yield _gauge("engine_owner_tasks_awake", "Owner tasks woken or running (their mailbox has work).", owners.awake)
        yield _gauge("engine_owner_queued_messages", "Messages waiting in owner mailboxes.", owners.queued)
        yield _counter("engine_owner_messages", "Messages processed by owner tasks.", owners.messages_processed)
        yield _counter("engine_owner_wakeups", "Owner task wake-ups (each drains its mailbox).", owners.wakeups)
        yield _gauge("engine_connections_open", "Client connections open.", counters["open"])
        yield _counter("engine_connections_accepted", "Client connections accepted (not refused).", counters["total"])
        yield _gauge("engine_connections_reading_paused", "Connections not being read: they owe the most replies allowed.", counters["reading_paused_now"])
        yield _counter("engine_reading_pauses", "Times a connection stopped reading because it owed too many replies.", counters["reading_paused"])
        yield _counter("engine_received_bytes", "Bytes received from clients.", counters["bytes_received"])
        yield _counter("engine_sent_bytes", "Bytes sent to clients.", counters["bytes_sent"])


# Rejected frames are counted in the connection counters as this prefix + their error code.
INVALID_FRAME_PREFIX = "invalid:"
OVERLOADED_WAL_BACKLOG = "wal_backlog"
OVERLOADED_OWNER_MAILBOX = "owner_mailbox"
OVERLOADED_CONNECTIONS = "connections"  # counted by the server as refused connections
OVERLOADED_CAUSES = (OVERLOADED_WAL_BACKLOG, OVERLOADED_OWNER_MAILBOX, OVERLOADED_CONNECTIONS)


def build_registry(collector: EngineCollector, with_process: bool = True) -> Any:
    """A registry of its own (not the process-global one) holding the engine's collector, and
    the process's CPU, memory and file descriptors when `with_process`."""
    from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector

    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    if with_process:
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
    return registry

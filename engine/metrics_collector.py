"""The Prometheus collector: reads the engine's plain counters (`metrics.py`, the engine, the
log, the owners, the connection counters) and yields metric families when `/metrics` is scraped.

Call `collect` only on the event loop (it reads live engine state between two steps).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Iterable, Iterator, Sequence

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from .metrics import INVALID_FRAME_PREFIX, INVALID_OP_INDEX, OP_INDEX_OF_COMMAND, OP_OF_COMMAND, OPS, OVERLOADED_CAUSES, OVERLOADED_CONNECTIONS, Histogram

if TYPE_CHECKING:
    from collections import Counter

    from .access import AccessControl
    from .service import Engine


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

    def __init__(
        self, engine: "Engine", connection_counters: "Counter[str]", recovery_seconds: float, replayed_records: int,
        access: "AccessControl | None" = None,
    ):
        self._engine = engine
        self._access = access
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
        if self._access is not None:
            yield from self._access_families(self._access)

    def _requests(self, engine: "Engine") -> Iterator[Metric]:
        requests = CounterMetricFamily("engine_requests", "Requests answered, by op and result (ok or the error code).", labels=["op", "result"])
        ok_by_op = [0] * len(OPS)
        for kind, count in engine.ok_replies.items():
            index = OP_INDEX_OF_COMMAND.get(kind)
            if index is not None:  # not the engine's own expire/forget
                ok_by_op[index] += count
        for index, count in enumerate(ok_by_op):
            if index != INVALID_OP_INDEX:  # a frame that is not a valid request is never ok
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
        snapshots = engine.snapshots
        yield _counter("engine_snapshot_builds", "Snapshots built (by the builder process, or on the loop).", snapshots.builds)
        yield _counter("engine_snapshot_failures", "Snapshot builds that failed (nothing is lost: the log has it all).", snapshots.failures)
        yield _gauge(
            "engine_snapshot_builder_running", "1 while a snapshot builder process is alive (building, or idle and holding its copy of the state).",
            0 if snapshots.builder_pid is None else 1,
        )
        stats = snapshots.stats()
        yield _counter("engine_snapshot_builder_starts", "Snapshot builder processes started.", stats["builder_starts"])
        yield _counter(
            "engine_snapshot_builder_base_loads",
            "Snapshots a builder built from a loaded snapshot (its first, or its state did not continue the log) rather than from the state it kept.",
            stats["builder_base_loads"],
        )
        yield _counter("engine_snapshot_builder_replayed_records", "Log records the snapshot builders replayed.", stats["builder_replayed_records"])
        map_figures = engine.storage.map_stats()
        yield _gauge("engine_lmdb_map_size_bytes", "Size of the LMDB map now (it grows, doubling, up to its ceiling).", map_figures["map_size_bytes"])
        yield _gauge("engine_lmdb_map_size_max_bytes", "Ceiling the LMDB map may grow to (--map-size-max-mb).", map_figures["map_size_max_bytes"])
        yield _counter("engine_lmdb_map_growths", "Times the LMDB map was found full and grown.", map_figures["map_growths"])
        yield _gauge(
            "engine_lmdb_map_full_at_ceiling",
            "1 once the map was full at its ceiling: changes get `internal` until a restart with a higher ceiling.",
            1 if map_figures["map_full_at_ceiling"] else 0,
        )
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
        yield _counter("engine_idle_timeouts", "Connections closed by the idle timeout (--idle-timeout-seconds).", counters["idle_timeouts"])
        yield _counter("engine_tls_handshake_failures", "TLS connections closed before their handshake completed.", counters["tls_handshake_failures"])


    def _access_families(self, access: "AccessControl") -> Iterator[Metric]:
        # Labelled by token *name* (from the auth file: a bounded set); never by the secret.
        hellos = CounterMetricFamily("engine_hellos", "Hellos by token name and result (refused: name '-').", labels=["token", "result"])
        for (name, result), count in sorted(access.hellos.items()):
            hellos.add_metric([name, result], count)
        yield hellos
        refused = CounterMetricFamily(
            "engine_unauthorized", "Requests refused with `unauthorized`, by token name ('-': no valid hello) and op.", labels=["token", "op"],
        )
        for (name, op), count in sorted(access.unauthorized.items()):
            refused.add_metric([name, op], count)
        yield refused
        by_token = GaugeMetricFamily("engine_connections_authenticated", "Connections open after a successful hello, by token name.", labels=["token"])
        for name, count in sorted(access.connections_open.items()):
            by_token.add_metric([name], count)
        yield by_token
        reloads = CounterMetricFamily("engine_auth_reloads", "Re-reads of the auth file (SIGHUP), by result.", labels=["result"])
        for result in ("ok", "failed"):
            reloads.add_metric([result], access.reloads[result])
        yield reloads


def build_registry(collector: EngineCollector, with_process: bool = True) -> CollectorRegistry:
    """A registry of its own (not the process-global one) holding the engine's collector, and
    the process's CPU, memory and file descriptors when `with_process`."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    if with_process:
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
    return registry

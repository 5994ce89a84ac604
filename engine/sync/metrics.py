"""The sync's KPIs: lag, throughput, duplicates, dead letters, failures, as Prometheus metrics.

Served by prometheus-client's own little HTTP server (a thread) on `--metrics-port`: the sync is
not the engine's hot path, so a thread answering scrapes costs nothing that matters. The same
figures feed the periodic progress line in the log.

- `engine_sync_seq_behind`: the engine's head seq minus the last seq applied. The head is the
  highest of: the `seq` in the `watch` reply (durable at subscription), the last event received,
  and `stats` -> `wal.durable_seq` polled every few seconds on a second connection. All three
  are durable positions (what `watch` can deliver), so the figure never counts events the
  engine may still lose, and it grows while the sync is down or slow.
- `engine_sync_seconds_behind`: 0 when caught up; otherwise the age (sync's clock minus the
  event's `ts_ms`, the engine's clock) of the last applied event: every waiting event is younger,
  so this is an upper bound on how stale the read model is.
- `engine_sync_events_total`: events handled (applied, skipped as duplicates, or dead-lettered);
  `engine_sync_duplicates_total`: skipped because the read model had them already (their rate
  over `events_total` is the duplicate rate); `engine_sync_dead_letters_total`: events the
  database refused; `engine_sync_failures_total{cause}`: reconnects, by `engine`, `database`,
  `gap` (their rate is the failure rate).
- `engine_sync_offset_seq`, `engine_sync_head_seq`: the two positions themselves.
"""

from __future__ import annotations

import time
from collections import Counter as Tally

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

FAILURE_CAUSES = ("engine", "database", "gap")


class SyncMetrics:
    """The sync's metrics in their own registry, plus plain tallies for the progress line."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self._seq_behind = Gauge("engine_sync_seq_behind", "Engine head seq minus the last seq applied", registry=registry)
        self._seconds_behind = Gauge(
            "engine_sync_seconds_behind", "Age of the last applied event while events wait; 0 when caught up", registry=registry,
        )
        self._offset = Gauge("engine_sync_offset_seq", "Seq of the last event applied to the read model", registry=registry)
        self._head = Gauge("engine_sync_head_seq", "Highest durable engine seq known to the sync", registry=registry)
        self._events = Counter("engine_sync_events", "Events handled: applied, duplicates, dead letters", registry=registry)
        self._duplicates = Counter("engine_sync_duplicates", "Events skipped because already applied", registry=registry)
        self._dead_letters = Counter("engine_sync_dead_letters", "Events the database refused", registry=registry)
        self._failures = Counter("engine_sync_failures", "Reconnects, by cause", ["cause"], registry=registry)
        for cause in FAILURE_CAUSES:
            self._failures.labels(cause=cause)  # exported at 0 from the start
        self.offset_seq = 0
        self.head_seq = 0
        self.seconds_behind = 0.0
        self.applied = 0
        self.duplicates = 0
        self.dead_letters = 0
        self.failures: Tally[str] = Tally()

    def serve(self, port: int, host: str) -> None:
        """Answer Prometheus scrapes on host:port (a daemon thread)."""
        start_http_server(port, addr=host, registry=self.registry)

    def observe_head(self, seq: int) -> None:
        """The engine is durable at least up to `seq`."""
        self.head_seq = max(self.head_seq, seq)
        self._head.set(self.head_seq)

    def batch_done(self, applied: int, duplicates: int, dead_lettered: int) -> None:
        """Count one committed batch."""
        self.applied += applied
        self.duplicates += duplicates
        self.dead_letters += dead_lettered
        self._events.inc(applied + duplicates + dead_lettered)
        self._duplicates.inc(duplicates)
        self._dead_letters.inc(dead_lettered)

    def failure(self, cause: str) -> None:
        """Count one reconnect."""
        assert cause in FAILURE_CAUSES, cause
        self.failures[cause] += 1
        self._failures.labels(cause=cause).inc()

    def update_lag(self, offset_seq: int, offset_event_ts_ms: int | None) -> None:
        """Recompute the lag gauges for the read model at `offset_seq`."""
        self.offset_seq = offset_seq
        self._offset.set(offset_seq)
        self.observe_head(offset_seq)
        behind = self.head_seq - offset_seq
        if behind <= 0 or offset_event_ts_ms is None:
            self.seconds_behind = 0.0
        else:
            self.seconds_behind = max(0.0, time.time() - offset_event_ts_ms / 1000)
        self._seq_behind.set(behind)
        self._seconds_behind.set(self.seconds_behind)

    def progress_line(self) -> str:
        """One log line with every KPI."""
        failures = ", ".join(f"{cause} {self.failures[cause]}" for cause in FAILURE_CAUSES)
        return (
            f"offset {self.offset_seq}, head {self.head_seq}, behind {self.head_seq - self.offset_seq} events"
            f" / {self.seconds_behind:.1f} s; applied {self.applied}, duplicates {self.duplicates},"
            f" dead letters {self.dead_letters}; failures: {failures}"
        )

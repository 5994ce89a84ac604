"""The sync's KPIs: lag in events and seconds, counters, and their Prometheus names."""

from __future__ import annotations

import time

from prometheus_client import generate_latest

from engine.sync.metrics import SyncMetrics


def _exposed(metrics: SyncMetrics) -> dict[str, float]:
    figures = {}
    for line in generate_latest(metrics.registry).decode().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            figures[name] = float(value)
    return figures


def test_lag_is_events_and_seconds_behind_the_engines_durable_head():
    metrics = SyncMetrics()
    metrics.observe_head(100)
    metrics.update_lag(90, int(time.time() * 1000) - 5_000)
    figures = _exposed(metrics)
    assert figures["engine_sync_seq_behind"] == 10
    assert 4.5 <= figures["engine_sync_seconds_behind"] <= 30
    assert (figures["engine_sync_offset_seq"], figures["engine_sync_head_seq"]) == (90, 100)
    metrics.update_lag(100, int(time.time() * 1000) - 5_000)  # caught up: an old last event is no lag
    figures = _exposed(metrics)
    assert (figures["engine_sync_seq_behind"], figures["engine_sync_seconds_behind"]) == (0, 0)


def test_counters_add_up_and_every_failure_cause_is_exported_from_the_start():
    metrics = SyncMetrics()
    assert _exposed(metrics)['engine_sync_failures_total{cause="database"}'] == 0
    metrics.batch_done(applied=7, duplicates=2, dead_lettered=1)
    metrics.failure("engine")
    figures = _exposed(metrics)
    assert figures["engine_sync_events_total"] == 10
    assert figures["engine_sync_duplicates_total"] == 2
    assert figures["engine_sync_dead_letters_total"] == 1
    assert figures['engine_sync_failures_total{cause="engine"}'] == 1
    assert "applied 7, duplicates 2, dead letters 1; failures: engine 1, database 0, gap 0" in metrics.progress_line()

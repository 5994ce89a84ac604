"""`python -m bench`: a few-second engine-only run, and the generator's codec against `protocol`.

No timing assertions: the machine may be busy. The peers (redis, postgres) are not needed here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import msgpack

from bench.engine_driver import EngineDriver
from bench.workloads import OK, REFUSED
from protocol import ClientProtocol, pack

ROOT = Path(__file__).resolve().parent.parent


def _body(frame: bytes) -> dict:
    assert int.from_bytes(frame[:4], "big") == len(frame) - 4
    return msgpack.unpackb(frame[4:], raw=False)


def test_generator_codec_encodes_what_the_protocol_encodes():
    keys = [("SKU-1", "DC-1"), ("SKU-2", "DC-2")]
    driver = EngineDriver(keys)
    reference = ClientProtocol()
    cases = [
        (driver.reserve("a", "r1", ((0, 3),), 0),
         reference.request("reserve", rid="r1", lines=[{"sku": "SKU-1", "loc": "DC-1", "qty": 3}])),
        (driver.reserve("b", "r2", ((0, 1), (1, 2)), 2000),
         reference.request("reserve", rid="r2", lines=[{"sku": "SKU-1", "loc": "DC-1", "qty": 1},
                                                       {"sku": "SKU-2", "loc": "DC-2", "qty": 2}], ttl_ms=2000)),
        (driver.release("c", "r1", ()), reference.request("release", rid="r1")),
        (driver.commit("d", "r2", ()), reference.request("commit", rid="r2")),
        (driver.adjust("e", "k1", 1, 20), reference.request("adjust", key="k1", sku="SKU-2", loc="DC-2", delta=20, reason="receipt")),
        (driver.get("f", 0), reference.request("get", sku="SKU-1", loc="DC-1")),
    ]
    for ours, (_, theirs) in cases:
        assert _body(ours) == _body(theirs)
    replies = pack({"id": 2, "ok": False, "error": "insufficient"}) + pack({"id": 1, "ok": True, "lines": []})
    decoded = driver.feed(replies[:7]) + driver.feed(replies[7:])
    assert [(token, status) for token, status, _ in decoded] == [("b", REFUSED), ("a", OK)]


def test_engine_only_run_verifies_and_writes_json(tmp_path):
    output = tmp_path / "bench.json"
    completed = subprocess.run(
        [sys.executable, "-m", "bench", "--systems", "engine", "--workloads", "hot", "--modes", "pipelined",
         "--seconds", "2", "--warmup-seconds", "0.3", "--connections", "8", "--depth", "4",
         "--paced-fraction", "0", "--output", str(output), "--plot", ""],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "engine" in completed.stdout
    result = json.loads(output.read_text())
    (measurement,) = result["measurements"]
    assert measurement["system"] == "engine"
    assert measurement["requests"] > 0
    assert measurement["verification"]["checked"]
    assert measurement["verification"]["oversold_sku_locations"] == 0
    assert measurement["verification"]["mismatched_sku_locations"] == 0
    assert len(measurement["series"]) == 2
    assert result["ok"] is True


def test_metrics_overhead_runs_both_engines_and_scrapes(tmp_path):
    """`python -m bench.metrics_overhead` for one short round: both engines verified, scraped."""
    output = tmp_path / "metrics_overhead.json"
    result = subprocess.run(
        [sys.executable, "-m", "bench.metrics_overhead", "--rounds", "1", "--seconds", "1", "--modes", "pooled",
         "--output", str(output)],
        cwd=ROOT, capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads(output.read_text())
    assert report["scrapes"] >= 1 and not report["scrape_failures"]
    summary = report["summary"]["pooled"]
    assert summary["engine"]["requests_per_second_median"] > 0
    assert summary["engine+metrics"]["requests_per_second_median"] > 0
    assert "engine+metrics" in result.stdout and "median of the rounds' ratios" in result.stdout


def test_idle_overhead_runs_with_and_without_idle_connections(tmp_path):
    """`python -m bench.idle_overhead` for one short round: both runs verified, the idle ones with
    their connections open, and each commit visiting only connections with replies waiting (at
    most the 64 loaded ones, never the 200 idle ones too)."""
    output = tmp_path / "idle_overhead.json"
    result = subprocess.run(
        [sys.executable, "-m", "bench.idle_overhead", "--rounds", "1", "--seconds", "1", "--modes", "pooled",
         "--idle", "200", "--output", str(output)],
        cwd=ROOT, capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads(output.read_text())
    runs = report["runs"]["pooled"]
    (without,), (with_idle,) = runs["no idle"], runs["+200 idle"]
    assert without["idle_connections"] == 0 and with_idle["idle_connections"] == 200
    for run in (without, with_idle):
        assert run["verification"]["ok"] and run["commits"] > 0
        assert 0 < run["connections_visited_per_commit"] <= run["connections"] == 64
    assert "with / without idle" in result.stdout and "median of the rounds' ratios" in result.stdout


def test_core_floor_times_each_pure_step_of_granted_requests(tmp_path, capsys):
    """`python -m bench.core_floor` on a few requests: every request granted (it asserts so),
    each step timed, the echo's own work beside it; the collector is on again after it."""
    import gc

    from bench import core_floor

    output = tmp_path / "core_floor.json"
    assert gc.isenabled()
    assert core_floor.main(["--requests", "200", "--repeats", "1", "--output", str(output)]) == 0
    assert gc.isenabled()
    summary = json.loads(output.read_text())["summary"]
    assert set(summary) == {"hot", "orders"}
    for figures in summary.values():
        steps = figures["parse_us"] + figures["decide_apply_us"] + figures["pack_reply_us"] + figures["log_encode_us"]
        assert figures["total_us"] > 0 and abs(steps - figures["total_us"]) < 0.01 + 0.01 * figures["total_us"]
        assert figures["echo_us"] > 0
    assert "echo's own work" in capsys.readouterr().out


def test_disk_probe_times_durable_commits_in_a_child_process():
    from bench import disk_probe

    assert disk_probe.summarize([]) == {"commits": 0, "fsync_ms_p50": None, "fsync_ms_p99": None,
                                        "fsync_ms_p999": None, "fsync_ms_max": None}
    summary = disk_probe.summarize([float(value) for value in range(1, 101)])
    assert (summary["commits"], summary["fsync_ms_p50"], summary["fsync_ms_p99"], summary["fsync_ms_max"]) == (100, 51.0, 100.0, 100.0)
    measured = disk_probe.probe(0.2)
    assert "error" not in measured, measured
    assert measured["commits"] >= 1
    assert 0 < measured["fsync_ms_p50"] <= measured["fsync_ms_p99"] <= measured["fsync_ms_max"]

"""`scripts/loadtest`: a few-second run on a server it starts, a run against a running server that
holds other stock, bad targets, and the verdict on fabricated figures.

No timing assertions: the machine may be busy.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

from bench.loadtest import EXIT_OK, EXIT_USAGE, EXIT_VERDICT, verdict_exit_code, verdict_text
from bench.measure import verify
from bench.workloads import History
from protocol import Client

ROOT = Path(__file__).resolve().parent.parent
RUN_TIMEOUT_SECONDS = 60
TOKEN = "loadtest-secret"


def run_loadtest(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench.loadtest", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=RUN_TIMEOUT_SECONDS)


def test_loadtest_on_its_own_server_verifies_and_writes_json_and_plot(tmp_path):
    prefix = tmp_path / "run"
    completed = run_loadtest("--seconds", "2", "--connections", "4", "--depth", "2", "--out", str(prefix))
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "verdict: OK — no oversell, server agrees with" in completed.stdout
    assert "throughput:" in completed.stdout and "p99.9" in completed.stdout
    assert "loadtest hot 4x2:" in completed.stderr  # the progress line
    result = json.loads(prefix.with_suffix(".json").read_text())
    assert result["ok"] is True
    assert result["config"]["started_here"] is True
    assert result["config"]["workload"] == "hot"
    assert result["throughput"]["requests"] > 0
    assert set(result["latency_ms"]) == {"p50", "p99", "p999"}
    assert len(result["series"]) == 2
    verdict = result["verdict"]
    assert verdict["oversold_sku_locations"] == 0
    assert verdict["history_oversold_sku_locations"] == 0
    assert verdict["mismatched_sku_locations"] == 0
    assert verdict["acknowledged_changes"] > 0
    plot = prefix.with_suffix(".png")
    if importlib.util.find_spec("matplotlib") is not None:
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert not plot.exists() and "matplotlib is not installed" in completed.stderr


def _figures(reply: dict) -> tuple[int, int]:
    return reply["on_hand"], reply["reserved"]


def test_loadtest_against_a_running_server_leaves_other_stock_alone(server_process, tmp_path):
    server = server_process("--token", TOKEN)
    # Other stock under the names the hot workload has without a prefix: one SKU-location with a
    # held reservation, nine never used (a load that used them would have to stock them first).
    other_keys = [(f"hot-{index:05d}", "DC-1") for index in range(10)]
    with Client("127.0.0.1", server.port) as client:
        client.hello(token=TOKEN)
        client.adjust("other-receipt", "hot-00000", "DC-1", 7, "receipt")
        client.reserve("other-order", [("hot-00000", "DC-1", 2)])
        other_before = [_figures(client.get(*key)) for key in other_keys]
    assert other_before == [(7, 2)] + [(0, 0)] * 9
    prefix = tmp_path / "remote"
    completed = run_loadtest("--connect", f"127.0.0.1:{server.port}", "--token", TOKEN, "--seconds", "1.5",
                             "--connections", "4", "--workload", "hot", "--out", str(prefix))
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(prefix.with_suffix(".json").read_text())
    assert result["config"]["started_here"] is False
    sku_prefix = result["config"]["sku_prefix"]
    with Client("127.0.0.1", server.port) as client:
        client.hello(token=TOKEN)
        other_after = [_figures(client.get(*key)) for key in other_keys]
        own = client.get(f"{sku_prefix}hot-00000", "DC-1")
    assert other_after == other_before
    assert sku_prefix and own["on_hand"] == result["config"]["stock_per_sku_location"]
    assert server.process.poll() is None  # the loadtest does not stop a server it did not start


def test_loadtest_refuses_a_server_it_cannot_use(server_process):
    server = server_process("--token", TOKEN)
    without_token = run_loadtest("--connect", f"127.0.0.1:{server.port}", "--seconds", "1")
    assert without_token.returncode == EXIT_USAGE
    assert "--token" in without_token.stderr
    server.terminate()
    unreachable = run_loadtest("--connect", f"127.0.0.1:{server.port}", "--seconds", "1")
    assert unreachable.returncode == EXIT_USAGE
    assert "cannot reach" in unreachable.stderr
    assert run_loadtest("--connect", "no-port-here").returncode == EXIT_USAGE


def _history(granted: list[int], released: list[int]) -> History:
    history = History(len(granted))
    history.granted, history.released = granted, released
    return history


KEYS = [("SKU-A", "DC-1"), ("SKU-B", "DC-1")]


def test_verdict_catches_an_oversell_in_the_acknowledged_history():
    # SKU-A: 10 on hand, 15 granted and none released; the server agrees, so only the history shows it.
    verification = verify(KEYS, before=[(10, 0), (5, 0)], after=[(10, 15), (5, 1)], history=_history([15, 3], [0, 2]),
                          exact_reserved=True, history_complete=True, changes=20)
    assert verification["ok"] is False
    assert verification["history_oversold_sku_locations"] == 1
    assert verification["worst_sku_location"] == {"key": "SKU-A/DC-1", "held": 15, "on_hand": 10}
    assert verification["oversold_sku_locations"] == 1
    assert verification["mismatched_sku_locations"] == 0
    assert "oversell" in verdict_text(verification) and "SKU-A/DC-1" in verdict_text(verification)
    assert verdict_exit_code(verification) == EXIT_VERDICT


def test_verdict_catches_a_server_that_disagrees_with_the_history():
    # Nothing oversold, but the server reports SKU-B reserved 0 where the history holds 1.
    verification = verify(KEYS, before=[(10, 0), (5, 0)], after=[(10, 4), (5, 0)], history=_history([4, 3], [0, 2]),
                          exact_reserved=True, history_complete=True, changes=9)
    assert verification["ok"] is False
    assert verification["history_oversold_sku_locations"] == 0
    assert verification["mismatched_sku_locations"] == 1
    assert verification["mismatch_examples"] == [{"key": "SKU-B/DC-1", "expected": [5, 1], "found": [5, 0]}]
    assert "disagrees" in verdict_text(verification)
    assert verdict_exit_code(verification) == EXIT_VERDICT


def test_verdict_passes_figures_that_agree():
    verification = verify(KEYS, before=[(10, 0), (5, 0)], after=[(10, 4), (5, 1)], history=_history([4, 3], [0, 2]),
                          exact_reserved=True, history_complete=True, changes=9)
    assert verification["ok"] is True
    assert verification["worst_sku_location"] == {"key": "SKU-B/DC-1", "held": 1, "on_hand": 5}
    assert verdict_text(verification).startswith("verdict: OK — no oversell, server agrees with 9 acknowledged changes")
    assert verdict_exit_code(verification) == EXIT_OK

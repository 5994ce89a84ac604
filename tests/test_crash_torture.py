"""Crash torture (bench/crash_torture.py): kill -9 a real server mid-stream, restart, verify.

The fast test runs one randomized kill round in the default suite; the slow one runs three
(`pytest -m slow`). Both fail with the first violations the torture found; the report names
the seed and the kept data folder to reproduce and inspect.
"""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "crash_torture.py"


def _load_torture():
    spec = importlib.util.spec_from_file_location("crash_torture", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["crash_torture"] = module
    spec.loader.exec_module(module)
    return module


crash_torture = _load_torture()


def _run(rounds: int, seconds_per_round: float, seed: int) -> dict:
    config = crash_torture.TortureConfig(
        rounds=rounds, seconds_per_round=seconds_per_round, connections=4, depth=16, seed=seed,
        kill_min_seconds=min(0.5, seconds_per_round), output=None, verbose=False,
    )
    return crash_torture.run_torture(config)


def _assert_clean(report: dict, rounds: int) -> None:
    details = "\n".join(json.dumps(v, default=str)[:600] for v in report["violation_details"][:10])
    assert report["violations"] == 0, (
        f"{report['violations']} violations {report['violation_kinds']} (reproduce: {report['command']}; "
        f"data kept in {report['workdir']}):\n{details}"
    )
    assert report["rounds"] == rounds
    assert report["acknowledged"] > 0, "the load must have been acknowledged before the kill"
    assert report["final"]["clean_shutdown_exit_code"] == 0
    assert report["final"]["verify"]["log_events"] > 0
    assert report["recovery_seconds"]["count"] == rounds
    assert report["maybe"] > 0, "the kill must have left requests in flight"


def test_one_random_kill_round_loses_nothing_acknowledged():
    seed = random.randrange(1_000_000)
    report = _run(rounds=1, seconds_per_round=1.0, seed=seed)
    _assert_clean(report, rounds=1)


@pytest.mark.slow
def test_crash_torture_three_rounds():
    seed = random.randrange(1_000_000)
    report = _run(rounds=3, seconds_per_round=1.5, seed=seed)
    _assert_clean(report, rounds=3)

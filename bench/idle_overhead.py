"""What idle connections cost the engine: the same load with and without N idle connections open.

Issue 10 asks that per-commit work not grow with the number of open connections: 1,000 idle
connections must not change the pooled figures by more than 10 %. One engine of this checkout is
loaded in rounds; each round measures every mode twice, without and with `--idle` idle
connections open (alternating which goes first), so that the machine's drift falls on both
alike. Throughput is compared as medians over rounds and as the median of each round's
back-to-back ratio: on this shared machine a single pair of runs differs by more than 10 % with
no idle connection at all.

Beside throughput, the work that would grow with open connections is counted directly from the
server's stats over each run: connections the outbox visited per log commit (only those with
replies waiting: at most the busy ones), and the server's CPU per request.

    .venv/bin/python -m bench.idle_overhead --rounds 5 --seconds 4 --idle 1000

Prints one line per run and a summary per mode; writes bench/results/idle_overhead.json. Exit
status 1 if a run failed its verification.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench import cli, systems
from bench.rotation import rate_ratios
from protocol import Client

RESULTS = cli.RESULTS
# As in tls_overhead: a periodic snapshot landing in one run would swamp the figures.
ENGINE_ARGS = ("--snapshot-interval-seconds", "86400")
TARGET_CHANGE_MAX = 0.10  # issue 10: idle connections change the pooled figures by at most 10 %


def _server_counts(system: systems.RunningSystem) -> dict[str, int]:
    client = Client(systems.HOST, system.port)
    try:
        stats = client.stats()
    finally:
        client.close()
    return {"commits": stats["wal"]["commits"], "visited": stats["outbox_connections_visited"]}


def _measure_counted(args: Any, system: systems.RunningSystem, workload: str, mode: str, seconds: float,
                     run_number: int, idle: int) -> dict:
    before = _server_counts(system)
    measurement = cli.measure(args, system, workload, mode, None, seconds, run_number, idle)
    after = _server_counts(system)
    commits = after["commits"] - before["commits"]
    measurement["commits"] = commits
    measurement["connections_visited_per_commit"] = (after["visited"] - before["visited"]) / commits if commits else None
    return measurement


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.idle_overhead", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="pairs of runs per mode (default %(default)s)")
    parser.add_argument("--seconds", type=float, default=4.0, help="measured seconds per run (default %(default)s)")
    parser.add_argument("--idle", type=int, default=1000, help="idle connections open in the 'with' runs (default %(default)s)")
    parser.add_argument("--modes", default="pooled,pipelined", help="comma list of pooled, pipelined (default %(default)s)")
    parser.add_argument("--workload", default="hot", choices=sorted(cli.WORKLOADS), help="default %(default)s")
    parser.add_argument("--output", default=str(RESULTS / "idle_overhead.json"))
    options = parser.parse_args(argv)
    if options.rounds < 1 or options.seconds <= 0 or options.idle < 1:
        parser.error("--rounds, --seconds and --idle must be positive")
    args = cli.parse_args(["--systems", "engine", "--seconds", str(options.seconds), "--warmup-seconds", "1"])
    modes = [mode for mode in options.modes.split(",") if mode]
    labels = {0: "no idle", options.idle: f"+{options.idle} idle"}

    results: dict[str, dict[int, list[dict]]] = {mode: {count: [] for count in labels} for mode in modes}
    ok = True
    run_number = int(time.time()) % 100_000 * 100
    engine = systems.start_engine("engine", extra_args=ENGINE_ARGS)
    try:
        for round_index in range(options.rounds):
            for mode in modes:
                order = [0, options.idle] if round_index % 2 == 0 else [options.idle, 0]
                for idle in order:
                    run_number += 1
                    measurement = _measure_counted(args, engine, options.workload, mode, options.seconds, run_number, idle)
                    ok = ok and measurement["verification"]["ok"]
                    results[mode][idle].append(measurement)
                    visited = measurement["connections_visited_per_commit"]
                    print(f"round {round_index + 1} {mode:>9} {labels[idle]:>11}: {measurement['requests_per_second']:>9,.0f} req/s"
                          f"  cpu {measurement['server_cpu_us_per_request'] or 0:5.1f} us/req"
                          f"  visited/commit {visited if visited is not None else float('nan'):5.1f}"
                          f"  {'ok' if measurement['verification']['ok'] else 'FAILED'}", flush=True)
    finally:
        engine.stop()

    print(f"\n{options.workload}, {args.connections} connections (pipelined: depth {args.depth}), "
          f"{options.seconds:g} s per run, {options.rounds} rounds, {options.idle} idle connections in the 'with' runs")
    summary: dict[str, dict] = {}
    for mode in modes:
        summary[mode] = {}
        for idle, label in labels.items():
            runs = results[mode][idle]
            summary[mode][label] = figures = {
                "requests_per_second_median": statistics.median(run["requests_per_second"] for run in runs),
                "cpu_us_per_request_median": statistics.median(run["server_cpu_us_per_request"] or 0 for run in runs),
                "connections_visited_per_commit_median": statistics.median(run["connections_visited_per_commit"] or 0 for run in runs),
            }
            print(f"{mode:>9} {label:>11}: {figures['requests_per_second_median']:>9,.0f} req/s, "
                  f"{figures['cpu_us_per_request_median']:5.1f} us/req, "
                  f"{figures['connections_visited_per_commit_median']:5.1f} connections visited per commit (medians)")
        without, with_idle = results[mode][0], results[mode][options.idle]
        ratio_of_medians, paired = rate_ratios(with_idle, without)
        change = max(abs(ratio_of_medians - 1), abs(paired - 1))
        verdict = "within" if change <= TARGET_CHANGE_MAX else "OUTSIDE"
        summary[mode]["with_over_without"] = {"ratio_of_medians": round(ratio_of_medians, 4), "paired_ratio_median": round(paired, 4)}
        print(f"{mode:>9} with / without idle: {ratio_of_medians:.2f} (medians), {paired:.2f} (median of the rounds' ratios): "
              f"{verdict} the target of {TARGET_CHANGE_MAX:.0%}")
    Path(options.output).parent.mkdir(parents=True, exist_ok=True)
    Path(options.output).write_text(json.dumps({"options": vars(options), "machine": cli.machine_info(),
                                                "summary": summary, "runs": {mode: {labels[idle]: runs for idle, runs in by_idle.items()}
                                                                              for mode, by_idle in results.items()}},
                                               indent=1, default=str))
    print(f"wrote {options.output}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

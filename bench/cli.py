"""`python -m bench`: one generator, run against the engine and its peers, side by side.

For each system (started here, stopped at the end), each workload it implements and each mode,
it loads stock through the system's own API (not timed), measures for --seconds, then checks the
stock against what was acknowledged. After a system's pooled peak it runs a paced load at
--paced-fraction of that peak (latency from the scheduled send time). It prints a table and
writes bench/results/bench.json and bench/results/bench.png.

  engine    this checkout's server              echo      a bare trio echo server (the ceiling)
  baseline  the engine at --baseline REV        redis     redis-server, Lua scripts, AOF fsync always
                                                postgres  PostgreSQL, synchronous_commit=on

Workloads: hot (10 SKU-locations), uniform (10,000), orders (1-5 lines over 1,000),
mixed (reserve, then commit / release / expire, plus receipts). Modes: pooled (64 connections,
one request in flight each), pipelined (64 x 16 in flight). Before each paced run, a probe times
durable one-record LMDB commits (`bench/disk_probe.py`): the disk's own fsync p99 at that moment,
a floor under any paced p99 (column "fsync p99").

Exit status: 0 when every run verified; 1 on any oversell or mismatch with the acknowledged
history; 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sys
import time
from pathlib import Path

from bench import disk_probe, report, systems
from bench.measure import Load
from bench.measure import measure as measure_load
from bench.workloads import WORKLOAD_SYSTEMS, WORKLOADS

SYSTEM_ORDER = ("echo", "engine", "baseline", "redis", "postgres")
MODES = {"pooled": None, "pipelined": None}
ROOT = systems.ROOT
RESULTS = ROOT / "bench" / "results"
ECHO_RATIO_MIN = 1.5


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--systems", default="echo,engine,redis,postgres",
                        help="comma list of echo, engine, baseline, redis, postgres (default %(default)s; "
                             "baseline is added by --baseline)")
    parser.add_argument("--baseline", metavar="REV", default=None,
                        help="also run the engine of git revision REV (a temporary git worktree, same venv)")
    parser.add_argument("--workloads", default="hot,uniform,orders,mixed",
                        help="comma list of hot, uniform, orders, mixed (default: all)")
    parser.add_argument("--modes", default="pooled,pipelined", help="comma list of pooled, pipelined (default: both)")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per run (default %(default)s)")
    parser.add_argument("--warmup-seconds", type=float, default=1.0, help="load before each window, not counted (default %(default)s)")
    parser.add_argument("--quick", action="store_true", help="2 s per measurement, 0.5 s warm-up")
    parser.add_argument("--connections", type=int, default=64, help="connections per run (default %(default)s)")
    parser.add_argument("--depth", type=int, default=16, help="requests in flight per connection when pipelined (default %(default)s)")
    parser.add_argument("--rate", type=float, default=None,
                        help="also a paced pooled run at R requests/s per system (latency from the scheduled send time)")
    parser.add_argument("--paced-fraction", type=float, default=0.5,
                        help="after each system's pooled peak, a paced run at F x that peak (default %(default)s; 0: none)")
    parser.add_argument("--paced-seconds", type=float, default=None,
                        help="measured seconds of a paced run (default: half of --seconds, at least 2)")
    parser.add_argument("--disk-probe-seconds", type=float, default=1.5,
                        help="before each paced run, time one-record durable LMDB commits for this long "
                             "(the disk's own fsync tail, shown next to the paced p99; default %(default)s; 0: none)")
    parser.add_argument("--idle-connections", type=int, default=0,
                        help="measure the engine's pooled and pipelined runs again with N extra idle connections open "
                             "(rows labelled '+N idle'): per-commit work must not grow with open connections")
    parser.add_argument("--generator-processes", type=int, default=1,
                        help="load generator processes (connections split between them, results merged; default %(default)s)")
    parser.add_argument("--output", default=str(RESULTS / "bench.json"), help="JSON results (default %(default)s)")
    parser.add_argument("--plot", default=str(RESULTS / "bench.png"), help="PNG plot (default %(default)s; '' for none)")
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.systems = [name for name in args.systems.split(",") if name]
    if args.baseline and "baseline" not in args.systems:
        args.systems.append("baseline")
    args.workloads = [name for name in args.workloads.split(",") if name]
    args.modes = [name for name in args.modes.split(",") if name]
    for name in args.systems:
        if name not in SYSTEM_ORDER:
            parser.error(f"unknown system {name!r}")
    for name in args.workloads:
        if name not in WORKLOADS:
            parser.error(f"unknown workload {name!r}")
    for name in args.modes:
        if name not in MODES:
            parser.error(f"unknown mode {name!r}")
    if args.quick:
        args.seconds = 2.0
        args.warmup_seconds = 0.5
    if args.paced_seconds is None:
        args.paced_seconds = max(2.0, args.seconds / 2)
    if args.connections < 1 or args.depth < 1 or args.generator_processes < 1 or args.seconds <= 0 or args.paced_seconds <= 0:
        parser.error("--connections, --depth, --generator-processes, --seconds and --paced-seconds must be positive (no paced run: --paced-fraction 0)")
    args.generator_processes = min(args.generator_processes, args.connections)
    args.systems = [name for name in SYSTEM_ORDER if name in args.systems]
    return args


# --- one measurement ----------------------------------------------------------------------


def measure(args, system, workload_name, mode, rate, seconds, run_number, idle_count=0) -> dict:
    """One row of the table: `measure.measure` with this run's arguments, labelled."""
    mode_label = mode if rate is None else f"paced@{rate:,.0f}/s"
    if idle_count:
        mode_label += f" +{idle_count} idle"
    load = Load(
        workload=workload_name, connections=args.connections, depth=args.depth if mode == "pipelined" else 1,
        seconds=seconds, warmup_seconds=args.warmup_seconds, processes=args.generator_processes, rate=rate,
        run_tag=str(run_number), idle_connections=idle_count,
    )
    result = measure_load(system, load, f"{system.name} {workload_name} {mode_label}")
    return {"system": system.name, "workload": workload_name, "mode": mode if rate is None else "paced",
            "label": mode_label, **result}


# --- the whole run ------------------------------------------------------------------------


def machine_info() -> dict:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"hostname": socket.gethostname(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "cpu_model": model, "python": sys.version.split()[0]}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.time()
    output = {"args": {key: value for key, value in vars(args).items()}, "machine": machine_info(),
              "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
              "systems": {}, "measurements": [], "warnings": []}
    run_number = int(started) % 100_000 * 100
    postgres_max_connections = max(200, args.connections + args.idle_connections + 20)
    for name in args.systems:
        workloads = [workload for workload in args.workloads if name in WORKLOAD_SYSTEMS[workload]]
        if not workloads:
            continue
        print(f"starting {name} ...", file=sys.stderr, flush=True)
        try:
            system = systems.start(name, baseline_revision=args.baseline, postgres_max_connections=postgres_max_connections)
        except Exception as error:  # any failure to start: reported as missing, with the reason
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            print(f"{name}: missing ({reason})", file=sys.stderr, flush=True)
            output["systems"][name] = {"status": "missing", "reason": reason}
            continue
        output["systems"][name] = {"status": "ran", "version": system.version, "port": system.port}
        try:
            for workload_name in workloads:
                for mode in args.modes:
                    run_number += 1
                    measurement = run_one(args, system, workload_name, mode, None, args.seconds, run_number, output)
                    if args.idle_connections and system.kind == "engine":
                        run_number += 1
                        run_one(args, system, workload_name, mode, None, args.seconds, run_number, output, args.idle_connections)
                    if measurement is None or mode != "pooled":
                        continue
                    paced_rates = []
                    if args.paced_fraction > 0 and measurement["requests_per_second"] > 0:
                        paced_rates.append(args.paced_fraction * measurement["requests_per_second"])
                    if args.rate:
                        paced_rates.append(args.rate)
                    for rate in paced_rates:
                        run_number += 1
                        disk = disk_probe.probe(args.disk_probe_seconds) if args.disk_probe_seconds > 0 else None
                        paced = run_one(args, system, workload_name, "pooled", rate, args.paced_seconds, run_number, output)
                        if paced is not None and disk is not None:
                            paced["disk_probe"] = disk
        finally:
            system.stop()
    report.add_ratios(output)
    warnings = report.echo_warnings(output, ECHO_RATIO_MIN)
    output["warnings"] += warnings
    output["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    output["valid"] = not warnings
    output["ok"] = all(m["verification"]["ok"] for m in output["measurements"])
    print(report.table(output))
    for warning in output["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(output, indent=1) + "\n")
    print(f"wrote {args.output}", file=sys.stderr)
    if args.plot:
        print(report.plot(output, args.plot), file=sys.stderr)
    if not output["ok"]:
        print("FAILED: oversell or mismatch with the acknowledged history (see 'verification' in the JSON)", file=sys.stderr)
        return 1
    return 0


def run_one(args, system, workload_name, mode, rate, seconds, run_number, output, idle_count=0) -> dict | None:
    try:
        measurement = measure(args, system, workload_name, mode, rate, seconds, run_number, idle_count)
    except Exception as error:
        message = f"{system.name} {workload_name} {mode}{'' if rate is None else ' paced'}: {type(error).__name__}: {error}"
        if not system.alive():
            message += f" (server exited; log: {system.log_tail(400)!r})"
        print(f"error: {message}", file=sys.stderr, flush=True)
        output["measurements"].append({
            "system": system.name, "workload": workload_name, "mode": mode if rate is None else "paced",
            "label": mode if rate is None else f"paced@{rate:,.0f}/s", "error": message, "requests_per_second": 0,
            "verification": {"checked": False, "ok": False, "why": message}, "series": [],
        })
        return None
    output["measurements"].append(measurement)
    verification = measurement["verification"]
    status = "ok" if verification["ok"] else "FAILED"
    if verification.get("checked"):
        status += f" (oversold {verification['oversold_sku_locations']}, mismatched {verification['mismatched_sku_locations']})"
    print(f"{system.name:>8} {workload_name:>7} {measurement['label']:>16}: {measurement['requests_per_second']:>9,.0f} req/s"
          f"  p99 {measurement['latency_ms_p99'] or 0:8.2f} ms  cpu {measurement['server_cpu_us_per_request'] or 0:6.1f} us/req  {status}",
          file=sys.stderr, flush=True)
    return measurement

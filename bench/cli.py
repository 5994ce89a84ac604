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
one request in flight each), pipelined (64 x 16 in flight).

Exit status: 0 when every run verified; 1 on any oversell or mismatch with the acknowledged
history; 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import platform
import socket
import sys
import time
from array import array
from pathlib import Path

import trio

from bench import report, systems
from bench.postgres_peer import startup_message
from bench.workloads import WORKLOAD_SYSTEMS, WORKLOADS, History

SYSTEM_ORDER = ("echo", "engine", "baseline", "redis", "postgres")
MODES = {"pooled": None, "pipelined": None}
ROOT = systems.ROOT
RESULTS = ROOT / "bench" / "results"
ECHO_RATIO_MIN = 1.5
EXPIRY_WAIT_MAX_SECONDS = 20.0


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
    if args.connections < 1 or args.depth < 1 or args.generator_processes < 1 or args.seconds <= 0:
        parser.error("--connections, --depth, --generator-processes and --seconds must be positive")
    args.generator_processes = min(args.generator_processes, args.connections)
    args.systems = [name for name in SYSTEM_ORDER if name in args.systems]
    return args


# --- one measurement ----------------------------------------------------------------------


class Progress:
    def __init__(self, label: str, start_at: float, stop_at: float) -> None:
        self.label = label
        self.start_at = start_at
        self.stop_at = stop_at
        self.interactive = sys.stderr.isatty()
        self.last_print = 0.0

    def show(self, count: int) -> None:
        now = time.perf_counter()
        if not self.interactive and now - self.last_print < 2.0:
            return
        self.last_print = now
        elapsed = now - self.start_at
        if elapsed < 0:
            text = f"{self.label}: warming up ({-elapsed:.1f} s)"
        else:
            text = f"{self.label}: {min(elapsed, self.stop_at - self.start_at):5.1f} s  {count / max(elapsed, 1e-3):>9,.0f} requests/s"
        end = "\r" if self.interactive else "\n"
        print(f"{text:<78}", end=end, file=sys.stderr, flush=True)

    def done(self) -> None:
        if self.interactive:
            print(" " * 78, end="\r", file=sys.stderr, flush=True)


def open_idle_connections(system: systems.RunningSystem, count: int) -> list[socket.socket]:
    connections = []
    for _ in range(count):
        connection = socket.create_connection((system.host, system.port), timeout=10)
        if system.kind == "postgres":
            # A backend per connection; without a startup message it would close after a minute.
            connection.sendall(startup_message())
            received = b""
            while b"Z\x00\x00\x00\x05" not in received:
                chunk = connection.recv(4096)
                if not chunk:
                    raise ConnectionError("postgres closed an idle connection")
                received += chunk
        connections.append(connection)
    return connections


def run_generators(args, system, workload_name, depth, rate, seconds, label, run_number) -> tuple[dict, float, float]:
    """Run the load in `args.generator_processes` processes; returns (merged result, cpu s, elapsed s)."""
    process_count = args.generator_processes
    numbers = list(range(args.connections))
    launch_at = time.perf_counter()
    spawn_seconds = 0.3 + 0.002 * args.connections
    load_at = launch_at + spawn_seconds
    start_at = load_at + args.warmup_seconds
    stop_at = start_at + seconds
    specs = []
    for index in range(process_count):
        specs.append({
            "kind": system.kind, "host": system.host, "port": system.port, "workload": workload_name,
            "depth": depth, "rate": rate, "connections_total": args.connections,
            "connection_numbers": numbers[index::process_count], "load_at": load_at,
            "start_at": start_at, "stop_at": stop_at, "seed": run_number * 1000 + index,
            "rid_prefix": f"b{run_number}p{index}.",
        })
    context = multiprocessing.get_context("fork")
    counters = context.RawArray("q", process_count)
    queue = context.Queue()
    processes = [context.Process(target=systems_safe_run, args=(spec, counters, index, queue), daemon=True)
                 for index, spec in enumerate(specs)]
    for process in processes:
        process.start()
    progress = Progress(label, start_at, stop_at)
    cpu_before = cpu_after = None
    results: dict[int, dict] = {}
    while len(results) < process_count:
        now = time.perf_counter()
        if cpu_before is None and now >= start_at:
            cpu_before = (system.cpu_seconds(), now)
        if cpu_after is None and now >= stop_at:
            cpu_after = (system.cpu_seconds(), now)
        progress.show(sum(counters))
        try:
            index, result = queue.get(timeout=min(0.2, max(0.001, (start_at if cpu_before is None else stop_at) - now)))
            results[index] = result
        except Exception:
            if not any(process.is_alive() for process in processes) and queue.empty():
                break
    progress.done()
    for process in processes:
        process.join(timeout=10)
    if cpu_before is None:
        cpu_before = (system.cpu_seconds(), time.perf_counter())
    if cpu_after is None:
        cpu_after = (system.cpu_seconds(), time.perf_counter())
    if len(results) < process_count:
        raise RuntimeError(f"{label}: {process_count - len(results)} generator process(es) died")
    merged = merge([results[index] for index in sorted(results)])
    return merged, cpu_after[0] - cpu_before[0], cpu_after[1] - cpu_before[1]


def systems_safe_run(spec, counters, index, queue) -> None:
    from bench.generator import run_process

    try:
        run_process(spec, counters, index, queue)
    except BaseException as error:  # report instead of hanging the parent
        queue.put((index, {"fatal": f"{type(error).__name__}: {error}"}))


def merge(parts: list[dict]) -> dict:
    fatal = [part["fatal"] for part in parts if "fatal" in part]
    if fatal:
        raise RuntimeError(f"generator failed: {fatal[0]}")
    bucket_count = len(parts[0]["requests"])
    merged = {
        "requests": [sum(part["requests"][bucket] for part in parts) for bucket in range(bucket_count)],
        "granted": [sum(part["granted"][bucket] for part in parts) for bucket in range(bucket_count)],
        "latencies": [],
        "replies": {}, "error_codes": {}, "sent": 0, "unanswered": 0, "connection_errors": [],
    }
    for bucket in range(bucket_count):
        values = array("d")
        for part in parts:
            values.frombytes(part["latencies"][bucket])
        merged["latencies"].append(values)
    history = History(len(parts[0]["history"][0]))
    for part in parts:
        other = History(0)
        other.granted, other.released, other.committed, other.adjusted = part["history"]
        history.merge(other)
        for name in ("replies", "error_codes"):
            for key, value in part[name].items():
                merged[name][key] = merged[name].get(key, 0) + value
        merged["sent"] += part["sent"]
        merged["unanswered"] = -1 if part["unanswered"] < 0 or merged["unanswered"] < 0 else merged["unanswered"]
        merged["connection_errors"] += part["connection_errors"]
    merged["history"] = history
    return merged


def percentile(ordered, fraction: float) -> float | None:
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, int(math.ceil(fraction * len(ordered))) - 1)]


def summarize_latencies(values) -> dict:
    ordered = sorted(values)
    return {f"latency_ms_{name}": (None if percentile(ordered, fraction) is None else round(percentile(ordered, fraction) * 1000, 3))
            for name, fraction in (("p50", 0.50), ("p99", 0.99), ("p999", 0.999))}


def verify(system, workload, before, after, history: History, merged: dict) -> dict:
    """No oversell, and the final stock equals the acknowledged history."""
    oversold = [index for index, (on_hand, reserved) in enumerate(after) if reserved > on_hand]
    mismatched = []
    for index, ((on_hand_before, reserved_before), (on_hand_after, reserved_after)) in enumerate(zip(before, after)):
        expected_on_hand = on_hand_before + history.adjusted[index] - history.committed[index]
        if workload.exact_reserved:
            expected_reserved = reserved_before + history.granted[index] - history.released[index] - history.committed[index]
        else:
            expected_reserved = 0  # mixed: every reservation carries a ttl and has expired by now
        if (on_hand_after, reserved_after) != (expected_on_hand, expected_reserved):
            mismatched.append({"key": "/".join(workload.keys()[index]), "expected": [expected_on_hand, expected_reserved],
                               "found": [on_hand_after, reserved_after]})
    complete = merged["unanswered"] == 0 and not merged["connection_errors"]
    return {
        "checked": True,
        "oversold_sku_locations": len(oversold),
        "mismatched_sku_locations": len(mismatched) if complete else None,
        "mismatch_examples": mismatched[:5] if complete else [],
        "history_complete": complete,
        "ok": not oversold and complete and not mismatched,
    }


async def wait_for_expiry(system, keys, before_count: int) -> list:
    """mixed: every reservation has a short ttl; wait until the server expired them all."""
    deadline = time.monotonic() + EXPIRY_WAIT_MAX_SECONDS
    while True:
        stock = await systems.read_stock(system, keys)
        if all(reserved == 0 for _, reserved in stock) or time.monotonic() > deadline:
            return stock
        await trio.sleep(0.5)


def measure(args, system, workload_name, mode, rate, seconds, run_number, idle_count=0) -> dict:
    workload = WORKLOADS[workload_name]
    keys = workload.keys()
    depth = args.depth if mode == "pipelined" else 1
    mode_label = mode if rate is None else f"paced@{rate:,.0f}/s"
    if idle_count:
        mode_label += f" +{idle_count} idle"
    label = f"{system.name} {workload_name} {mode_label}"
    checked = system.kind != "echo"
    before = None
    if checked:
        trio.run(systems.top_up_stock, system, keys, workload.stock_per_key, f"{run_number}")
        if workload.ttl_ms:
            before = trio.run(wait_for_expiry, system, keys, 0)
        else:
            before = trio.run(systems.read_stock, system, keys)
    idle = open_idle_connections(system, idle_count)
    try:
        merged, cpu_seconds, window_seconds = run_generators(args, system, workload_name, depth, rate, seconds, label, run_number)
    finally:
        for connection in idle:
            connection.close()
    requests = sum(merged["requests"])
    granted = sum(merged["granted"])
    all_latencies = array("d")
    for bucket in merged["latencies"]:
        all_latencies.extend(bucket)
    measurement = {
        "system": system.name, "workload": workload_name, "mode": mode if rate is None else "paced",
        "label": mode_label, "connections": args.connections, "depth": depth, "rate_target": rate,
        "seconds": seconds, "idle_connections": idle_count,
        "requests": requests, "requests_per_second": round(requests / seconds, 1),
        "granted_reserves_per_second": round(granted / seconds, 1),
        **summarize_latencies(all_latencies),
        "server_cpu_seconds": round(cpu_seconds, 3), "server_cpu_window_seconds": round(window_seconds, 3),
        "server_cpu_us_per_request": round(cpu_seconds * 1e6 / requests, 2) if requests else None,
        "replies": merged["replies"], "error_codes": merged["error_codes"],
        "connection_errors": merged["connection_errors"][:10],
        "series": [
            {"second": index, "requests": merged["requests"][index], "granted": merged["granted"][index],
             **summarize_latencies(merged["latencies"][index])}
            for index in range(len(merged["requests"]))
        ],
    }
    if checked:
        if workload.ttl_ms:
            after = trio.run(wait_for_expiry, system, keys, 0)
        else:
            after = trio.run(systems.read_stock, system, keys)
        measurement["verification"] = verify(system, workload, before, after, merged["history"], merged)
    else:
        measurement["verification"] = {"checked": False, "ok": True, "why": "echo keeps no stock"}
    return measurement


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
                        run_one(args, system, workload_name, "pooled", rate, args.paced_seconds, run_number, output)
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

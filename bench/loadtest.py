"""`scripts/loadtest` (`python -m bench.loadtest`): the operator's front to the bench's generator.

Point it at a running engine (--connect HOST:PORT, with a token if the server wants one:
--token-file FILE or $ENGINE_TOKEN, or --token; --tls-ca FILE and the other --tls-* options for a
server that speaks TLS), or let it start one on a temporary folder (stopped at the end). It loads stock on SKU-locations of its
own (a SKU prefix unique to the run: no other stock is read or changed), drives one workload for
--seconds with a live progress line on stderr, then prints throughput, latency percentiles,
error counts and the verdict, and writes JSON and a PNG plot (--out PREFIX: PREFIX.json,
PREFIX.png).

Workloads:
  hot      single-line reserves over 10 SKU-locations whose stock is half the reserves in
           flight (demand above stock: many `insufficient`); each granted one released again
  uniform  the same over 10,000 SKU-locations, ample stock
  orders   reserves of 1-5 lines (qty 1-3) over 1,000 SKU-locations, then release

The verdict, read after the run: per SKU-location, what the acknowledged history holds (granted -
released - committed) is not above its stock, the server does not show reserved > on_hand, and
the server's final on_hand/reserved equal the acknowledged history.

Exit status: 0 verdict OK; 1 oversell, disagreement with the acknowledged history, or a run that
could not be verified; 2 bad arguments, server unreachable, refusing us (token, TLS) or not started.
"""

from __future__ import annotations

import argparse
import json
import secrets
import ssl
import sys
import time
from pathlib import Path

from bench import report, systems
from bench.cli import machine_info
from bench.measure import Load, measure
from bench.workloads import WORKLOADS, Workload
from protocol import (
    Client,
    ConnectionClosed,
    ConnectOptions,
    ConnectOptionsError,
    ProtocolViolation,
    ServerError,
    TlsOptionsError,
    add_connect_arguments,
    connect_options,
    parse_address,
    tls_refusal,
)

LOADTEST_WORKLOADS = ("hot", "uniform", "orders")
HOT_DEMAND_OVER_STOCK = 2  # hot: reserves in flight per SKU-location are twice its stock
PREFLIGHT_TIMEOUT_SECONDS = 5.0
RESULTS = systems.ROOT / "bench" / "results"
EXIT_OK, EXIT_VERDICT, EXIT_USAGE = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    """The command line of `scripts/loadtest`."""
    parser = argparse.ArgumentParser(prog="scripts/loadtest", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connect", metavar="HOST:PORT", default=None,
                        help="a running engine (default: start one on a temporary folder, stopped at the end)")
    parser.add_argument("--workload", choices=LOADTEST_WORKLOADS, default="hot", help="default %(default)s")
    parser.add_argument("--connections", type=int, default=64, help="default %(default)s")
    parser.add_argument("--depth", type=int, default=1,
                        help="requests in flight per connection: 1 = pooled, more = pipelined (default %(default)s)")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds (default %(default)s)")
    parser.add_argument("--warmup-seconds", type=float, default=0.5,
                        help="load before the measured window, not counted (default %(default)s)")
    parser.add_argument("--rate", type=float, default=None,
                        help="paced: R requests/s over all connections (depth 1), latency from each request's "
                             "scheduled send time (default: closed loop, as fast as replies come)")
    parser.add_argument("--processes", type=int, default=1,
                        help="generator processes, the connections split between them (default %(default)s)")
    parser.add_argument("--stock", type=int, default=None,
                        help="on_hand loaded per SKU-location (default: hot, half the reserves in flight per "
                             "SKU-location; uniform and orders, 1,000,000)")
    parser.add_argument("--out", metavar="PREFIX", default=None,
                        help="writes PREFIX.json and PREFIX.png (default bench/results/loadtest-<timestamp>)")
    # --token (sent in hello on every connection), --token-file, --tls-ca, ...: as the shell and the sync.
    add_connect_arguments(parser)
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parsed and checked arguments; a bad one exits with status 2 and says why."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.connections < 1 or args.depth < 1 or args.processes < 1 or args.seconds <= 0 or args.warmup_seconds < 0:
        parser.error("--connections, --depth, --processes and --seconds must be positive")
    if args.rate is not None and args.rate <= 0:
        parser.error("--rate must be positive")
    if args.rate is not None and args.depth != 1:
        parser.error("--rate paces one request at a time per connection: leave --depth at 1")
    if args.stock is not None and args.stock < 1:
        parser.error("--stock must be at least 1")
    if args.connect is not None:
        try:
            args.host, args.port = parse_address(args.connect)
        except ValueError as error:
            parser.error(str(error))
    try:
        args.connect_options = connect_options(args)
    except ConnectOptionsError as error:
        parser.error(str(error))
    if args.connect_options.tls is not None and args.connect is None:
        parser.error("the --tls options are for --connect: the engine the load test starts itself speaks plaintext")
    args.processes = min(args.processes, args.connections)
    return args


def default_stock(workload: Workload, lanes: int) -> int:
    """hot: stock below the reserves in flight (demand above stock); the others: the workload's own."""
    if workload.name != "hot":
        return workload.stock_per_key
    return max(1, lanes // (workload.key_count * HOT_DEMAND_OVER_STOCK))


def check_reachable(host: str, port: int, connect: ConnectOptions, ssl_context: ssl.SSLContext | None,
                    probe_key: tuple[str, str]) -> str | None:
    """None when the engine answers `hello` and a `get` (of one of this run's own SKU-locations); else why not."""
    server_hostname = None if connect.tls is None else connect.tls.server_hostname(host)
    try:
        with Client(host, port, timeout_seconds=PREFLIGHT_TIMEOUT_SECONDS, ssl_context=ssl_context,
                    server_hostname=server_hostname) as client:
            client.hello(token=connect.token)
            client.get(*probe_key)
    except ServerError as error:
        if error.code == "unauthorized":
            hint = "a wrong token" if connect.token else "it needs a token: --token-file FILE, $ENGINE_TOKEN or --token"
            return f"{host}:{port} refused us ({error.code}): {hint}"
        return f"{host}:{port} answered {error.code}: {error}"
    except (OSError, ConnectionClosed, ProtocolViolation) as error:  # ssl.SSLError is an OSError
        refusal = tls_refusal(error, connect.tls)
        if refusal is not None:
            return f"TLS with {host}:{port} failed: {refusal}"
        return f"cannot reach an engine at {host}:{port}: {type(error).__name__}: {error}"
    return None


# --- what it prints -----------------------------------------------------------------------


def verdict_text(verification: dict) -> str:
    """The verdict line: OK with the count of acknowledged changes, or every failed check."""
    if verification["ok"]:
        worst = verification["worst_sku_location"]
        fullest = "" if worst is None else f" (fullest SKU-location {worst['key']}: {worst['held']:,} held of {worst['on_hand']:,} at the end)"
        return (f"verdict: OK — no oversell, server agrees with {verification['acknowledged_changes']:,} "
                f"acknowledged changes{fullest}")
    problems = []
    if verification.get("history_oversold_sku_locations"):
        worst = verification["worst_sku_location"]
        problems.append(f"oversell in the acknowledged history at {verification['history_oversold_sku_locations']} "
                        f"SKU-location(s) (worst {worst['key']}: {worst['held']:,} held, {worst['on_hand']:,} on hand)")
    if verification.get("oversold_sku_locations"):
        problems.append(f"the server shows reserved > on_hand at {verification['oversold_sku_locations']} SKU-location(s)")
    if verification.get("mismatched_sku_locations"):
        examples = "; ".join(f"{example['key']} expected on_hand/reserved {example['expected'][0]:,}/{example['expected'][1]:,}, "
                             f"server {example['found'][0]:,}/{example['found'][1]:,}"
                             for example in verification["mismatch_examples"])
        problems.append(f"the server disagrees with the acknowledged history at "
                        f"{verification['mismatched_sku_locations']} SKU-location(s): {examples}")
    if not verification.get("history_complete", True):
        problems.append("not every request was answered, so the history is incomplete and cannot be checked")
    return "verdict: FAILED — " + "; ".join(problems or ["see 'verdict' in the JSON"])


def verdict_exit_code(verification: dict) -> int:
    """0 when the verdict is OK, 1 otherwise."""
    return EXIT_OK if verification["ok"] else EXIT_VERDICT


def _milliseconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} ms"


def summary_lines(measurement: dict) -> list[str]:
    """Throughput, latency, replies and errors of one run, as printed."""
    replies = ", ".join(f"{name.replace(':', ' ')} {count:,}" for name, count in sorted(measurement["replies"].items()))
    errors = ", ".join(f"{code} {count:,}" for code, count in sorted(measurement["error_codes"].items())) or "none"
    lines = [
        f"throughput: {measurement['requests_per_second']:,.0f} requests/s, "
        f"{measurement['granted_reserves_per_second']:,.0f} granted reserves/s "
        f"({measurement['requests']:,} replies in {measurement['seconds']:g} s)",
        f"latency: p50 {_milliseconds(measurement['latency_ms_p50'])}, p99 {_milliseconds(measurement['latency_ms_p99'])}, "
        f"p99.9 {_milliseconds(measurement['latency_ms_p999'])}"
        + (" (from each request's scheduled send time)" if measurement["rate_target"] else ""),
        f"replies (whole run): {replies or 'none'}",
        f"errors by code: {errors}",
    ]
    for error in measurement["connection_errors"]:
        lines.append(f"connection error: {error}")
    return lines


# --- the run ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Run one load test; returns the exit status."""
    args = parse_args(argv)
    started = time.time()
    run_id = f"lt{time.strftime('%Y%m%d%H%M%S', time.localtime(started))}{secrets.token_hex(2)}"
    workload = WORKLOADS[args.workload]
    lanes = args.connections * args.depth
    load = Load(workload=args.workload, connections=args.connections, depth=args.depth, seconds=args.seconds,
                warmup_seconds=args.warmup_seconds, processes=args.processes, rate=args.rate,
                stock_per_key=args.stock or default_stock(workload, lanes), sku_prefix=f"{run_id}-", run_tag=run_id)
    keys = load.keys()
    connect = args.connect_options
    if args.connect is not None:
        try:
            ssl_context = None if connect.tls is None else connect.tls.ssl_context()
        except TlsOptionsError as error:
            print(f"error: {error}", file=sys.stderr)
            return EXIT_USAGE
        problem = check_reachable(args.host, args.port, connect, ssl_context, keys[0])
        if problem is not None:
            print(f"error: {problem}", file=sys.stderr)
            return EXIT_USAGE
        system = systems.RemoteSystem(args.host, args.port, connect.token, connect.tls)
        where = f"{args.host}:{args.port}" + (" (TLS)" if connect.tls is not None else "")
    else:
        print("starting an engine on a temporary folder ...", file=sys.stderr, flush=True)
        try:
            system = systems.start_engine()
        except systems.SystemMissing as error:
            print(f"error: {error}", file=sys.stderr)
            return EXIT_USAGE
        where = f"{system.host}:{system.port} (started here, {system.version}, stopped at the end)"
    shape = f"paced at {args.rate:,.0f} requests/s" if args.rate else f"{args.depth} in flight each"
    print(f"loadtest: {args.workload} on {len(keys):,} SKU-locations {keys[0][0]}.. with {load.stock():,} on hand each; "
          f"{args.connections} connections, {shape}, {args.seconds:g} s; engine at {where}", file=sys.stderr, flush=True)
    try:
        measurement = measure(system, load, f"loadtest {args.workload} {args.connections}x{args.depth}")
    except Exception as error:  # the server went away, a generator died: no verdict possible
        print(f"error: the run did not complete: {type(error).__name__}: {error}", file=sys.stderr)
        if not system.alive():
            print(f"the server exited; its log ends: {system.log_tail(600)}", file=sys.stderr)
        return EXIT_VERDICT
    finally:
        system.stop()
    verification = measurement["verification"]
    verdict = verdict_text(verification)
    for line in summary_lines(measurement) + [verdict]:
        print(line)
    prefix = Path(args.out) if args.out else RESULTS / f"loadtest-{time.strftime('%Y%m%d-%H%M%S', time.localtime(started))}"
    prefix.parent.mkdir(parents=True, exist_ok=True)
    json_path = prefix.with_name(prefix.name + ".json")
    json_path.write_text(json.dumps(result_document(args, load, where, run_id, started, measurement, verdict), indent=1) + "\n")
    print(f"wrote {_shown(json_path)}", file=sys.stderr)
    title = (f"loadtest {args.workload}: {args.connections} connections x {args.depth}"
             + (f", paced {args.rate:,.0f}/s" if args.rate else "")
             + f", {args.seconds:g} s — verdict {'OK' if verification['ok'] else 'FAILED'}")
    print(report.plot_run(measurement, title, str(_shown(prefix.with_name(prefix.name + ".png")))), file=sys.stderr)
    return verdict_exit_code(verification)


def _shown(path: Path) -> Path:
    """`path` relative to the current folder when it is below it (shorter to read), else as given."""
    try:
        return path.resolve().relative_to(Path.cwd())
    except ValueError:
        return path


def result_document(args: argparse.Namespace, load: Load, where: str, run_id: str, started: float,
                    measurement: dict, verdict: str) -> dict:
    """The JSON written next to the plot: config, figures, per-second series, verdict."""
    return {
        "tool": "scripts/loadtest",
        "run_id": run_id,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(),
        "config": {
            "server": where, "started_here": args.connect is None, "token": args.connect is not None and args.connect_options.token is not None,
            "tls": args.connect_options.tls is not None,
            "workload": args.workload, "connections": args.connections, "depth": args.depth, "rate": args.rate,
            "seconds": args.seconds, "warmup_seconds": args.warmup_seconds, "processes": args.processes,
            "sku_prefix": load.sku_prefix, "sku_locations": len(load.keys()), "stock_per_sku_location": load.stock(),
        },
        "throughput": {"requests": measurement["requests"], "requests_per_second": measurement["requests_per_second"],
                       "granted_reserves_per_second": measurement["granted_reserves_per_second"]},
        "latency_ms": {name: measurement[f"latency_ms_{name}"] for name in ("p50", "p99", "p999")},
        "server_cpu_us_per_request": measurement["server_cpu_us_per_request"],
        "replies": measurement["replies"],
        "error_codes": measurement["error_codes"],
        "connection_errors": measurement["connection_errors"],
        "series": measurement["series"],
        "verdict": {**measurement["verification"], "text": verdict},
        "ok": measurement["verification"]["ok"],
    }


if __name__ == "__main__":
    sys.exit(main())

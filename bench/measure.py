"""One measurement, the part `python -m bench` and `scripts/loadtest` share: load stock, run the
generator processes over a window (with a live progress line), read the stock back and verify it
against the acknowledged history.

The verdict (`verify`) is a pure function of the figures read before and after and of the history
of ok replies, so it is tested without a server.
"""

from __future__ import annotations

import math
import multiprocessing
import socket
import sys
import time
from array import array
from dataclasses import dataclass

import trio

from bench import systems
from bench.generator import PROGRESS_FIELDS
from bench.postgres_peer import startup_message
from bench.workloads import WORKLOADS, History

EXPIRY_WAIT_MAX_SECONDS = 20.0
PROGRESS_WIDTH = 78
MISMATCH_EXAMPLES_MAX = 5
CONNECTION_ERRORS_KEPT_MAX = 10


@dataclass(frozen=True)
class Load:
    """The shape of one measurement."""

    workload: str
    connections: int
    depth: int                        # requests in flight per connection (1: pooled); paced runs use 1
    seconds: float                    # the measured window
    warmup_seconds: float             # load before the window, not counted
    processes: int = 1                # generator processes; the connections are split between them
    rate: float | None = None         # paced: requests/s over all connections
    stock_per_key: int | None = None  # on_hand loaded per SKU-location; None: the workload's own
    sku_prefix: str = ""              # "": the workload's own SKU-locations; else a set of this run's own
    run_tag: str = "0"                # makes rids and stock-loading keys unique to this run
    idle_connections: int = 0         # extra connections held open, idle, during the window
    progress_interval_seconds: float = 1.0

    def keys(self) -> list[tuple[str, str]]:
        """The SKU-locations this load reserves, in the index order of its history."""
        return WORKLOADS[self.workload].keys(self.sku_prefix)

    def stock(self) -> int:
        """on_hand each SKU-location is loaded up to before the window."""
        return WORKLOADS[self.workload].stock_per_key if self.stock_per_key is None else self.stock_per_key


# --- progress -----------------------------------------------------------------------------


class Progress:
    """One live line on stderr: rewritten in place on a terminal, a line per interval otherwise."""

    def __init__(self, label: str, start_at: float, stop_at: float, interval_seconds: float) -> None:
        self.label = label
        self.start_at = start_at
        self.stop_at = stop_at
        self.interval_seconds = interval_seconds
        self.interactive = sys.stderr.isatty()
        self.last_print_at = 0.0
        self.last_requests = 0

    def show(self, requests: int, granted: int, errors: int) -> None:
        """Print the line if an interval has passed: rate since the last line, totals so far."""
        now = time.perf_counter()
        if now - self.last_print_at < self.interval_seconds:
            return
        elapsed = now - self.start_at
        if elapsed < 0:
            text = f"{self.label}: warming up ({-elapsed:.1f} s)"
        else:
            since = max(self.start_at, self.last_print_at)
            rate = (requests - self.last_requests) / max(now - since, 1e-3)
            shown = min(elapsed, self.stop_at - self.start_at)
            text = (f"{self.label}: {shown:5.1f} s  {rate:>9,.0f} requests/s  granted {granted:,}"
                    f"  errors {errors:,}")
            self.last_requests = requests
        self.last_print_at = now
        end = "\r" if self.interactive else "\n"
        print(f"{text:<{PROGRESS_WIDTH}}", end=end, file=sys.stderr, flush=True)

    def done(self) -> None:
        """Clear the line on a terminal, so what follows starts clean."""
        if self.interactive:
            print(" " * PROGRESS_WIDTH, end="\r", file=sys.stderr, flush=True)


# --- running the generator processes ------------------------------------------------------


def open_idle_connections(system, count: int) -> list[socket.socket]:
    """`count` connections that send nothing (postgres: after its startup handshake)."""
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


def run_generators(system, load: Load, label: str) -> tuple[dict, float | None, float]:
    """Run `load` in `load.processes` processes; returns (merged result, server cpu s or None, window s)."""
    process_count = load.processes
    numbers = list(range(load.connections))
    launch_at = time.perf_counter()
    spawn_seconds = 0.3 + 0.002 * load.connections
    load_at = launch_at + spawn_seconds
    start_at = load_at + load.warmup_seconds
    stop_at = start_at + load.seconds
    specs = []
    for index in range(process_count):
        specs.append({
            "kind": system.kind, "host": system.host, "port": system.port, "token": system.token,
            "tls": getattr(system, "tls", None), "tls_library": getattr(system, "tls_library", "lean"),
            "workload": load.workload, "sku_prefix": load.sku_prefix,
            "depth": load.depth, "rate": load.rate, "connections_total": load.connections,
            "connection_numbers": numbers[index::process_count], "load_at": load_at,
            "start_at": start_at, "stop_at": stop_at, "seed": _seed(load.run_tag) * 1000 + index,
            "rid_prefix": f"b{load.run_tag}p{index}.",
        })
    context = multiprocessing.get_context("fork")
    counters = context.RawArray("q", process_count * len(PROGRESS_FIELDS))
    queue = context.Queue()
    processes = [context.Process(target=_run_process_reporting, args=(spec, counters, index, queue), daemon=True)
                 for index, spec in enumerate(specs)]
    for process in processes:
        process.start()
    progress = Progress(label, start_at, stop_at, load.progress_interval_seconds)
    cpu_before = cpu_after = None
    results: dict[int, dict] = {}
    while len(results) < process_count:
        now = time.perf_counter()
        if cpu_before is None and now >= start_at:
            cpu_before = (system.cpu_seconds(), now)
        if cpu_after is None and now >= stop_at:
            cpu_after = (system.cpu_seconds(), now)
        progress.show(*_progress_totals(counters))
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
    cpu_seconds = None if cpu_before[0] is None or cpu_after[0] is None else cpu_after[0] - cpu_before[0]
    return merged, cpu_seconds, cpu_after[1] - cpu_before[1]


def _seed(run_tag: str) -> int:
    """A number per run (the bench's tags are numbers already; others are hashed stably)."""
    return int(run_tag) if run_tag.isdigit() else int.from_bytes(run_tag.encode()[-6:], "big")


def _progress_totals(counters) -> tuple[int, ...]:
    width = len(PROGRESS_FIELDS)
    return tuple(sum(counters[field::width]) for field in range(width))


def _run_process_reporting(spec, counters, index, queue) -> None:
    from bench.generator import run_process

    try:
        run_process(spec, counters, index, queue)
    except BaseException as error:  # report instead of hanging the parent
        queue.put((index, {"fatal": f"{type(error).__name__}: {error}"}))


def merge(parts: list[dict]) -> dict:
    """One result from the generator processes' results (buckets, histories and counts summed)."""
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


# --- figures ------------------------------------------------------------------------------


def percentile(ordered, fraction: float) -> float | None:
    """The nearest-rank percentile of already sorted values (None when there are none)."""
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, int(math.ceil(fraction * len(ordered))) - 1)]


def summarize_latencies(values) -> dict:
    """latency_ms_p50 / _p99 / _p999 of latencies given in seconds."""
    ordered = sorted(values)
    return {f"latency_ms_{name}": (None if percentile(ordered, fraction) is None else round(percentile(ordered, fraction) * 1000, 3))
            for name, fraction in (("p50", 0.50), ("p99", 0.99), ("p999", 0.999))}


def acknowledged_changes(replies: dict[str, int]) -> int:
    """How many ok replies changed stock (every op a workload sends does: reserve, release, commit, adjust)."""
    return sum(count for name, count in replies.items() if name.endswith(":ok"))


# --- the verdict --------------------------------------------------------------------------


def verify(keys: list[tuple[str, str]], before: list[tuple[int, int]], after: list[tuple[int, int]],
           history: History, *, exact_reserved: bool, history_complete: bool, changes: int) -> dict:
    """No oversell, and the server's final figures equal the acknowledged history.

    `before`/`after`: (on_hand, reserved) per key as the server reported them. Three checks:
    the server holds no key with reserved > on_hand; from the history, no key's holds
    (reserved before + granted - released - committed) exceed its stock (on_hand before +
    adjusted - committed); and each key's after figures equal that history. The last two need
    `exact_reserved` (no expiries, which are not acknowledged to the client) and
    `history_complete` (every request answered); otherwise the stock must just be back to
    reserved == 0 (expiry) or the history is not checked (incomplete).
    """
    server_oversold = [index for index, (on_hand, reserved) in enumerate(after) if reserved > on_hand]
    history_oversold = []
    mismatched = []
    worst = None
    for index, ((on_hand_before, reserved_before), (on_hand_after, reserved_after)) in enumerate(zip(before, after)):
        stock = on_hand_before + history.adjusted[index] - history.committed[index]
        held = reserved_before + history.granted[index] - history.released[index] - history.committed[index]
        expected_reserved = held if exact_reserved else 0  # not exact: every reservation has expired by now
        if exact_reserved:
            if worst is None or held - stock > worst["held"] - worst["on_hand"]:
                worst = {"key": "/".join(keys[index]), "held": held, "on_hand": stock}
            if held > stock:
                history_oversold.append(index)
        if (on_hand_after, reserved_after) != (stock, expected_reserved):
            mismatched.append({"key": "/".join(keys[index]), "expected": [stock, expected_reserved],
                               "found": [on_hand_after, reserved_after]})
    checked_history = exact_reserved and history_complete
    ok = not server_oversold and history_complete and not mismatched and not (checked_history and history_oversold)
    return {
        "checked": True,
        "oversold_sku_locations": len(server_oversold),
        "history_oversold_sku_locations": len(history_oversold) if checked_history else None,
        "worst_sku_location": worst if checked_history else None,
        "mismatched_sku_locations": len(mismatched) if history_complete else None,
        "mismatch_examples": mismatched[:MISMATCH_EXAMPLES_MAX] if history_complete else [],
        "history_complete": history_complete,
        "acknowledged_changes": changes,
        "ok": ok,
    }


# --- one measurement ----------------------------------------------------------------------


async def wait_for_expiry(system, keys) -> list:
    """mixed: every reservation has a short ttl; wait until the server expired them all."""
    deadline = time.monotonic() + EXPIRY_WAIT_MAX_SECONDS
    while True:
        stock = await systems.read_stock(system, keys)
        if all(reserved == 0 for _, reserved in stock) or time.monotonic() > deadline:
            return stock
        await trio.sleep(0.5)


def _read_settled_stock(system, load: Load, keys) -> list[tuple[int, int]]:
    if WORKLOADS[load.workload].ttl_ms:
        return trio.run(wait_for_expiry, system, keys)
    return trio.run(systems.read_stock, system, keys)


def measure(system, load: Load, label: str) -> dict:
    """Load stock (not timed), run `load` against `system`, then read back and verify.

    Returns the measurement: throughput, latency percentiles, replies and error codes, the
    per-second `series` and the `verification`. Echo keeps no stock: it is not verified.
    """
    workload = WORKLOADS[load.workload]
    keys = load.keys()
    checked = system.kind != "echo"
    before = None
    if checked:
        trio.run(systems.top_up_stock, system, keys, load.stock(), load.run_tag)
        before = _read_settled_stock(system, load, keys)
    idle = open_idle_connections(system, load.idle_connections)
    try:
        merged, cpu_seconds, window_seconds = run_generators(system, load, label)
    finally:
        for connection in idle:
            connection.close()
    requests = sum(merged["requests"])
    granted = sum(merged["granted"])
    all_latencies = array("d")
    for bucket in merged["latencies"]:
        all_latencies.extend(bucket)
    measurement = {
        "workload": load.workload, "connections": load.connections, "depth": 1 if load.rate else load.depth,
        "rate_target": load.rate, "seconds": load.seconds, "idle_connections": load.idle_connections,
        "requests": requests, "requests_per_second": round(requests / load.seconds, 1),
        "granted_reserves_per_second": round(granted / load.seconds, 1),
        **summarize_latencies(all_latencies),
        "server_cpu_seconds": None if cpu_seconds is None else round(cpu_seconds, 3),
        "server_cpu_window_seconds": round(window_seconds, 3),
        "server_cpu_us_per_request": round(cpu_seconds * 1e6 / requests, 2) if requests and cpu_seconds is not None else None,
        "replies": merged["replies"], "error_codes": merged["error_codes"],
        "connection_errors": merged["connection_errors"][:CONNECTION_ERRORS_KEPT_MAX],
        "series": [
            {"second": index, "requests": merged["requests"][index], "granted": merged["granted"][index],
             **summarize_latencies(merged["latencies"][index])}
            for index in range(len(merged["requests"]))
        ],
    }
    if checked:
        after = _read_settled_stock(system, load, keys)
        measurement["verification"] = verify(
            keys, before, after, merged["history"], exact_reserved=workload.exact_reserved,
            history_complete=merged["unanswered"] == 0 and not merged["connection_errors"],
            changes=acknowledged_changes(merged["replies"]))
    else:
        measurement["verification"] = {"checked": False, "ok": True, "why": "echo keeps no stock"}
    return measurement

"""Do snapshots pause serving? p99 of a steady moderate load with and without snapshots, at
1,000,000 SKU-locations and 1,000,000 open reservations.

For each snapshot builder (`--builders`, default: `process` then `loop`, the old way) it starts a
server on a temporary folder, loads the SKU-locations (batch counts) and one open reservation on
each, restarts the server on that data (so the state is recovered and frozen, as a server
holding that much normally has it), measures the pooled peak briefly (`--peak-seconds`,
`--peak-connections` x 1 in flight) and then runs a paced load at `--peak-fraction` of that peak
(or `--rate`): reserve then release of a random SKU-location, `--connections` connections x 1 in
flight, latency counted from each request's SCHEDULED send time (a stall delays every request
behind it: no coordinated omission). In that one run on that one server, phases of
`--window-seconds` alternate (`--rounds` pairs): without snapshots, then with snapshots taken
one after the other (`--snapshot-gap-seconds` apart) through the `snapshot` op. Alternating
spreads the noise of a shared machine (and the server's own minute-by-minute housekeeping)
over both kinds of phase. It prints p50/p99/max over all phases of each kind and their ratio
(and the p99 of every phase), and writes everything to `--output` (JSON).

    .venv/bin/python bench/snapshot_pause.py
    .venv/bin/python bench/snapshot_pause.py --sku-locations 200000 --reservations 200000 --window-seconds 10
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import trio

from loading import ROOT, cpu_count, load_batches, load_reservations, python_version, resident_bytes, sku_location, start_server, stop_server
from protocol import LINES_PER_BATCH_MAX, ClientProtocol, open_trio_client

MIB = 1024**2
RECEIVE_BYTES_MAX = 1 << 16
SNAPSHOT_SECONDS_MAX = 600.0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sku-locations", type=int, default=1_000_000)
    parser.add_argument("--reservations", type=int, default=1_000_000, help="open reservations (one per SKU-location, at most --sku-locations)")
    parser.add_argument("--locations-per-sku", type=int, default=5)
    parser.add_argument("--builders", default="process,loop", help="snapshot builders to measure, in order (process, loop)")
    parser.add_argument("--peak-seconds", type=float, default=3.0)
    parser.add_argument("--peak-connections", type=int, default=64)
    parser.add_argument("--peak-fraction", type=float, default=0.25)
    parser.add_argument("--rate", type=float, default=None, help="requests/s of the paced load (default: --peak-fraction of the peak)")
    parser.add_argument("--connections", type=int, default=64, help="paced connections, 1 in flight each (enough that each sends far apart: a connection with a request in flight cannot send its next)")
    parser.add_argument("--warm-up-seconds", type=float, default=3.0)
    parser.add_argument("--window-seconds", type=float, default=15.0, help="length of each phase")
    parser.add_argument("--rounds", type=int, default=3, help="pairs of phases: without snapshots, then with")
    parser.add_argument("--snapshot-gap-seconds", type=float, default=1.0, help="pause between one snapshot's reply and the next request")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--output", default=str(ROOT / "bench" / "results" / "snapshot_pause.json"))
    args = parser.parse_args()
    args.reservations = min(args.reservations, args.sku_locations)
    return args


def percentile(sorted_values: list[float], fraction: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(fraction * len(sorted_values)))]


def summary(latencies: list[float], seconds: float) -> dict:
    values = sorted(latencies)
    return {
        "requests": len(values),
        "requests_per_second": round(len(values) / seconds),
        "p50_ms": round(percentile(values, 0.50) * 1000, 3),
        "p99_ms": round(percentile(values, 0.99) * 1000, 3),
        "p999_ms": round(percentile(values, 0.999) * 1000, 3),
        "max_ms": round(values[-1] * 1000, 3) if values else None,
    }


class Load:
    """Reserve-then-release on random loaded SKU-locations, one request in flight per connection."""

    def __init__(self, port: int, args: argparse.Namespace, run_id: str):
        self.port = port
        self.args = args
        self.run_id = run_id
        self.samples: list[tuple[float, float]] = []  # (scheduled or sent at, latency seconds)
        self.errors: dict[str, int] = {}

    def _next_request(self, codec: ClientProtocol, chooser: random.Random, state: dict) -> bytes:
        held = state.pop("held", None)
        if held is not None:
            return codec.request("release", rid=held)[1]
        state["number"] = state.get("number", 0) + 1
        rid = f"{self.run_id}-{state['lane']}-{state['number']}"
        state["sent_rid"] = rid
        sku, loc = sku_location(chooser.randrange(self.args.sku_locations), self.args.locations_per_sku)
        return codec.request("reserve", rid=rid, lines=[{"sku": sku, "loc": loc, "qty": 1}])[1]

    def _after(self, reply: dict, state: dict) -> None:
        rid = state.pop("sent_rid", None)
        if reply.get("ok"):
            if rid is not None:
                state["held"] = rid
        elif reply.get("error") != "insufficient":
            self.errors[reply.get("error", "?")] = self.errors.get(reply.get("error", "?"), 0) + 1

    async def _exchange(self, stream: trio.SocketStream, codec: ClientProtocol, request: bytes) -> dict:
        await stream.send_all(request)
        while True:
            replies = codec.receive_data(await stream.receive_some(RECEIVE_BYTES_MAX))
            if replies:
                (reply,) = replies
                return reply

    async def closed_loop(self, lane: int, stop_at: float, counts: list[int]) -> None:
        chooser, state, codec = random.Random(lane), {"lane": f"peak{lane}"}, ClientProtocol()
        async with await trio.open_tcp_stream("127.0.0.1", self.port) as stream:
            while time.perf_counter() < stop_at:
                self._after(await self._exchange(stream, codec, self._next_request(codec, chooser, state)), state)
                counts[0] += 1

    async def paced_until(self, lane: int, interval_seconds: float, first_at: float, stop: list[float]) -> None:
        """Send on a fixed schedule until the time in `stop[0]` (set when the phases are over)."""
        chooser, state, codec = random.Random(self.args.seed * 1000 + lane), {"lane": f"paced{lane}"}, ClientProtocol()
        scheduled_at = first_at
        async with await trio.open_tcp_stream("127.0.0.1", self.port) as stream:
            while scheduled_at < stop[0]:
                delay = scheduled_at - time.perf_counter()
                if delay > 0:
                    await trio.sleep(delay)
                reply = await self._exchange(stream, codec, self._next_request(codec, chooser, state))
                self.samples.append((scheduled_at, time.perf_counter() - scheduled_at))
                self._after(reply, state)
                scheduled_at += interval_seconds


async def peak(load: Load, seconds: float, connections: int) -> float:
    counts = [0]
    stop_at = time.perf_counter() + seconds
    async with trio.open_nursery() as nursery:
        for lane in range(connections):
            nursery.start_soon(load.closed_loop, lane, stop_at, counts)
    return counts[0] / seconds


async def snapshot_phases(port: int, phases_at: float, args: argparse.Namespace, phases: list[dict]) -> None:
    """Alternate phases without and with snapshots (`--rounds` of each). A phase with snapshots
    takes them one after the other for `--window-seconds` and ends when its last one is done,
    so no snapshot runs into the next quiet phase."""
    await trio.sleep(max(0.0, phases_at - time.perf_counter()))
    async with open_trio_client("127.0.0.1", port) as admin:
        for _ in range(args.rounds):
            quiet_at = time.perf_counter()
            await trio.sleep(args.window_seconds)
            phases.append({"snapshots": False, "start": quiet_at, "end": time.perf_counter(), "taken": []})
            busy_at = time.perf_counter()
            taken = []
            while time.perf_counter() < busy_at + args.window_seconds:
                started = time.perf_counter()
                with trio.fail_after(SNAPSHOT_SECONDS_MAX):
                    seq = (await admin.snapshot())["seq"]
                taken.append({"seq": seq, "seconds": round(time.perf_counter() - started, 3)})
                await trio.sleep(args.snapshot_gap_seconds)
            phases.append({"snapshots": True, "start": busy_at, "end": time.perf_counter(), "taken": taken})


async def measure_windows(port: int, load: Load, rate: float, args: argparse.Namespace) -> dict:
    """The paced load over a warm-up and the alternating phases; p99 over each kind of phase."""
    load_at = time.perf_counter() + 0.2
    phases_at = load_at + args.warm_up_seconds
    # Long enough for every phase (a phase with snapshots runs over by up to one snapshot).
    interval = args.connections / rate
    phases: list[dict] = []
    async with trio.open_nursery() as nursery:
        stop = [float("inf")]
        for lane in range(args.connections):
            nursery.start_soon(load.paced_until, lane, interval, load_at + lane / rate, stop)
        await snapshot_phases(port, phases_at, args, phases)
        stop[0] = time.perf_counter()
    quiet = [latency for at, latency in load.samples if any(not p["snapshots"] and p["start"] <= at < p["end"] for p in phases)]
    busy = [latency for at, latency in load.samples if any(p["snapshots"] and p["start"] <= at < p["end"] for p in phases)]
    quiet_seconds = sum(p["end"] - p["start"] for p in phases if not p["snapshots"])
    busy_seconds = sum(p["end"] - p["start"] for p in phases if p["snapshots"])
    per_phase = []
    for phase in phases:
        latencies = [latency for at, latency in load.samples if phase["start"] <= at < phase["end"]]
        per_phase.append({
            "snapshots": phase["snapshots"], "seconds": round(phase["end"] - phase["start"], 1),
            "p99_ms": summary(latencies, phase["end"] - phase["start"])["p99_ms"], "taken": phase["taken"],
        })
    return {
        "without_snapshots": summary(quiet, quiet_seconds),
        "with_snapshots": summary(busy, busy_seconds),
        "snapshots": [taken for phase in phases for taken in phase["taken"]],
        "phases": per_phase,
    }


def measure(builder: str, args: argparse.Namespace) -> dict:
    run_id = f"pause-{builder}-{time.time_ns()}"
    with tempfile.TemporaryDirectory(prefix=f"engine-snapshot-pause-{builder}-") as data_dir:
        server_args = ("--snapshot-builder", builder, "--snapshot-interval-seconds", "1000000", "--map-size-mb", "4096")
        process, port, log_path = start_server(data_dir, extra_args=server_args)
        try:
            started = time.perf_counter()
            trio.run(load_batches, port, args.sku_locations, args.locations_per_sku, 2, 32, LINES_PER_BATCH_MAX, run_id)
            trio.run(load_reservations, port, args.reservations, args.locations_per_sku, 4, 256, run_id)
            load_seconds = time.perf_counter() - started
            print(f"[{builder}] loaded {args.sku_locations:,} SKU-locations and {args.reservations:,} open reservations in {load_seconds:.1f} s", flush=True)
            # Restart on the same data, as a server that holds this much normally has: the
            # recovered state is frozen out of the cyclic collector's reach. (Grown since the
            # start instead, it is scanned by every full collection: ~0.65 s at this size, a
            # pause of its own that would drown what is measured here.)
            stop_server(process)
            restarted_at = time.perf_counter()
            process, port, log_path = start_server(data_dir, extra_args=server_args)
            restart_seconds = time.perf_counter() - restarted_at
            print(f"[{builder}] restarted (recovered from the shutdown snapshot) in {restart_seconds:.1f} s", flush=True)

            load = Load(port, args, run_id)
            peak_rate = trio.run(peak, load, args.peak_seconds, args.peak_connections)
            rate = args.rate or peak_rate * args.peak_fraction
            print(f"[{builder}] pooled peak {peak_rate:,.0f} requests/s ({args.peak_connections} x 1); paced load at {rate:,.0f} requests/s", flush=True)
            windows = trio.run(measure_windows, port, load, rate, args)
            rss_mib = resident_bytes(process.pid) / MIB
        finally:
            stop_server(process)
        server_log = Path(log_path).read_text()
    ratio = windows["with_snapshots"]["p99_ms"] / windows["without_snapshots"]["p99_ms"]
    builder_lines = [line for line in server_log.splitlines() if "engine.snapshot_builder" in line and "written" in line]
    return {
        "builder": builder,
        "load_seconds": round(load_seconds, 1),
        "restart_seconds": round(restart_seconds, 1),
        "pooled_peak_requests_per_second": round(peak_rate),
        "paced_rate": round(rate),
        **windows,
        "p99_ratio": round(ratio, 2),
        "errors": load.errors,
        "server_rss_mib": round(rss_mib),
        "builder_log": builder_lines,  # one line per snapshot: loaded or continued, records replayed, the time of each step
    }


def main() -> int:
    args = parse_args()
    results = []
    for builder in args.builders.split(","):
        result = measure(builder, args)
        results.append(result)
        quiet, busy = result["without_snapshots"], result["with_snapshots"]
        print(
            f"[{builder}] without snapshots: p50 {quiet['p50_ms']:.2f} ms, p99 {quiet['p99_ms']:.2f} ms, max {quiet['max_ms']:.1f} ms "
            f"({quiet['requests_per_second']:,}/s) | with {len(result['snapshots'])} snapshots "
            f"({', '.join(str(s['seconds']) for s in result['snapshots'])} s each): p50 {busy['p50_ms']:.2f} ms, "
            f"p99 {busy['p99_ms']:.2f} ms, max {busy['max_ms']:.1f} ms ({busy['requests_per_second']:,}/s) | p99 ratio {result['p99_ratio']:.2f}",
            flush=True,
        )
    report = {"arguments": vars(args), "cpus": cpu_count(), "python": python_version(), "results": results}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")
    failed = any(result["errors"] for result in results)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

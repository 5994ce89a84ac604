"""Oversell-free throughput: many pipelined connections reserving hot SKU-locations.

Starts a server process on a temporary data folder (or uses --port of a running one), stocks
`--skus` SKU-locations, then `--connections` connections keep `--depth` reserves in flight each
for `--seconds`. At the end it checks that the server's `reserved` equals what was granted and
never exceeds stock, prints the figures, and writes them as JSON.

    .venv/bin/python bench/reserve_load.py --seconds 10 --connections 64 --depth 16
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import trio

from loading import start_server  # bench/loading.py (this script's folder is on sys.path)
from protocol import ClientProtocol, Client

ROOT = Path(__file__).resolve().parent.parent


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=None, help="use a running server instead of starting one")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--depth", type=int, default=16, help="requests in flight per connection")
    parser.add_argument("--skus", type=int, default=100)
    parser.add_argument("--stock", type=int, default=1_000_000, help="on_hand per SKU-location")
    parser.add_argument("--lines-max", type=int, default=1, help="lines per reserve: 1..N")
    parser.add_argument("--release-ratio", type=float, default=0.5, help="share of granted reserves released again")
    parser.add_argument("--output", default=str(ROOT / "bench" / "results" / "reserve_load.json"))
    return parser.parse_args()


class Tally:
    def __init__(self) -> None:
        self.granted: Counter = Counter()
        self.released: Counter = Counter()
        self.replies = Counter()
        self.latencies_seconds: list[float] = []


async def connection_load(port: int, number: int, args: argparse.Namespace, skus: list[tuple[str, str]], tally: Tally, deadline: float) -> None:
    chooser = random.Random(number)
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    codec = ClientProtocol()
    in_flight: dict[int, tuple[float, str, list]] = {}
    counter = 0

    def next_request() -> bytes:
        nonlocal counter
        counter += 1
        lines = [(sku, loc, chooser.randint(1, 3)) for sku, loc in chooser.sample(skus, chooser.randint(1, args.lines_max))]
        rid = f"c{number}-{counter}"
        request_id, data = codec.request("reserve", rid=rid, lines=[{"sku": s, "loc": l, "qty": q} for s, l, q in lines])
        in_flight[request_id] = (time.perf_counter(), "reserve", lines)
        if chooser.random() < args.release_ratio:
            release_id, release = codec.request("release", rid=rid)
            in_flight[release_id] = (time.perf_counter(), "release", lines)
            data += release
        return data

    async with stream:
        await stream.send_all(b"".join(next_request() for _ in range(args.depth)))
        while in_flight:
            data = await stream.receive_some(1 << 16)
            if not data:
                raise RuntimeError("server closed the connection")
            now = time.perf_counter()
            outgoing = []
            for reply in codec.receive_data(data):
                started, op, lines = in_flight.pop(reply["id"])
                tally.latencies_seconds.append(now - started)
                outcome = "ok" if reply["ok"] else reply["error"]
                tally.replies[f"{op}:{outcome}"] += 1
                if reply["ok"] and op == "reserve" and not reply.get("duplicate"):
                    for sku, loc, qty in lines:
                        tally.granted[(sku, loc)] += qty
                if reply["ok"] and op == "release" and not reply.get("duplicate"):
                    for sku, loc, qty in lines:
                        tally.released[(sku, loc)] += qty
                if op == "reserve" and now < deadline:
                    outgoing.append(next_request())
            if outgoing:
                await stream.send_all(b"".join(outgoing))


async def run_load(port: int, args: argparse.Namespace, skus: list[tuple[str, str]]) -> tuple[Tally, float]:
    tally = Tally()
    started = time.perf_counter()
    deadline = started + args.seconds
    async with trio.open_nursery() as nursery:
        for number in range(args.connections):
            nursery.start_soon(connection_load, port, number, args, skus, tally, deadline)
    return tally, time.perf_counter() - started


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else 0.0


def main() -> int:
    args = parse_args()
    skus = [(f"sku-{index}", "dc-1") for index in range(args.skus)]
    process = None
    with tempfile.TemporaryDirectory(prefix="engine-bench-") as data_dir:
        if args.port is None:
            process, port, _ = start_server(data_dir)
        else:
            port = args.port
        try:
            with Client("127.0.0.1", port) as admin:
                run_id = f"{time.time_ns()}"
                for sku, loc in skus:
                    admin.send("adjust", key=f"bench-{run_id}-{sku}", sku=sku, loc=loc, delta=args.stock, reason="receipt")
                for _ in skus:
                    admin.receive_any()
                before = {key: admin.get(*key) for key in skus}
                print(f"load: {args.connections} connections x {args.depth} in flight, {args.skus} SKU-locations, {args.seconds:.0f} s ...", flush=True)
                tally, elapsed = trio.run(run_load, port, args, skus)
                after = {key: admin.get(*key) for key in skus}
                stats = admin.stats()
        finally:
            if process is not None:
                process.terminate()
                process.wait(timeout=30)
    oversold = 0
    mismatched = 0
    for key in skus:
        expected_reserved = before[key]["reserved"] + tally.granted[key] - tally.released[key]
        if after[key]["reserved"] != expected_reserved:
            mismatched += 1
        if after[key]["reserved"] > after[key]["on_hand"]:
            oversold += 1
    requests = sum(tally.replies.values())
    result = {
        "connections": args.connections,
        "depth": args.depth,
        "skus": args.skus,
        "lines_max": args.lines_max,
        "seconds": round(elapsed, 3),
        "requests": requests,
        "requests_per_second": round(requests / elapsed),
        "reserves_granted_per_second": round(tally.replies["reserve:ok"] / elapsed),
        "latency_ms_p50": round(percentile(tally.latencies_seconds, 0.50) * 1000, 3),
        "latency_ms_p99": round(percentile(tally.latencies_seconds, 0.99) * 1000, 3),
        "replies": dict(tally.replies),
        "commits": stats["wal"]["commits"],
        "records_per_commit_mean": round(stats["wal"]["records_committed"] / max(1, stats["wal"]["commits"]), 1),
        "oversold_sku_locations": oversold,
        "mismatched_sku_locations": mismatched,
    }
    print(json.dumps(result, indent=2))
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0 if oversold == 0 and mismatched == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

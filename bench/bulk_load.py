"""Bulk load: N SKU-locations (default 1,000,000) through batch `count`s.

Starts a server process on a temporary data folder (or uses --port of a running one), loads
`--sku-locations` SKU-locations in batch counts of `--lines-per-batch` lines (one key each),
pipelined over `--connections` connections with `--depth` batches in flight each. Then it checks
a random sample with `get` and the number of SKU-locations and keys with `stats`, reads the
server's resident memory (VmRSS), prints the figures and writes them as JSON. Exits non-zero
if anything does not match.

    .venv/bin/python bench/bulk_load.py
    .venv/bin/python bench/bulk_load.py --sku-locations 200000 --connections 4 --depth 8
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

from loading import (
    ROOT,
    cpu_seconds,
    load_batches,
    memory_status_bytes,
    on_hand_of,
    python_version,
    sku_location,
    slices,
    start_server,
    stop_server,
)
from protocol import LINES_PER_BATCH_MAX, Client

MIB = 1024**2
SAMPLE_SIZE = 1000


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=None, help="use a running (empty) server instead of starting one")
    parser.add_argument("--sku-locations", type=int, default=1_000_000)
    parser.add_argument("--locations-per-sku", type=int, default=5)
    parser.add_argument("--lines-per-batch", type=int, default=LINES_PER_BATCH_MAX)
    parser.add_argument("--connections", type=int, default=2)
    parser.add_argument("--depth", type=int, default=32, help="batches in flight per connection")
    parser.add_argument("--output", default=str(ROOT / "bench" / "results" / "bulk_load.json"))
    return parser.parse_args()


def verify(client: Client, args: argparse.Namespace, stocks_before: int, keys_before: int) -> list[str]:
    """Problems found: a sample of SKU-locations read back with `get`, and the counts in `stats`."""
    problems = []
    chooser = random.Random(1)
    for index in chooser.sample(range(args.sku_locations), min(SAMPLE_SIZE, args.sku_locations)):
        sku, loc = sku_location(index, args.locations_per_sku)
        reply = client.get(sku, loc)
        if reply["on_hand"] != on_hand_of(index):
            problems.append(f"{sku}/{loc}: on_hand {reply['on_hand']}, loaded {on_hand_of(index)}")
    stats = client.stats()
    batches = sum(-(-len(indices) // args.lines_per_batch) for indices in slices(args.sku_locations, args.connections))
    if stats["stocks"] - stocks_before != args.sku_locations:
        problems.append(f"stats: {stats['stocks'] - stocks_before} SKU-locations added, loaded {args.sku_locations}")
    if stats["keys"] - keys_before != batches:
        problems.append(f"stats: {stats['keys'] - keys_before} keys added, sent {batches} batches")
    return problems


def main() -> int:
    args = parse_args()
    run_id = f"bulk-{time.time_ns()}"
    with tempfile.TemporaryDirectory(prefix="engine-bulk-") as data_dir:
        process = None
        if args.port is None:
            process, port, _ = start_server(data_dir)
        else:
            port = args.port
        try:
            with Client("127.0.0.1", port, timeout_seconds=600) as client:
                client.hello()
                before = client.stats()
                server_cpu_before = cpu_seconds(process.pid) if process else 0.0
                print(
                    f"loading {args.sku_locations:,} SKU-locations in batch counts of {args.lines_per_batch} lines, "
                    f"{args.connections} connections x {args.depth} in flight ...", flush=True,
                )
                started = time.perf_counter()
                trio.run(load_batches, port, args.sku_locations, args.locations_per_sku, args.connections, args.depth, args.lines_per_batch, run_id)
                load_seconds = time.perf_counter() - started
                server_cpu_seconds = cpu_seconds(process.pid) - server_cpu_before if process else None
                memory = memory_status_bytes(process.pid) if process else None
                problems = verify(client, args, before["stocks"], before["keys"])
                wal = client.stats()["wal"]
        finally:
            if process is not None:
                stop_server(process)
    result = {
        "sku_locations": args.sku_locations,
        "locations_per_sku": args.locations_per_sku,
        "lines_per_batch": args.lines_per_batch,
        "connections": args.connections,
        "depth": args.depth,
        "load_seconds": round(load_seconds, 2),
        "sku_locations_per_second": round(args.sku_locations / load_seconds),
        "server_cpu_seconds": None if server_cpu_seconds is None else round(server_cpu_seconds, 2),
        "server_rss_mib": None if memory is None else round(memory["VmRSS"] / MIB, 1),
        "server_peak_rss_mib": None if memory is None else round(memory["VmHWM"] / MIB, 1),
        "log_commits": wal["commits"],
        "sample_checked": min(SAMPLE_SIZE, args.sku_locations),
        "problems": problems[:20],
        "python": python_version(),
    }
    print(json.dumps(result, indent=2))
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

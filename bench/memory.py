"""Resident memory of the server holding N SKU-locations and the ids used to load them.

Starts a server process on a temporary data folder, loads `--sku-locations` SKU-locations
(default 1,000,000) with stock — one `adjust` per SKU-location, one key each (default), or batch
`count`s (`--batch`) — pipelined over a few connections, waits for the queues to drain, then
reads the server's VmRSS from /proc/PID/status. Prints the load time, the resident memory, and
bytes per SKU-location (above the idle server's own), and writes them as JSON.

    .venv/bin/python bench/memory.py                 # 1M single adjusts, 1M remembered keys
    .venv/bin/python bench/memory.py --batch         # 1M SKU-locations in batch counts
    .venv/bin/python bench/memory.py --root /tmp/old-tree --output /tmp/old.json   # an older engine
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import trio

from loading import ROOT, load_batches, slices, load_singles, python_version, memory_status_bytes, resident_bytes, settle_seconds, start_server, stop_server
from protocol import Client

MIB = 1024**2


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sku-locations", type=int, default=1_000_000)
    parser.add_argument("--locations-per-sku", type=int, default=5, help="SKUs x locations shape of the load")
    parser.add_argument("--batch", action="store_true", help="load with batch counts instead of single adjusts")
    parser.add_argument("--lines-per-batch", type=int, default=3000)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--depth", type=int, default=None, help="requests in flight per connection (default 256 single, 4 batch)")
    parser.add_argument("--settle-seconds", type=float, default=4.0, help="wait before reading VmRSS (queues drain, the log commits)")
    parser.add_argument("--root", default=str(ROOT), help="source tree the server runs from (to measure an older engine)")
    parser.add_argument("--output", default=str(ROOT / "bench" / "results" / "memory.json"))
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    depth = args.depth or (4 if args.batch else 256)
    total = args.sku_locations
    run_id = f"mem-{time.time_ns()}"
    with tempfile.TemporaryDirectory(prefix="engine-memory-") as data_dir:
        process, port, _ = start_server(data_dir, Path(args.root))
        try:
            with Client("127.0.0.1", port, timeout_seconds=600) as admin:
                admin.hello()
                idle_rss_bytes = resident_bytes(process.pid)
                mode = f"batch counts of {args.lines_per_batch} lines" if args.batch else "single adjusts"
                print(f"loading {total:,} SKU-locations with {mode} over {args.connections} connections x {depth} ...", flush=True)
                started = time.perf_counter()
                if args.batch:
                    trio.run(load_batches, port, total, args.locations_per_sku, args.connections, depth, args.lines_per_batch, run_id)
                else:
                    trio.run(load_singles, port, total, args.locations_per_sku, args.connections, depth, run_id)
                load_seconds = time.perf_counter() - started
                loaded_rss_bytes = resident_bytes(process.pid)
                settled_rss_bytes = settle_seconds(process.pid, args.settle_seconds)
                status = memory_status_bytes(process.pid)
                stats = admin.stats()
        finally:
            stop_server(process)
    # Each connection loads its own slice in batches, so a slice's last batch may be short.
    expected_keys = sum(-(-len(indices) // args.lines_per_batch) for indices in slices(total, args.connections)) if args.batch else total
    result = {
        "sku_locations": total,
        "locations_per_sku": args.locations_per_sku,
        "mode": "batch" if args.batch else "single",
        "lines_per_batch": args.lines_per_batch if args.batch else 1,
        "connections": args.connections,
        "depth": depth,
        "load_seconds": round(load_seconds, 2),
        "sku_locations_per_second": round(total / load_seconds),
        "stocks": stats["stocks"],
        "keys_remembered": stats["keys"],
        "idle_rss_mib": round(idle_rss_bytes / MIB, 1),
        "loaded_rss_mib": round(loaded_rss_bytes / MIB, 1),
        "rss_mib": round(settled_rss_bytes / MIB, 1),
        "rss_anon_mib": round(status["RssAnon"] / MIB, 1),
        "rss_file_mib": round(status["RssFile"] / MIB, 1),
        "peak_rss_mib": round(status["VmHWM"] / MIB, 1),
        "bytes_per_sku_location": round(settled_rss_bytes / total),
        "bytes_per_sku_location_above_idle": round((settled_rss_bytes - idle_rss_bytes) / total),
        "server_root": args.root,
        "python": python_version(),
    }
    print(json.dumps(result, indent=2))
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")
    if stats["stocks"] != total or stats["keys"] != expected_keys:
        print(f"MISMATCH: expected {total} stocks and {expected_keys} keys", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The disk's own durable-commit latency, measured in the same run as the systems.

A paced p99 counts every stall of the disk: a reply that must wait for an fsync cannot come
sooner than the fsync. On a shared VM the fsync tail moves from minute to minute (p50 0.3 ms,
p99 anywhere from 1 to 15 ms here), so a paced p99 is read next to this probe, taken just
before it: sequential LMDB write transactions of one small record each, opened with the
engine's own durability options (`sync=True`, `metasync=True`), one fsync per transaction,
on the same file system as the engine's data, in a child process (its GIL is not the
generator's).

    python -m bench.disk_probe --seconds 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROBE_RECORD_BYTES = 256
PROBE_COMMITS_MAX = 100_000  # a bound on the loop, whatever the disk's speed


def commit_latencies_ms(seconds: float, folder: str | None = None) -> list[float]:
    """Latency of each one-record durable LMDB transaction, for about `seconds`."""
    import lmdb

    latencies: list[float] = []
    with tempfile.TemporaryDirectory(prefix="disk-probe-", dir=folder) as path:
        env = lmdb.open(path, map_size=256 * 1024**2, subdir=True, max_dbs=1, sync=True, metasync=True,
                        map_async=False, writemap=False, readahead=False, lock=True)
        try:
            log = env.open_db(b"log")
            record = b"x" * PROBE_RECORD_BYTES
            deadline = time.perf_counter() + seconds
            for seq in range(PROBE_COMMITS_MAX):
                started = time.perf_counter()
                if started >= deadline:
                    break
                with env.begin(write=True, db=log) as txn:
                    txn.put(seq.to_bytes(8, "big"), record, append=True)
                latencies.append((time.perf_counter() - started) * 1000)
        finally:
            env.close()
    return latencies


def summarize(latencies_ms: list[float]) -> dict:
    """Count, p50, p99, p99.9 and max of `latencies_ms` (None when empty)."""
    ordered = sorted(latencies_ms)

    def at(fraction: float) -> float | None:
        return round(ordered[min(len(ordered) - 1, int(fraction * len(ordered)))], 3) if ordered else None

    return {"commits": len(ordered), "fsync_ms_p50": at(0.50), "fsync_ms_p99": at(0.99),
            "fsync_ms_p999": at(0.999), "fsync_ms_max": round(ordered[-1], 3) if ordered else None}


def probe(seconds: float, folder: str | None = None) -> dict:
    """Run the probe in a child process and return its summary (an `error` key if it failed)."""
    command = [sys.executable, "-m", "bench.disk_probe", "--seconds", str(seconds), "--json"]
    if folder is not None:
        command += ["--folder", folder]
    try:
        finished = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=seconds + 30, check=True)
        return json.loads(finished.stdout)
    except (subprocess.SubprocessError, OSError, ValueError) as error:
        return {"error": f"{type(error).__name__}: {error}"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--folder", default=None, help="where the probe's LMDB goes (default: the temporary folder)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args()
    summary = summarize(commit_latencies_ms(args.seconds, args.folder))
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"{summary['commits']:,} durable LMDB commits: p50 {summary['fsync_ms_p50']} ms, "
              f"p99 {summary['fsync_ms_p99']} ms, p99.9 {summary['fsync_ms_p999']} ms, max {summary['fsync_ms_max']} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())

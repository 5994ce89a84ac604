"""Recovery time: how long a restart takes to replay the log, with and without a snapshot.

Writes `--records` changes (reserves over `--skus` SKU-locations) into a fresh server, kills it
with SIGKILL, and times the restart until it listens again. Then takes a snapshot, adds
`--tail` more changes, kills again and times the restart from snapshot + tail.

    .venv/bin/python bench/recovery_time.py --records 200000 --tail 10000
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from protocol import Client

ROOT = Path(__file__).resolve().parent.parent
LISTEN_LINE = re.compile(r"listening on [\d.]+:(\d+) \(data in .*, seq (\d+), (\d+) records replayed\)")


def start(data_dir: str) -> tuple[subprocess.Popen, int, float, int]:
    """Start a server; return (process, port, seconds until listening, records replayed)."""
    log_path = Path(data_dir) / f"server-{time.monotonic_ns()}.log"
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "engine", "serve", "--port", "0", "--data", data_dir],
        cwd=ROOT, stdout=open(log_path, "w"), stderr=subprocess.STDOUT,
    )
    while True:
        match = LISTEN_LINE.search(log_path.read_text())
        if match:
            return process, int(match.group(1)), time.perf_counter() - started, int(match.group(3))
        if process.poll() is not None:
            raise SystemExit(f"server exited:\n{log_path.read_text()}")
        time.sleep(0.01)


def load(port: int, prefix: str, records: int, skus: int) -> None:
    with Client("127.0.0.1", port, timeout_seconds=120) as client:
        for index in range(skus):
            client.send("adjust", key=f"{prefix}-stock-{index}", sku=f"sku-{index}", loc="dc", delta=10**9, reason="receipt")
        for _ in range(skus):
            client.receive_any()
        window = 2000
        for start_index in range(0, records, window):
            count = min(window, records - start_index)
            for offset in range(count):
                number = start_index + offset
                client.send("reserve", rid=f"{prefix}-{number}", lines=[{"sku": f"sku-{number % skus}", "loc": "dc", "qty": 1}])
            for _ in range(count):
                client.receive_any()


def kill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--tail", type=int, default=10_000)
    parser.add_argument("--skus", type=int, default=1000)
    parser.add_argument("--output", default=str(ROOT / "bench" / "results" / "recovery_time.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="engine-recovery-") as data_dir:
        process, port, _, _ = start(data_dir)
        loaded = time.perf_counter()
        load(port, "a", args.records, args.skus)
        load_seconds = time.perf_counter() - loaded
        kill(process)
        process, port, replay_seconds, replayed = start(data_dir)
        with Client("127.0.0.1", port) as client:
            snapshot_started = time.perf_counter()
            snapshot_seq = client.snapshot()["seq"]
            snapshot_seconds = time.perf_counter() - snapshot_started
        load(port, "b", args.tail, args.skus)
        kill(process)
        process, port, tail_seconds, tail_replayed = start(data_dir)
        process.terminate()
        process.wait()
    result = {
        "records": args.records + args.skus,
        "load_records_per_second": round((args.records + args.skus) / load_seconds),
        "restart_full_replay_seconds": round(replay_seconds, 3),
        "records_replayed": replayed,
        "replay_records_per_second": round(replayed / replay_seconds),
        "snapshot_seq": snapshot_seq,
        "snapshot_seconds": round(snapshot_seconds, 3),
        "restart_snapshot_plus_tail_seconds": round(tail_seconds, 3),
        "tail_records_replayed": tail_replayed,
    }
    print(json.dumps(result, indent=2))
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Recovery time: how long a restart takes to replay the log, with and without a snapshot.

Writes `--records` log records (single-line reserves over `--skus` SKU-locations, a
`--release-ratio` share of them followed by their release, both counting as records) into a
fresh server over `--connections` pipelined connections, kills it with SIGKILL, and times the
restart from `Popen` until the server logs that it listens: process start-up included. Then
takes a snapshot, adds `--tail` more records, kills again and times the restart from snapshot +
tail. The server's own start-up line (`started in ... s`) is copied into the result.

    .venv/bin/python bench/recovery_time.py --records 300000 --tail 10000
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

import trio

from protocol import Client, ClientProtocol

ROOT = Path(__file__).resolve().parent.parent
LISTEN_LINE = re.compile(r"listening on [\d.]+:(\d+) \(data in .*, seq (\d+), (\d+) records replayed\)")
STARTED_LINE = re.compile(r"started in [^\n]*")
# Requests a load connection keeps in flight: enough for the server to batch its commits.
DEPTH_PER_CONNECTION = 256


def start(data_dir: str) -> tuple[subprocess.Popen, int, float, int, str | None]:
    """Start a server; return (process, port, seconds until listening, records replayed, its
    own start-up line)."""
    log_path = Path(data_dir) / f"server-{time.monotonic_ns()}.log"
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "engine", "serve", "--port", "0", "--data", data_dir],
        cwd=ROOT, stdout=open(log_path, "w"), stderr=subprocess.STDOUT,
    )
    while True:
        text = log_path.read_text()
        match = LISTEN_LINE.search(text)
        if match:
            seconds = time.perf_counter() - started
            started_line = None
            for _ in range(100):  # logged right after the listen line
                started_match = STARTED_LINE.search(log_path.read_text())
                if started_match:
                    started_line = started_match.group(0)
                    break
                time.sleep(0.01)
            return process, int(match.group(1)), seconds, int(match.group(3)), started_line
        if process.poll() is not None:
            raise SystemExit(f"server exited:\n{log_path.read_text()}")
        time.sleep(0.005)


def load(port: int, prefix: str, records: int, skus: int, connections: int, release_ratio: float) -> None:
    """Stock the SKU-locations, then write `records` more log records: reserves, a
    `release_ratio` share of them released in the same pipeline."""
    with Client("127.0.0.1", port, timeout_seconds=120) as client:
        for index in range(skus):
            client.send("adjust", key=f"{prefix}-stock-{index}", sku=f"sku-{index}", loc="dc", delta=10**9, reason="receipt")
        for _ in range(skus):
            client.receive_any()
    # Reserve i is followed by its release when floor((i+1) r) > floor(i r): an exact share.
    requests = []
    number = 0
    while len(requests) < records:
        rid = f"{prefix}-{number}"
        requests.append(("reserve", {"rid": rid, "lines": [{"sku": f"sku-{number % skus}", "loc": "dc", "qty": 1}]}))
        if len(requests) < records and int((number + 1) * release_ratio) > int(number * release_ratio):
            requests.append(("release", {"rid": rid}))
        number += 1
    # Connection c sends requests c, c + n, c + 2n...: a rid's reserve and release may land on
    # different connections, so a release may arrive first and fail (`not_found`). Keep a
    # reserve and its release on one connection instead: split by reservation, in order.
    shares: list[list] = [[] for _ in range(connections)]
    index = 0
    while index < len(requests):
        group = 2 if index + 1 < len(requests) and requests[index + 1][0] == "release" else 1
        shares[(index // 2) % connections].extend(requests[index:index + group])
        index += group
    trio.run(_load_connections, port, shares)


async def _load_connections(port: int, shares: list[list]) -> None:
    async with trio.open_nursery() as nursery:
        for share in shares:
            nursery.start_soon(_load_one_connection, port, share)


async def _load_one_connection(port: int, share: list) -> None:
    codec = ClientProtocol()
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        sent = 0
        outstanding = 0
        while sent < len(share) or outstanding:
            batch = []
            while sent < len(share) and outstanding < DEPTH_PER_CONNECTION:
                op, fields = share[sent]
                batch.append(codec.request(op, **fields)[1])
                sent += 1
                outstanding += 1
            if batch:
                await stream.send_all(b"".join(batch))
            data = await stream.receive_some(1 << 16)
            if not data:
                raise RuntimeError("server closed the connection")
            for reply in codec.receive_data(data):
                if not reply.get("ok"):
                    raise RuntimeError(f"load request failed: {reply}")
                outstanding -= 1


def kill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--tail", type=int, default=10_000)
    parser.add_argument("--skus", type=int, default=1000)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--release-ratio", type=float, default=0.0, help="share of reserves released again (each release is a record)")
    parser.add_argument("--output", default=str(ROOT / "bench" / "results" / "recovery_time.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="engine-recovery-") as data_dir:
        process, port, _, _, _ = start(data_dir)
        loaded = time.perf_counter()
        load(port, "a", args.records, args.skus, args.connections, args.release_ratio)
        load_seconds = time.perf_counter() - loaded
        kill(process)
        process, port, replay_seconds, replayed, replay_started_line = start(data_dir)
        with Client("127.0.0.1", port) as client:
            snapshot_started = time.perf_counter()
            snapshot_seq = client.snapshot()["seq"]
            snapshot_seconds = time.perf_counter() - snapshot_started
        load(port, "b", args.tail, args.skus, args.connections, args.release_ratio)
        kill(process)
        process, port, tail_seconds, tail_replayed, tail_started_line = start(data_dir)
        process.terminate()
        process.wait()
    result = {
        "records": args.records + args.skus,
        "release_ratio": args.release_ratio,
        "connections": args.connections,
        "load_records_per_second": round((args.records + args.skus) / load_seconds),
        "restart_full_replay_seconds": round(replay_seconds, 3),
        "records_replayed": replayed,
        "replay_records_per_second": round(replayed / replay_seconds),
        "server_started_line": replay_started_line,
        "snapshot_seq": snapshot_seq,
        "snapshot_seconds": round(snapshot_seconds, 3),
        "restart_snapshot_plus_tail_seconds": round(tail_seconds, 3),
        "tail_records_replayed": tail_replayed,
        "tail_server_started_line": tail_started_line,
    }
    print(json.dumps(result, indent=2))
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

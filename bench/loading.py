"""What `bulk_load.py` and `memory.py` share: start a server, name SKU-locations, load stock
through pipelined connections (single `adjust`s or batch `count`s), read a process's memory.

Not a benchmark on its own. Every load checks each reply (`ok`, not a duplicate) and raises on
the first one that is not, so a figure is never printed for a load that did not happen.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import trio

from protocol import ClientProtocol

ROOT = Path(__file__).resolve().parent.parent

LISTEN_LINE = re.compile(r"listening on [\d.]+:(\d+)")
SERVER_START_SECONDS_MAX = 30.0
RECEIVE_BYTES_MAX = 1 << 20


def start_server(data_dir: str, root: Path = ROOT, extra_args: tuple[str, ...] = ()) -> tuple[subprocess.Popen, int, Path]:
    """`python -m engine serve` on a free port with data in `data_dir`. Returns `(process, port, log)`.

    `root` is the folder the server is started from (its `engine` package is the one imported),
    so a copy of an older tree can be measured with the same tool.
    """
    log_path = Path(data_dir) / "server.log"
    log_file = open(log_path, "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "engine", "serve", "--port", "0", "--data", data_dir, *extra_args],
        cwd=root, stdout=log_file, stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + SERVER_START_SECONDS_MAX
    while time.monotonic() < deadline:
        match = LISTEN_LINE.search(log_path.read_text())
        if match:
            return process, int(match.group(1)), log_path
        if process.poll() is not None:
            break
        time.sleep(0.05)
    process.kill()
    raise SystemExit(f"server did not start:\n{log_path.read_text()}")


def stop_server(process: subprocess.Popen) -> None:
    """SIGTERM (flush, snapshot, exit); SIGKILL if it does not stop within a minute."""
    process.terminate()
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


def memory_status_bytes(pid: int) -> dict[str, int]:
    """The memory lines of `/proc/PID/status` (VmRSS, RssAnon, RssFile, ...) in bytes."""
    figures = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if len(parts) == 2 and parts[1] == "kB":
            figures[name] = int(parts[0]) * 1024
    return figures


def resident_bytes(pid: int) -> int:
    """VmRSS of process `pid` (Linux `/proc/PID/status`), in bytes."""
    return memory_status_bytes(pid)["VmRSS"]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time process `pid` has used so far (Linux `/proc/PID/stat`)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def sku_location(index: int, locations_per_sku: int) -> tuple[str, str]:
    """The `index`-th SKU-location: SKUs numbered densely, each at `locations_per_sku` locations."""
    return f"SKU-{index // locations_per_sku:08d}", f"DC-{index % locations_per_sku:02d}"


def on_hand_of(index: int) -> int:
    """The stock loaded at the `index`-th SKU-location (1..1000: varied, never zero)."""
    return 1 + (index * 7919) % 1000


def slices(total: int, parts: int) -> Iterator[range]:
    """`range(total)` cut into `parts` consecutive slices (one per connection)."""
    step = -(-total // parts)
    for start in range(0, total, step):
        yield range(start, min(total, start + step))


class LoadFailed(Exception):
    """A load request was refused or came back a duplicate."""


async def _pipelined(port: int, frames: Iterator[bytes], codec: ClientProtocol, depth: int, check) -> None:
    """Send `frames` on one connection with at most `depth` unanswered; `check(reply)` each reply."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    in_flight = 0
    exhausted = False
    async with stream:
        while True:
            outgoing = []
            while not exhausted and in_flight + len(outgoing) < depth:
                frame = next(frames, None)
                if frame is None:
                    exhausted = True
                else:
                    outgoing.append(frame)
            if outgoing:
                in_flight += len(outgoing)
                await stream.send_all(b"".join(outgoing))
            if in_flight == 0 and exhausted:
                return
            data = await stream.receive_some(RECEIVE_BYTES_MAX)
            if not data:
                raise LoadFailed("the server closed the connection")
            for reply in codec.receive_data(data):
                in_flight -= 1
                check(reply)


def _check(reply: dict) -> None:
    if reply.get("ok") is not True or reply.get("duplicate"):
        raise LoadFailed(f"load request not applied: {reply!r}"[:500])


async def load_singles(port: int, total: int, locations_per_sku: int, connections: int, depth: int, run_id: str) -> None:
    """One `adjust` (receipt, one key each) per SKU-location, pipelined over `connections`."""

    async def connection(indices: range) -> None:
        codec = ClientProtocol()

        def frames() -> Iterator[bytes]:
            for index in indices:
                sku, loc = sku_location(index, locations_per_sku)
                yield codec.request("adjust", key=f"{run_id}-{index}", sku=sku, loc=loc, delta=on_hand_of(index), reason="receipt")[1]

        await _pipelined(port, frames(), codec, depth, _check)

    async with trio.open_nursery() as nursery:
        for indices in slices(total, connections):
            nursery.start_soon(connection, indices)


async def load_batches(port: int, total: int, locations_per_sku: int, connections: int, depth: int, lines_per_batch: int, run_id: str) -> None:
    """Batch `count`s of `lines_per_batch` lines (one key each), pipelined over `connections`."""

    async def connection(indices: range) -> None:
        codec = ClientProtocol()

        def frames() -> Iterator[bytes]:
            for start in range(indices.start, indices.stop, lines_per_batch):
                lines = []
                for index in range(start, min(indices.stop, start + lines_per_batch)):
                    sku, loc = sku_location(index, locations_per_sku)
                    lines.append({"sku": sku, "loc": loc, "on_hand": on_hand_of(index)})
                yield codec.request("count", key=f"{run_id}-batch-{start}", lines=lines, reason="initial load")[1]

        await _pipelined(port, frames(), codec, depth, _check)

    async with trio.open_nursery() as nursery:
        for indices in slices(total, connections):
            nursery.start_soon(connection, indices)


async def load_reservations(port: int, total: int, locations_per_sku: int, connections: int, depth: int, run_id: str) -> None:
    """One open single-line reservation (qty 1, no expiry) on each of the first `total`
    SKU-locations, pipelined over `connections`. Load their stock first (`load_batches`)."""

    async def connection(indices: range) -> None:
        codec = ClientProtocol()

        def frames() -> Iterator[bytes]:
            for index in indices:
                sku, loc = sku_location(index, locations_per_sku)
                yield codec.request("reserve", rid=f"{run_id}-hold-{index}", lines=[{"sku": sku, "loc": loc, "qty": 1}])[1]

        await _pipelined(port, frames(), codec, depth, _check)

    async with trio.open_nursery() as nursery:
        for indices in slices(total, connections):
            nursery.start_soon(connection, indices)


def settle_seconds(pid: int, seconds: float) -> int:
    """Wait `seconds` (queues drain, the log commits), then return the resident bytes."""
    time.sleep(seconds)
    return resident_bytes(pid)


def python_version() -> str:
    return sys.version.split()[0]


def cpu_count() -> int:
    return os.cpu_count() or 1

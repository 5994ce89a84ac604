"""The floor under the engine's CPU per request: its pure work alone, with no I/O and no tasks.

What every request costs before any socket, task switch, owner mailbox, outbox or commit: the
sans-IO protocol reading it (`ServerProtocol.receive_data`: frame, msgpack, validation into a
command), the pure core deciding and applying it (`apply`), packing its reply, and encoding its
events as log entries (as the WAL does, in groups of `--group`). Timed in this one process, on
requests made up front, so the figure is the engine's own work and nothing else.

The bare echo server's own work per request (msgpack decode, reply encode) is timed the same
way: the ratio of the two is the least the engine can cost per request relative to echo,
however lean the I/O around it.

    .venv/bin/python -m bench.core_floor --requests 20000 --repeats 5

Prints the medians over repeats; writes bench/results/core_floor.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import msgpack

from bench import cli
from bench.echo_server import answer_frames
from engine.core import State
from engine.core.decide import apply
from engine.storage import _encode_checked_entry
from protocol import Adjust, ServerProtocol, frame, pack

RESULTS = cli.RESULTS
STOCK = 10**9


def _frames(messages: list[dict[str, Any]]) -> bytes:
    return b"".join(frame(msgpack.packb(message)) for message in messages)


def hot_requests(count: int) -> list[dict[str, Any]]:
    """Single-line reserves, each released by the next request (the `hot` workload's pair)."""
    messages = []
    for index in range(count // 2):
        messages.append({"id": 2 * index, "op": "reserve", "rid": f"r{index}", "ttl_ms": 60_000,
                         "lines": [{"sku": f"S{index % 10}", "loc": "DC-1", "qty": 1}]})
        messages.append({"id": 2 * index + 1, "op": "release", "rid": f"r{index}"})
    return messages


def order_requests(count: int) -> list[dict[str, Any]]:
    """Three-line reserves over 1,000 SKU-locations, each committed by the next request."""
    messages = []
    for index in range(count // 2):
        lines = [{"sku": f"S{(index * 7 + line) % 1000}", "loc": "DC-1", "qty": 1} for line in range(3)]
        messages.append({"id": 2 * index, "op": "reserve", "rid": f"o{index}", "ttl_ms": 60_000, "lines": lines})
        messages.append({"id": 2 * index + 1, "op": "commit", "rid": f"o{index}"})
    return messages


WORKLOADS: dict[str, tuple[Callable[[int], list[dict[str, Any]]], int]] = {
    "hot": (hot_requests, 10),  # (requests, SKU-locations stocked)
    "orders": (order_requests, 1000),
}


def _stocked_state(sku_count: int) -> State:
    state = State()
    for index in range(sku_count):
        apply(state, Adjust(key=f"k{index}", sku=f"S{index}", loc="DC-1", delta=STOCK, reason=None), 0)
    return state


def time_engine(workload: str, count: int, group: int) -> dict[str, float]:
    """Microseconds per request of each pure step, for `count` requests of `workload`."""
    gc.collect()
    make, sku_count = WORKLOADS[workload]
    data = _frames(make(count))
    state = _stocked_state(sku_count)
    protocol = ServerProtocol()
    started = time.perf_counter()
    received = protocol.receive_data(data)
    parsed = time.perf_counter()
    events, replies = [], []
    for request in received:
        _, new_events, reply = apply(state, request.command, 1_000)
        reply["id"] = request.request_id
        events += new_events
        replies.append(reply)
    decided = time.perf_counter()
    for reply in replies:
        pack(reply)
    packed = time.perf_counter()
    for start in range(0, len(events), group):
        batch = events[start : start + group]
        _encode_checked_entry(batch, batch[0]["seq"] - 1)
    encoded = time.perf_counter()
    assert len(received) == len(replies) == count and all(reply["ok"] for reply in replies)
    per_request = 1e6 / count
    return {
        "parse_us": (parsed - started) * per_request,
        "decide_apply_us": (decided - parsed) * per_request,
        "pack_reply_us": (packed - decided) * per_request,
        "log_encode_us": (encoded - packed) * per_request,
        "total_us": (encoded - started) * per_request,
    }


def time_echo(workload: str, count: int) -> float:
    """Microseconds per request of the echo server's own work on the same frames: read each
    frame's header, decode its body, encode `{"ok": true, "id": id}` (`echo_server.answer_frames`)."""
    gc.collect()
    make, _ = WORKLOADS[workload]
    data = _frames(make(count))
    started = time.perf_counter()
    _, consumed = answer_frames(data)
    elapsed = time.perf_counter() - started
    assert consumed == len(data)
    return elapsed * 1e6 / count


def _summarize(workload: str, count: int, options: argparse.Namespace) -> dict[str, float]:
    runs = [time_engine(workload, count, options.group) for _ in range(options.repeats)]
    echo = statistics.median(time_echo(workload, count) for _ in range(options.repeats))
    figures = {name: round(statistics.median(run[name] for run in runs), 3) for name in runs[0]}
    figures["echo_us"] = round(echo, 3)
    figures["engine_over_echo"] = round(figures["total_us"] / echo, 2)
    print(f"{workload:>7}: parse {figures['parse_us']:5.2f} + decide/apply {figures['decide_apply_us']:5.2f}"
          f" + reply {figures['pack_reply_us']:4.2f} + log encode {figures['log_encode_us']:4.2f}"
          f" = {figures['total_us']:5.2f} us/request;  echo's own work {echo:4.2f} us ({figures['engine_over_echo']:.1f}x)"
          f"  (medians of {options.repeats} x {count:,} requests)")
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.core_floor", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20_000, help="requests per repeat (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=5, help="default %(default)s")
    parser.add_argument("--group", type=int, default=32, help="events per log entry when encoding (default %(default)s)")
    parser.add_argument("--workloads", default="hot,orders", help="comma list of " + ", ".join(WORKLOADS) + " (default %(default)s)")
    parser.add_argument("--output", default=str(RESULTS / "core_floor.json"))
    options = parser.parse_args(argv)
    workloads = [name for name in options.workloads.split(",") if name]
    unknown = sorted(set(workloads) - set(WORKLOADS))
    if unknown or options.requests < 2 or options.repeats < 1 or options.group < 1:
        parser.error(f"unknown workloads {unknown}" if unknown else "--requests must be at least 2, --repeats and --group positive")
    count = options.requests - options.requests % 2

    # The collector's passes are not the floor: the repeats run with it off (the server runs
    # with a generation-0 threshold of 10,000), and each collects before it starts.
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        summary = {workload: _summarize(workload, count, options) for workload in workloads}
    finally:
        if was_enabled:
            gc.enable()
    Path(options.output).parent.mkdir(parents=True, exist_ok=True)
    Path(options.output).write_text(json.dumps({"options": vars(options), "machine": cli.machine_info(), "summary": summary}, indent=1))
    print(f"wrote {options.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

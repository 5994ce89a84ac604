"""The load generator: one trio loop per process, lanes over connections, per-second buckets.

Two shapes of load:
- closed loop (`pooled`: depth 1, `pipelined`: depth N): each lane sends its next request as
  soon as the reply to its previous one is in. Latency runs from the send.
- paced (`rate`): each connection (depth 1) sends on a fixed schedule, `connections / rate`
  seconds apart, staggered across connections. Latency runs from the SCHEDULED send time, so a
  stall shows up in the latency of every request it delayed (no coordinated omission).

Only replies that arrive inside the window [start_at, stop_at) are counted and timed; the load
starts before it (warm-up) and stops sending at stop_at, then waits for the replies it is owed so
that the acknowledged history is complete for the verification. The clock is
`time.perf_counter()` (CLOCK_MONOTONIC: the same in every process), so several generator
processes share one window.
"""

from __future__ import annotations

import math
import time
from array import array
from collections import Counter

import trio

from bench.systems import DRIVERS, connect_driver
from bench.workloads import ERROR, OK, OP_NAMES, RESERVE, WORKLOADS, History, Lane, LaneMachine

RECEIVE_BYTES_MAX = 1 << 16
DRAIN_TIMEOUT_SECONDS = 30.0
PROGRESS_INTERVAL_SECONDS = 0.2
ERROR_CODES_KEPT_MAX = 50
# What each process publishes for the live progress line, in this order (slots of a shared array).
PROGRESS_FIELDS = ("requests", "granted", "errors")


class Tally:
    """What one process saw: per-second buckets of replies in the window, and the history."""

    def __init__(self, bucket_count: int, key_count: int) -> None:
        self.requests = [0] * bucket_count
        self.granted = [0] * bucket_count
        self.latencies = [array("d") for _ in range(bucket_count)]
        self.history = History(key_count)
        self.replies: Counter = Counter()       # "op:status" over the whole run (window or not)
        self.error_codes: Counter = Counter()
        self.window_count = 0
        self.window_granted = 0
        self.error_count = 0                    # error replies over the whole run
        self.sent = 0
        self.unanswered = 0
        self.connection_errors: list[str] = []

    def as_result(self) -> dict:
        return {
            "requests": self.requests,
            "granted": self.granted,
            "latencies": [bucket.tobytes() for bucket in self.latencies],
            "history": [self.history.granted, self.history.released, self.history.committed, self.history.adjusted],
            "replies": dict(self.replies),
            "error_codes": dict(self.error_codes),
            "sent": self.sent,
            "unanswered": self.unanswered,
            "connection_errors": self.connection_errors,
        }


class Run:
    """One process's part of a measurement."""

    def __init__(self, spec: dict) -> None:
        self.spec = spec
        self.workload = WORKLOADS[spec["workload"]]
        self.keys = self.workload.keys(spec["sku_prefix"])
        self.start_at = spec["start_at"]
        self.stop_at = spec["stop_at"]
        self.bucket_count = max(1, math.ceil(self.stop_at - self.start_at - 1e-9))
        self.tally = Tally(self.bucket_count, len(self.keys))
        self.shared: dict = {}
        self.machine = LaneMachine(self.workload, None, self.tally.history, seed=spec["seed"])
        # One TLS context per process, for all its connections (the options cross to the
        # process as plain strings; a context is built where it is used).
        self.ssl_context = None if spec.get("tls") is None else spec["tls"].ssl_context()

    def record(self, lane: Lane, status: int, detail: object, now: float, latency: float) -> None:
        tally = self.tally
        op = lane.op
        tally.replies[(op, status)] += 1
        if status == ERROR:
            tally.error_count += 1
            if len(tally.error_codes) < ERROR_CODES_KEPT_MAX:
                tally.error_codes[f"{OP_NAMES[op]}:{detail}"] += 1
            else:
                tally.error_codes[f"{OP_NAMES[op]}:(other)"] += 1
        if self.start_at <= now < self.stop_at:
            bucket = int(now - self.start_at)
            tally.requests[bucket] += 1
            tally.latencies[bucket].append(latency)
            tally.window_count += 1
            if op == RESERVE and status == OK:
                tally.granted[bucket] += 1
                tally.window_granted += 1

    async def connect(self, driver) -> trio.abc.Stream:
        """A connection for one driver (TLS when the spec says so); a server that wants a token gets `hello` first."""
        spec = self.spec
        return await connect_driver(driver, spec["host"], spec["port"], spec["token"], spec.get("tls"), self.ssl_context,
                                    spec.get("tls_library", "lean"))

    async def closed_loop(self, number: int, depth: int) -> None:
        spec = self.spec
        driver = DRIVERS[spec["kind"]](self.keys, self.shared)
        stream = await self.connect(driver)
        machine = self.machine
        after = machine.after
        stop_at = self.stop_at
        record = self.record
        tally = self.tally
        perf_counter = time.perf_counter
        lanes = [Lane(f"{spec['rid_prefix']}{number}.{index}.") for index in range(depth)]
        async with stream:
            machine.driver = driver
            outgoing = []
            for lane in lanes:
                machine.driver = driver
                outgoing.append(machine.start(lane))
            now = perf_counter()
            for lane in lanes:
                lane.sent_at = now
            tally.sent += len(lanes)
            await stream.send_all(b"".join(outgoing))
            in_flight = len(lanes)
            while in_flight:
                data = await stream.receive_some(RECEIVE_BYTES_MAX)
                if not data:
                    raise ConnectionError("the server closed the connection")
                now = perf_counter()
                outgoing = []
                sent_lanes = []
                machine.driver = driver
                for lane, status, detail in driver.feed(data):
                    record(lane, status, detail, now, now - lane.sent_at)
                    if now < stop_at:
                        outgoing.append(after(lane, status))
                        sent_lanes.append(lane)
                    else:
                        after_stop(machine, lane, status)
                        in_flight -= 1
                if outgoing:
                    sent_at = perf_counter()
                    for lane in sent_lanes:
                        lane.sent_at = sent_at
                    tally.sent += len(outgoing)
                    await stream.send_all(b"".join(outgoing))

    async def paced(self, number: int, interval_seconds: float, first_at: float) -> None:
        spec = self.spec
        driver = DRIVERS[spec["kind"]](self.keys, self.shared)
        stream = await self.connect(driver)
        machine = self.machine
        perf_counter = time.perf_counter
        lane = Lane(f"{spec['rid_prefix']}{number}.0.")
        scheduled_at = first_at
        async with stream:
            machine.driver = driver
            request = machine.start(lane)
            while scheduled_at < self.stop_at:
                delay = scheduled_at - perf_counter()
                if delay > 0:
                    await trio.sleep(delay)
                lane.sent_at = scheduled_at
                self.tally.sent += 1
                await stream.send_all(request)
                replies = []
                while not replies:
                    data = await stream.receive_some(RECEIVE_BYTES_MAX)
                    if not data:
                        raise ConnectionError("the server closed the connection")
                    replies = driver.feed(data)
                now = perf_counter()
                (_, status, detail), = replies
                self.record(lane, status, detail, now, now - scheduled_at)
                machine.driver = driver
                request = machine.after(lane, status)
                scheduled_at += interval_seconds
            # The request built for after the window is never sent: forget its pending entry.

    async def guarded(self, function, *args) -> None:
        try:
            await function(*args)
        except (OSError, ConnectionError, trio.BrokenResourceError) as error:
            self.tally.connection_errors.append(f"{type(error).__name__}: {error}")

    def publish(self, counters, index: int) -> None:
        """Write this process's PROGRESS_FIELDS into its slots of the shared `counters`."""
        tally = self.tally
        base = index * len(PROGRESS_FIELDS)
        counters[base] = tally.window_count
        counters[base + 1] = tally.window_granted
        counters[base + 2] = tally.error_count

    async def progress(self, counters, index: int) -> None:
        while True:
            self.publish(counters, index)
            await trio.sleep(PROGRESS_INTERVAL_SECONDS)

    async def main(self, counters, index: int) -> dict:
        spec = self.spec
        async with trio.open_nursery() as progress_nursery:
            if counters is not None:
                progress_nursery.start_soon(self.progress, counters, index)
            with trio.move_on_after(self.stop_at - time.perf_counter() + DRAIN_TIMEOUT_SECONDS) as scope:
                async with trio.open_nursery() as nursery:
                    for offset, number in enumerate(spec["connection_numbers"]):
                        if spec.get("rate"):
                            interval = spec["connections_total"] / spec["rate"]
                            first_at = spec["load_at"] + number / spec["rate"]
                            nursery.start_soon(self.guarded, self.paced, number, interval, first_at)
                        else:
                            nursery.start_soon(self.guarded, self.closed_loop, number, spec["depth"])
            if scope.cancelled_caught:
                self.tally.connection_errors.append(f"replies still owed {DRAIN_TIMEOUT_SECONDS:.0f} s after the window")
                self.tally.unanswered = -1  # unknown how many: the history is incomplete
            progress_nursery.cancel_scope.cancel()
        if counters is not None:
            self.publish(counters, index)
        result = self.tally.as_result()
        result["replies"] = {f"{OP_NAMES[op]}:{('ok', 'refused', 'error')[status]}": count
                             for (op, status), count in self.tally.replies.items()}
        return result


def after_stop(machine: LaneMachine, lane: Lane, status: int) -> None:
    """Record the reply's effect on the history without sending anything more."""
    machine.after(lane, status)
    # The lane's next request was encoded (and registered by the driver) but is never sent.


def run_process(spec: dict, counters=None, index: int = 0, queue=None) -> dict:
    """Entry of one generator process (also callable in-process)."""
    import gc

    gc.freeze()
    gc.set_threshold(100_000, 50, 50)  # the generator makes no cycles worth a collection pass
    result = trio.run(Run(spec).main, counters, index)
    if queue is not None:
        queue.put((index, result))
    return result

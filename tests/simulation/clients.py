"""The simulated clients: each a task that connects through the simulated network, pipelines
batches of requests from its `Workload`, reads replies in a second task, and records every
request and reply in the `History`.

A client gives up on a batch now and then (a cancel scope around the wait): it closes the
connection, possibly in the middle of a frame, and carries on with a new one; the requests it
did not hear back about are abandoned (their outcome is unknown). A reply that does not come
within REPLY_SECONDS_MAX on a live connection is reported as a liveness violation.
"""

from __future__ import annotations

import math
import random
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import trio

from engine.transport import ConnectionLost
from protocol import ClientProtocol

from .history import History, Record
from .network import ClientEnd, ConnectionRefused, SimulatedListener
from .storage import MemoryDisk
from .workload import Workload

BATCH_SIZES = (1, 1, 2, 3, 5, 8)  # requests a client pipelines before waiting for the replies
# A live connection owes a reply within this (simulated) time. Measured over 200 seeds the
# slowest reply took 0.31 s (one record per commit, a commit of up to 50 ms, 12 clients with up
# to 8 requests in flight each). Longer is a lost reply (a liveness violation).
REPLY_SECONDS_MAX = 2.0
GIVE_UP_SECONDS_MAX = 0.01  # a client that gives up on a batch does so this soon
RECONNECT_SECONDS_MAX = 0.2  # while no server listens


class Clients:
    """What every simulated client shares: the network, the history, the disk (to note how far
    it was durable when a reply arrived) and where violations go."""

    def __init__(
        self, listener: SimulatedListener, history: History, disk: MemoryDisk, violation: Callable[[str], None],
        abandon_probability: float, think_seconds_max: float,
    ):
        assert 0 <= abandon_probability <= 1 and think_seconds_max >= 0
        self._listener = listener
        self._history = history
        self._disk = disk
        self._violation = violation
        self._abandon_probability = abandon_probability
        self._think_seconds_max = think_seconds_max

    def _replied(self, record: Record, reply: dict[str, Any]) -> None:
        self._history.replied(record, reply, self._disk.last_seq, trio.current_time())

    async def request_once(self, client: int, op: str, fields: dict[str, Any]) -> dict[str, Any] | None:
        """One request on a connection of its own; its reply, or None (no server, or it went away)."""
        try:
            end = self._listener.connect()
        except ConnectionRefused:
            return None
        with _closing(end):
            protocol = ClientProtocol()
            request_id, data = protocol.request(op, **fields)
            record = self._history.sent(client, op, fields, retry=False, now_seconds=trio.current_time())
            try:
                await end.send(data)
                while True:
                    with trio.move_on_after(REPLY_SECONDS_MAX) as waited:
                        received = await end.receive()
                    if waited.cancelled_caught:
                        self._violation(f"client {client}: no reply within {REPLY_SECONDS_MAX} s on a live connection: {record}")
                        record.abandoned = True
                        return None
                    if not received:
                        record.abandoned = True
                        return None
                    for reply in protocol.receive_data(received):
                        assert reply["id"] == request_id
                        self._replied(record, reply)
                        return reply
            except ConnectionLost:
                record.abandoned = True
                return None

    async def run_client(self, number: int, chooser: random.Random, workload: Workload, requests: int) -> None:
        """Send `requests` requests (answered or not), reconnecting whenever needed."""
        remaining = requests
        while remaining > 0:
            try:
                end = self._listener.connect()
            except ConnectionRefused:
                await trio.sleep(chooser.uniform(0.01, RECONNECT_SECONDS_MAX))
                continue
            with _closing(end):
                remaining = await self._session(number, chooser, workload, end, remaining)

    async def _session(self, number: int, chooser: random.Random, workload: Workload, end: ClientEnd, remaining: int) -> int:
        """Batches of requests on one connection until it breaks or the client gives up on one.
        Returns how many requests are left to send."""
        protocol = ClientProtocol()
        pending: dict[int, Record] = {}
        changed = [trio.Event()]
        closed = False

        def wake() -> None:
            changed[0].set()
            changed[0] = trio.Event()

        async def read_replies() -> None:
            nonlocal closed
            while received := await end.receive():
                for reply in protocol.receive_data(received):
                    record = pending.pop(reply.get("id"), None)
                    if record is None:
                        self._violation(f"client {number}: a reply to no pending request: {reply}")
                        continue
                    self._replied(record, reply)
                    workload.observe(record.op, record.fields, reply)
                wake()
            closed = True
            wake()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_replies)
            while remaining > 0 and not closed:
                batch = [workload.next_request() for _ in range(min(remaining, chooser.choice(BATCH_SIZES)))]
                remaining -= len(batch)
                give_up_seconds = chooser.uniform(0, GIVE_UP_SECONDS_MAX) if chooser.random() < self._abandon_probability else math.inf
                with trio.move_on_after(min(give_up_seconds, REPLY_SECONDS_MAX)) as give_up:
                    try:
                        for op, fields, retry in batch:
                            request_id, data = protocol.request(op, **fields)
                            pending[request_id] = self._history.sent(number, op, fields, retry, trio.current_time())
                            await end.send(data)
                    except ConnectionLost:  # the server went away (a kill): reconnect
                        break
                    while pending and not closed:
                        await changed[0].wait()
                if give_up.cancelled_caught:
                    if give_up_seconds > REPLY_SECONDS_MAX:
                        self._violation(f"client {number}: no reply within {REPLY_SECONDS_MAX} s on a live connection: {list(pending.values())}")
                    break
                await trio.sleep(chooser.uniform(0, self._think_seconds_max))
            nursery.cancel_scope.cancel()
        for record in pending.values():
            record.abandoned = True
            workload.observe(record.op, record.fields, None)
        return remaining


@contextmanager
def _closing(end: ClientEnd) -> Iterator[ClientEnd]:
    try:
        yield end
    finally:
        end.close()

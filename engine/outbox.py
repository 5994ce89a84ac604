"""Replies on their way out: each is held until the log is durable up to its `seq`, then written
to its connection's socket, all of one connection's ready replies in one `send`.

The work per log commit is proportional to the connections that have replies waiting for it,
never to the connections that are open: a connection registers here only while it has replies
waiting, and a commit visits only those.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Protocol

import trio

from protocol import codes, error_reply, pack

FAILED_MESSAGE = "the change could not be made durable; the server must be restarted"

# What a reply carries for the latency metric: (monotonic ns when its frame was read, op index),
# shared by the requests of one op in one received chunk (see `metrics.RequestLatency`).
Stamp = tuple[int, int]


class ReplyTarget(Protocol):
    """What the outbox needs of a connection (see `engine.connection.Connection`)."""

    closed: bool
    ready: list[bytes]  # packed replies that may go out now
    ready_stamps: list[Stamp]  # the stamp of each reply in `ready`, in the same order
    waiting: deque[tuple[int, bytes, Any, Stamp]]  # (seq, packed reply, request id, stamp) waiting for the log

    def flush(self) -> None:
        """Write `ready` to the socket (what the kernel does not take now, the writer task sends)."""


class Outbox:
    def __init__(self) -> None:
        self.durable_seq = 0
        self.failed = False
        self._waiting_targets: list[ReplyTarget] = []  # targets with a non-empty `waiting`
        self._dirty: list[ReplyTarget] = []  # targets with a non-empty `ready`
        self._flush_wanted = trio.Event()
        self.connections_visited = 0  # by `release`: per commit, only those with replies waiting

    def deliver(self, target: ReplyTarget, stamp: Stamp, reply: dict[str, Any]) -> None:
        """Queue one reply (a map with `id` and `seq`). It goes out once `seq` is durable."""
        if target.closed:
            return
        seq = reply.get("seq", 0)
        if seq <= self.durable_seq or self.failed:
            self._ready(target, pack(reply if seq <= self.durable_seq else _failed_reply(reply.get("id"))), stamp)
            self._flush_wanted.set()
        else:
            if not target.waiting:
                self._waiting_targets.append(target)
            target.waiting.append((seq, pack(reply), reply.get("id"), stamp))

    def _ready(self, target: ReplyTarget, data: bytes, stamp: Stamp) -> None:
        if not target.ready:
            self._dirty.append(target)
        target.ready.append(data)
        target.ready_stamps.append(stamp)

    def release(self, durable_seq: int) -> None:
        """The log is durable up to `durable_seq`: send every reply that waited for it."""
        assert durable_seq >= self.durable_seq, f"durable seq went back from {self.durable_seq} to {durable_seq}"
        self.durable_seq = durable_seq
        self.connections_visited += len(self._waiting_targets)
        still_waiting = []
        for target in self._waiting_targets:
            waiting = target.waiting
            if target.closed:
                waiting.clear()
                continue
            # Replies wait in arrival order; one behind a higher seq waits at most one commit more.
            while waiting and waiting[0][0] <= durable_seq:
                _, data, _, stamp = waiting.popleft()
                self._ready(target, data, stamp)
            if waiting:
                still_waiting.append(target)
        self._waiting_targets = still_waiting
        self.flush()

    def fail(self) -> None:
        """The log failed: nothing waiting can ever be acknowledged; each becomes `internal`."""
        self.failed = True
        for target in self._waiting_targets:
            while target.waiting:
                _, _, request_id, stamp = target.waiting.popleft()
                if not target.closed:
                    self._ready(target, pack(_failed_reply(request_id)), stamp)
        self._waiting_targets = []
        self.flush()

    def flush(self) -> None:
        """Write every connection's ready replies."""
        dirty, self._dirty = self._dirty, []
        for target in dirty:
            target.flush()

    async def run_flusher(self) -> None:
        """Flush replies that became ready outside a commit (reads, refusals, pings) once per
        scheduler batch, so that the replies of many requests share one write per connection."""
        while True:
            await self._flush_wanted.wait()
            self._flush_wanted = trio.Event()
            self.flush()


def _failed_reply(request_id: Any) -> dict[str, Any]:
    return error_reply(request_id, codes.INTERNAL, FAILED_MESSAGE, seq=0)

"""What the simulated clients sent and what came back: one `Record` per request.

Times are logical ticks (a counter advanced at every send and every reply received), not the
clock: many things happen at the same simulated instant, and "A's reply arrived before B was
sent" must be exact. `seen_seq_at_send` is the highest `seq` of any reply any client had received
when the request was sent: every change up to it was applied (and durable) before this request
was sent, so its reply must reflect all of them (the real-time half of linearizability).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class Record:
    """One request and, if it came, its reply."""

    client: int
    op: str
    fields: dict[str, Any]
    sent_tick: int
    seen_seq_at_send: int
    sent_at_seconds: float  # simulated time (for liveness; the checks of order use ticks)
    retry: bool = False
    reply: dict[str, Any] | None = None
    reply_tick: int | None = None
    reply_seconds: float | None = None  # simulated time from send to reply
    durable_seq_at_reply: int | None = None  # the disk's last seq when the reply was received
    abandoned: bool = False  # the client gave up on it (cancelled, or the connection broke)


@dataclass
class History:
    """Every request of a run, in the order sent."""

    records: list[Record] = field(default_factory=list)
    tick: int = 0
    seen_seq: int = 0  # highest seq of any reply received so far

    def sent(self, client: int, op: str, fields: dict[str, Any], retry: bool, now_seconds: float) -> Record:
        self.tick += 1
        record = Record(client, op, fields, self.tick, self.seen_seq, now_seconds, retry)
        self.records.append(record)
        return record

    def replied(self, record: Record, reply: dict[str, Any], durable_seq: int, now_seconds: float) -> None:
        assert record.reply is None, f"two replies to one request: {record}"
        self.tick += 1
        record.reply_seconds = now_seconds - record.sent_at_seconds
        record.reply = reply
        record.reply_tick = self.tick
        record.durable_seq_at_reply = durable_seq
        self.seen_seq = max(self.seen_seq, reply.get("seq", 0))

    def trace(self) -> list[tuple]:
        """The run's history as plain data (for the determinism hash)."""
        return [
            (r.client, r.op, r.fields, r.sent_tick, r.seen_seq_at_send, r.retry, r.reply, r.reply_tick, r.durable_seq_at_reply, r.abandoned)
            for r in self.records
        ]

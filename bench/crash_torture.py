"""Crash torture: kill -9 the server again and again mid-stream; after every restart, check that
nothing acknowledged was lost and that everything the server shows is explained by the log.

Each round starts `python -m engine serve` on a data folder that persists across rounds, drives
a mixed, pipelined workload from `--connections` client threads (multi-line reserves over a few
hot SKU-locations, releases, full and short-pick commits, extends, receipts and damage, counts,
transfers, ttl'd reservations that expire, idempotent retries, reads, the odd snapshot), and
SIGKILLs the server after a random delay while requests are in flight. A client-side ledger
keeps every request: replies received are acknowledged (ok) or refused (error); requests with no
reply are "maybe" (logged or not). After each restart the verifier checks, against the server:

- seq: the first reply after a restart (`stats`) has `wal.durable_seq` >= every `seq` any reply
  ever carried (the server never takes back what it showed);
- every rid ever sent (`lookup`): an acknowledged reserve is present; a refused one is absent;
  the lines are exactly those requested (all-or-nothing); its state is explained by requests
  acknowledged or maybe-sent (release -> released, commit -> committed with the named lines,
  ttl/extend -> expired, nothing -> held); a closed state a reply acknowledged never changes;
- every SKU-location (`get`, `query`): `reserved` = the sum of its held reservations' lines,
  `available` = `on_hand` - `reserved`, `on_hand` >= 0, `available` >= 0 unless a damage adjust
  or a count could explain a shortage; `query` agrees with `get`;
- idempotency: retrying acknowledged reserves, releases, commits, adjusts, counts and transfers
  with the same id-string and payload returns the original reply with `duplicate: true` and
  changes no `on_hand`;
- the log (`watch` from seq 0, replayed client-side): seqs are contiguous and the history read
  earlier is unchanged; every event is explained by a request sent (and none by a refused one);
  no reserve or transfer ever leaves `available` < 0; no reservation expires before its time,
  nor late (one that fell due while the server was down is expired by the timer right after
  the restart: the verifier waits before its first `lookup`, which would expire it too);
  every acknowledged change is the event at its reply's `seq`, and every figure any reply showed
  (reserve `available`, `insufficient` lines, get/query/adjust/count/transfer figures, lookup
  and `invalid_state` states) equals the replayed log at that reply's `seq`.

    .venv/bin/python bench/crash_torture.py --rounds 20 --seconds-per-round 2 --seed 1

Prints per-round figures and a summary, writes JSON (`--output`), exits 1 on any violation
(keeping the data folder and server logs for the evidence), 0 otherwise.
"""

from __future__ import annotations

import argparse
import bisect
import hashlib
import json
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import msgpack

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from protocol import Client, ConnectionClosed, ProtocolViolation  # noqa: E402
from protocol import requests as rq  # noqa: E402

# -- the workload's world ---------------------------------------------------------------------

SKUS = ("sku-a", "sku-b", "sku-c")
LOCS = ("w1", "w2")
STOCKS = tuple((sku, loc) for sku in SKUS for loc in LOCS)  # 6 hot SKU-locations
INITIAL_ON_HAND = 60

MUTATING = frozenset({"reserve", "release", "commit", "extend", "adjust", "count", "transfer"})
EVENT_OF_OP = {
    "reserve": "reserved", "release": "released", "commit": "committed", "extend": "extended",
    "adjust": "adjusted", "count": "counted", "transfer": "transferred",
}
# Error codes each op may legitimately get in this workload; anything else is a violation.
EXPECTED_ERRORS = {
    "reserve": {"insufficient", "overloaded"},
    "release": {"invalid_state", "overloaded"},
    "commit": {"invalid_state", "invalid", "overloaded"},  # invalid: on_hand below the pick
    "extend": {"invalid_state", "overloaded"},
    "adjust": {"invalid", "overloaded"},  # invalid: damage larger than on_hand
    "count": {"overloaded"},
    "transfer": {"insufficient", "overloaded"},
    "get": {"overloaded"},
    "query": {"overloaded"},
    "lookup": {"overloaded"},
    "snapshot": set(),
}

ACKED, REFUSED, MAYBE = "acked", "refused", "maybe"
# An expiry may be logged this late after its time: the timer's promptness on a busy machine.
EXPIRY_SLACK_MS = 3000
# One that fell due while the server was down is expired by the timer right after the restart:
# this late at most after the server listens. The verifier waits a little longer before its
# first `lookup` (which would expire an overdue reservation too, hiding a lost timer).
RESTART_EXPIRY_SLACK_MS = 400
FIRST_LOOKUP_AFTER_LISTEN_MS = 600
CLOSED_STATES = ("released", "committed", "expired")
REPLY_META = ("id", "seq", "duplicate", "ok")


@dataclass
class TortureConfig:
    rounds: int = 20
    seconds_per_round: float = 2.0
    connections: int = 6
    depth: int = 16
    seed: int = 1
    data_dir: str | None = None
    snapshot_interval_seconds: float = 0.7
    kill_min_seconds: float = 0.15
    retry_sample: int = 200
    output: str | None = str(ROOT / "bench" / "results" / "crash_torture.json")
    keep: bool = False
    verbose: bool = True


# -- the server process -----------------------------------------------------------------------

# How to run the server; `serve --port 0 --data DIR ...` is appended. Replaceable (e.g. to torture
# a deliberately broken build and see that this tool notices).
SERVER_COMMAND = [sys.executable, "-m", "engine"]

LISTEN_LINE = re.compile(r"listening on [\d.]+:(\d+) \(data in .*, seq (\d+), (\d+) records replayed\)")
RECOVERED_LINE = re.compile(r"recovered at seq (\d+): replayed (\d+) records in ([\d.]+) s")


class ServerProcess:
    """`python -m engine serve --port 0` on `data_dir`; `startup_seconds` is process start to listening."""

    def __init__(self, data_dir: Path, log_path: Path, snapshot_interval_seconds: float, timeout_seconds: float = 60):
        self.log_path = log_path
        self._log = open(log_path, "w")
        started = time.monotonic()
        self.process = subprocess.Popen(
            [
                *SERVER_COMMAND, "serve", "--port", "0", "--data", str(data_dir),
                "--map-size-mb", "512", "--snapshot-interval-seconds", str(snapshot_interval_seconds),
            ],
            cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
        )
        deadline = started + timeout_seconds
        while True:
            text = log_path.read_text()
            match = LISTEN_LINE.search(text)
            if match:
                self.listening_wall_ms = int(time.time() * 1000)
                self.startup_seconds = time.monotonic() - started
                self.port = int(match.group(1))
                self.recovered_seq = int(match.group(2))
                self.replayed = int(match.group(3))
                recovered = RECOVERED_LINE.search(text)
                self.replay_seconds = float(recovered.group(3)) if recovered else None
                return
            if self.process.poll() is not None:
                self._log.close()
                raise RuntimeError(f"server exited with {self.process.returncode} before listening:\n{text[-4000:]}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"server did not listen within {timeout_seconds} s:\n{text[-4000:]}")
            time.sleep(0.005)

    def kill(self) -> None:
        """SIGKILL: no flush, no snapshot."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)
        if not self._log.closed:
            self._log.close()

    def terminate(self, timeout_seconds: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=timeout_seconds)
        except subprocess.TimeoutExpired:
            self.kill()
            code = -9
        if not self._log.closed:
            self._log.close()
        return code

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text()[-chars:]


# -- the ledger -------------------------------------------------------------------------------


@dataclass(eq=False)
class Op:
    """One request sent. `status` is maybe until a reply arrives: acked (ok) or refused (error)."""

    op: str
    fields: dict[str, Any]
    round: int
    conn: int
    status: str = MAYBE
    reply: dict[str, Any] | None = None
    retry_of: Op | None = None  # an idempotent retry of this acknowledged op
    pair: Op | None = None  # a commit pipelined right behind this reserve (and back)
    audited: bool = False

    @property
    def duplicate(self) -> bool:
        return bool(self.reply and self.reply.get("duplicate"))

    def brief(self) -> dict[str, Any]:
        return {"op": self.op, "fields": self.fields, "round": self.round, "conn": self.conn, "status": self.status, "reply": self.reply}


@dataclass(eq=False)
class RidInfo:
    rid: str
    lines: tuple  # sorted (sku, loc, qty)
    ttl_ms: int
    ref: str | None
    reserve: Op
    ops: list[Op] = field(default_factory=list)  # every op naming the rid, the reserve included
    closed: str | None = None  # a closed state some reply acknowledged (final)
    found: bool = False  # some reply proved it exists

    def sent(self, op: str) -> list[Op]:
        """Ops of this kind that were acknowledged or may have been applied (not refused)."""
        return [o for o in self.ops if o.op == op and o.status != REFUSED]


def sorted_lines(lines: list[dict[str, Any]]) -> tuple:
    return tuple(sorted((line["sku"], line["loc"], line["qty"]) for line in lines))


def expected_commit_lines(info: RidInfo, fields: dict[str, Any]) -> tuple:
    if fields.get("lines") is None:
        return info.lines
    named = {(line["sku"], line["loc"]): line["qty"] for line in fields["lines"]}
    return tuple(sorted((sku, loc, named.get((sku, loc), 0)) for sku, loc, _ in info.lines))


def core_reply(reply: dict[str, Any]) -> dict[str, Any]:
    return {name: value for name, value in reply.items() if name not in REPLY_META}


class Ledger:
    """Everything sent and seen, across rounds. Thread-safe where workers touch it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ops: list[Op] = []
        self.rids: dict[str, RidInfo] = {}
        self.keys: dict[str, Op] = {}
        self.max_seq = 0
        self.max_seq_op: Op | None = None
        self.shortage_possible: set[tuple[str, str]] = set()
        self.violations: list[dict[str, Any]] = []
        self._reported: set[tuple[str, Any]] = set()
        self.repeated_violations = 0  # the same (kind, rid or SKU-location) seen again later
        self.carry_over: list[str] = []  # held rids handed to the next round's workers
        self.server_starts_ms: list[int] = []  # wall clock at each server process start
        self.server_listens_ms: list[int] = []  # wall clock when each was seen listening
        self.retried_keys: set[str] = set()
        self.retried_rid_ops: set[int] = set()

    def violation(self, round_no: int, phase: str, kind: str, **detail: Any) -> None:
        with self.lock:
            # A lost reservation is found again by every later verification: report it once.
            subject = detail.get("rid")
            if subject is not None:
                if (kind, subject) in self._reported:
                    self.repeated_violations += 1
                    return
                self._reported.add((kind, subject))
            self.violations.append({"round": round_no, "phase": phase, "kind": kind, **detail})

    def record(self, op: Op) -> None:
        """Record a request before it is written: if the write dies, it is a maybe."""
        with self.lock:
            self.ops.append(op)
            fields = op.fields
            if op.op == "reserve" and op.retry_of is None:
                rid = fields["rid"]
                assert rid not in self.rids, rid
                self.rids[rid] = RidInfo(rid, sorted_lines(fields["lines"]), fields.get("ttl_ms") or 0, fields.get("ref"), op, [op])
            elif op.op in ("reserve", "release", "commit", "extend", "lookup"):
                self.rids[fields["rid"]].ops.append(op)
            elif op.op in ("adjust", "count", "transfer") and op.retry_of is None:
                assert fields["key"] not in self.keys
                self.keys[fields["key"]] = op
                if op.op == "count" or (op.op == "adjust" and fields["delta"] < 0):
                    self.shortage_possible.add((fields["sku"], fields["loc"]))

    def see_seq(self, op: Op, seq: Any) -> None:
        if isinstance(seq, int) and seq > self.max_seq:
            with self.lock:
                if seq > self.max_seq:
                    self.max_seq = seq
                    self.max_seq_op = op

    def observe_closed(self, round_no: int, phase: str, rid: str, state: str, source: str) -> None:
        with self.lock:
            info = self.rids[rid]
            info.found = True
            if info.closed is None:
                info.closed = state
            elif info.closed != state:
                self.violations.append({
                    "round": round_no, "phase": phase, "kind": "closed_state_changed", "rid": rid,
                    "was": info.closed, "now": state, "source": source,
                })


# -- the workload -----------------------------------------------------------------------------


class Worker(threading.Thread):
    """One connection: keeps `depth` requests in flight until the server dies or time is up."""

    def __init__(self, ledger: Ledger, round_no: int, conn: int, port: int, seed: int, depth: int,
                 deadline: float, stop: threading.Event, held: list[str]):
        super().__init__(name=f"torture-r{round_no}-c{conn}", daemon=True)
        self.ledger = ledger
        self.round_no = round_no
        self.conn = conn
        self.port = port
        self.rng = random.Random(seed)
        self.depth = depth
        self.deadline = deadline
        self.stop = stop
        self.held: list[str] = list(held)  # rids this worker may release/commit/extend
        self.acked: list[Op] = []  # acknowledged ops that an idempotent retry may repeat
        self.counter = 0
        self.in_flight: dict[int, Op] = {}
        self.sent = 0
        self.replies = Counter()
        self.end_reason = ""

    # -- choosing requests --

    def _next_name(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}{self.round_no}-c{self.conn}-{self.counter}"

    def _op(self, op: str, **fields: Any) -> Op:
        return Op(op, fields, self.round_no, self.conn)

    def _reserve_op(self, ttl: bool = True) -> Op:
        rng = self.rng
        chosen = rng.sample(STOCKS, rng.choice((1, 1, 2, 2, 3)))
        lines = [{"sku": sku, "loc": loc, "qty": rng.randint(1, 4)} for sku, loc in chosen]
        fields: dict[str, Any] = {"rid": self._next_name("r"), "lines": lines}
        roll = rng.random()
        if ttl and roll < 0.35:
            fields["ttl_ms"] = rng.randint(150, 1500)  # expires within the round or while down
        elif ttl and roll < 0.6:
            fields["ttl_ms"] = 60_000
        if rng.random() < 0.3:
            fields["ref"] = f"SO-{self.counter}"
        return self._op("reserve", **fields)

    def _take_held(self) -> str | None:
        if not self.held:
            return None
        return self.held.pop(self.rng.randrange(len(self.held)))

    def next_requests(self) -> list[Op]:
        rng = self.rng
        roll = rng.random()
        if roll < 0.36:
            return [self._reserve_op()]
        if roll < 0.38:  # reserve + commit pipelined: the commit must wait for the reserve
            reserve = self._reserve_op(ttl=False)
            commit = self._op("commit", rid=reserve.fields["rid"])
            reserve.pair, commit.pair = commit, reserve
            return [reserve, commit]
        if roll < 0.50:
            rid = self._take_held()
            if rid is not None:
                return [self._op("release", rid=rid)]
        elif roll < 0.62:
            rid = self._take_held()
            if rid is not None:
                if rng.random() < 0.35:  # a short pick of some lines
                    info = self.ledger.rids[rid]
                    named = rng.sample(info.lines, rng.randint(1, len(info.lines)))
                    lines = [{"sku": s, "loc": l, "qty": rng.randint(0, q)} for s, l, q in named]
                    return [self._op("commit", rid=rid, lines=lines)]
                return [self._op("commit", rid=rid)]
        elif roll < 0.66:
            if self.held:
                rid = self.rng.choice(self.held)
                return [self._op("extend", rid=rid, ttl_ms=rng.choice((rng.randint(200, 1500), 60_000)))]
        elif roll < 0.72:
            sku, loc = rng.choice(STOCKS)
            return [self._op("adjust", key=self._next_name("k"), sku=sku, loc=loc, delta=rng.randint(5, 30), reason="receipt")]
        elif roll < 0.745:
            sku, loc = rng.choice(STOCKS)
            return [self._op("adjust", key=self._next_name("k"), sku=sku, loc=loc, delta=-rng.randint(1, 6), reason="damage")]
        elif roll < 0.757:
            sku, loc = rng.choice(STOCKS)
            return [self._op("count", key=self._next_name("k"), sku=sku, loc=loc, on_hand=rng.randint(20, 90), reason="cycle")]
        elif roll < 0.79:
            sku = rng.choice(SKUS)
            source, target = rng.sample(LOCS, 2)
            return [self._op("transfer", key=self._next_name("k"), sku=sku, **{"from": source, "to": target}, qty=rng.randint(1, 10))]
        elif roll < 0.84:
            sku, loc = rng.choice(STOCKS)
            return [self._op("get", sku=sku, loc=loc)]
        elif roll < 0.86:
            return [self._op("query", sku=rng.choice(SKUS))]
        elif roll < 0.89:
            pool = self.held or [o.fields["rid"] for o in self.acked if "rid" in o.fields]
            if pool:
                return [self._op("lookup", rid=rng.choice(pool))]
        elif roll < 0.91:
            if self.acked:
                original = rng.choice(self.acked)
                retry = Op(original.op, dict(original.fields), self.round_no, self.conn, retry_of=original)
                return [retry]
        elif roll < 0.913:
            return [self._op("snapshot")]
        return [self._reserve_op()]

    # -- the connection --

    def run(self) -> None:
        try:
            client = Client("127.0.0.1", self.port, timeout_seconds=30)
        except OSError as error:
            self.end_reason = f"connect: {error!r}"
            return
        try:
            while not self.stop.is_set() and time.monotonic() < self.deadline:
                while len(self.in_flight) < self.depth and not self.stop.is_set():
                    for op in self.next_requests():
                        self.ledger.record(op)
                        self.sent += 1
                        self.in_flight[client.send(op.op, **op.fields)] = op
                reply = client.receive_any()
                op = self.in_flight.pop(reply.get("id"), None) if isinstance(reply.get("id"), int) else None
                if op is None:
                    self.ledger.violation(self.round_no, "workload", "unmatched_reply", reply=reply)
                    continue
                self.on_reply(op, reply)
            self.end_reason = "stopped"
        except (ConnectionClosed, ProtocolViolation, TimeoutError, OSError) as error:
            self.end_reason = type(error).__name__
        except Exception as error:  # noqa: BLE001 - a bug of this tool must not pass as a clean round
            self.end_reason = repr(error)
            self.ledger.violation(self.round_no, "tool", "worker_crashed", error=repr(error))
        finally:
            client.close()

    def on_reply(self, op: Op, reply: dict[str, Any]) -> None:
        ledger = self.ledger
        op.reply = reply
        ledger.see_seq(op, reply.get("seq"))
        fields = op.fields
        code = "ok" if reply.get("ok") is True else reply.get("error")
        self.replies[f"{op.op}:{code}"] += 1
        bad = lambda kind, **detail: ledger.violation(self.round_no, "workload", kind, request=op.brief(), **detail)  # noqa: E731
        if reply.get("ok") is not True:
            op.status = REFUSED
            allowed = set(EXPECTED_ERRORS.get(op.op, set()))
            if op.pair is not None and op.op == "commit":
                allowed.add("not_found")  # its reserve was refused
            if code not in allowed:
                if code in ("internal",):
                    op.status = MAYBE  # the server applied it but could not make it durable
                bad("unexpected_error")
                return
            if code == "invalid_state":
                ledger.observe_closed(self.round_no, "workload", fields["rid"], reply.get("state"), f"{op.op} invalid_state")
            if code == "insufficient":
                for line in reply.get("lines", []):
                    if not line["available"] < line["requested"]:
                        bad("insufficient_but_available")
            if op.op == "commit" and code == "invalid" and op.pair is None:
                self.held.append(fields["rid"])  # still held: release it later
            self._check_pair(op)
            return
        op.status = ACKED
        duplicate = bool(reply.get("duplicate"))
        if op.retry_of is not None:
            if not duplicate:
                bad("retry_not_duplicate")
            original = op.retry_of.reply or {}
            if core_reply(reply) != core_reply(original):
                bad("retry_reply_differs", original=original)
            return
        if duplicate:
            bad("duplicate_on_first_send")
        if op.op == "reserve":
            info = ledger.rids[fields["rid"]]
            info.found = True
            if sorted_lines(reply.get("lines", [])) != info.lines:
                bad("reserve_lines_differ")
            for line in reply.get("lines", []):
                if line.get("available", -1) < 0:
                    bad("oversold_at_grant", line=line)
            if (reply.get("expires_at_ms") is None) != (info.ttl_ms == 0):
                bad("expiry_mismatch")
            if op.pair is None:
                self.held.append(fields["rid"])
            self.acked.append(op)
            self._check_pair(op)
        elif op.op == "release":
            if reply.get("state") != "released":
                bad("release_state")
            ledger.observe_closed(self.round_no, "workload", fields["rid"], "released", "release ok")
            self.acked.append(op)
        elif op.op == "commit":
            info = ledger.rids[fields["rid"]]
            if reply.get("state") != "committed" or sorted_lines(reply.get("lines", [])) != expected_commit_lines(info, fields):
                bad("commit_reply_differs")
            ledger.observe_closed(self.round_no, "workload", fields["rid"], "committed", "commit ok")
            self.acked.append(op)
            self._check_pair(op)
        elif op.op == "extend":
            ledger.rids[fields["rid"]].found = True
            if not isinstance(reply.get("expires_at_ms"), int):
                bad("extend_without_expiry")
        elif op.op in ("adjust", "count", "transfer"):
            figures = [reply] if op.op != "transfer" else [reply.get("from", {}), reply.get("to", {})]
            for f in figures:
                if f.get("available") != f.get("on_hand", 0) - f.get("reserved", 0) or f.get("on_hand", -1) < 0:
                    bad("figures_inconsistent")
            if op.op == "count" and reply.get("on_hand") != fields["on_hand"]:
                bad("count_not_applied")
            self.acked.append(op)
        elif op.op in ("get", "query"):
            figures = [reply] if op.op == "get" else reply.get("locations", [])
            for f in figures:
                if f.get("available") != f.get("on_hand", 0) - f.get("reserved", 0) or f.get("on_hand", -1) < 0 or f.get("reserved", -1) < 0:
                    bad("figures_inconsistent")
        elif op.op == "lookup":
            info = ledger.rids[fields["rid"]]
            info.found = True
            if sorted_lines(reply.get("lines", [])) != info.lines:
                bad("lookup_lines_differ")
            if reply.get("state") in CLOSED_STATES:
                ledger.observe_closed(self.round_no, "workload", fields["rid"], reply["state"], "lookup")

    def _check_pair(self, op: Op) -> None:
        """A commit pipelined behind its reserve: granted -> committed; refused -> not_found."""
        if op.pair is None:
            return
        reserve, commit = (op, op.pair) if op.op == "reserve" else (op.pair, op)
        if reserve.reply is None or commit.reply is None:
            return
        granted = reserve.reply.get("ok") is True
        code = "ok" if commit.reply.get("ok") is True else commit.reply.get("error")
        if (granted and code not in ("ok", "invalid")) or (not granted and code != "not_found"):
            self.ledger.violation(self.round_no, "workload", "pipelined_commit_out_of_order",
                                  reserve=reserve.brief(), commit=commit.brief())


def seed_stock(port: int, ledger: Ledger) -> None:
    """Round 0: a receipt for every hot SKU-location, acknowledged before the load starts."""
    with Client("127.0.0.1", port, timeout_seconds=30) as client:
        for sku, loc in STOCKS:
            op = Op("adjust", {"key": f"init-{sku}-{loc}", "sku": sku, "loc": loc, "delta": INITIAL_ON_HAND, "reason": "receipt"}, 0, -1)
            ledger.record(op)
            op.reply = client.receive(client.send(op.op, **op.fields))
            ledger.see_seq(op, op.reply.get("seq"))
            op.status = ACKED if op.reply.get("ok") else REFUSED
            if not op.reply.get("ok"):
                ledger.violation(0, "setup", "seed_stock_refused", request=op.brief())


# -- verification after a restart -------------------------------------------------------------


def _reply_op(ledger: Ledger, round_no: int, op: str, fields: dict[str, Any], reply: dict[str, Any]) -> Op:
    """A verification read, kept (not in the ledger's request list) for the log audit."""
    result = Op(op, fields, round_no, -2, ACKED if reply.get("ok") else REFUSED, reply)
    ledger.see_seq(result, reply.get("seq"))
    return result


def verify(port: int, ledger: Ledger, round_no: int, audit: LogAudit, retry_sample: int, rng: random.Random) -> dict[str, Any]:
    """Check the restarted server against the ledger. Returns figures; violations go to the ledger."""
    started = time.monotonic()
    bad = lambda kind, **detail: ledger.violation(round_no, "verify", kind, **detail)  # noqa: E731
    reads: list[Op] = []
    figures: dict[str, Any] = {}
    with Client("127.0.0.1", port, timeout_seconds=60) as client:
        # 1. The first reply after the restart: nothing any reply showed may be missing.
        stats = client.stats()
        durable_seq = stats["wal"]["durable_seq"]
        figures["durable_seq_after_restart"] = durable_seq
        figures["max_seq_seen_before"] = ledger.max_seq
        if durable_seq < ledger.max_seq or stats["applied_seq"] < ledger.max_seq:
            bad("seq_went_backwards", durable_seq=durable_seq, applied_seq=stats["applied_seq"],
                max_seq_seen=ledger.max_seq, reply_with_max_seq=ledger.max_seq_op.brief() if ledger.max_seq_op else None)

        # 2. Every rid and every SKU-location, consistently (expiry may race: then read again).
        # Not before overdue reservations had time to be expired by the restarted timer.
        wait_ms = ledger.server_listens_ms[-1] + FIRST_LOOKUP_AFTER_LISTEN_MS - time.time() * 1000
        time.sleep(max(0.0, wait_ms / 1000))
        rids = list(ledger.rids)
        stable = False
        for _attempt in range(8):
            lookups = dict(zip(rids, client.pipeline([rq.lookup_request(rid) for rid in rids])))
            gets = dict(zip(STOCKS, client.pipeline([rq.get_request(sku, loc) for sku, loc in STOCKS])))
            queries = dict(zip(SKUS, client.pipeline([rq.query_request(sku) for sku in SKUS])))
            timed = [rid for rid, r in lookups.items() if r.get("ok") and r["state"] == "held" and r.get("expires_at_ms") is not None]
            again = dict(zip(timed, client.pipeline([rq.lookup_request(rid) for rid in timed])))
            for rid, r in lookups.items():
                reads.append(_reply_op(ledger, round_no, "lookup", {"rid": rid}, r))
            for key, r in gets.items():
                reads.append(_reply_op(ledger, round_no, "get", {"sku": key[0], "loc": key[1]}, r))
            for sku, r in queries.items():
                reads.append(_reply_op(ledger, round_no, "query", {"sku": sku}, r))
            for rid, r in again.items():
                reads.append(_reply_op(ledger, round_no, "lookup", {"rid": rid}, r))
            stable = all(r.get("ok") and r["state"] == "held" for r in again.values())
            lookups.update(again)
            if stable:
                break
            time.sleep(0.2)
        figures["rids_checked"] = len(rids)
        states = Counter()
        held_by_stock = Counter()
        carry_over = []
        for rid, reply in lookups.items():
            info = ledger.rids[rid]
            if reply.get("ok") is not True:
                states[reply.get("error")] += 1
                if reply.get("error") != "not_found":
                    bad("lookup_failed", rid=rid, reply=reply)
                    continue
                if info.reserve.status == ACKED and not info.reserve.retry_of:
                    bad("acknowledged_reserve_lost", rid=rid, reserve=info.reserve.brief())
                elif info.found or info.closed:
                    bad("reservation_lost", rid=rid, closed=info.closed,
                        evidence=[o.brief() for o in info.ops if o.status == ACKED][:5])
                else:
                    acked = [o.brief() for o in info.ops if o.status == ACKED and o.op in ("release", "commit", "extend")]
                    if acked:
                        bad("acknowledged_change_of_lost_reservation", rid=rid, ops=acked)
                continue
            state = reply["state"]
            states[state] += 1
            if info.reserve.status == REFUSED and reply["state"]:
                bad("refused_reserve_present", rid=rid, reserve=info.reserve.brief(), lookup=reply)
            if sorted_lines(reply["lines"]) != info.lines:
                bad("lines_differ", rid=rid, requested=info.lines, found=reply["lines"])
            if reply.get("ref") != info.ref:
                bad("ref_differs", rid=rid, sent=info.ref, found=reply.get("ref"))
            acked_release = [o for o in info.ops if o.op == "release" and o.status == ACKED]
            acked_commit = [o for o in info.ops if o.op == "commit" and o.status == ACKED]
            if info.closed is not None and state != info.closed:
                bad("acknowledged_state_lost", rid=rid, acknowledged=info.closed, found=state)
            elif acked_release and state != "released":
                bad("acknowledged_release_lost", rid=rid, found=state)
            elif acked_commit and state != "committed":
                bad("acknowledged_commit_lost", rid=rid, found=state)
            if state == "held":
                expires = reply.get("expires_at_ms")
                if expires is not None and expires < time.time() * 1000 - 2000:
                    bad("overdue_reservation_still_held", rid=rid, expires_at_ms=expires)
                for sku, loc, qty in info.lines:
                    held_by_stock[(sku, loc)] += qty
                carry_over.append(rid)
            elif state == "released":
                if not info.sent("release"):
                    bad("unexplained_release", rid=rid, ops=[o.brief() for o in info.ops])
            elif state == "committed":
                explained = [o for o in info.sent("commit") if expected_commit_lines(info, o.fields) == sorted_lines(reply.get("committed", []))]
                if not explained:
                    bad("unexplained_commit", rid=rid, committed=reply.get("committed"), ops=[o.brief() for o in info.ops])
            elif state == "expired":
                if not info.ttl_ms and not info.sent("extend"):
                    bad("unexplained_expiry", rid=rid, ops=[o.brief() for o in info.ops])
            if state in CLOSED_STATES and info.closed is None:
                ledger.observe_closed(round_no, "verify", rid, state, "verify lookup")
            else:
                info.found = True
        figures["reservation_states"] = dict(states)
        ledger.carry_over = carry_over

        # 3. Stock figures.
        if not stable:
            figures["reserved_check"] = "skipped: expiries kept racing the reads"
        for key, got in gets.items():
            if got.get("ok") is not True:
                bad("get_failed", stock=key, reply=got)
                continue
            if stable and got["reserved"] != held_by_stock[key]:
                bad("reserved_mismatch", stock=key, reserved=got["reserved"], held_lines_sum=held_by_stock[key])
            if got["on_hand"] < 0 or got["reserved"] < 0 or got["available"] != got["on_hand"] - got["reserved"]:
                bad("figures_inconsistent", stock=key, figures=got)
            if got["available"] < 0 and key not in ledger.shortage_possible:
                bad("unexplained_shortage", stock=key, figures=got)
        for sku, reply in queries.items():
            if reply.get("ok") is not True:
                bad("query_failed", sku=sku, reply=reply)
                continue
            total = Counter()
            for location in reply["locations"]:
                got = gets.get((sku, location["loc"]))
                figures_of = {name: location[name] for name in ("on_hand", "reserved", "available")}
                if got is None or {name: got[name] for name in figures_of} != figures_of:
                    bad("query_differs_from_get", sku=sku, location=location, get=got)
                total.update(figures_of)
            if dict(reply["total"]) != {name: total[name] for name in ("on_hand", "reserved", "available")}:
                bad("query_total_wrong", sku=sku, reply=reply)
        figures["stock"] = {f"{sku}@{loc}": {n: got.get(n) for n in ("on_hand", "reserved", "available")} for (sku, loc), got in gets.items()}

        # 4. Idempotency: acknowledged ids retried with the same payload are duplicates, change nothing.
        before = {key: got.get("on_hand") for key, got in gets.items()}
        key_ops = [op for op in ledger.keys.values() if op.status == ACKED]
        fresh = [op for op in key_ops if op.fields["key"] not in ledger.retried_keys]
        old = [op for op in key_ops if op.fields["key"] in ledger.retried_keys]
        chosen = fresh + rng.sample(old, min(len(old), retry_sample))
        rid_ops = [
            op for info in ledger.rids.values() for op in info.ops
            if op.status == ACKED and op.retry_of is None and not op.duplicate and op.op in ("reserve", "release", "commit")
        ]
        fresh_rid = [op for op in rid_ops if id(op) not in ledger.retried_rid_ops]
        old_rid = [op for op in rid_ops if id(op) in ledger.retried_rid_ops]
        chosen_rid = fresh_rid[: retry_sample * 4] + rng.sample(old_rid, min(len(old_rid), retry_sample))
        retries = chosen + chosen_rid
        replies = client.pipeline([(op.op, dict(op.fields)) for op in retries])
        for op, reply in zip(retries, replies):
            ledger.see_seq(op, reply.get("seq"))
            if reply.get("ok") is not True or reply.get("duplicate") is not True:
                bad("retry_not_duplicate", request=op.brief(), retry_reply=reply)
            elif core_reply(reply) != core_reply(op.reply):
                bad("retry_reply_differs", request=op.brief(), retry_reply=reply)
        ledger.retried_keys.update(op.fields["key"] for op in chosen)
        ledger.retried_rid_ops.update(id(op) for op in chosen_rid)
        after = dict(zip(STOCKS, client.pipeline([rq.get_request(sku, loc) for sku, loc in STOCKS])))
        for key, got in after.items():
            reads.append(_reply_op(ledger, round_no, "get", {"sku": key[0], "loc": key[1]}, got))
            if got.get("on_hand") != before[key]:
                bad("retries_changed_stock", stock=key, before=before[key], after=got.get("on_hand"))
        figures["idempotent_retries"] = len(retries)

        final_stats = client.stats()
        audit_to = final_stats["wal"]["durable_seq"]
    figures["verify_seconds"] = round(time.monotonic() - started, 3)

    # 5. The log, replayed client-side, explains everything.
    audit_started = time.monotonic()
    figures.update(audit.run(port, ledger, round_no, audit_to, reads))
    figures["audit_seconds"] = round(time.monotonic() - audit_started, 3)
    return figures


# -- the log audit ----------------------------------------------------------------------------


class LogAudit:
    """Reads the whole log with `watch` from 0 and replays it: every event is explained by the
    ledger, and every reply equals the replayed state at the reply's `seq`."""

    def __init__(self) -> None:
        self.digests: list[bytes] = []  # per seq, of the log as read last time
        self.events_checked = 0  # events [1, events_checked] were checked against the ledger

    @staticmethod
    def read_log(port: int, to_seq: int) -> list[dict[str, Any]]:
        events = []
        if to_seq <= 0:
            return events
        with Client("127.0.0.1", port, timeout_seconds=60) as client:
            client.watch(from_seq=0)
            while True:
                event = client.next_event()
                events.append(event)
                if event["seq"] >= to_seq:
                    return events

    def run(self, port: int, ledger: Ledger, round_no: int, to_seq: int, reads: list[Op]) -> dict[str, Any]:
        bad = lambda kind, **detail: ledger.violation(round_no, "audit", kind, **detail)  # noqa: E731
        try:
            events = self.read_log(port, to_seq)
        except Exception as error:  # noqa: BLE001 - any failure to read the log is a finding
            bad("log_unreadable", error=repr(error))
            return {"log_events": 0}
        for index, event in enumerate(events):
            if event.get("seq") != index + 1:
                bad("log_not_contiguous", index=index, seq=event.get("seq"))
                return {"log_events": len(events)}
        digests = [hashlib.blake2b(msgpack.packb(e), digest_size=12).digest() for e in events]
        common = min(len(digests), len(self.digests))
        for index in range(common):
            if digests[index] != self.digests[index]:
                bad("log_history_changed", seq=index + 1, event=events[index])
                break
        if len(digests) < len(self.digests):
            bad("log_shrank", had=len(self.digests), now=len(digests))
        self.digests = digests

        replay = Replay()
        for event in events:
            problem = replay.apply(event)
            if problem:
                bad("log_inconsistent", event=event, problem=problem)
                return {"log_events": len(events)}
            if event["seq"] > self.events_checked:
                self._explain(event, replay, ledger, bad)
        self.events_checked = max(self.events_checked, len(events))

        audited = 0
        pending = [op for op in ledger.ops if not op.audited and op.reply is not None] + reads
        for op in pending:
            seq = op.reply.get("seq")
            if not isinstance(seq, int) or seq > to_seq:
                continue  # a maybe-era reply beyond what was read: checked next time
            problem = replay.check_reply(op)
            if problem:
                bad("reply_not_explained_by_log", request=op.brief(), problem=problem)
            op.audited = True
            audited += 1
        maybe = [op for op in ledger.ops if op.status == MAYBE and op.op in MUTATING]
        return {"log_events": len(events), "replies_audited": audited, "maybe_mutations": len(maybe)}

    @staticmethod
    def _explain(event: dict[str, Any], replay: Replay, ledger: Ledger, bad) -> None:
        kind = event["type"]
        if kind == "forgotten":
            bad("ids_forgotten_early", event=event)
            return
        if "rid" in event:
            info = ledger.rids.get(event["rid"])
            if info is None:
                bad("event_for_unknown_rid", event=event)
                return
            if kind == "reserved":
                if info.reserve.status == REFUSED:
                    bad("refused_reserve_logged", event=event, reserve=info.reserve.brief())
                if (sorted_lines(event["lines"]), event["ttl_ms"] or 0, event["ref"]) != (info.lines, info.ttl_ms, info.ref):
                    bad("logged_reserve_differs", event=event, sent=info.reserve.brief())
            elif kind == "released":
                if not info.sent("release"):
                    bad("unexplained_release_logged", event=event)
            elif kind == "committed":
                if not any(expected_commit_lines(info, o.fields) == sorted_lines(event["lines"]) for o in info.sent("commit")):
                    bad("unexplained_commit_logged", event=event)
            elif kind == "extended":
                if not any(o.fields["ttl_ms"] == event["ttl_ms"] for o in info.sent("extend")):
                    bad("unexplained_extend_logged", event=event)
            elif kind == "expired":
                expires = replay.expiry_before.get(event["seq"])
                if expires is None or event["ts_ms"] < expires:
                    bad("expired_early", event=event, expires_at_ms=expires)
                else:
                    # Due while the server was down: expired right after the start, not when
                    # someone happens to look (a lookup would expire it too, hiding a lost timer).
                    process = bisect.bisect_right(ledger.server_starts_ms, event["ts_ms"]) - 1
                    listened = ledger.server_listens_ms[process] if 0 <= process < len(ledger.server_listens_ms) else None
                    if listened is not None and expires <= listened:
                        due, slack = listened, RESTART_EXPIRY_SLACK_MS
                    else:
                        due, slack = expires, EXPIRY_SLACK_MS
                    if event["ts_ms"] - due > slack:
                        bad("expired_late", event=event, expires_at_ms=expires, due_ms=due, late_ms=event["ts_ms"] - due)
            return
        op = ledger.keys.get(event.get("key"))
        if op is None:
            bad("event_for_unknown_key", event=event)
            return
        fields = op.fields
        if op.status == REFUSED:
            bad("refused_request_logged", event=event, request=op.brief())
        if kind != EVENT_OF_OP[op.op]:
            bad("logged_key_differs", event=event, request=op.brief())
        elif kind == "adjusted" and (event["sku"], event["loc"], event["delta"], event["reason"]) != (fields["sku"], fields["loc"], fields["delta"], fields["reason"]):
            bad("logged_key_differs", event=event, request=op.brief())
        elif kind == "counted" and (event["sku"], event["loc"], event["on_hand"]) != (fields["sku"], fields["loc"], fields["on_hand"]):
            bad("logged_key_differs", event=event, request=op.brief())
        elif kind == "transferred" and (event["sku"], event["from"], event["to"], event["qty"]) != (fields["sku"], fields["from"], fields["to"], fields["qty"]):
            bad("logged_key_differs", event=event, request=op.brief())


class Replay:
    """The log applied to plain figures, with the history of every SKU-location and rid."""

    def __init__(self) -> None:
        self.stock: dict[tuple[str, str], list[int]] = {}  # [on_hand, reserved]
        self.stock_seqs: dict[tuple[str, str], list[int]] = {}
        self.stock_values: dict[tuple[str, str], list[tuple[int, int]]] = {}
        self.rid: dict[str, dict[str, Any]] = {}  # lines, state, expires_at_ms
        self.rid_seqs: dict[str, list[int]] = {}
        self.rid_values: dict[str, list[tuple[str, int | None]]] = {}
        self.event_at: dict[int, dict[str, Any]] = {}
        self.expiry_before: dict[int, int | None] = {}

    def _touch(self, key: tuple[str, str], seq: int) -> None:
        on_hand, reserved = self.stock[key]
        self.stock_seqs.setdefault(key, []).append(seq)
        self.stock_values.setdefault(key, []).append((on_hand, reserved))

    def _record_rid(self, rid: str, seq: int) -> None:
        r = self.rid[rid]
        self.rid_seqs.setdefault(rid, []).append(seq)
        self.rid_values.setdefault(rid, []).append((r["state"], r["expires_at_ms"]))

    def apply(self, event: dict[str, Any]) -> str | None:
        """Apply one event; return what is wrong with it, if anything."""
        seq, kind = event["seq"], event["type"]
        self.event_at[seq] = event
        if kind == "reserved":
            if event["rid"] in self.rid:
                return "rid reserved twice"
            for line in event["lines"]:
                key = (line["sku"], line["loc"])
                figures = self.stock.setdefault(key, [0, 0])
                figures[1] += line["qty"]
                if figures[0] - figures[1] < 0:
                    return f"oversell: available {figures[0] - figures[1]} at {key} after the reserve"
                self._touch(key, seq)
            self.rid[event["rid"]] = {"lines": event["lines"], "state": "held", "expires_at_ms": event["expires_at_ms"]}
            self._record_rid(event["rid"], seq)
        elif kind in ("released", "expired", "committed"):
            r = self.rid.get(event["rid"])
            if r is None or r["state"] != "held":
                return f"{kind} of a reservation that is {r and r['state']}"
            self.expiry_before[seq] = r["expires_at_ms"]
            shipped = {(l["sku"], l["loc"]): l["qty"] for l in event["lines"]} if kind == "committed" else {}
            for line in r["lines"]:
                key = (line["sku"], line["loc"])
                figures = self.stock[key]
                qty = shipped.get(key, 0)
                if not 0 <= qty <= line["qty"]:
                    return f"commits {qty} of a {line['qty']} hold"
                figures[1] -= line["qty"]
                figures[0] -= qty
                if figures[0] < 0 or figures[1] < 0:
                    return f"negative figures at {key}"
                self._touch(key, seq)
            r["state"] = kind
            self._record_rid(event["rid"], seq)
        elif kind == "extended":
            r = self.rid.get(event["rid"])
            if r is None or r["state"] != "held":
                return "extend of a reservation that is not held"
            r["expires_at_ms"] = event["expires_at_ms"]
            self._record_rid(event["rid"], seq)
        elif kind == "adjusted":
            key = (event["sku"], event["loc"])
            figures = self.stock.setdefault(key, [0, 0])
            figures[0] += event["delta"]
            if figures[0] < 0:
                return "on_hand below zero"
            self._touch(key, seq)
        elif kind == "counted":
            key = (event["sku"], event["loc"])
            figures = self.stock.setdefault(key, [0, 0])
            if figures[0] + event["variance"] != event["on_hand"]:
                return "variance does not match"
            figures[0] = event["on_hand"]
            self._touch(key, seq)
        elif kind == "transferred":
            source = self.stock.setdefault((event["sku"], event["from"]), [0, 0])
            target = self.stock.setdefault((event["sku"], event["to"]), [0, 0])
            source[0] -= event["qty"]
            target[0] += event["qty"]
            if source[0] - source[1] < 0:
                return "transfer left available below zero at the source"
            self._touch((event["sku"], event["from"]), seq)
            self._touch((event["sku"], event["to"]), seq)
        return None

    def figures_at(self, key: tuple[str, str], seq: int) -> dict[str, int]:
        seqs = self.stock_seqs.get(key, [])
        index = bisect.bisect_right(seqs, seq) - 1
        on_hand, reserved = self.stock_values[key][index] if index >= 0 else (0, 0)
        return {"on_hand": on_hand, "reserved": reserved, "available": on_hand - reserved}

    def rid_at(self, rid: str, seq: int) -> tuple[str, int | None] | None:
        seqs = self.rid_seqs.get(rid, [])
        index = bisect.bisect_right(seqs, seq) - 1
        return self.rid_values[rid][index] if index >= 0 else None

    def check_reply(self, op: Op) -> str | None:
        """Does `op.reply` equal the log's state at the reply's seq? Returns the difference."""
        reply, fields, seq = op.reply, op.fields, op.reply["seq"]
        code = "ok" if reply.get("ok") is True else reply.get("error")
        duplicate = bool(reply.get("duplicate"))

        def same_figures(key: tuple[str, str], shown: dict[str, Any], names=("on_hand", "reserved", "available")) -> str | None:
            logged = self.figures_at(key, seq)
            if any(shown.get(name) != logged[name] for name in names):
                return f"{key} shown {({n: shown.get(n) for n in names})}, log at seq {seq} has {logged}"
            return None

        def event_is(kind: str, **match: Any) -> str | None:
            event = self.event_at.get(seq)
            if event is None or event["type"] != kind or any(event.get(n) != v for n, v in match.items()):
                return f"acknowledged at seq {seq} but the log has {event} there"
            return None

        if op.op == "get" and code == "ok":
            if seq and not _contains(self.stock_seqs.get((fields["sku"], fields["loc"]), []), seq):
                return f"seq {seq} is not a change of this SKU-location"
            return same_figures((fields["sku"], fields["loc"]), reply)
        if op.op == "query" and code == "ok":
            for location in reply["locations"]:
                problem = same_figures((fields["sku"], location["loc"]), location)
                if problem:
                    return problem
            return None
        if op.op == "reserve":
            if code == "ok" and not duplicate:
                problem = event_is("reserved", rid=fields["rid"])
                if problem:
                    return problem
                for line in reply["lines"]:
                    problem = same_figures((line["sku"], line["loc"]), line, ("available",))
                    if problem:
                        return problem
            if code == "insufficient":
                if self.rid_at(fields["rid"], seq) is not None:
                    return "refused although the rid is reserved in the log"
                for line in reply.get("lines", []):
                    problem = same_figures((line["sku"], line["loc"]), line, ("available",))
                    if problem:
                        return problem
            return None
        if op.op in ("release", "commit", "extend", "lookup") or code in ("invalid_state", "not_found"):
            rid = fields.get("rid")
            if rid is None:
                return None
            at = self.rid_at(rid, seq)
            if code == "not_found":
                return None if at is None else f"not_found, but the log has the rid as {at} at seq {seq}"
            if code == "ok" and op.op in ("release", "commit", "extend") and not duplicate:
                kind = EVENT_OF_OP[op.op]
                problem = event_is(kind, rid=rid)
                if problem:
                    return problem
                if op.op == "extend" and reply.get("expires_at_ms") != self.event_at[seq]["expires_at_ms"]:
                    return "extend reply's expiry differs from the log"
                if op.op == "commit" and sorted_lines(reply["lines"]) != sorted_lines(self.event_at[seq]["lines"]):
                    return "commit reply's lines differ from the log"
                return None
            if code == "ok" and op.op == "lookup":
                if at is None or (reply["state"], reply.get("expires_at_ms")) != at:
                    return f"lookup shows {(reply['state'], reply.get('expires_at_ms'))}, log at seq {seq} has {at}"
                return None
            if code == "invalid_state":
                if at is None or reply.get("state") != at[0]:
                    return f"invalid_state {reply.get('state')}, log at seq {seq} has {at}"
            return None
        if op.op in ("adjust", "count", "transfer"):
            if code == "ok" and not duplicate:
                problem = event_is(EVENT_OF_OP[op.op], key=fields["key"])
                if problem:
                    return problem
                if op.op == "transfer":
                    return same_figures((fields["sku"], fields["from"]), reply["from"]) or same_figures((fields["sku"], fields["to"]), reply["to"])
                return same_figures((fields["sku"], fields["loc"]), reply)
            if code == "invalid" and op.op == "adjust":
                logged = self.figures_at((fields["sku"], fields["loc"]), seq)
                if logged["on_hand"] + fields["delta"] >= 0:
                    return f"adjust refused as invalid, but the log at seq {seq} has on_hand {logged['on_hand']}"
            if code == "insufficient":
                for line in reply.get("lines", []):
                    problem = same_figures((line["sku"], line["loc"]), line, ("available",))
                    if problem:
                        return problem
        return None


def _contains(ordered: list[int], value: int) -> bool:
    index = bisect.bisect_left(ordered, value)
    return index < len(ordered) and ordered[index] == value


# -- rounds -----------------------------------------------------------------------------------


@dataclass
class RoundResult:
    round: int
    startup_seconds: float  # process start to listening (recovery after the previous kill)
    replayed_records: int
    replay_seconds: float | None
    recovered_seq: int
    verify: dict[str, Any] = field(default_factory=dict)
    kill_after_seconds: float = 0.0
    requests_sent: int = 0
    acknowledged: int = 0
    refused: int = 0
    maybe: int = 0
    in_flight_at_kill: int = 0
    replies: dict[str, int] = field(default_factory=dict)
    violations: int = 0


def run_workload(port: int, ledger: Ledger, round_no: int, cfg: TortureConfig, rng: random.Random,
                 server: ServerProcess, result: RoundResult) -> None:
    """Drive the load, SIGKILL the server after a random delay, wait for the workers."""
    stop = threading.Event()
    deadline = time.monotonic() + cfg.seconds_per_round + 5
    carry = list(ledger.carry_over)
    rng.shuffle(carry)
    workers = [
        Worker(ledger, round_no, conn, port, rng.getrandbits(32), cfg.depth, deadline, stop, carry[conn :: cfg.connections])
        for conn in range(cfg.connections)
    ]
    if rng.random() < 0.1:  # now and then right after the start: amid the first requests and post-recovery expiries
        kill_after = rng.uniform(0.0, 0.05)
    else:
        kill_after = rng.uniform(cfg.kill_min_seconds, max(cfg.kill_min_seconds, cfg.seconds_per_round))
    ops_before = len(ledger.ops)
    started = time.monotonic()
    try:
        for worker in workers:
            worker.start()
        time.sleep(max(0.0, kill_after - (time.monotonic() - started)))
        result.in_flight_at_kill = sum(len(worker.in_flight) for worker in workers)
    finally:
        server.kill()
        result.kill_after_seconds = round(time.monotonic() - started, 3)
        stop.set()
        for worker in workers:
            worker.join(timeout=30)
    for worker in workers:
        if worker.is_alive():
            ledger.violation(round_no, "workload", "worker_hung", worker=worker.name)
    ops = ledger.ops[ops_before:]
    result.requests_sent = len(ops)
    if not ops:
        ledger.violation(round_no, "tool", "no_load", workers=[w.end_reason for w in workers])
    result.acknowledged = sum(op.status == ACKED for op in ops)
    result.refused = sum(op.status == REFUSED for op in ops)
    result.maybe = sum(op.status == MAYBE for op in ops)
    replies = Counter()
    for worker in workers:
        replies.update(worker.replies)
    result.replies = dict(sorted(replies.items()))


def run_torture(cfg: TortureConfig) -> dict[str, Any]:
    """Run `cfg.rounds` kill rounds plus a final restart and verification. Returns the report."""
    ledger = Ledger()
    audit = LogAudit()
    rng = random.Random(cfg.seed)
    workdir = Path(tempfile.mkdtemp(prefix="crash-torture-"))
    data_dir = Path(cfg.data_dir) if cfg.data_dir else workdir / "data"
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    rounds: list[RoundResult] = []
    final: dict[str, Any] = {}
    started = time.monotonic()
    say = print if cfg.verbose else (lambda *a, **k: None)
    server: ServerProcess | None = None
    try:
        for round_no in range(cfg.rounds + 1):
            last = round_no == cfg.rounds
            violations_before = len(ledger.violations)
            try:
                ledger.server_starts_ms.append(int(time.time() * 1000))
                server = ServerProcess(data_dir, logs / f"server-{round_no:03d}.log", cfg.snapshot_interval_seconds)
                ledger.server_listens_ms.append(server.listening_wall_ms)
            except RuntimeError as error:
                ledger.violation(round_no, "restart", "server_failed_to_start", error=str(error))
                server = None
                break
            result = RoundResult(round_no, round(server.startup_seconds, 3), server.replayed, server.replay_seconds, server.recovered_seq)
            try:
                if round_no == 0:
                    seed_stock(server.port, ledger)
                else:
                    result.verify = verify(server.port, ledger, round_no, audit, cfg.retry_sample, rng)
                if last:
                    final["clean_shutdown_exit_code"] = server.terminate()
                    if final["clean_shutdown_exit_code"] != 0:
                        ledger.violation(round_no, "shutdown", "clean_shutdown_failed", code=final["clean_shutdown_exit_code"], log=server.log_tail())
                else:
                    run_workload(server.port, ledger, round_no, cfg, rng, server, result)
            except Exception as error:  # noqa: BLE001 - a crash of the tool mid-round is reported, not hidden
                ledger.violation(round_no, "tool", "exception", error=repr(error), log=server.log_tail())
            finally:
                server.kill()
            result.violations = len(ledger.violations) - violations_before
            if not last:
                rounds.append(result)
            else:
                final["verify"] = result.verify
                final["startup_seconds"] = result.startup_seconds
                final["violations"] = result.violations
            v = result.verify
            say(
                f"round {round_no:3d}{' (final)' if last else ''}: recovery {result.startup_seconds:.2f} s "
                f"(replayed {result.replayed_records}, seq {result.recovered_seq})"
                + (f" | verify {v.get('verify_seconds', 0):.2f} s, audit {v.get('log_events', 0)} events {v.get('audit_seconds', 0):.2f} s" if v else "")
                + ("" if last else f" | sent {result.requests_sent}, ack {result.acknowledged}, refused {result.refused}, "
                   f"maybe {result.maybe}, in flight at kill {result.in_flight_at_kill}, killed at {result.kill_after_seconds:.2f} s")
                + f" | violations {result.violations}",
                flush=True,
            )
            for violation in ledger.violations[violations_before:][:5]:
                say("   VIOLATION", _short(violation), flush=True)
    finally:
        if server is not None:
            server.kill()
    elapsed = time.monotonic() - started
    startups = [r.startup_seconds for r in rounds[1:]] + ([final["startup_seconds"]] if "startup_seconds" in final else [])
    statuses = Counter(op.status for op in ledger.ops)
    maybe_mutations = [op for op in ledger.ops if op.status == MAYBE and op.op in MUTATING]
    report = {
        "config": {k: v for k, v in asdict(cfg).items() if k not in ("verbose",)},
        "command": _command(cfg),
        "rounds": len(rounds),
        "seconds": round(elapsed, 1),
        "requests_sent": len(ledger.ops),
        "acknowledged": statuses[ACKED],
        "refused": statuses[REFUSED],
        "maybe": statuses[MAYBE],
        "maybe_mutations": len(maybe_mutations),
        "rids": len(ledger.rids),
        "keys": len(ledger.keys),
        "max_seq_seen": ledger.max_seq,
        "recovery_seconds": _spread(startups),
        "violations": len(ledger.violations),
        "repeated_violations": ledger.repeated_violations,
        "violation_kinds": dict(Counter(v["kind"] for v in ledger.violations)),
        "violation_details": ledger.violations[:50],
        "per_round": [asdict(r) for r in rounds],
        "final": final,
        "workdir": str(workdir) if (ledger.violations or cfg.keep) else None,
        "data_dir": str(data_dir),
    }
    if ledger.violations or cfg.keep:
        say(f"kept data and server logs in {workdir}" + (f" (data in {data_dir})" if cfg.data_dir else ""))
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return report


def _spread(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)
    return {
        "count": len(ordered), "min": round(ordered[0], 3), "median": round(ordered[len(ordered) // 2], 3),
        "max": round(ordered[-1], 3), "mean": round(sum(ordered) / len(ordered), 3),
    }


def _short(violation: dict[str, Any], limit: int = 600) -> str:
    text = json.dumps(violation, default=str)
    return text if len(text) <= limit else text[:limit] + " ..."


def _command(cfg: TortureConfig) -> str:
    return (
        f".venv/bin/python bench/crash_torture.py --rounds {cfg.rounds} --seconds-per-round {cfg.seconds_per_round} "
        f"--connections {cfg.connections} --depth {cfg.depth} --seed {cfg.seed} "
        f"--snapshot-interval-seconds {cfg.snapshot_interval_seconds}"
    )


def parse_args(argv: list[str] | None = None) -> TortureConfig:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20, help="kill -9 rounds (then one final restart and check)")
    parser.add_argument("--seconds-per-round", type=float, default=2.0, help="the kill comes at a random time up to this")
    parser.add_argument("--connections", type=int, default=6, help="client connections (threads)")
    parser.add_argument("--depth", type=int, default=16, help="requests in flight per connection")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: from the clock; printed)")
    parser.add_argument("--data", default=None, help="new or empty data folder to use (default: a temporary one); it persists across rounds")
    parser.add_argument("--snapshot-interval-seconds", type=float, default=0.7, help="server's periodic snapshot interval")
    parser.add_argument("--retry-sample", type=int, default=200, help="older acknowledged ids retried per verification")
    parser.add_argument("--keep", action="store_true", help="keep the data folder and server logs even when all is well")
    parser.add_argument("--output", default=str(ROOT / "bench" / "results" / "crash_torture.json"), help="JSON report path ('' for none)")
    args = parser.parse_args(argv)
    if args.data and Path(args.data).exists() and any(Path(args.data).iterdir()):
        # The ledger must know every request the data has seen, or nothing can be verified.
        parser.error(f"--data {args.data} is not empty: give a new or empty folder")
    seed = args.seed if args.seed is not None else int(time.time()) % 1_000_000
    return TortureConfig(
        rounds=args.rounds, seconds_per_round=args.seconds_per_round, connections=args.connections, depth=args.depth,
        seed=seed, data_dir=args.data, snapshot_interval_seconds=args.snapshot_interval_seconds,
        retry_sample=args.retry_sample, output=args.output or None, keep=args.keep,
    )


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    print(f"crash torture: {cfg.rounds} rounds of up to {cfg.seconds_per_round} s, {cfg.connections} connections x "
          f"{cfg.depth} in flight, seed {cfg.seed}", flush=True)
    report = run_torture(cfg)
    summary = {k: report[k] for k in (
        "rounds", "seconds", "requests_sent", "acknowledged", "refused", "maybe", "maybe_mutations", "rids", "keys",
        "max_seq_seen", "recovery_seconds", "violations", "violation_kinds",
    )}
    print(json.dumps(summary, indent=2))
    if cfg.output:
        path = Path(cfg.output)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"wrote {path}")
    if report["violations"]:
        print(f"FAILED: {report['violations']} violations; reproduce with: {report['command']}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

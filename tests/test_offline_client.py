"""The offline-capable client (issue 13): a durable SQLite outbox drained to a real server.

Against real servers (`python -m engine serve` child processes, stopped and started again on
the same port and data): orders queued while the server is down and while it is killed mid-drain,
the app killed mid-drain and restarted, a link that drops between a request and its reply, and
the outbox's bound. Every order must be decided exactly once, and the server's own records
(`lookup`, `get`) must agree with the outcomes. Each of these tests prints a summary line
(`pytest -s`): orders queued, drained, duplicates answered, lost.

The pure parts (request checks, reply classification, backoff, the store) are tested first,
without a server.
"""

from __future__ import annotations

import json
import random
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from protocol import (
    Client,
    InvalidOutboxRequest,
    OfflineClient,
    Outcome,
    OutboxFull,
    OutboxInUse,
    OutboxStore,
    ServerError,
    UnknownEntry,
)
from protocol._outbox_policy import backoff_delay_seconds, judge_reply
from protocol._outbox_requests import prepare_request

from offline_app import STOCKS, order_lines
from reply_dropping_proxy import ReplyDroppingProxy
from scripted_server import ScriptedServer

ROOT = Path(__file__).resolve().parent.parent
APP = Path(__file__).resolve().parent / "offline_app.py"

# Tests reconnect fast: a restarted server is found within a fraction of a second.
FAST_RECONNECT = {"reconnect_delay_min_seconds": 0.02, "reconnect_delay_max_seconds": 0.2, "reply_timeout_seconds": 5.0}
DRAIN_DEADLINE_SECONDS = 60.0


def free_port() -> int:
    """A loopback port that was free a moment ago (the server binds it with SO_REUSEADDR)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until(condition, timeout_seconds: float, what: str) -> None:
    deadline = time.monotonic() + timeout_seconds
    while not condition():
        assert time.monotonic() < deadline, f"no {what} within {timeout_seconds} s"
        time.sleep(0.005)


@dataclass
class DrainSummary:
    queued: int
    decided: int
    granted: int
    refused: int
    duplicates: int
    lost: int

    def line(self, name: str) -> str:
        return (
            f"[{name}] orders queued {self.queued}, drained {self.decided} (granted {self.granted}, "
            f"refused {self.refused}), duplicates answered {self.duplicates}, lost {self.lost}"
        )


def verify_with_server(
    port: int, outcomes: list[Outcome], lines_by_rid: dict[str, tuple[str, str, int]], on_hand_by_stock: dict[tuple[str, str], int]
) -> DrainSummary:
    """Every reserve decided once, and the server's records agree: granted ones are held with
    their lines, refused ones left no trace, `reserved` is the sum of the granted, no oversell."""
    reserves = [outcome for outcome in outcomes if outcome.op == "reserve"]
    rids = Counter(outcome.idempotency_id for outcome in reserves)
    assert rids == Counter(list(lines_by_rid)), "each order exactly once in the outbox"
    held_by_stock: Counter = Counter()
    with Client("127.0.0.1", port) as server:
        for outcome in reserves:
            rid = outcome.idempotency_id
            sku, loc, qty = lines_by_rid[rid]
            assert outcome.decided, outcome
            if outcome.status == "granted":
                assert outcome.reply["rid"] == rid and outcome.error is None
                reservation = server.lookup(rid)
                assert reservation["state"] == "held", (rid, reservation)
                assert reservation["lines"] == [{"sku": sku, "loc": loc, "qty": qty}]
                held_by_stock[(sku, loc)] += qty
            else:
                assert outcome.status == "refused" and outcome.error == "insufficient", outcome
                (short_line,) = outcome.reply["lines"]
                assert short_line["requested"] == qty and short_line["available"] < qty
                with pytest.raises(ServerError) as refused:
                    server.lookup(rid)
                assert refused.value.code == "not_found", f"refused {rid} is on the server"
        for stock, on_hand in on_hand_by_stock.items():
            figures = server.get(*stock)
            assert figures["on_hand"] == on_hand
            assert figures["reserved"] == held_by_stock[stock], (stock, figures, held_by_stock[stock])
            assert figures["available"] >= 0, f"{stock} oversold: {figures}"
    granted = sum(outcome.status == "granted" for outcome in reserves)
    decided = sum(outcome.decided for outcome in reserves)
    return DrainSummary(
        queued=len(lines_by_rid), decided=decided, granted=granted, refused=decided - granted,
        duplicates=sum(outcome.duplicate for outcome in reserves), lost=len(lines_by_rid) - decided,
    )


def load_stock(port: int, on_hand_by_stock: dict[tuple[str, str], int]) -> None:
    with Client("127.0.0.1", port) as client:
        for number, ((sku, loc), on_hand) in enumerate(on_hand_by_stock.items()):
            client.adjust(f"stock-{number}", sku, loc, on_hand, "receipt")


# -- requests, replies, backoff: pure ------------------------------------------------------------


def test_only_valid_mutating_requests_are_queued_and_each_gets_an_id():
    with pytest.raises(InvalidOutboxRequest, match="only mutating ops"):
        prepare_request("get", {"sku": "a", "loc": "b"})
    with pytest.raises(InvalidOutboxRequest, match="bad_request.*'qty'"):
        prepare_request("reserve", {"rid": "r", "lines": [{"sku": "a", "loc": "b", "qty": 0}]})
    with pytest.raises(InvalidOutboxRequest, match="needs the 'rid'"):
        prepare_request("commit", {})
    with pytest.raises(InvalidOutboxRequest, match="the outbox sets it"):
        prepare_request("release", {"rid": "r", "id": 4})
    with pytest.raises(InvalidOutboxRequest, match="above the frame bound"):
        prepare_request("reserve", {"rid": "r", "lines": [{"sku": "a", "loc": "b", "qty": 1}], "ref": "x" * 200}, max_frame_bytes=100)
    generated = prepare_request("reserve", {"lines": [{"sku": "a", "loc": "b", "qty": 1}], "ttl_ms": None})
    assert generated.fields["rid"] == generated.idempotency_id and len(generated.idempotency_id) == 36
    assert "ttl_ms" not in generated.fields
    assert prepare_request("transfer", {"key": "t-1", "sku": "a", "from": "x", "to": "y", "qty": 2}).idempotency_id == "t-1"


def test_replies_are_final_or_retried_as_documented():
    assert judge_reply({"id": 1, "ok": True, "rid": "r"}).outcome == "granted"
    assert judge_reply({"id": 1, "ok": True, "rid": "r", "duplicate": True}).outcome == "granted"
    for code in ("insufficient", "not_found", "conflict", "invalid_state", "invalid", "bad_request", "unknown_op", "new_code"):
        verdict = judge_reply({"id": 1, "ok": False, "error": code, "message": "m"})
        assert verdict.final and verdict.outcome == "refused", code
    for code in ("overloaded", "internal", "unauthorized", "unsupported_version"):
        assert not judge_reply({"id": 1, "ok": False, "error": code, "message": "m"}).final, code


def test_backoff_grows_to_its_bound_with_jitter():
    chooser = random.Random(1)
    delays = [backoff_delay_seconds(failures, 0.1, 2.0, chooser) for failures in range(1, 60)]
    assert 0.05 <= delays[0] <= 0.1
    assert all(1.0 <= delay <= 2.0 for delay in delays[6:])
    assert len({round(delay, 6) for delay in delays[6:]}) > 10, "jittered, not in step"


# -- the store: durable, bounded, decided once ---------------------------------------------------


def test_store_keeps_requests_and_outcomes_across_reopening(tmp_path):
    path = tmp_path / "outbox.sqlite"
    store = OutboxStore(path)
    first = store.append("reserve", {"rid": "r1", "lines": [{"sku": "a", "loc": "b", "qty": 1}]}, "r1", now_ms=10)
    second = store.append("release", {"rid": "r1"}, "r1", now_ms=11)
    assert (first.status, second.local_id) == ("pending", first.local_id + 1)
    assert store._database.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store._database.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL: fsync at every commit
    store.mark_sent(first.local_id, now_ms=12)
    store.close()

    store = OutboxStore(path)
    assert store.sent_undecided_ids() == [first.local_id]
    assert store.next_undecided().fields == {"rid": "r1", "lines": [{"sku": "a", "loc": "b", "qty": 1}]}
    decided = store.record_outcome(first.local_id, "granted", {"id": 9, "ok": True, "rid": "r1", "duplicate": True}, now_ms=13)
    assert decided.status == "granted" and decided.duplicate and decided.reply == {"ok": True, "rid": "r1", "duplicate": True}
    with pytest.raises(AssertionError, match="decided twice"):
        store.record_outcome(first.local_id, "refused", {"ok": False, "error": "invalid"}, now_ms=14)
    assert store.next_undecided().local_id == second.local_id and store.undecided_count() == 1
    store.close()
    assert OutboxStore(path).outcome(first.local_id).status == "granted"


def test_store_refuses_at_its_bound_and_drops_nothing(tmp_path):
    store = OutboxStore(tmp_path / "outbox.sqlite", undecided_max=3, decided_kept_max=2)
    queued = [store.append("adjust", {"key": f"k{n}"}, f"k{n}", now_ms=n) for n in range(3)]
    with pytest.raises(OutboxFull, match=r"undecided_max=3.*k3.*NOT queued"):
        store.append("adjust", {"key": "k3"}, "k3", now_ms=3)
    assert [outcome.idempotency_id for outcome in store.outcomes()] == ["k0", "k1", "k2"]
    store.record_outcome(queued[0].local_id, "granted", {"ok": True}, now_ms=4)
    store.append("adjust", {"key": "k3"}, "k3", now_ms=5)  # room again
    for outcome in queued[1:]:
        store.record_outcome(outcome.local_id, "granted", {"ok": True}, now_ms=6)
    # Decided rows past decided_kept_max go, oldest first; undecided ones never do.
    assert [outcome.idempotency_id for outcome in store.outcomes()] == ["k1", "k2", "k3"]
    with pytest.raises(UnknownEntry):
        store.outcome(queued[0].local_id)
    store.close()
    store = OutboxStore(tmp_path / "outbox.sqlite", undecided_max=3, decided_kept_max=2)  # counts what it finds
    store.record_outcome(store.next_undecided().local_id, "refused", {"ok": False, "error": "invalid"}, now_ms=7)
    assert [outcome.idempotency_id for outcome in store.outcomes()] == ["k2", "k3"]
    store.close()


def test_one_drainer_per_outbox_file(tmp_path):
    path = tmp_path / "outbox.sqlite"
    with OfflineClient(path, port=free_port(), **FAST_RECONNECT):
        with pytest.raises(OutboxInUse):
            OfflineClient(path, port=free_port())
    with OfflineClient(path, port=free_port(), **FAST_RECONNECT) as reopened:
        assert reopened.pending_count() == 0


def test_a_request_sent_but_unanswered_past_the_resend_window_is_not_resent(tmp_path):
    path = tmp_path / "outbox.sqlite"
    store = OutboxStore(path)
    queued = store.append("adjust", {"key": "k", "sku": "a", "loc": "b", "delta": 1, "reason": "receipt"}, "k", now_ms=0)
    store.mark_sent(queued.local_id, now_ms=1_000)
    store.close()
    now_ms = 1_000 + 24 * 3600 * 1000
    with OfflineClient(path, port=free_port(), clock_ms=lambda: now_ms, **FAST_RECONNECT) as client:
        outcome = client.wait(queued.local_id, timeout_seconds=10)
    assert outcome.status == "unknown" and "resend window" in outcome.message and outcome.attempts == 1


def test_transient_replies_retry_the_same_request_before_any_later_one(tmp_path):
    """`overloaded` and `internal` leave the request queued: it is sent again with the same id,
    after a backoff, and the request behind it waits (the outbox's order)."""
    answers = {"order-1": [("overloaded", None), ("internal", None), (None, {"rid": "order-1", "lines": [], "expires_at_ms": None})]}

    def answer(request: dict) -> dict:
        if request["op"] == "hello":
            return {"ok": True, "server": "scripted", "version": 1}
        script = answers.get(request["rid"])
        code, fields = script.pop(0) if script else (None, {"rid": request["rid"]})
        if code is not None:
            return {"ok": False, "error": code, "message": f"scripted {code}"}
        return {"ok": True, **fields}

    with ScriptedServer(answer) as server:
        with OfflineClient(tmp_path / "outbox.sqlite", "127.0.0.1", server.port, **FAST_RECONNECT) as client:
            first = client.reserve("order-1", [("sku", "loc", 1)])
            second = client.release("order-2")
            assert client.wait_until_drained(30), client.last_error
            first_outcome, second_outcome = client.outcome(first.local_id), client.outcome(second.local_id)
        sent = [(request["op"], request.get("rid")) for request in server.received if request["op"] != "hello"]
    assert sent == [("reserve", "order-1")] * 3 + [("release", "order-2")]
    assert (first_outcome.status, first_outcome.attempts, first_outcome.duplicate) == ("granted", 3, False)
    assert (second_outcome.status, second_outcome.attempts) == ("granted", 1)


def test_a_refused_hello_or_a_missing_reply_keeps_the_request_queued(tmp_path):
    """A refused `hello` (wrong token) is a connection problem: nothing is decided, the client
    says why and tries again. A reply that never comes: after the timeout the client reconnects
    and resends with the same id."""
    hellos_refused = 2
    replies_withheld = 1

    def answer(request: dict) -> dict | None:
        nonlocal hellos_refused, replies_withheld
        if request["op"] == "hello":
            if hellos_refused:
                hellos_refused -= 1
                return {"ok": False, "error": "unauthorized", "message": "bad token"}
            return {"ok": True, "server": "scripted", "version": 1}
        if replies_withheld:
            replies_withheld -= 1
            return None
        return {"ok": True, "sku": "sku", "loc": "loc", "on_hand": 1, "reserved": 0, "available": 1}

    settings = {**FAST_RECONNECT, "reply_timeout_seconds": 0.3}
    with ScriptedServer(answer) as server:
        with OfflineClient(tmp_path / "outbox.sqlite", "127.0.0.1", server.port, token="t", **settings) as client:
            queued = client.adjust(None, "sku", "loc", 1, "receipt")
            wait_until(lambda: client.last_error is not None and "unauthorized" in client.last_error, 10, "refused hello")
            assert client.outcome(queued.local_id).status == "pending"
            outcome = client.wait(queued.local_id, timeout_seconds=30)
        adjusts = [request for request in server.received if request["op"] == "adjust"]
    assert outcome.status == "granted" and outcome.attempts == 2
    assert [request["key"] for request in adjusts] == [queued.idempotency_id] * 2
    assert [request["token"] for request in server.received if request["op"] == "hello"] == ["t"] * 4


# -- against real servers ------------------------------------------------------------------------


def test_orders_queued_while_the_server_is_down_are_each_decided_once(server_process, tmp_path):
    """The server is down while 200 orders are queued; it starts, is killed -9 mid-drain and
    started again; every order is decided exactly once, as the server's records say."""
    port = free_port()
    on_hand_by_stock = {STOCKS[0]: 120, STOCKS[1]: 80}
    server = server_process("--port", str(port))
    load_stock(port, on_hand_by_stock)
    assert server.terminate() == 0
    lines = order_lines(200, seed=13)
    lines_by_rid = {f"order-{number}": line for number, line in enumerate(lines)}

    with OfflineClient(tmp_path / "outbox.sqlite", "127.0.0.1", port, **FAST_RECONNECT) as client:
        started = time.monotonic()
        queued = [client.reserve(rid, [line], ref=rid) for rid, line in lines_by_rid.items()]
        submit_seconds = time.monotonic() - started
        assert all(outcome.status == "pending" for outcome in queued)
        assert client.pending_count() == 200
        wait_until(lambda: client.last_error is not None, 10, "failed connection attempt")
        assert "cannot connect" in client.last_error and client.pending_count() == 200

        server = server_process("--port", str(port))
        wait_until(lambda: client.pending_count() <= 150, 30, "progress of the drain")
        server.kill()  # mid-drain: a request may be in flight, applied or not
        killed_with_pending = client.pending_count()
        server_process("--port", str(port))
        started = time.monotonic()
        assert client.wait_until_drained(DRAIN_DEADLINE_SECONDS), client.last_error
        drain_seconds = time.monotonic() - started
        outcomes = client.outcomes(limit=1000)

    summary = verify_with_server(port, outcomes, lines_by_rid, on_hand_by_stock)
    assert summary.lost == 0 and summary.decided == 200
    assert 0 < summary.granted < 200, "some orders fit, some did not"
    print(
        f"\n{summary.line('server down, then killed mid-drain')}; queued in {submit_seconds * 1000:.0f} ms "
        f"({submit_seconds / 200 * 1e6:.0f} µs each); server killed with {killed_with_pending} pending; "
        f"the rest drained in {drain_seconds:.2f} s after restart"
    )


KILL_ROUNDS_MAX = 8


def _start_app(outbox: Path, port: int, log_path: Path, *extra: str) -> subprocess.Popen:
    with open(log_path, "w") as log:
        return subprocess.Popen(
            [sys.executable, str(APP), str(outbox), str(port), "--record-delay-seconds", "0.02", *extra],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        )


def _callback_lines(log_path: Path) -> list[dict]:
    return [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]


def test_app_killed_mid_drain_and_restarted_loses_nothing_and_applies_nothing_twice(server_process, tmp_path):
    """SIGKILL the app three times (or more, up to eight, until a kill catches an applied request
    in flight) while it drains 200 orders; each restart resumes on the same outbox. Requests in flight at a kill that the server had applied are answered `duplicate: true`."""
    on_hand_by_stock = {STOCKS[0]: 120, STOCKS[1]: 80}
    server = server_process()
    load_stock(server.port, on_hand_by_stock)
    outbox = tmp_path / "outbox.sqlite"
    lines_by_rid = {f"order-{number}": line for number, line in enumerate(order_lines(200, seed=5))}
    apps: list[subprocess.Popen] = []
    logs: list[Path] = []
    in_flight_applied: set[str] = set()  # sent, not recorded at a kill, yet held by the server
    in_flight_total = 0
    try:
        logs.append(tmp_path / "app-0.log")
        apps.append(_start_app(outbox, server.port, logs[-1], "--orders", "200", "--seed", "5"))
        wait_until(lambda: "submitted 200" in logs[0].read_text(), 30, "submission of 200 orders")
        # At least three kills, and more (up to eight) until one has caught a request the server
        # applied before its reply was recorded: where a kill lands is timing, not a given.
        for kill_round in range(KILL_ROUNDS_MAX):
            if kill_round >= 3 and in_flight_applied:
                break
            decided_before_kill = 15
            wait_until(lambda: len(_callback_lines(logs[-1])) >= decided_before_kill, 30, f"{decided_before_kill} outcomes")
            apps[-1].send_signal(signal.SIGKILL)
            assert apps[-1].wait(timeout=10) == -signal.SIGKILL
            store = OutboxStore(outbox)
            in_flight = [store.outcome(local_id).idempotency_id for local_id in store.sent_undecided_ids()]
            assert store.undecided_count() > 0, "the kill must land mid-drain"
            store.close()
            assert len(in_flight) <= 1, "one request in flight at a time"
            in_flight_total += len(in_flight)
            with Client("127.0.0.1", server.port) as reader:
                for rid in in_flight:
                    try:
                        reader.lookup(rid)
                        in_flight_applied.add(rid)
                    except ServerError as error:
                        assert error.code == "not_found"
            logs.append(tmp_path / f"app-{kill_round + 1}.log")
            apps.append(_start_app(outbox, server.port, logs[-1]))
        assert apps[-1].wait(timeout=DRAIN_DEADLINE_SECONDS) == 0, logs[-1].read_text()
    finally:
        for app in apps:
            if app.poll() is None:
                app.kill()
                app.wait(timeout=10)

    store = OutboxStore(outbox)
    outcomes = store.outcomes(limit=1000)
    store.close()
    summary = verify_with_server(server.port, outcomes, lines_by_rid, on_hand_by_stock)
    assert summary.lost == 0
    by_rid = {outcome.idempotency_id: outcome for outcome in outcomes}
    for rid in in_flight_applied:
        assert by_rid[rid].duplicate and by_rid[rid].status == "granted", by_rid[rid]
    assert summary.duplicates >= len(in_flight_applied) >= 1, "a kill must have caught an applied request in flight"
    heard = Counter(line["local_id"] for log_path in logs for line in _callback_lines(log_path))
    assert max(heard.values()) == 1, "an outcome announced twice"
    print(
        f"\n{summary.line(f'app killed {len(apps) - 1} times mid-drain')}; in flight at the kills {in_flight_total}, "
        f"of which applied by the server {len(in_flight_applied)} (each answered duplicate: true); "
        f"outcomes announced {len(heard)}, none twice"
    )


def test_link_dropped_between_request_and_reply(server_process, tmp_path):
    """The server applies a request, the link drops before the reply: the client reconnects,
    resends with the same id, and records the original reply (`duplicate: true`) once."""
    stock = STOCKS[0]
    server = server_process()
    load_stock(server.port, {stock: 10})
    dropped_ids = {"receipt-7", "order-0", "order-2"}
    lines_by_rid = {"order-0": (*stock, 3), "order-1": (*stock, 2), "order-2": (*stock, 4), "order-3": (*stock, 100)}
    with ReplyDroppingProxy(server.port, dropped_ids) as proxy:
        with OfflineClient(tmp_path / "outbox.sqlite", "127.0.0.1", proxy.port, **FAST_RECONNECT) as client:
            receipt = client.adjust("receipt-7", *stock, 5, "receipt")
            for rid, line in lines_by_rid.items():
                client.reserve(rid, [line])
            assert client.wait_until_drained(DRAIN_DEADLINE_SECONDS), client.last_error
            outcomes = client.outcomes()
        assert sorted(proxy.dropped) == sorted(dropped_ids)
        assert proxy.connections == 1 + len(dropped_ids)

    receipt_outcome = outcomes[0]
    assert receipt_outcome.local_id == receipt.local_id
    assert (receipt_outcome.status, receipt_outcome.duplicate, receipt_outcome.attempts) == ("granted", True, 2)
    assert receipt_outcome.reply["on_hand"] == 15, "the original reply: the figures right after the receipt"
    by_rid = {outcome.idempotency_id: outcome for outcome in outcomes[1:]}
    for rid, outcome in by_rid.items():
        assert outcome.duplicate == (rid in dropped_ids), outcome
        assert outcome.attempts == (2 if rid in dropped_ids else 1), outcome
    summary = verify_with_server(server.port, outcomes, lines_by_rid, {stock: 15})
    assert (summary.granted, summary.refused, summary.lost) == (3, 1, 0)
    assert summary.duplicates == 2
    print(
        f"\n{summary.line('link dropped before 3 replies')}; receipt applied once (on_hand 15), "
        f"dropped replies {sorted(proxy.dropped)} each answered duplicate: true on the resend"
    )


def test_outbox_bound_refuses_new_requests_and_keeps_the_queued_ones(server_process, tmp_path):
    port = free_port()
    stock = STOCKS[1]
    lines_by_rid = {f"order-{number}": (*stock, 1) for number in range(4)}
    heard: list[int] = []

    def failing_callback(outcome: Outcome) -> None:
        heard.append(outcome.local_id)
        raise RuntimeError("an app bug in on_outcome is logged; the drainer goes on")

    with OfflineClient(
        tmp_path / "outbox.sqlite", "127.0.0.1", port, undecided_max=5, on_outcome=failing_callback, **FAST_RECONNECT
    ) as client:
        client.adjust("receipt-1", *stock, 3, "receipt")
        for rid, line in lines_by_rid.items():
            client.reserve(rid, [line])
        with pytest.raises(OutboxFull, match=r"5 undecided requests.*undecided_max=5.*order-4.*NOT queued"):
            client.reserve("order-4", [(*stock, 1)])
        assert client.pending_count() == 5
        assert [outcome.idempotency_id for outcome in client.outcomes()] == ["receipt-1", *lines_by_rid]

        server_process("--port", str(port))
        assert client.wait_until_drained(DRAIN_DEADLINE_SECONDS), client.last_error
        summary = verify_with_server(port, client.outcomes(), lines_by_rid, {stock: 3})
        assert (summary.granted, summary.refused, summary.lost) == (3, 1, 0)
        late = client.reserve("order-4", [(*stock, 1)])  # room again once drained
        assert client.wait(late.local_id, timeout_seconds=30).error == "insufficient"
    assert heard == list(range(1, 7)), "every outcome announced once, in order"
    print(f"\n{summary.line('outbox bound 5')}; the 6th request was refused locally with OutboxFull, none dropped")

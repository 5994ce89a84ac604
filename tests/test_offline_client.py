"""The offline client's outbox (issue 13): request checks, reply classification, backoff, and
the SQLite store, without a server."""

from __future__ import annotations

import random

import pytest

from protocol import InvalidOutboxRequest, OutboxFull, OutboxStore, UnknownEntry
from protocol._outbox_policy import backoff_delay_seconds, judge_reply
from protocol._outbox_requests import prepare_request


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

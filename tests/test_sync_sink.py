"""The sync's read model and SQL sink, without an engine: figures equal to the core's
`apply_event`, duplicates skipped, a database failure mid-transaction leaves nothing, dead letters."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from engine.core import State, apply_event
from engine.sync.databases import Database, open_database
from engine.sync.sink import ReadModelSink


def _line(sku: str, loc: str, qty: int) -> dict:
    return {"sku": sku, "loc": loc, "qty": qty}


def _events() -> list[dict]:
    """Every event type, a multi-line reserve, a short pick, an expiry, a transfer, a forget."""
    bodies = [
        {"type": "adjusted", "key": "k1", "sku": "s1", "loc": "A", "delta": 10, "reason": "receipt"},
        {"type": "adjusted_batch", "key": "k2", "lines": [{"sku": "s1", "loc": "B", "delta": 5}, {"sku": "s2", "loc": "A", "delta": 7}], "reason": "receipt"},
        {"type": "counted", "key": "k3", "sku": "s2", "loc": "A", "on_hand": 9, "variance": 2, "reason": None},
        {"type": "counted_batch", "key": "k4", "lines": [{"sku": "s1", "loc": "A", "on_hand": 12, "variance": 2}, {"sku": "s3", "loc": "A", "on_hand": 4, "variance": 4}], "reason": "cycle"},
        {"type": "reserved", "rid": "r1", "lines": [_line("s1", "A", 3), _line("s2", "A", 2)], "ttl_ms": 0, "expires_at_ms": None, "ref": "o1"},
        {"type": "reserved", "rid": "r2", "lines": [_line("s1", "B", 2)], "ttl_ms": 1000, "expires_at_ms": 2000, "ref": None},
        {"type": "extended", "rid": "r2", "ttl_ms": 5000, "expires_at_ms": 9000},
        {"type": "committed", "rid": "r1", "lines": [_line("s1", "A", 2), _line("s2", "A", 0)]},
        {"type": "released", "rid": "r2", "lines": [_line("s1", "B", 2)]},
        {"type": "reserved", "rid": "r3", "lines": [_line("s3", "A", 4)], "ttl_ms": 10, "expires_at_ms": 100, "ref": None},
        {"type": "expired", "rid": "r3", "lines": [_line("s3", "A", 4)]},
        {"type": "transferred", "key": "k5", "sku": "s1", "from": "A", "to": "B", "qty": 5},
        {"type": "forgotten", "rids": ["r2"], "keys": ["k1"]},
        {"type": "reserved", "rid": "r4", "lines": [_line("s2", "A", 3)], "ttl_ms": 0, "expires_at_ms": None, "ref": "o4"},
        {"type": "committed", "rid": "r4", "lines": [_line("s2", "A", 3)]},
        {"type": "reserved", "rid": "r5", "lines": [_line("s1", "B", 1), _line("s3", "A", 1)], "ttl_ms": 0, "expires_at_ms": None, "ref": None},
    ]
    return [{"seq": index + 1, "ts_ms": 1000 + index, **body} for index, body in enumerate(bodies)]


def _core_state(events: list[dict]) -> State:
    state = State()
    for event in events:
        apply_event(state, json.loads(json.dumps(event)))
    return state


def _sink(path: Path) -> ReadModelSink:
    sink = ReadModelSink(open_database(f"sqlite:///{path}"))
    sink.create_schema()
    return sink


def _stock_rows(sink: ReadModelSink) -> dict:
    rows = sink.database.execute("SELECT sku, loc, on_hand, reserved, available FROM stock").fetchall()
    return {(sku, loc): (on_hand, reserved, available) for sku, loc, on_hand, reserved, available in rows}


def _reservation_rows(sink: ReadModelSink) -> dict:
    rows = sink.database.execute("SELECT rid, state, lines, ref, expires_at_ms, committed FROM reservations").fetchall()
    return {rid: (state, json.loads(lines), ref, expires, None if committed is None else json.loads(committed))
            for rid, state, lines, ref, expires, committed in rows}


def assert_equal_to_core(sink: ReadModelSink, state: State) -> None:
    expected_stock = {key: (stock.on_hand, stock.reserved, stock.available) for key, stock in state.stocks.items()}
    assert _stock_rows(sink) == expected_stock
    reservations = _reservation_rows(sink)
    for rid in state.reservations:
        reservation = state.reservation(rid)
        committed = None if reservation.committed is None else [_line(*line) for line in reservation.committed]
        expected = (reservation.state, [_line(*line) for line in reservation.lines], reservation.ref, reservation.expires_at_ms, committed)
        assert reservations[rid] == expected, rid


def test_read_model_figures_equal_the_cores_apply_event(tmp_path):
    events = _events()
    sink = _sink(tmp_path / "model.db")
    outcome = sink.apply_batch(events)
    assert (outcome.applied, outcome.duplicates, outcome.dead_lettered, outcome.offset) == (len(events), 0, 0, len(events))
    assert_equal_to_core(sink, _core_state(events))
    # The forgotten reservation stays in the read model, closed.
    assert _reservation_rows(sink)["r2"][0] == "released"
    assert sink.read_offset() == (len(events), events[-1]["ts_ms"])


@pytest.mark.parametrize("batch_size", [1, 2, 3, 5, 7])
def test_any_cut_into_batches_gives_the_same_figures(tmp_path, batch_size):
    """Reserves and their commits, extends and releases in one batch or in different ones."""
    events = _events()
    sink = _sink(tmp_path / "model.db")
    for start in range(0, len(events), batch_size):
        assert sink.apply_batch(events[start : start + batch_size]).dead_lettered == 0
    assert_equal_to_core(sink, _core_state(events))
    assert sink.dead_letter_count() == 0


def test_replayed_events_are_skipped_as_duplicates(tmp_path):
    events = _events()
    sink = _sink(tmp_path / "model.db")
    sink.apply_batch(events[:10])
    outcome = sink.apply_batch(events[5:])  # 5 already applied, then the rest
    assert (outcome.applied, outcome.duplicates) == (len(events) - 10, 5)
    assert sink.apply_batch(events).duplicates == len(events)
    assert_equal_to_core(sink, _core_state(events))


class _FailingConnection:
    """A sqlite3 connection whose `fail_at`-th statement raises, as a lost connection would."""

    def __init__(self, connection: sqlite3.Connection, fail_at: int):
        self._connection = connection
        self.statements = 0
        self.fail_at = fail_at

    def cursor(self):
        outer = self

        class Cursor:
            def __init__(self):
                self._cursor = outer._connection.cursor()

            def execute(self, statement, parameters=()):
                outer.statements += 1
                if outer.statements == outer.fail_at:
                    raise sqlite3.OperationalError("injected: connection lost")
                return self._cursor.execute(statement, parameters)

            def executemany(self, statement, rows):
                outer.statements += 1
                if outer.statements == outer.fail_at:
                    raise sqlite3.OperationalError("injected: connection lost")
                return self._cursor.executemany(statement, rows)

            def __getattr__(self, name):
                return getattr(self._cursor, name)

        return Cursor()

    def close(self):
        self._connection.close()


REJECT_S3 = "CREATE TRIGGER no_s3 BEFORE INSERT ON stock WHEN NEW.sku = 's3' BEGIN SELECT RAISE(ABORT, 'no s3 here'); END"


def _sink_after_four(path: Path, rejecting: bool) -> ReadModelSink:
    sink = _sink(path)
    sink.apply_batch(_events()[:3])
    if rejecting:  # from event 4 on, batches touching s3 fall back to one savepoint per event
        sink.database.execute(REJECT_S3)
    sink.apply_batch(_events()[3:4])
    return sink


def _statements_of_one_batch(path: Path, events: list[dict], rejecting: bool) -> int:
    sink = _sink_after_four(path, rejecting)
    counting = _FailingConnection(sink.database.connection, fail_at=0)
    database = sink.database
    ReadModelSink(Database(counting, "sqlite", database.rejected_errors, database.failure_errors)).apply_batch(events[4:])
    counting.close()
    return counting.statements


@pytest.mark.parametrize("rejecting", [False, True], ids=["summed", "one-by-one"])
def test_a_database_failure_at_any_statement_leaves_neither_rows_nor_offset(tmp_path, rejecting):
    """The transaction boundary: rows and offset commit together or not at all, whichever
    statement of the batch fails, COMMIT included; on the fast path (stock summed per batch) and
    on the path with a savepoint per event that a refused row leads to. (For SQLite this stands
    in for a dropped connection; the PostgreSQL test in test_sync.py terminates the real backend
    mid-stream.)"""
    events = _events()
    statements = _statements_of_one_batch(tmp_path / "count.db", events, rejecting)
    assert statements > (40 if rejecting else 6)
    for fail_at in range(1, statements + 1):
        path = tmp_path / f"model-{fail_at}.db"
        sink = _sink_after_four(path, rejecting)
        before = (_stock_rows(sink), _reservation_rows(sink), sink.read_offset(), sink.dead_letter_count())
        database = sink.database
        failing = _FailingConnection(database.connection, fail_at)
        broken = ReadModelSink(Database(failing, "sqlite", database.rejected_errors, database.failure_errors))
        with pytest.raises(sqlite3.OperationalError, match="injected"):
            broken.apply_batch(events[4:])
        broken.database.close()
        resumed = _sink(path)
        assert (_stock_rows(resumed), _reservation_rows(resumed), resumed.read_offset(), resumed.dead_letter_count()) == before, fail_at
        offset, _ = resumed.read_offset()
        resumed.apply_batch(events[offset:])
        if rejecting:
            resumed.database.execute("DROP TRIGGER no_s3")
            assert resumed.retry_dead_letters().still_rejected == 0
        assert_equal_to_core(resumed, _core_state(events))
        resumed.database.close()


def test_rejected_rows_go_to_dead_letters_and_replay_later(tmp_path):
    events = _events()
    sink = _sink(tmp_path / "model.db")
    # The operator forbids rows for SKU s3 (a constraint the sync knows nothing about).
    sink.database.execute(REJECT_S3)
    outcome = sink.apply_batch(events)
    # counted_batch (4), reserve r3 (10), its expiry (11) and the multi-line reserve r5 (16).
    dead = [seq for (seq,) in sink.database.execute("SELECT seq FROM dead_letters ORDER BY seq").fetchall()]
    assert dead == [4, 10, 11, 16]
    assert (outcome.applied, outcome.dead_lettered, outcome.offset) == (len(events) - 4, 4, len(events))
    reasons = [reason for (reason,) in sink.database.execute("SELECT reason FROM dead_letters ORDER BY seq").fetchall()]
    assert all("IntegrityError: no s3 here" in reason for reason in reasons), reasons
    # The stream went on: s1/B has the transfer and the release.
    assert _stock_rows(sink)[("s1", "B")] == (10, 0, 10)

    retry = sink.retry_dead_letters()
    assert (retry.retried, retry.applied, retry.still_rejected) == (4, 0, 4)
    assert sink.dead_letter_count() == 4
    sink.database.execute("DROP TRIGGER no_s3")
    retry = sink.retry_dead_letters(chunk_max=3)
    assert (retry.retried, retry.applied, retry.still_rejected) == (4, 4, 0)
    assert sink.dead_letter_count() == 0
    assert_equal_to_core(sink, _core_state(events))

"""The SQL sink: tables of the read model, and the transaction that makes the sync exactly-once.

Tables (the same SQL on SQLite and PostgreSQL):
- `stock` (sku, loc, on_hand, reserved, available, seq): one row per SKU-location; `seq` is the
  last event that changed it.
- `reservations` (rid, state, lines, ref, expires_at_ms, committed, seq): `lines` and
  `committed` are JSON lists of `{sku, loc, qty}` as `lookup` returns them.
- `sync_offset` (stream, seq, event_ts_ms, updated_at_ms): one row, the last event applied.
- `dead_letters` (seq, event, reason, at_ms, attempts): events whose rows the database refused.

Exactly-once: one batch of events is ONE transaction that writes their rows AND moves
`sync_offset.seq` to the last of them. A crash anywhere before `COMMIT` leaves neither; after it,
both. Inside the transaction the offset is read again under the write lock and every event at
or below it is skipped as a duplicate, so even two syncs on one database apply each event once.

Writing a batch: first the fast way, each kind of write one statement for many rows (stock
deltas summed per SKU-location, see `read_model.batch_changes`), no savepoints. If the database
refuses anything, that transaction is rolled back and the batch is written again one event at a
time, each inside its own `SAVEPOINT`: when the database refuses one of its rows (a constraint
the operator added, a value out of range) or the event closes a reservation the read model does
not hold, the savepoint is rolled back, the event goes to `dead_letters` with the reason, and the
batch goes on: the offset moves past it in the same transaction.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..core.events import Event
from .databases import Database
from .read_model import (
    HELD,
    BatchChanges,
    LineMap,
    ReservationClosed,
    ReservationExtended,
    ReservationOpened,
    RowChanges,
    UnknownReservation,
    batch_changes,
    rids_to_look_up,
    row_changes,
)

log = logging.getLogger("engine.sync")

OFFSET_STREAM = "engine"  # the key of the one `sync_offset` row

# Dead letters replayed per transaction by `retry_dead_letters`.
RETRY_CHUNK_MAX = 100

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS stock (
        sku TEXT NOT NULL, loc TEXT NOT NULL,
        on_hand BIGINT NOT NULL, reserved BIGINT NOT NULL, available BIGINT NOT NULL,
        seq BIGINT NOT NULL,
        PRIMARY KEY (sku, loc))""",
    """CREATE TABLE IF NOT EXISTS reservations (
        rid TEXT PRIMARY KEY, state TEXT NOT NULL, lines TEXT NOT NULL, ref TEXT,
        expires_at_ms BIGINT, committed TEXT, seq BIGINT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS sync_offset (
        stream TEXT PRIMARY KEY, seq BIGINT NOT NULL, event_ts_ms BIGINT, updated_at_ms BIGINT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS dead_letters (
        seq BIGINT PRIMARY KEY, event TEXT NOT NULL, reason TEXT NOT NULL, at_ms BIGINT NOT NULL,
        attempts INTEGER NOT NULL)""",
)

_UPSERT_STOCK = (
    "INSERT INTO stock (sku, loc, on_hand, reserved, available, seq) VALUES (?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (sku, loc) DO UPDATE SET"
    " on_hand = stock.on_hand + excluded.on_hand,"
    " reserved = stock.reserved + excluded.reserved,"
    " available = stock.available + excluded.available,"
    # A dead letter replayed later must not move `seq` back.
    " seq = CASE WHEN excluded.seq > stock.seq THEN excluded.seq ELSE stock.seq END"
)

_INSERT_RESERVATION = (
    "INSERT INTO reservations (rid, state, lines, ref, expires_at_ms, committed, seq) VALUES (?, ?, ?, ?, ?, NULL, ?)"
)
_EXTEND_RESERVATION = "UPDATE reservations SET expires_at_ms = ?, seq = ? WHERE rid = ? AND state = ?"
_CLOSE_RESERVATION = "UPDATE reservations SET state = ?, committed = ?, seq = ? WHERE rid = ? AND state = ?"

# Rids per `SELECT ... IN (...)` of held lines: SQLite allows 32,766 parameters (since 3.32).
HELD_LINES_PER_SELECT_MAX = 500

# Reasons are kept short enough for any column and any log line.
REASON_CHARACTERS_MAX = 500


class RowRejected(Exception):
    """The read model cannot take the event's rows (not a database error: a missing row)."""


class StreamGap(Exception):
    """An event does not follow the offset: the stream skipped events. Never expected."""


@dataclass(frozen=True)
class BatchOutcome:
    """What one committed batch did."""

    applied: int
    duplicates: int
    dead_lettered: int
    offset: int  # sync_offset.seq after the commit
    offset_event_ts_ms: int | None  # ts_ms of the event at `offset`


@dataclass(frozen=True)
class RetryOutcome:
    """What `retry_dead_letters` did."""

    retried: int
    applied: int
    still_rejected: int


class ReadModelSink:
    """The read model in one database connection. Not thread-safe: one sink per thread."""

    def __init__(self, database: Database):
        self.database = database

    def create_schema(self) -> None:
        """Create the tables that are missing (an operator's own definitions, e.g. with extra
        constraints, are kept) and the offset row."""
        database = self.database
        database.begin_write()
        try:
            for statement in SCHEMA:
                database.execute(statement)
            database.execute(
                "INSERT INTO sync_offset (stream, seq, event_ts_ms, updated_at_ms) VALUES (?, 0, NULL, ?)"
                " ON CONFLICT (stream) DO NOTHING",
                (OFFSET_STREAM, _now_ms()),
            )
            database.execute("COMMIT")
        except BaseException:
            database.rollback_quietly()
            raise

    def read_offset(self) -> tuple[int, int | None]:
        """(seq of the last applied event, its ts_ms): where the stream resumes."""
        row = self.database.execute("SELECT seq, event_ts_ms FROM sync_offset WHERE stream = ?", (OFFSET_STREAM,)).fetchone()
        assert row is not None, "sync_offset has no row: create_schema() first"
        return int(row[0]), None if row[1] is None else int(row[1])

    def dead_letter_count(self) -> int:
        """Rows in `dead_letters`."""
        return int(self.database.execute("SELECT COUNT(*) FROM dead_letters").fetchone()[0])

    def apply_batch(self, events: Sequence[Event]) -> BatchOutcome:
        """Apply `events` (consecutive seqs, log order) and move the offset, in one transaction.

        Events at or below the stored offset are skipped (duplicates). Raises the database's
        failure errors (nothing of the batch is then written) and `StreamGap`.

        First the fast way (`_apply_batch_summed`); if the database refuses anything, one event
        at a time, each in a savepoint, so that exactly the refused events become dead letters.
        """
        outcome = self._apply_batch_summed(events)
        if outcome is not None:
            return outcome
        log.info("the database refused a row of events %d..%d: writing them one event at a time", events[0]["seq"], events[-1]["seq"])
        return self._apply_batch_one_by_one(events)

    def _apply_batch_summed(self, events: Sequence[Event]) -> BatchOutcome | None:
        """The batch with each kind of write as one statement for many rows (`batch_changes`),
        no savepoints; None (rolled back) if the database refused a row."""
        database = self.database
        database.begin_write()
        try:
            offset, offset_ts_ms = self._locked_offset()
            fresh = [event for event in events if event["seq"] > offset]
            for event in fresh:
                _check_follows(event["seq"], offset)
                offset, offset_ts_ms = event["seq"], event["ts_ms"]
            batch = batch_changes(fresh, self._held_lines_many(rids_to_look_up(fresh)))
            self._write_batch(batch)
            if fresh:
                self._store_offset(offset, offset_ts_ms)
            database.execute("COMMIT")
        except (*database.rejected_errors, RowRejected, UnknownReservation):
            pass  # a row was refused: roll back below; the caller goes one event at a time
        except BaseException:
            database.rollback_quietly()
            raise
        else:
            return BatchOutcome(len(fresh), len(events) - len(fresh), 0, offset, offset_ts_ms)
        try:
            database.execute("ROLLBACK")  # not quietly: if even this fails, the connection is gone
        except BaseException:
            database.rollback_quietly()
            raise
        return None

    def _write_batch(self, batch: BatchChanges) -> None:
        database = self.database
        database.executemany(_INSERT_RESERVATION, [
            (opened.rid, HELD, _json(opened.lines), opened.ref, opened.expires_at_ms, seq) for opened, seq in batch.opened
        ])
        updated = database.executemany(_EXTEND_RESERVATION, [
            (extended.expires_at_ms, seq, extended.rid, HELD) for extended, seq in batch.extended
        ])
        if updated != len(batch.extended):
            raise RowRejected("an extended reservation is not held in the read model")
        updated = database.executemany(_CLOSE_RESERVATION, [
            (closed.state, None if closed.committed is None else _json(closed.committed), seq, closed.rid, HELD)
            for closed, seq in batch.closed
        ])
        if updated != len(batch.closed):
            raise RowRejected("a closed reservation is not held in the read model")
        database.executemany(_UPSERT_STOCK, [
            (sku, loc, on_hand_delta, reserved_delta, on_hand_delta - reserved_delta, seq)
            for (sku, loc), (on_hand_delta, reserved_delta, seq) in batch.stock.items()
        ])

    def _apply_batch_one_by_one(self, events: Sequence[Event]) -> BatchOutcome:
        """The batch with a savepoint per event: a refused event becomes a dead letter."""
        database = self.database
        database.begin_write()
        try:
            offset, offset_ts_ms = self._locked_offset()
            applied = duplicates = dead_lettered = 0
            for event in events:
                seq = event["seq"]
                if seq <= offset:
                    duplicates += 1
                    continue
                _check_follows(seq, offset)
                reason = self._apply_in_savepoint(event)
                if reason is None:
                    applied += 1
                else:
                    self._insert_dead_letter(event, reason)
                    dead_lettered += 1
                offset, offset_ts_ms = seq, event["ts_ms"]
            if applied or dead_lettered:
                self._store_offset(offset, offset_ts_ms)
            database.execute("COMMIT")
        except BaseException:
            database.rollback_quietly()
            raise
        return BatchOutcome(applied, duplicates, dead_lettered, offset, offset_ts_ms)

    def retry_dead_letters(self, chunk_max: int = RETRY_CHUNK_MAX) -> RetryOutcome:
        """Apply the dead letters again, in seq order; remove those that now succeed (in the same
        transaction as their rows), record the new reason of those that still fail. Each dead
        letter present at the start is tried once."""
        database = self.database
        last_row = database.execute("SELECT MAX(seq) FROM dead_letters").fetchone()
        if last_row is None or last_row[0] is None:
            return RetryOutcome(0, 0, 0)
        last_seq = int(last_row[0])
        after_seq = 0
        retried = applied = still_rejected = 0
        while after_seq < last_seq:
            database.begin_write()
            try:
                rows = database.execute(
                    "SELECT seq, event FROM dead_letters WHERE seq > ? AND seq <= ? ORDER BY seq LIMIT ?",
                    (after_seq, last_seq, chunk_max),
                ).fetchall()
                for seq, text in rows:
                    outcome = self._retry_one(int(seq), json.loads(text))
                    if outcome is None:
                        continue  # removed meanwhile (another retry)
                    retried += 1
                    if outcome:
                        applied += 1
                    else:
                        still_rejected += 1
                database.execute("COMMIT")
            except BaseException:
                database.rollback_quietly()
                raise
            if not rows:
                break
            after_seq = int(rows[-1][0])
        return RetryOutcome(retried, applied, still_rejected)

    # -- one event ---------------------------------------------------------------------------

    def _store_offset(self, offset: int, offset_ts_ms: int | None) -> None:
        self.database.execute(
            "UPDATE sync_offset SET seq = ?, event_ts_ms = ?, updated_at_ms = ? WHERE stream = ?",
            (offset, offset_ts_ms, _now_ms(), OFFSET_STREAM),
        )

    def _locked_offset(self) -> tuple[int, int | None]:
        row = self.database.execute(
            "SELECT seq, event_ts_ms FROM sync_offset WHERE stream = ?" + self.database.lock_suffix, (OFFSET_STREAM,),
        ).fetchone()
        assert row is not None, "sync_offset has no row: create_schema() first"
        return int(row[0]), None if row[1] is None else int(row[1])

    def _apply_in_savepoint(self, event: Event) -> str | None:
        """Apply one event's rows; on a rejection undo them and return the reason."""
        database = self.database
        database.execute("SAVEPOINT sync_event")
        try:
            self._apply(event)
        except (*database.rejected_errors, RowRejected, UnknownReservation) as error:
            database.execute("ROLLBACK TO SAVEPOINT sync_event")
            database.execute("RELEASE SAVEPOINT sync_event")
            return f"{type(error).__name__}: {error}"[:REASON_CHARACTERS_MAX]
        database.execute("RELEASE SAVEPOINT sync_event")
        return None

    def _retry_one(self, seq: int, event: Event) -> bool | None:
        """Replay one dead letter inside the open transaction: True applied (and removed), False
        still rejected (reason updated), None when it is no longer there."""
        database = self.database
        database.execute("SAVEPOINT sync_retry")
        if database.execute("DELETE FROM dead_letters WHERE seq = ?", (seq,)).rowcount != 1:
            database.execute("RELEASE SAVEPOINT sync_retry")
            return None
        try:
            self._apply(event)
        except (*database.rejected_errors, RowRejected, UnknownReservation) as error:
            database.execute("ROLLBACK TO SAVEPOINT sync_retry")
            database.execute("RELEASE SAVEPOINT sync_retry")
            reason = f"{type(error).__name__}: {error}"[:REASON_CHARACTERS_MAX]
            database.execute(
                "UPDATE dead_letters SET reason = ?, at_ms = ?, attempts = attempts + 1 WHERE seq = ?", (reason, _now_ms(), seq),
            )
            return False
        database.execute("RELEASE SAVEPOINT sync_retry")
        return True

    def _apply(self, event: Event) -> None:
        changes = row_changes(event, self._held_lines)
        database = self.database
        for change in changes.stock:
            database.execute(_UPSERT_STOCK, (
                change.sku, change.loc, change.on_hand_delta, change.reserved_delta,
                change.on_hand_delta - change.reserved_delta, changes.seq,
            ))
        self._write_reservation(changes)

    def _write_reservation(self, changes: RowChanges) -> None:
        database = self.database
        seq = changes.seq
        reservation = changes.reservation
        if isinstance(reservation, ReservationOpened):
            database.execute(_INSERT_RESERVATION, (
                reservation.rid, HELD, _json(reservation.lines), reservation.ref, reservation.expires_at_ms, seq,
            ))
        elif isinstance(reservation, ReservationClosed):
            committed = None if reservation.committed is None else _json(reservation.committed)
            cursor = database.execute(_CLOSE_RESERVATION, (reservation.state, committed, seq, reservation.rid, HELD))
            if cursor.rowcount != 1:
                raise RowRejected(f"reservation {reservation.rid!r} is not held in the read model (is its reserve a dead letter?)")
        elif isinstance(reservation, ReservationExtended):
            cursor = database.execute(_EXTEND_RESERVATION, (reservation.expires_at_ms, seq, reservation.rid, HELD))
            if cursor.rowcount != 1:
                raise RowRejected(f"reservation {reservation.rid!r} is not held in the read model (is its reserve a dead letter?)")

    def _held_lines_many(self, rids: set[str]) -> dict[str, list[LineMap]]:
        """Lines of those of `rids` that are held in the read model."""
        held: dict[str, list[LineMap]] = {}
        ordered = sorted(rids)
        for start in range(0, len(ordered), HELD_LINES_PER_SELECT_MAX):
            chunk = ordered[start : start + HELD_LINES_PER_SELECT_MAX]
            rows = self.database.execute(
                f"SELECT rid, lines FROM reservations WHERE state = ? AND rid IN ({', '.join('?' * len(chunk))})",
                (HELD, *chunk),
            ).fetchall()
            for rid, lines in rows:
                held[rid] = json.loads(lines)
        return held

    def _held_lines(self, rid: str) -> list[LineMap] | None:
        row = self.database.execute("SELECT lines FROM reservations WHERE rid = ? AND state = ?", (rid, HELD)).fetchone()
        return None if row is None else json.loads(row[0])

    def _insert_dead_letter(self, event: Event, reason: str) -> None:
        self.database.execute(
            "INSERT INTO dead_letters (seq, event, reason, at_ms, attempts) VALUES (?, ?, ?, ?, 1)",
            (event["seq"], _json(event), reason, _now_ms()),
        )


def _check_follows(seq: int, offset: int) -> None:
    if seq != offset + 1:
        raise StreamGap(f"event {seq} after offset {offset}: events {offset + 1}..{seq - 1} are missing")


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=False)


def _now_ms() -> int:
    return int(time.time() * 1000)

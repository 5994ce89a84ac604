"""The durable outbox of the offline client: one SQLite file of requests and their outcomes.

No network here. Each row is one mutating request the application submitted, in submission
order (`local_id`), with its idempotency id (`rid` or `key`), its wire fields, and once decided
its final outcome and the server's reply. The offline client (`offline_client.py`) drives it:
`append` when the app submits, `next_undecided` / `mark_sent` / `record_outcome` as it drains.

Durability: WAL journal and `synchronous=FULL`, so every committed transaction is fsync'd before
the call returns. A row is durable before `append` returns, and an outcome is durable before
anyone is told about it; a crash at any point leaves either the old or the new row.

Bounds: at most `undecided_max` undecided rows (`append` raises `OutboxFull` at the bound, the
request is not written and nothing already written is touched); decided rows past
`decided_kept_max` are deleted oldest first (their outcome has been recorded and announced).
Each row's fields are bounded by the caller (a request must fit in one wire frame).
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import msgpack

# Statuses of a row. `pending` and `sent` are undecided: `sent` means the request went out at
# least once, so the server may already have applied it (a resend then gets `duplicate: true`).
PENDING = "pending"
SENT = "sent"
DECIDED = "decided"

# Final outcomes. `unknown` is only given to a request that was sent but not answered, and could
# no longer be resent safely (see `OfflineClient`'s `resend_window_ms`).
GRANTED = "granted"
REFUSED = "refused"
UNKNOWN = "unknown"
OUTCOMES = frozenset({GRANTED, REFUSED, UNKNOWN})

# Requests waiting to be decided. A field rep offline for a day takes a few hundred orders; the
# bound keeps a runaway caller from filling the device, and with 1 MiB frames at most it bounds
# the file. At the bound `append` raises `OutboxFull`: the app must tell its user, not drop.
UNDECIDED_ENTRIES_MAX = 10_000

# Decided rows kept for the app to read back (`outcome`, `outcomes`) after its callback.
DECIDED_ENTRIES_KEPT_MAX = 100_000

# How long a call waits for the file when another connection holds its write lock. Only this
# process writes (the offline client holds a lock file), so this covers readers such as tests.
BUSY_TIMEOUT_SECONDS = 10.0

# `outcomes()` returns at most this many rows per call.
OUTCOMES_PER_CALL_MAX = 10_000

SCHEMA_VERSION = 1

_SCHEMA_STATEMENTS = (
    """
CREATE TABLE IF NOT EXISTS entries (
    local_id          INTEGER PRIMARY KEY AUTOINCREMENT,  -- submission order, never reused
    op                TEXT    NOT NULL,
    fields            BLOB    NOT NULL,                   -- msgpack map of the wire fields
    idempotency_id    TEXT    NOT NULL,                   -- the rid or key inside fields
    status            TEXT    NOT NULL CHECK (status IN ('pending', 'sent', 'decided')),
    attempts          INTEGER NOT NULL DEFAULT 0,         -- times the request was sent
    created_at_ms     INTEGER NOT NULL,
    first_sent_at_ms  INTEGER,
    decided_at_ms     INTEGER,
    outcome           TEXT CHECK (outcome IN ('granted', 'refused', 'unknown')),
    reply             BLOB,                               -- msgpack of the final reply, without the wire id
    duplicate         INTEGER NOT NULL DEFAULT 0,         -- the final reply said duplicate: true
    note              TEXT                                -- why, when the outcome was decided locally
)
    """,
    "CREATE INDEX IF NOT EXISTS entries_undecided ON entries (local_id) WHERE status != 'decided'",
    "CREATE INDEX IF NOT EXISTS entries_decided ON entries (local_id) WHERE status = 'decided'",
)

_COLUMNS = (
    "local_id, op, fields, idempotency_id, status, attempts, created_at_ms, first_sent_at_ms, "
    "decided_at_ms, outcome, reply, duplicate, note"
)


class OutboxFull(Exception):
    """The outbox holds its bound of undecided requests; this one was not written."""


class UnknownEntry(KeyError):
    """No row with this local id (never written, or decided long ago and pruned)."""


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of one submitted request, as recorded in the outbox.

    `status` is `pending` until the server's answer is final, then `granted`, `refused` or
    (rarely, see `OfflineClient`) `unknown`. `reply` is the server's final reply map (without
    the wire `id`): for `granted` the ok reply, for `refused` the error reply with its figures
    (`insufficient`: `lines` of `{sku, loc, requested, available}`). `duplicate` is True when the
    final reply was the server's answer to a resend of a request it had already applied: the
    original reply, recorded once.
    """

    local_id: int
    op: str
    idempotency_id: str
    status: str
    attempts: int
    duplicate: bool
    reply: dict[str, Any] | None
    note: str | None
    created_at_ms: int
    decided_at_ms: int | None

    @property
    def decided(self) -> bool:
        """True once the outcome is final."""
        return self.status != PENDING

    @property
    def error(self) -> str | None:
        """The server's error code of a refusal (`insufficient`, `conflict`, ...), else None."""
        if self.reply is None or self.reply.get("ok") is not False:
            return None
        return self.reply.get("error")

    @property
    def message(self) -> str | None:
        """The server's message of a refusal, or the local note of an `unknown` outcome."""
        if self.note is not None:
            return self.note
        if self.reply is None:
            return None
        return self.reply.get("message")


@dataclass(frozen=True, slots=True)
class StoredRequest:
    """An undecided row, as the drainer needs it to send the request."""

    local_id: int
    op: str
    fields: dict[str, Any]
    idempotency_id: str
    status: str
    attempts: int
    first_sent_at_ms: int | None


def _pack(value: dict[str, Any]) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def _unpack(data: bytes) -> dict[str, Any]:
    return msgpack.unpackb(data, raw=False, strict_map_key=False, use_list=True)


class OutboxStore:
    """The SQLite outbox file. Thread-safe (one connection behind a lock). One writer process:
    the offline client holds a lock file; a second store on the same file may read."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        undecided_max: int = UNDECIDED_ENTRIES_MAX,
        decided_kept_max: int = DECIDED_ENTRIES_KEPT_MAX,
    ):
        assert undecided_max >= 1 and decided_kept_max >= 1
        self.path = os.fspath(path)
        self.undecided_max = undecided_max
        self.decided_kept_max = decided_kept_max
        self._lock = threading.Lock()
        # isolation_level=None: no implicit transactions; every write below is an explicit
        # BEGIN IMMEDIATE ... COMMIT. check_same_thread=False: the lock serialises the threads.
        self._database = sqlite3.connect(
            self.path, timeout=BUSY_TIMEOUT_SECONDS, isolation_level=None, check_same_thread=False
        )
        try:
            journal_mode = self._database.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if journal_mode.lower() != "wal":
                raise sqlite3.OperationalError(f"{self.path}: the outbox needs WAL journal mode, SQLite gave {journal_mode!r}")
            # FULL: the WAL is fsync'd at every commit (NORMAL would only sync at checkpoints,
            # and a power loss could take back a request the app was told is queued).
            self._database.execute("PRAGMA synchronous=FULL")
            self._database.execute("PRAGMA foreign_keys=OFF")
            version = self._database.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, SCHEMA_VERSION):
                raise sqlite3.OperationalError(f"{self.path}: outbox schema version {version}, this client reads {SCHEMA_VERSION}")
            with self._transaction():
                # Statement by statement: `executescript` would commit the open transaction.
                for statement in _SCHEMA_STATEMENTS:
                    self._database.execute(statement)
                self._database.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                # Counted once here, then kept up to date by this (the only writing) store, so
                # that pruning costs no scan of the decided rows.
                self._decided_count = self._database.execute("SELECT COUNT(*) FROM entries WHERE status = ?", (DECIDED,)).fetchone()[0]
        except BaseException:
            self._database.close()
            raise

    # -- lifecycle --------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the file. Everything written is already durable."""
        with self._lock:
            self._database.close()

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        self._database.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._database.execute("ROLLBACK")
            raise
        self._database.execute("COMMIT")

    # -- writes -----------------------------------------------------------------------------------

    def append(self, op: str, fields: dict[str, Any], idempotency_id: str, now_ms: int) -> Outcome:
        """Write a new pending request durably and return its (pending) outcome.

        Raises `OutboxFull` when `undecided_max` requests are undecided; nothing is written then.
        """
        packed = _pack(fields)
        with self._lock, self._transaction():
            undecided = self._count_undecided()
            if undecided >= self.undecided_max:
                raise OutboxFull(
                    f"the outbox holds {undecided} undecided requests (its bound, undecided_max={self.undecided_max}); "
                    f"this {op} ({idempotency_id}) was NOT queued: retry once the outbox has drained"
                )
            cursor = self._database.execute(
                "INSERT INTO entries (op, fields, idempotency_id, status, created_at_ms) VALUES (?, ?, ?, ?, ?)",
                (op, packed, idempotency_id, PENDING, now_ms),
            )
            local_id = cursor.lastrowid
        return Outcome(local_id, op, idempotency_id, PENDING, 0, False, None, None, now_ms, None)

    def mark_sent(self, local_id: int, now_ms: int) -> None:
        """Record that the request is about to go out (once more): from here the server may apply it."""
        with self._lock, self._transaction():
            cursor = self._database.execute(
                "UPDATE entries SET status = ?, attempts = attempts + 1, first_sent_at_ms = COALESCE(first_sent_at_ms, ?) "
                "WHERE local_id = ? AND status != ?",
                (SENT, now_ms, local_id, DECIDED),
            )
            assert cursor.rowcount == 1, f"mark_sent of local id {local_id}, which is not an undecided request"

    def record_outcome(
        self,
        local_id: int,
        outcome: str,
        reply: dict[str, Any] | None,
        now_ms: int,
        note: str | None = None,
    ) -> Outcome:
        """Record the final outcome of an undecided request, once, and return it.

        Deciding a request twice is a bug of the caller and fails an assertion: an outcome is
        never overwritten. Decided rows past `decided_kept_max` are pruned, oldest first.
        """
        assert outcome in OUTCOMES, outcome
        stored_reply = None if reply is None else {name: value for name, value in reply.items() if name != "id"}
        duplicate = bool(stored_reply and stored_reply.get("duplicate") is True)
        with self._lock:
            with self._transaction():
                cursor = self._database.execute(
                    "UPDATE entries SET status = ?, outcome = ?, reply = ?, duplicate = ?, note = ?, decided_at_ms = ? "
                    "WHERE local_id = ? AND status != ?",
                    (DECIDED, outcome, None if stored_reply is None else _pack(stored_reply), int(duplicate), note, now_ms, local_id, DECIDED),
                )
                assert cursor.rowcount == 1, f"local id {local_id} decided twice, or never written"
                row = self._select_one(local_id)  # before pruning, which may take this very row
                decided_count = self._decided_count + 1
                decided_count -= self._prune_decided(decided_count)
            self._decided_count = decided_count  # only once the transaction committed
        assert row is not None
        return _outcome_from_row(row)

    def _prune_decided(self, decided_count: int) -> int:
        """Delete the oldest decided rows beyond `decided_kept_max` (in the caller's transaction);
        return how many went."""
        excess = decided_count - self.decided_kept_max
        if excess <= 0:
            return 0
        cursor = self._database.execute(
            "DELETE FROM entries WHERE local_id IN (SELECT local_id FROM entries WHERE status = ? ORDER BY local_id LIMIT ?)",
            (DECIDED, excess),
        )
        return cursor.rowcount

    # -- reads ------------------------------------------------------------------------------------

    def next_undecided(self) -> StoredRequest | None:
        """The oldest undecided request (the next to send), or None when everything is decided."""
        with self._lock:
            row = self._database.execute(
                "SELECT local_id, op, fields, idempotency_id, status, attempts, first_sent_at_ms FROM entries "
                "WHERE status != ? ORDER BY local_id LIMIT 1",
                (DECIDED,),
            ).fetchone()
        if row is None:
            return None
        local_id, op, fields, idempotency_id, status, attempts, first_sent_at_ms = row
        return StoredRequest(local_id, op, _unpack(fields), idempotency_id, status, attempts, first_sent_at_ms)

    def outcome(self, local_id: int) -> Outcome:
        """The outcome of one request (pending or final). Raises `UnknownEntry` if there is no such row."""
        with self._lock:
            row = self._select_one(local_id)
        if row is None:
            raise UnknownEntry(local_id)
        return _outcome_from_row(row)

    def outcomes(self, after_local_id: int = 0, limit: int = 1000) -> list[Outcome]:
        """Outcomes of the requests with a local id above `after_local_id`, in order, at most `limit`."""
        assert 1 <= limit <= OUTCOMES_PER_CALL_MAX
        with self._lock:
            rows = self._database.execute(
                f"SELECT {_COLUMNS} FROM entries WHERE local_id > ? ORDER BY local_id LIMIT ?", (after_local_id, limit)
            ).fetchall()
        return [_outcome_from_row(row) for row in rows]

    def undecided_count(self) -> int:
        """Requests not decided yet (pending or sent)."""
        with self._lock:
            return self._count_undecided()

    def sent_undecided_ids(self) -> list[int]:
        """Local ids of requests sent at least once and not decided: the server may have applied them."""
        with self._lock:
            rows = self._database.execute("SELECT local_id FROM entries WHERE status = ? ORDER BY local_id", (SENT,)).fetchall()
        return [local_id for (local_id,) in rows]

    def _count_undecided(self) -> int:
        return self._database.execute("SELECT COUNT(*) FROM entries WHERE status != ?", (DECIDED,)).fetchone()[0]

    def _select_one(self, local_id: int) -> tuple | None:
        return self._database.execute(f"SELECT {_COLUMNS} FROM entries WHERE local_id = ?", (local_id,)).fetchone()


def _outcome_from_row(row: tuple) -> Outcome:
    (local_id, op, _fields, idempotency_id, status, attempts, created_at_ms, _first_sent_at_ms,
     decided_at_ms, outcome, reply, duplicate, note) = row
    if status != DECIDED:
        shown_status = PENDING
    else:
        assert outcome in OUTCOMES, (local_id, outcome)
        shown_status = outcome
    return Outcome(
        local_id=local_id,
        op=op,
        idempotency_id=idempotency_id,
        status=shown_status,
        attempts=attempts,
        duplicate=bool(duplicate),
        reply=None if reply is None else _unpack(reply),
        note=note,
        created_at_ms=created_at_ms,
        decided_at_ms=decided_at_ms,
    )

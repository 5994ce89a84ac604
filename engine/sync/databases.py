"""Open the read model's database from a `--to` URL: SQLite (stdlib) or PostgreSQL (psycopg 3).

Everything that differs between the two lives here, in a `Database`: the connection, the
placeholder style, how a write transaction starts, and which exceptions mean "this row is
rejected" (a constraint: dead-letter the event, go on) rather than "the database is gone"
(roll back, reconnect, resume from the committed offset).

Both connections run in autocommit mode and the sink issues `BEGIN`/`COMMIT`/`SAVEPOINT`
itself, so the transaction boundary is written out where it matters (`sink.py`), not implied by
a driver's defaults.

PostgreSQL uses psycopg 3's blocking connection: the sync is one stream into one connection, so
an event loop buys nothing, and a blocking driver keeps the transaction code plain and identical
for both databases.
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass
from typing import Any

SQLITE_PREFIX = "sqlite:///"
POSTGRES_PREFIXES = ("postgresql://", "postgres://")

# How long a SQLite write waits for another writer's lock (a report holding a write transaction,
# a `--retry-dead-letters` run) before the batch fails as a database failure and is retried.
SQLITE_BUSY_TIMEOUT_SECONDS = 5.0

# How long connecting to PostgreSQL may take before it counts as a database failure.
POSTGRES_CONNECT_TIMEOUT_SECONDS = 10

# The sync's backend shows up under this name in `pg_stat_activity` (operators, and the test that
# terminates it, find it there).
POSTGRES_APPLICATION_NAME = "engine-sync"


class UnsupportedDatabase(ValueError):
    """The `--to` URL names a database the sync cannot write to (or its driver is missing)."""


@dataclass
class Database:
    """One open connection, and how to speak to it."""

    connection: Any
    kind: str  # "sqlite" or "postgresql"
    rejected_errors: tuple[type[BaseException], ...]  # a row the database refuses
    failure_errors: tuple[type[BaseException], ...]  # the database (or the connection to it) failed

    def sql(self, statement: str) -> str:
        """`statement` with `?` placeholders, in this driver's placeholder style."""
        return statement if self.kind == "sqlite" else statement.replace("?", "%s")

    def execute(self, statement: str, parameters: tuple = ()) -> Any:
        """Run one statement; return the cursor (for `fetchone`, `rowcount`)."""
        cursor = self.connection.cursor()
        cursor.execute(self.sql(statement), parameters)
        return cursor

    def executemany(self, statement: str, rows: list[tuple]) -> int:
        """Run one statement for each row of parameters (psycopg pipelines them: one round trip);
        return the rows changed, summed over all of them."""
        if not rows:
            return 0
        cursor = self.connection.cursor()
        cursor.executemany(self.sql(statement), rows)
        return cursor.rowcount

    def begin_write(self) -> None:
        """Start a write transaction. SQLite takes the write lock now (`IMMEDIATE`), so the offset
        read next cannot change under us; PostgreSQL locks the offset row with `FOR UPDATE`."""
        self.execute("BEGIN IMMEDIATE" if self.kind == "sqlite" else "BEGIN")

    @property
    def lock_suffix(self) -> str:
        """Appended to the offset `SELECT` inside a write transaction."""
        return "" if self.kind == "sqlite" else " FOR UPDATE"

    def rollback_quietly(self) -> None:
        """Roll back whatever is open; a connection that is already gone is no error here."""
        try:
            self.execute("ROLLBACK")
        except Exception:  # noqa: BLE001 - the caller is already handling the real failure
            pass

    def close(self) -> None:
        """Close the connection (an open transaction is rolled back by the database)."""
        try:
            self.connection.close()
        except Exception:  # noqa: BLE001 - closing a broken connection may fail; nothing to do
            pass


def describe(url: str) -> str:
    """The URL without its password, for logs."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        credentials, host = rest.rsplit("@", 1)
        user = credentials.split(":", 1)[0]
        return f"{scheme}://{user}@{host}"
    return url


def check_url(url: str) -> None:
    """Raise `UnsupportedDatabase` unless `url` names a database the sync can write to."""
    if url.startswith(SQLITE_PREFIX):
        if not url[len(SQLITE_PREFIX):]:
            raise UnsupportedDatabase("sqlite:///PATH needs a file path (an in-memory database would be lost on exit)")
        return
    if not url.startswith(POSTGRES_PREFIXES):
        raise UnsupportedDatabase(f"--to {url!r}: expected sqlite:///PATH or postgresql://...")


def open_database(url: str) -> Database:
    """Connect to the database `url` names: `sqlite:///PATH` (relative; `sqlite:////abs/path` for
    an absolute one, as SQLAlchemy writes it) or `postgresql://user@host:port/dbname`."""
    check_url(url)
    if url.startswith(SQLITE_PREFIX):
        return _open_sqlite(url[len(SQLITE_PREFIX):])
    return _open_postgres(url)


def failure_errors(url: str) -> tuple[type[BaseException], ...]:
    """Every error of the driver `url` needs: once outside a row's savepoint, any of them means
    the batch did not commit, and the sync reopens the database and resumes from the offset."""
    if url.startswith(POSTGRES_PREFIXES):
        try:
            import psycopg
        except ImportError:
            return ()
        return (psycopg.Error,)
    return (sqlite3.Error,)


def _open_sqlite(path: str) -> Database:
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    # isolation_level=None: autocommit; the sink writes BEGIN/COMMIT itself.
    connection = sqlite3.connect(path, timeout=SQLITE_BUSY_TIMEOUT_SECONDS, isolation_level=None, check_same_thread=True)
    # WAL: reports read while the sync writes. synchronous=NORMAL: a power loss may lose the last
    # commits, but each as a whole (rows and offset together), so the sync resumes from an
    # earlier offset with nothing missing and nothing doubled; FULL would only add fsyncs.
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=NORMAL")
    connection.execute("PRAGMA foreign_keys=ON")
    return Database(
        connection, "sqlite",
        rejected_errors=(sqlite3.IntegrityError, sqlite3.DataError),
        failure_errors=(sqlite3.OperationalError, sqlite3.InterfaceError, sqlite3.DatabaseError),
    )


def _open_postgres(url: str) -> Database:
    try:
        import psycopg
    except ImportError as error:
        raise UnsupportedDatabase(
            "--to postgresql://... needs psycopg 3: pip install 'psycopg[binary]' (the project's `sync` extra)"
        ) from error
    connection = psycopg.connect(
        url, autocommit=True, connect_timeout=POSTGRES_CONNECT_TIMEOUT_SECONDS, application_name=POSTGRES_APPLICATION_NAME,
    )
    return Database(
        connection, "postgresql",
        rejected_errors=(psycopg.IntegrityError, psycopg.DataError),
        failure_errors=(psycopg.OperationalError, psycopg.InterfaceError),
    )

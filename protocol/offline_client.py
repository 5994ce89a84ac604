"""The offline-capable client: orders are taken whether or not the server can be reached.

    with OfflineClient("orders.outbox", host, port, on_outcome=show) as client:
        queued = client.reserve(None, [("SKU-42", "DC-1", 2)], ref="SO-1001")   # returns at once
        print(queued.status)                       # "pending": durable on this device
        outcome = client.wait(queued.local_id, timeout_seconds=2.0)
        print(outcome.status, outcome.reply)       # "granted" / "refused" (+ figures), or still "pending"

`submit` (and the `reserve` ... `transfer` helpers) checks the request, gives it an id if it has
none, writes it to the SQLite outbox (`OutboxStore`: fsync'd before the call returns) and returns
its pending `Outcome` without touching the network. One background thread, the drainer, sends
the queued requests one at a time in submission order with their ids, over a blocking `Client`,
and records each final answer (see `_outbox_policy.py` for which answers are final). While the
server cannot be reached it reconnects with exponential backoff and jitter; requests keep being
accepted (up to the outbox's bound) and wait.

Exactly once: a request goes out with the same `rid`/`key` every time. If the link drops after
the server applied it and before the reply arrived, or the app dies before the reply was
recorded, the resend is answered `duplicate: true` with the original reply, and that is recorded
as the outcome, once. On restart (a new `OfflineClient` on the same file) draining resumes.

Why a thread and a blocking `Client`, not trio: the apps that take orders (tablet UIs, scripts,
web handlers) are mostly not trio programs; a thread works under any of them, `sqlite3` blocks
anyway, and the drainer sends one request at a time, so it gains nothing from an event loop.

Why one request at a time (no pipelining): the outbox promises submission order. The server
keeps a connection's order only per SKU-location (a multi-line reserve, or a batch, may be
decided before an earlier single-line request), and when an earlier pipelined request is shed
(`overloaded`) the later ones are already applied. One in flight costs a round trip and two
local fsyncs per request (figures in docs/ARCHITECTURE.md); a field rep's backlog of a
few hundred orders drains in seconds.
"""

from __future__ import annotations

import logging
import os
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from ._errors import ConnectionClosed, ProtocolViolation, ServerError
from ._limits import DEFAULT_HOST, DEFAULT_PORT, MAX_FRAME_BYTES
from ._outbox_policy import backoff_delay_seconds, judge_reply
from ._outbox_requests import prepare_request
from ._requests import (
    LineLike,
    StockLineLike,
    adjust_many_request,
    adjust_request,
    commit_request,
    count_many_request,
    count_request,
    extend_request,
    release_request,
    reserve_request,
    transfer_request,
)
from .client import Client
from .outbox_store import (
    DECIDED_ENTRIES_KEPT_MAX,
    UNDECIDED_ENTRIES_MAX,
    UNKNOWN,
    Outcome,
    OutboxStore,
    StoredRequest,
)

log = logging.getLogger(__name__)

# The server remembers a rid or key for at least 24 hours after the reservation ends or the key
# is used (`--id-retention-hours`). A request that was sent and never answered can be resent
# safely only while the server still remembers its id; past this window it could be applied a
# second time, so it is not resent: its outcome becomes `unknown` for a person to check.
# An hour of margin below the server's default.
RESEND_WINDOW_MS = 23 * 3600 * 1000

REPLY_TIMEOUT_SECONDS = 10.0  # connect, hello, and each reply; past it the connection is dropped
RECONNECT_DELAY_MIN_SECONDS = 0.05
RECONNECT_DELAY_MAX_SECONDS = 5.0

# With nothing to send, the drainer wakes at least this often (a submit wakes it at once).
IDLE_WAKE_SECONDS = 1.0


def wall_clock_ms() -> int:
    """Milliseconds since the epoch: creation and decision times of outbox rows."""
    return time.time_ns() // 1_000_000


class OutboxInUse(RuntimeError):
    """Another live `OfflineClient` (in this or another process) drains this outbox file."""


class DrainerFailed(RuntimeError):
    """The drainer thread stopped on a bug (an assertion). Queued requests stay in the file."""


class _LinkFailure(Exception):
    """The connection failed, or no reply came in time: the request's fate is unknown."""


class OfflineClient:
    """Queue mutating requests durably and send them when the server can be reached.

    Thread-safe: any thread may submit, read and wait. `on_outcome(outcome)` is called on the
    drainer thread once each outcome is durable; keep it short (it delays the next request), and
    read `outcomes()` at start-up too: an app killed between the record and the call misses the
    call, never the record.
    """

    def __init__(
        self,
        outbox_path: str | os.PathLike[str],
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        *,
        token: str | None = None,
        client_name: str = "offline-client",
        on_outcome: Callable[[Outcome], None] | None = None,
        undecided_max: int = UNDECIDED_ENTRIES_MAX,
        decided_kept_max: int = DECIDED_ENTRIES_KEPT_MAX,
        reply_timeout_seconds: float = REPLY_TIMEOUT_SECONDS,
        reconnect_delay_min_seconds: float = RECONNECT_DELAY_MIN_SECONDS,
        reconnect_delay_max_seconds: float = RECONNECT_DELAY_MAX_SECONDS,
        resend_window_ms: int = RESEND_WINDOW_MS,
        max_frame_bytes: int = MAX_FRAME_BYTES,
        clock_ms: Callable[[], int] = wall_clock_ms,
    ):
        assert reply_timeout_seconds > 0 and resend_window_ms > 0
        assert 0 < reconnect_delay_min_seconds <= reconnect_delay_max_seconds
        self.host = host
        self.port = port
        self.token = token
        self.client_name = client_name
        self.reply_timeout_seconds = reply_timeout_seconds
        self.reconnect_delay_min_seconds = reconnect_delay_min_seconds
        self.reconnect_delay_max_seconds = reconnect_delay_max_seconds
        self.resend_window_ms = resend_window_ms
        self.max_frame_bytes = max_frame_bytes
        self._on_outcome = on_outcome
        self._clock_ms = clock_ms
        self._lock_file = _lock_outbox(os.fspath(outbox_path))
        try:
            self._store = OutboxStore(outbox_path, undecided_max, decided_kept_max)
        except BaseException:
            self._lock_file.close()
            raise
        self._connection: Client | None = None  # used by the drainer thread only
        self._chooser = random.Random()
        self._stopping = threading.Event()
        self._work = threading.Event()  # set by submit: something to send
        self._decided = threading.Condition()  # notified after every recorded outcome
        self._closed = False
        self.last_error: str | None = None  # why the last attempt failed; None after a success
        self.drainer_failure: BaseException | None = None
        self._drainer = threading.Thread(target=self._drain, name=f"outbox-drainer:{self._store.path}", daemon=True)
        self._drainer.start()

    # -- lifecycle --------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop draining and close the file. Queued requests stay queued for the next start.

        A request in flight is waited for (at most `reply_timeout_seconds`) so its reply is kept.
        """
        if self._closed:
            return
        self._closed = True
        self._stopping.set()
        self._work.set()
        self._drainer.join(timeout=self.reply_timeout_seconds * 2 + 1)
        if self._drainer.is_alive():
            log.warning("the outbox drainer did not stop within %.1f s; leaving it to exit with the process", self.reply_timeout_seconds * 2 + 1)
            return  # it still uses the store; the lock file goes with the process
        self._store.close()
        self._lock_file.close()

    def __enter__(self) -> OfflineClient:
        return self

    def __exit__(self, *exception_info: object) -> None:
        self.close()

    # -- submitting -------------------------------------------------------------------------------

    def submit(self, op: str, **fields: Any) -> Outcome:
        """Queue one mutating request durably and return its pending `Outcome` at once.

        `fields` are the wire fields (`rid`/`key` generated when absent for `reserve`, `adjust`,
        `count`, `transfer`). Raises `InvalidOutboxRequest` for a non-mutating op or fields the
        server would refuse, and `OutboxFull` at the outbox's bound; nothing is queued then.
        """
        if self._closed:
            raise RuntimeError("the offline client is closed")
        prepared = prepare_request(op, fields, self.max_frame_bytes)
        outcome = self._store.append(prepared.op, prepared.fields, prepared.idempotency_id, self._clock_ms())
        self._work.set()
        return outcome

    def reserve(self, rid: str | None, lines: Iterable[LineLike], ttl_ms: int | None = None, ref: str | None = None) -> Outcome:
        """Queue a `reserve` (`rid` None: one is generated). The ttl runs from when the server applies it."""
        return self._submit_request(reserve_request(rid, lines, ttl_ms, ref))

    def release(self, rid: str) -> Outcome:
        """Queue a `release` of the reservation `rid`."""
        return self._submit_request(release_request(rid))

    def commit(self, rid: str, lines: Iterable[LineLike] | None = None) -> Outcome:
        """Queue a `commit` of the reservation `rid` (`lines`: a short pick)."""
        return self._submit_request(commit_request(rid, lines))

    def extend(self, rid: str, ttl_ms: int) -> Outcome:
        """Queue an `extend`. Not deduplicated by the server: a resend extends again from its own time."""
        return self._submit_request(extend_request(rid, ttl_ms))

    def adjust(self, key: str | None, sku: str, loc: str, delta: int, reason: str) -> Outcome:
        """Queue an `adjust` (`key` None: one is generated)."""
        return self._submit_request(adjust_request(key, sku, loc, delta, reason))

    def adjust_many(self, key: str | None, lines: Iterable[StockLineLike], reason: str) -> Outcome:
        """Queue a batch `adjust` (`key` None: one is generated)."""
        return self._submit_request(adjust_many_request(key, lines, reason))

    def count(self, key: str | None, sku: str, loc: str, on_hand: int, reason: str | None = None) -> Outcome:
        """Queue a `count` (`key` None: one is generated)."""
        return self._submit_request(count_request(key, sku, loc, on_hand, reason))

    def count_many(self, key: str | None, lines: Iterable[StockLineLike], reason: str | None = None) -> Outcome:
        """Queue a batch `count` (`key` None: one is generated)."""
        return self._submit_request(count_many_request(key, lines, reason))

    def transfer(self, key: str | None, sku: str, from_loc: str, to_loc: str, qty: int) -> Outcome:
        """Queue a `transfer` (`key` None: one is generated)."""
        return self._submit_request(transfer_request(key, sku, from_loc, to_loc, qty))

    def _submit_request(self, request: tuple[str, dict[str, Any]]) -> Outcome:
        op, fields = request
        return self.submit(op, **fields)

    # -- reading outcomes -------------------------------------------------------------------------

    def outcome(self, local_id: int) -> Outcome:
        """The current outcome of one request (`pending` until decided). `UnknownEntry` if none."""
        return self._store.outcome(local_id)

    def outcomes(self, after_local_id: int = 0, limit: int = 1000) -> list[Outcome]:
        """Outcomes of the requests after `after_local_id`, in submission order, at most `limit`."""
        return self._store.outcomes(after_local_id, limit)

    def pending_count(self) -> int:
        """Requests queued and not decided yet."""
        return self._store.undecided_count()

    def wait(self, local_id: int, timeout_seconds: float) -> Outcome:
        """Wait up to `timeout_seconds` for the request to be decided; return its outcome then
        (still `pending` if the time ran out)."""
        return self._wait_for(lambda: self._store.outcome(local_id), lambda outcome: outcome.decided, timeout_seconds)

    def wait_until_drained(self, timeout_seconds: float) -> bool:
        """Wait up to `timeout_seconds` until nothing is pending; True if drained."""
        return self._wait_for(self.pending_count, lambda pending: pending == 0, timeout_seconds) == 0

    def _wait_for(self, read: Callable[[], Any], done: Callable[[Any], bool], timeout_seconds: float) -> Any:
        assert timeout_seconds >= 0
        deadline = time.monotonic() + timeout_seconds
        with self._decided:
            while True:
                value = read()
                remaining_seconds = deadline - time.monotonic()
                if done(value) or remaining_seconds <= 0:
                    return value
                if self.drainer_failure is not None:
                    raise DrainerFailed(f"the outbox drainer stopped: {self.drainer_failure!r}") from self.drainer_failure
                self._decided.wait(min(remaining_seconds, IDLE_WAKE_SECONDS))

    # -- the drainer thread -----------------------------------------------------------------------

    def _drain(self) -> None:
        failures = 0  # attempts in a row that did not decide a request; drives the backoff
        try:
            while not self._stopping.is_set():
                # Clear before looking, so a submit after the look wakes the wait below.
                self._work.clear()
                request = self._store.next_undecided()
                if request is None:
                    self._work.wait(IDLE_WAKE_SECONDS)
                    continue
                if self._resend_window_passed(request):
                    self._decide(request, UNKNOWN, None, note=self._resend_window_note(request))
                    continue
                try:
                    reply = self._send(request)
                    verdict = judge_reply(reply)
                    if verdict.final:
                        self._decide(request, verdict.outcome, reply)
                        failures = 0
                        self.last_error = None
                        continue
                    self.last_error = f"{request.op} {request.idempotency_id}: {verdict.reason}"
                except _LinkFailure as failure:
                    self.last_error = str(failure)
                    self._disconnect()
                except sqlite3.OperationalError as error:
                    # Disk full, I/O error: an operating error, not a bug. A reply that could not
                    # be recorded is asked for again by the resend (`duplicate: true`).
                    self.last_error = f"the outbox file failed: {error}"
                    log.warning("%s; retrying", self.last_error)
                failures += 1
                self._pause(failures)
        except BaseException as error:
            # A broken invariant (an assertion) or a bug: stop rather than guess. Everything
            # queued is still in the file, and a new client resumes from it.
            log.exception("the outbox drainer stopped")
            self.drainer_failure = error
            with self._decided:
                self._decided.notify_all()
        finally:
            self._disconnect()

    def _send(self, request: StoredRequest) -> dict[str, Any]:
        """Send one request (connecting first if needed) and return its reply."""
        connection = self._connect()
        # Durable before the bytes leave: from here the server may apply it, and a restart knows.
        self._store.mark_sent(request.local_id, self._clock_ms())
        try:
            return connection.receive(connection.send(request.op, **request.fields))
        except (ConnectionClosed, ProtocolViolation, TimeoutError, OSError) as error:
            raise _LinkFailure(f"{request.op} {request.idempotency_id}: no reply ({type(error).__name__}: {error})") from error

    def _connect(self) -> Client:
        if self._connection is not None:
            return self._connection
        try:
            connection = Client(self.host, self.port, timeout_seconds=self.reply_timeout_seconds, max_frame_bytes=self.max_frame_bytes)
        except OSError as error:
            raise _LinkFailure(f"cannot connect to {self.host}:{self.port}: {error}") from error
        try:
            connection.hello(token=self.token, client=self.client_name)
        except (ServerError, ConnectionClosed, ProtocolViolation, TimeoutError, OSError) as error:
            connection.close()
            raise _LinkFailure(f"hello refused by {self.host}:{self.port}: {error}") from error
        self._connection = connection
        return connection

    def _disconnect(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def _pause(self, failures: int) -> None:
        delay_seconds = backoff_delay_seconds(failures, self.reconnect_delay_min_seconds, self.reconnect_delay_max_seconds, self._chooser)
        self._stopping.wait(delay_seconds)

    def _resend_window_passed(self, request: StoredRequest) -> bool:
        if request.first_sent_at_ms is None:
            return False  # never sent: the server cannot have applied it, it may wait for ever
        return self._clock_ms() - request.first_sent_at_ms > self.resend_window_ms

    def _resend_window_note(self, request: StoredRequest) -> str:
        return (
            f"sent {request.attempts} time(s), first {self._clock_ms() - request.first_sent_at_ms} ms ago, never answered; "
            f"past the resend window ({self.resend_window_ms} ms, below the server's id retention) a resend could be "
            f"applied twice, so it was not resent: check {request.idempotency_id!r} on the server"
        )

    def _decide(self, request: StoredRequest, outcome_status: str, reply: dict[str, Any] | None, note: str | None = None) -> None:
        outcome = self._store.record_outcome(request.local_id, outcome_status, reply, self._clock_ms(), note)
        with self._decided:
            self._decided.notify_all()
        if self._on_outcome is not None:
            try:
                self._on_outcome(outcome)
            except Exception:
                log.exception("on_outcome callback failed for local id %d (the outcome is recorded)", outcome.local_id)


def _lock_outbox(path: str):
    """Hold an exclusive lock on `<path>.lock` for the client's life (released by the kernel when
    the process dies), so two drainers never send the same file's requests side by side."""
    # Imported here, not at the top: `protocol` (the other clients) must stay importable where
    # there is no fcntl; only the offline client needs it.
    try:
        import fcntl
    except ImportError:
        raise RuntimeError("the offline client locks its outbox with fcntl.flock, which this platform lacks (POSIX only)") from None
    lock_file = open(f"{path}.lock", "a+b")
    try:
        fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock_file.close()
        raise OutboxInUse(f"{path} is drained by another OfflineClient (lock {path}.lock is held)") from None
    return lock_file

"""The sync loop: read the offset from the sink, `watch from_seq=offset+1`, apply events in batches.

One thread, blocking calls: one event stream into one database connection. While a batch
commits, the next events wait in the socket buffers (TCP back-pressure reaches the engine's
bounded watcher), so an event loop would add nothing but a second way to write the same code.

Failures and what happens:
- the engine goes away (killed, restarted, network): the watch connection closes; the loop
  reconnects with a growing delay and resumes from the offset the database holds.
- the database fails (connection terminated, locked, disk): the open batch is rolled back as a
  whole; the loop reopens the database and resumes from the committed offset.
- the engine no longer has the events after the offset (trimmed by log retention), or its log
  ends before the offset (another engine, a reset data folder): `CannotResume`, the process
  stops with a message; the read model must be rebuilt into an empty database.
Whatever happens, the offset and the rows move in one transaction (`sink.py`), so resuming from
the offset applies every event exactly once.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time

from protocol import Client, ConnectionClosed, ProtocolViolation, ServerError, tls_refusal

from ..core.events import Event, check_event
from .databases import failure_errors, open_database
from .metrics import SyncMetrics
from .settings import SyncSettings
from .sink import ReadModelSink, StreamGap

log = logging.getLogger("engine.sync")

CLIENT_NAME = "engine-sync"


class CannotResume(Exception):
    """The read model cannot continue from the engine's log; the message says what to do."""


class EngineRefused(Exception):
    """The engine refuses the sync itself (a wrong `--token`, an unsupported protocol version, TLS
    that does not agree: see `protocol.tls_refusal`): retrying cannot help."""


class TooManyDeadLetters(Exception):
    """The dead-letter table reached its bound: the database refuses rows wholesale, which is an
    operator's problem to fix (then `--retry-dead-letters`), not something to record forever."""


class _Backoff:
    """The delay before the next reconnect: doubles per failure in a row, back to the start on success."""

    def __init__(self, initial_seconds: float, max_seconds: float):
        self.initial_seconds = initial_seconds
        self.max_seconds = max_seconds
        self.delay_seconds = initial_seconds

    def next_delay(self) -> float:
        delay = self.delay_seconds
        self.delay_seconds = min(self.delay_seconds * 2, self.max_seconds)
        return delay

    def reset(self) -> None:
        self.delay_seconds = self.initial_seconds


def run_sync(settings: SyncSettings, metrics: SyncMetrics, stop: threading.Event) -> None:
    """Keep the read model in step with the engine until `stop` is set.

    Raises `CannotResume`, `EngineRefused` or `TooManyDeadLetters` when going on would be wrong
    or useless, `TlsOptionsError` for a TLS file it cannot use; every other failure of the engine
    or the database is retried (logged, counted, with a delay that doubles per failure in a row
    and starts again after a committed batch).
    """
    # One context for every connection (a watch, a stats poll every few seconds): the CA and the
    # client certificate are read once.
    ssl_context = settings.tls.ssl_context() if settings.tls is not None else None
    database_errors = failure_errors(settings.url)
    backoff = _Backoff(settings.reconnect_delay_initial_seconds, settings.reconnect_delay_max_seconds)
    sink: ReadModelSink | None = None
    try:
        while not stop.is_set():
            try:
                if sink is None:
                    sink = ReadModelSink(open_database(settings.url))
                    sink.create_schema()
                _stream(settings, ssl_context, sink, metrics, stop, backoff)
                continue
            except (CannotResume, EngineRefused, TooManyDeadLetters):
                raise
            except database_errors as error:
                cause = "database"
                log.warning("database failure (resuming from the committed offset): %s", error)
                if sink is not None:
                    sink.database.close()
                sink = None
            except StreamGap as error:
                cause = "gap"
                log.error("%s; reconnecting", error)
            except (ConnectionClosed, ProtocolViolation, ServerError, OSError) as error:  # TimeoutError is an OSError
                refusal = tls_refusal(error, settings.tls)
                if refusal is not None:
                    raise EngineRefused(f"TLS with the engine at {settings.host}:{settings.port} failed: {refusal}") from error
                cause = "engine"
                log.warning("engine connection failed (reconnecting): %s", error)
            metrics.failure(cause)
            stop.wait(backoff.next_delay())
    finally:
        if sink is not None:
            sink.database.close()


def _connect(settings: SyncSettings, ssl_context: ssl.SSLContext | None) -> Client:
    """A connection to the engine (TLS when the settings say so), not yet greeted."""
    return Client(
        settings.host, settings.port, timeout_seconds=settings.engine_timeout_seconds, ssl_context=ssl_context,
        server_hostname=None if settings.tls is None else settings.tls.server_hostname(settings.host),
    )


def _stream(
    settings: SyncSettings, ssl_context: ssl.SSLContext | None, sink: ReadModelSink, metrics: SyncMetrics, stop: threading.Event,
    backoff: _Backoff,
) -> None:
    """One watch connection, until it fails or `stop` is set."""
    offset, offset_ts_ms = sink.read_offset()
    dead_letters = sink.dead_letter_count()
    with _connect(settings, ssl_context) as client:
        _hello(client, settings.token)
        head_seq = _subscribe(client, offset)
        metrics.observe_head(head_seq)
        metrics.update_lag(offset, offset_ts_ms)
        log.info("watching %s:%d from seq %d (engine at seq %d)", settings.host, settings.port, offset + 1, head_seq)
        next_head_poll = next_progress = time.monotonic()
        while not stop.is_set():
            batch = _gather(client, settings)
            if batch:
                outcome = sink.apply_batch(batch)
                backoff.reset()
                metrics.observe_head(batch[-1]["seq"])
                metrics.batch_done(outcome.applied, outcome.duplicates, outcome.dead_lettered)
                offset, offset_ts_ms = outcome.offset, outcome.offset_event_ts_ms
                dead_letters += outcome.dead_lettered
                if outcome.dead_lettered:
                    log.warning("%d event(s) up to seq %d went to dead_letters", outcome.dead_lettered, offset)
                if dead_letters >= settings.dead_letters_max:
                    raise TooManyDeadLetters(
                        f"{dead_letters} dead letters (bound {settings.dead_letters_max}): the database refuses rows"
                        " wholesale; fix the cause, run `python -m engine sync --retry-dead-letters`, then restart"
                    )
            now = time.monotonic()
            if now >= next_head_poll:
                next_head_poll = now + settings.head_poll_seconds
                _poll_head(settings, ssl_context, metrics)
            metrics.update_lag(offset, offset_ts_ms)
            if now >= next_progress:
                next_progress = now + settings.progress_seconds
                log.info("progress: %s", metrics.progress_line())


def _hello(client: Client, token: str | None) -> None:
    try:
        client.hello(token=token, client=CLIENT_NAME)
    except ServerError as error:
        if error.code in ("unauthorized", "unsupported_version"):
            raise EngineRefused(f"the engine refuses the sync: {error} (check --token)") from error
        raise


def _subscribe(client: Client, offset: int) -> int:
    """`watch from_seq=offset+1`; returns the engine's durable seq. Raises `CannotResume`."""
    try:
        reply = client.watch(from_seq=offset + 1)
    except ServerError as error:
        if error.code == "invalid" and "first_seq" in error.reply:
            raise CannotResume(
                f"the engine no longer retains the events after the read model's offset {offset}"
                f" (its log starts at seq {error.reply['first_seq']}): rebuild the read model into an empty"
                " database while the engine still holds its whole log, or keep the log longer (serve --log-retention-days)"
            ) from error
        raise
    head_seq = reply["seq"]
    if head_seq < offset:
        raise CannotResume(
            f"the read model is at seq {offset} but the engine's log ends at seq {head_seq}: this database was"
            " fed by another engine or a data folder since reset; sync into an empty database"
        )
    return head_seq


def _gather(client: Client, settings: SyncSettings) -> list[Event]:
    """Up to `batch_events_max` events: wait up to `idle_wait_seconds` for the first, then up to
    `batch_window_seconds` for more. Empty when the engine had nothing to say."""
    client.timeout_seconds = settings.idle_wait_seconds
    try:
        batch = [client.next_event()]
    except TimeoutError:
        return []
    deadline = time.monotonic() + settings.batch_window_seconds
    while len(batch) < settings.batch_events_max:
        remaining_seconds = deadline - time.monotonic()
        if remaining_seconds <= 0:
            break
        client.timeout_seconds = remaining_seconds
        try:
            batch.append(client.next_event())
        except TimeoutError:
            break
    for event in batch:
        check_event(event)  # checked before the engine logged it; again as it arrives here
    return batch


def _poll_head(settings: SyncSettings, ssl_context: ssl.SSLContext | None, metrics: SyncMetrics) -> None:
    """The engine's durable seq from `stats`, on a short connection of its own. A failure is only
    logged: the watch connection is what tells whether the engine is there."""
    try:
        with _connect(settings, ssl_context) as client:
            client.hello(token=settings.token, client=CLIENT_NAME)
            metrics.observe_head(int(client.stats()["wal"]["durable_seq"]))
    except (ConnectionClosed, ProtocolViolation, ServerError, OSError, KeyError, TypeError) as error:
        log.debug("stats for the lag metric failed: %s", error)

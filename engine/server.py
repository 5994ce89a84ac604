"""The server's lifecycle: open storage, recover, serve, and shut down cleanly.

Nursery layout (structured concurrency: every task has a parent):
  run_server
  └─ log nursery: the WAL writer (outlives everything that appends to it),
     │  outbox flusher (writes replies that became ready outside a commit)
     └─ service nursery: owner tasks, housekeeping (expiry, id retention, snapshots), listener,
        connections
Shutdown: stop the service nursery (no new changes; a snapshot builder running is stopped), flush
the log, write a snapshot (on the loop: nothing is served any more), close.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass
from functools import partial
from typing import Callable

import trio

from protocol import codes, error_reply, pack

from .access import AccessControl, check_listen_address
from .config import Config
from .connection import Connection, linger
from .gc_freezer import FullCollectionFreezer
from .outbox import Outbox
from .owners import Owners
from .core import State
from .data_lock import lock_data_folder
from .recovery import recover
from .service import Engine, wall_clock_ms
from .storage import LmdbStorage
from .tls import TlsHandshakeFailed, TlsTransport, server_ssl_context
from .transport import ConnectionLost, SocketTransport, open_listener, serve
from .wal import WriteAheadLog

log = logging.getLogger("engine.server")


@dataclass
class RunningServer:
    """What `run_server` hands to `task_status.started`: where it listens, and the engine."""

    host: str
    port: int
    engine: Engine
    shutdown: trio.Event
    stopped: trio.Event
    metrics_port: int | None = None  # where `/metrics` is served (None: not served)
    access: AccessControl | None = None  # the token table in force (`access.reload()` on SIGHUP)

    def stop(self) -> None:
        """Ask for a clean shutdown (flush, snapshot, close)."""
        self.shutdown.set()

    async def aclose(self) -> None:
        """Shut down cleanly and wait until storage is closed."""
        self.shutdown.set()
        await self.stopped.wait()


def storage_path(config: Config) -> str:
    return os.path.join(config.data_dir, "lmdb")


async def run_server(
    config: Config,
    *,
    shutdown: trio.Event | None = None,
    clock_ms: Callable[[], int] = wall_clock_ms,
    process_started_monotonic: float | None = None,
    task_status: trio.TaskStatus[RunningServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until `shutdown` is set (or the task is cancelled, which skips the final snapshot).

    `process_started_monotonic` (`time.monotonic()` when the process started) dates the
    start-up line; without it the line counts from this call."""
    started_monotonic = time.monotonic() if process_started_monotonic is None else process_started_monotonic
    shutdown = shutdown if shutdown is not None else trio.Event()
    stopped = trio.Event()
    check_listen_address(config)  # InsecureListenRefused: beyond loopback without auth
    access = AccessControl.from_config(config)  # AuthFileError: a bad --auth file
    make_transport: Callable = SocketTransport
    if config.tls_cert_file is not None:
        assert config.tls_key_file is not None, "a TLS certificate needs its key"
        tls_context = server_ssl_context(config.tls_cert_file, config.tls_key_file, config.tls_client_ca_file)  # TlsConfigError
        make_transport = partial(TlsTransport, context=tls_context)
    data_lock = lock_data_folder(config.data_dir)  # one server per folder: DataFolderLocked if taken
    try:
        storage = LmdbStorage(storage_path(config), config.map_size_bytes, map_size_max_bytes=config.map_size_max_bytes)
    except BaseException:
        data_lock.release()
        raise
    try:
        recovery_started = time.monotonic()
        state, replayed = await trio.to_thread.run_sync(_recover_without_cyclic_gc, storage)
        await trio.to_thread.run_sync(storage.prune_snapshots, config.snapshots_kept)  # and what killed builders left
        # Replay read the log through the map: without this, all of it would stay mapped in (and
        # counted in the server's RSS) until the first release by the log's commits.
        await trio.to_thread.run_sync(storage.release_map_pages)
        recovery_seconds = time.monotonic() - recovery_started
        _tune_interpreter()
        outbox = Outbox()
        wal = WriteAheadLog(storage, config.records_per_commit_max, outbox)
        async with trio.open_nursery() as log_nursery:
            log_nursery.start_soon(wal.run)
            log_nursery.start_soon(outbox.run_flusher)
            async with trio.open_nursery() as service_nursery:
                owners = Owners(service_nursery, config.owner_tasks, config.mailbox_messages_max)
                engine = Engine(config, state, storage, wal, owners, outbox, clock_ms)
                service_nursery.start_soon(engine.run_housekeeping)
                if config.freeze_after_slow_full_collections:
                    service_nursery.start_soon(FullCollectionFreezer().run)
                listener = open_listener(config.host, config.port)
                port = listener.getsockname()[1]
                counters: Counter = Counter()
                handler = partial(_handle_connection, engine=engine, counters=counters, access=access)
                service_nursery.start_soon(serve, listener, handler, make_transport)
                metrics_port = None
                if config.metrics_port is not None:
                    # Imported here: prometheus_client costs ~20 ms of start-up, for servers without metrics too.
                    from .metrics_collector import EngineCollector, build_registry
                    from .metrics_http import serve_metrics

                    registry = build_registry(EngineCollector(engine, counters, recovery_seconds, replayed, access))
                    metrics_port = await service_nursery.start(serve_metrics, config.host, config.metrics_port, registry)
                log.info("listening on %s:%d%s (data in %s, seq %d, %d records replayed)", config.host, port,
                         " (TLS)" if config.tls_cert_file is not None else "", config.data_dir, state.seq, replayed)
                _log_start_up(started_monotonic, recovery_seconds, state.seq, replayed)
                task_status.started(RunningServer(config.host, port, engine, shutdown, stopped, metrics_port, access))
                await shutdown.wait()
                log.info("shutting down: closing connections")
                service_nursery.cancel_scope.cancel()
            await wal.flush()
            if wal.failure is None and state.seq > engine.last_snapshot_seq:
                try:
                    await engine.snapshot(on_loop=True)  # nothing is served now: no builder needed
                except RuntimeError as error:
                    log.error("final snapshot failed (the log has everything): %s", error)
            log.info("stopped at seq %d (durable %d)", state.seq, wal.durable_seq)
            log_nursery.cancel_scope.cancel()
    finally:
        storage.close()
        data_lock.release()
        stopped.set()


async def _tls_handshake(transport: TlsTransport, timeout_seconds: float, counters: Counter) -> bool:
    """Complete the handshake within `timeout_seconds`; False (logged, counted) if it failed."""
    with trio.move_on_after(timeout_seconds):
        try:
            await transport.handshake()
            return True
        except TlsHandshakeFailed as error:
            counters["tls_handshake_failures"] += 1
            log.info("TLS handshake failed: %s", error)
            return False
    counters["tls_handshake_failures"] += 1
    log.info("TLS handshake not completed within %.1f s", timeout_seconds)
    return False


# The state is millions of small, acyclic objects (freed by reference counting alone). What
# recovery built is frozen; what serving adds is kept in forms the collector stops tracking after
# one look (flat tuples of strings and numbers: see `Reservation`), so each collection scans
# little more than what was allocated since the last one. The generation-0 threshold then sets
# the length of a pause: 10,000 gives pauses of a few ms (measured at 60k requests/s: at most
# 7 ms, against 25 ms at 50,000; before flat records, generation-1 pauses took 100 ms).
GC_GENERATION0_THRESHOLD = 10_000
SWITCH_INTERVAL_SECONDS = 0.0005

# A refused connection lingers briefly (its overloaded reply must not be lost to a reset), but
# not long: a flood of connections must not pile up lingering tasks.
REFUSED_LINGER_SECONDS = 0.25


def _recover_without_cyclic_gc(storage: LmdbStorage) -> tuple[State, int]:
    """`recover` with the cyclic collector off, then the recovered state frozen (out of its reach).

    Recovery allocates millions of small acyclic objects. With the collector on, it rescanned
    the growing state every 700 allocations: about half of the replay's CPU (measured: 300k
    reserves, 2.5-3.0 s -> 1.3 s). Re-enabled before the freeze, its first collection would
    scan everything allocated meanwhile (0.3 s), and a full `gc.collect()` after recovery
    costs 0.15 s: recovery makes no cycles, so the collection runs before it instead (garbage
    of the imports, of earlier servers in the same process). The event loop does not serve
    yet, so no other code allocates meanwhile."""
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        recovered = recover(storage)
        gc.freeze()  # what recovery built is long-lived: never scan it again
    finally:
        _, generation1, generation2 = gc.get_threshold()
        gc.set_threshold(GC_GENERATION0_THRESHOLD, generation1, generation2)
        if was_enabled:
            gc.enable()
    return recovered


def _log_start_up(started_monotonic: float, recovery_seconds: float, seq: int, replayed: int) -> None:
    # Replay starts right after the snapshot, so the snapshot's seq is what replay did not cover.
    started_seconds = time.monotonic() - started_monotonic
    log.info(
        "started in %.2f s (%d records/s from process start): recovered seq %d (snapshot at %d, replayed %d records in %.2f s, %d records/s)",
        started_seconds, replayed / max(started_seconds, 1e-6), seq, seq - replayed, replayed, recovery_seconds,
        replayed / max(recovery_seconds, 1e-6),
    )


def process_started_monotonic() -> float | None:
    """`time.monotonic()` at the moment this process started (from /proc: Linux), or None.

    Start-up includes the interpreter and the imports, which run before any of our code."""
    try:
        with open("/proc/self/stat", "rb") as stat:
            # Field 22, start time in clock ticks since boot; the command name (field 2) may
            # hold spaces, so count from its closing parenthesis.
            fields = stat.read().rsplit(b")", 1)[1].split()
        started_since_boot_seconds = int(fields[19]) / os.sysconf("SC_CLK_TCK")
        age_seconds = time.clock_gettime(time.CLOCK_BOOTTIME) - started_since_boot_seconds
    except (OSError, ValueError, IndexError, AttributeError):
        return None
    if not 0 <= age_seconds < 3600:
        return None
    return time.monotonic() - age_seconds


def _tune_interpreter() -> None:
    # (The collector is tuned by `_recover_without_cyclic_gc`.)
    # A log commit's worker thread, back from fsync, needs the GIL to hand its result to the
    # event loop; a busy loop gives it up only every switch interval (5 ms by default), which
    # then delays every reply waiting for that commit. Ask for it sooner.
    sys.setswitchinterval(SWITCH_INTERVAL_SECONDS)


async def _handle_connection(transport: SocketTransport, *, engine: Engine, counters: Counter, access: AccessControl) -> None:
    if isinstance(transport, TlsTransport) and not await _tls_handshake(transport, engine.config.tls_handshake_timeout_seconds, counters):
        return
    if counters["open"] >= engine.config.connections_max:
        counters["refused"] += 1
        reply = error_reply(None, codes.OVERLOADED, f"too many connections ({engine.config.connections_max}); retry later")
        with trio.move_on_after(1):
            try:
                await transport.send_all(pack(reply))
            except ConnectionLost:
                return
        await linger(transport, REFUSED_LINGER_SECONDS)
        return
    counters["open"] += 1
    counters["total"] += 1
    try:
        await Connection(transport, engine, counters, access).run()
    finally:
        counters["open"] -= 1

"""One seeded run of the simulation: the real shell, a simulated disk, network and clock.

Real: `Engine` (routing, owner tasks, multi-line holds, parking, expiry), `WriteAheadLog` (group
commit), `Outbox`, `Connection` and `_handle_connection` (the server's connection path), the
codec, the core, `recover`. Simulated: the disk (`storage.MemoryDisk`, with injected write
failures), the commit thread (`commit.SimulatedCommitRunner`: a seeded fsync time inside trio),
the network (`network.py`: bounded in-memory pipes), the clock (trio's `MockClock`, autojump),
and the clients (`clients.py`, drawing requests from `workload.py`). This file runs the server
processes one after another, the chaos that kills or stops them, and the checks at the end. The server stack is built here as `engine.server.run_server` builds it (the
LMDB folder, its lock, the listening socket and the worker-thread recovery left out).

Every choice comes from `random.Random` instances seeded from the run's seed, and trio's own
scheduler is seeded too (`_seeded_trio_scheduler`): with no threads, sockets or wall clock, a
seed gives the same run, event for event (`SimulationResult.trace_hash`).

Faults: the server is killed (`kill -9`: connections dropped, a commit in flight is not
durable) or stopped cleanly (flush, snapshot) at seeded times; a write fails now and then (the
log stops, every reply waiting becomes `internal`, the server is restarted); clients give up on
requests mid-flight (a cancel scope; the connection is closed, possibly inside a frame); each
restart recovers from what the disk holds. See `checks.py` for what every run must satisfy.
"""

from __future__ import annotations

import hashlib
import math
import random
import traceback
import zlib
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Hashable, Iterator

import msgpack
import trio
import trio.testing

from engine.access import AccessControl
from engine.config import DAY_MS, Config
from engine.core import HELD, Reservation, check_invariants
from engine.outbox import Outbox
from engine.owners import Owners
from engine.recovery import recover
from engine.server import _handle_connection
from engine.service import Engine
from engine.wal import WriteAheadLog

from .clients import Clients
from .checks import check_log, check_origins, check_replies, replay
from .commit import SimulatedCommitRunner
from .history import History
from .network import SimulatedListener
from .storage import MemoryDisk, MemoryStorage
from .workload import STOCK_KEYS, Workload

BASE_CLOCK_MS = 1_767_225_600_000  # 2026-01-01: the simulated clock's epoch
SIMULATED_SECONDS_MAX = 3600.0  # a run that has not finished by then is stuck: a violation
# At the end the server runs this long without faults of the chaos; then no reservation may be
# held more than EXPIRY_LATENESS_MS_MAX past its expiry (the timer fires within a millisecond).
FINAL_QUIET_SECONDS = 0.5
EXPIRY_LATENESS_MS_MAX = 100


@dataclass(frozen=True)
class SimulationOptions:
    clients: int = 12
    requests_per_client: int = 30
    # Simulated time between faults of the server, drawn per seed: some runs see many, some
    # none (where a lost reply shows as a client's timeout instead of being cut short by a kill).
    kill_interval_seconds_means: tuple[float, ...] = (0.3, 1.0, 5.0, math.inf)
    clean_stop_probability: float = 0.3  # of a fault: a clean stop (flush, snapshot), else kill -9
    append_failure_probability: float = 0.01
    abandon_probability: float = 0.05  # of a client's batch: given up on after a short wait
    think_seconds_max: float = 0.1


@dataclass
class SimulationResult:
    seed: int
    requests: int = 0
    replies: int = 0
    events: int = 0
    kills: int = 0
    clean_stops: int = 0
    write_failures: int = 0
    abandoned: int = 0
    outcomes: Counter = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)
    trace_hash: str = ""


def stable_key_hash(key: Hashable) -> int:
    """A partition hash that is the same in every process (`hash` of a str is salted)."""
    return zlib.crc32(repr(key).encode())


def simulation_config(chooser: random.Random) -> Config:
    """Seeded bounds: tiny ones make the rare paths (a commit per record, a paused reader) common."""
    return replace(
        Config(port=0, data_dir="<memory>"),
        owner_tasks=chooser.choice([1, 2, 3, 8]),
        records_per_commit_max=chooser.choice([1, 3, 64, 20_000]),
        in_flight_per_connection_max=chooser.choice([1, 2, 8, 4096]),
        snapshot_interval_seconds=1e9,  # engine.snapshot() runs storage calls in a worker thread
        # Short id retention now and then, so that `forgotten` events race retries and lookups.
        id_retention_ms=chooser.choice([DAY_MS, DAY_MS, 1000, 200]),
        forget_interval_seconds=chooser.choice([0.1, 0.5, 60.0]),
    )


class _Server:
    """One server process of the run."""

    def __init__(self, storage: MemoryStorage):
        self.storage = storage
        self.scope = trio.CancelScope()
        self.engine: Engine | None = None
        self.up = trio.Event()
        self.stop_cleanly = trio.Event()


class Simulation:
    def __init__(self, seed: int, options: SimulationOptions):
        self.seed = seed
        self.options = options
        self.disk = MemoryDisk(self._chooser("disk"), options.append_failure_probability)
        self.listener = SimulatedListener(self._chooser("network"))
        self.config = simulation_config(self._chooser("config"))
        self.history = History()
        self.result = SimulationResult(seed)
        self._commit_chooser = self._chooser("commit")
        self._restart_chooser = self._chooser("restart")
        self._shared_rids: list[str] = []
        self.clients = Clients(self.listener, self.history, self.disk, self.violation, options.abandon_probability, options.think_seconds_max)
        self._server: _Server | None = None
        self._server_changed = trio.Event()

    def _chooser(self, purpose: str) -> random.Random:
        return random.Random(f"{self.seed}:{purpose}")

    def clock_ms(self) -> int:
        return BASE_CLOCK_MS + int(trio.current_time() * 1000)

    def violation(self, message: str) -> None:
        self.result.violations.append(message)

    # -- the run ------------------------------------------------------------------------------

    async def run(self) -> SimulationResult:
        try:
            with trio.fail_after(SIMULATED_SECONDS_MAX):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._supervise)
                    await self._setup_stock()
                    chaos_scope = trio.CancelScope()
                    nursery.start_soon(self._chaos, chaos_scope)
                    async with trio.open_nursery() as clients:
                        for number in range(self.options.clients):
                            chooser = self._chooser(f"client {number}")
                            workload = Workload(number, chooser, self._shared_rids)
                            clients.start_soon(self.clients.run_client, number, chooser, workload, self.options.requests_per_client)
                    chaos_scope.cancel()
                    await self._final_checks()
                    nursery.cancel_scope.cancel()
        except trio.TooSlowError:
            self.violation(f"the run did not finish within {SIMULATED_SECONDS_MAX} simulated seconds")
        except Exception as error:  # an assertion in the engine (a broken invariant) is a finding too
            self.violation("the run raised:\n" + "".join(traceback.format_exception(error)))
        self._summarise()
        return self.result

    def _summarise(self) -> None:
        result, records = self.result, self.history.records
        result.requests = len(records)
        result.replies = sum(1 for record in records if record.reply is not None)
        result.abandoned = sum(1 for record in records if record.abandoned)
        result.events = self.disk.last_seq
        result.write_failures = self.disk.append_failures
        for record in records:
            if record.reply is not None:
                reply = record.reply
                outcome = ("duplicate" if reply.get("duplicate") else "ok") if reply["ok"] else reply["error"]
                result.outcomes[f"{record.op} {outcome}"] += 1
        trace = [self.history.trace(), [(first, last, data) for first, last, data in self.disk.entries]]
        result.trace_hash = hashlib.sha256(msgpack.packb(trace, use_bin_type=True)).hexdigest()

    # -- the server ---------------------------------------------------------------------------

    async def _supervise(self) -> None:
        """Run servers one after another on the disk, each until it is killed or stopped."""
        while True:
            server = _Server(MemoryStorage(self.disk))
            self._server = server
            with server.scope:
                await self._serve(server)
            self.listener.drop_all()
            self._server = None
            await trio.sleep(self._restart_chooser.uniform(0.001, 0.1))

    async def _serve(self, server: _Server) -> None:
        """`engine.server.run_server`'s stack on simulated storage and network."""
        config, storage = self.config, server.storage
        state, _ = recover(storage)
        if state.seq < self.history.seen_seq:
            self.violation(f"restart recovered seq {state.seq}; clients had seen seq {self.history.seen_seq}")
        if storage.latest_snapshot() is not None and state.to_snapshot() != replay(self.disk.events()).to_snapshot():
            self.violation(f"recovery from the snapshot at seq {storage.latest_snapshot()['seq']} differs from a replay from empty")
        outbox = Outbox()
        wal = WriteAheadLog(
            storage, config.records_per_commit_max, outbox,
            commit_runner=partial(SimulatedCommitRunner, self._commit_chooser),
        )
        async with trio.open_nursery() as log_nursery:
            log_nursery.start_soon(wal.run)
            log_nursery.start_soon(outbox.run_flusher)
            async with trio.open_nursery() as service_nursery:
                owners = Owners(service_nursery, config.owner_tasks, config.mailbox_messages_max, key_hash=stable_key_hash)
                engine = Engine(config, state, storage, wal, owners, outbox, self.clock_ms)
                server.engine = engine
                service_nursery.start_soon(engine.run_housekeeping)
                service_nursery.start_soon(self._kill_when_failed, server, wal)
                self.listener.listen(service_nursery, partial(_handle_connection, engine=engine, counters=Counter(), access=AccessControl.from_config(config)))
                server.up.set()
                await server.stop_cleanly.wait()
                self.listener.drop_all()
                service_nursery.cancel_scope.cancel()
            self.result.clean_stops += 1
            await wal.flush()
            if wal.failure is None and state.seq > 0:
                storage.save_snapshot(state.to_snapshot(), config.snapshots_kept)  # as `run_server` does on shutdown
            log_nursery.cancel_scope.cancel()

    async def _kill_when_failed(self, server: _Server, wal: WriteAheadLog) -> None:
        """A failed write stops the log; the operator (here: at once, or nearly) restarts."""
        while wal.failure is None:
            await wal.wait_durable_changed()
        await trio.sleep(self._restart_chooser.uniform(0, 0.05))  # meanwhile requests get `internal`
        self._kill(server)

    def _kill(self, server: _Server) -> None:
        """kill -9: nothing more reaches the disk, every connection drops, every task ends."""
        self.result.kills += 1
        server.storage.kill()
        self.listener.drop_all()
        server.scope.cancel()

    async def _chaos(self, scope: trio.CancelScope) -> None:
        chooser = self._chooser("chaos")
        interval_seconds_mean = chooser.choice(self.options.kill_interval_seconds_means)
        if interval_seconds_mean == math.inf:
            return
        with scope:
            while True:
                await trio.sleep(chooser.expovariate(1 / interval_seconds_mean))
                server = self._server
                if server is None or not server.up.is_set() or server.stop_cleanly.is_set():
                    continue
                if chooser.random() < self.options.clean_stop_probability:
                    server.stop_cleanly.set()
                else:
                    self._kill(server)

    async def _running_engine(self) -> Engine:
        while True:
            server = self._server
            if server is not None and server.up.is_set() and not server.stop_cleanly.is_set():
                assert server.engine is not None
                if server.engine.wal.failure is None:
                    return server.engine
            await trio.sleep(0.01)

    # -- the end ------------------------------------------------------------------------------

    async def _final_checks(self) -> None:
        """Everything applied made durable; then nothing left in flight inside the engine, timely
        expiry, and checks 1 to 5 (see `checks.py`)."""
        while True:
            engine = await self._running_engine()
            await trio.sleep(FINAL_QUIET_SECONDS)  # the expiries now due fire
            await engine.wal.flush()
            still_running = self._server is not None and self._server.engine is engine
            if still_running and engine.wal.failure is None and engine.wal.durable_seq == engine.wal.appended_seq:
                break
        stats = engine.stats()
        leftovers = {name: stats[name] for name in ("tentative_holds", "parked", "rids_in_flight", "owner_queued") if stats[name]}
        if leftovers:
            self.violation(f"the engine is not quiescent after the clients finished: {leftovers}")
        now_ms = self.clock_ms()
        for reservation in map(Reservation.from_record, engine.state.reservations.values()):
            if reservation.state == HELD and reservation.expires_at_ms is not None and reservation.expires_at_ms < now_ms - EXPIRY_LATENESS_MS_MAX:
                self.violation(f"{reservation.rid} still held {now_ms - reservation.expires_at_ms} ms after its expiry")
        events = self.disk.events()
        if replay(events).to_snapshot() != engine.state.to_snapshot():
            self.violation("the log replayed from empty differs from the server's state")
        check_invariants(engine.state)
        for message in check_log(events) + check_origins(events, self.history.records) + check_replies(events, self.history.records):
            self.violation(message)

    # -- clients ------------------------------------------------------------------------------

    async def _setup_stock(self) -> None:
        """Count every SKU-location to a seeded figure (retried until acknowledged)."""
        chooser = self._chooser("setup")
        for index, (sku, loc) in enumerate(STOCK_KEYS):
            fields = {"key": f"setup-{index}", "sku": sku, "loc": loc, "on_hand": chooser.randint(0, 30)}
            while True:
                await self._running_engine()
                reply = await self.clients.request_once(-1, "count", fields)
                if reply is not None and reply["ok"]:
                    break
                await trio.sleep(0.01)

@contextmanager
def _seeded_trio_scheduler(seed: int) -> Iterator[None]:
    """Make trio's scheduler deterministic and seeded: each batch of runnable tasks is sorted by
    creation and shuffled with `seed` (trio's hook for Hypothesis), instead of reversed at
    random from an unseeded generator."""
    run_module = trio._core._run
    saved_state, saved_flag = run_module._r.getstate(), run_module._ALLOW_DETERMINISTIC_SCHEDULING
    run_module._r.seed(seed)
    run_module._ALLOW_DETERMINISTIC_SCHEDULING = True
    try:
        yield
    finally:
        run_module._r.setstate(saved_state)
        run_module._ALLOW_DETERMINISTIC_SCHEDULING = saved_flag


def run_simulation(seed: int, options: SimulationOptions = SimulationOptions()) -> SimulationResult:
    """Run one seed to the end (in its own `trio.run`) and return what it found."""
    with _seeded_trio_scheduler(seed):
        return trio.run(Simulation(seed, options).run, clock=trio.testing.MockClock(autojump_threshold=0))

"""The engine's shell around the pure core: owns the state, routes each command to where it is
decided, logs the events, and hands every reply back with the seq it must wait for.

Where each command is decided:
- `get`, `adjust`, `count`, single-line `reserve`, `transfer` (at its source): in the owner of
  the SKU-location, in order with everything else queued there.
- multi-line `reserve`: tentative holds at each line's owner, then one decision (`coordinator`).
- `release`, `commit`, `extend` of a held reservation: behind what is queued at its lines'
  owners (in the owner of a single line; for several lines, once the last of their owners has
  reached it), so that requests a client pipelines on one SKU-location apply in the order sent.
- `lookup`, expiry, `query`, and `release`/`commit`/`extend` of a closed or unknown reservation
  (they change nothing): at once, in the caller's step.
A request naming a rid whose `reserve`, `release`, `commit` or `extend` is still in flight waits
for it to be decided.

Tentative holds never cause a refusal. A reserve or transfer that fits the real state but not
what is left after other requests' tentative holds waits ("parks") until those holds are lifted,
then is decided against the real state. So every `insufficient` is explained by the log: no
client is refused on account of a hold that is then rolled back.

Every state change happens in a synchronous step that also appends its events to the WAL, so
the order of the log is the order in which the state changed.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from functools import partial
from typing import Any, Callable

import trio

from protocol import MUTATING_COMMANDS, Adjust, AdjustBatch, Commit, Count, CountBatch, Extend, Get, Lookup, Query, Release, Reserve, Transfer, codes, error_reply

from .config import Config
from .coordinator import MultiLineHold, run_after_owners
from .core import HELD, RECORD_STATE, Expire, Forget, State, StockKey, apply
from .core.state import RECORD_EXPIRES_AT_MS, record_lines
from .core.events import ADJUSTED, ADJUSTED_BATCH, COUNTED, COUNTED_BATCH, EXTENDED, RESERVED, TRANSFERRED
from .expiry import ExpiryScheduler
from .metrics import OVERLOADED_OWNER_MAILBOX, OVERLOADED_WAL_BACKLOG, Histogram, RequestLatency
from .outbox import Outbox
from .owners import Owners
from .snapshotter import Snapshotter
from .storage import LmdbStorage
from .wal import WriteAheadLog

log = logging.getLogger("engine")

ReplySink = Callable[[dict[str, Any]], None]


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


class Engine:
    """Routes validated commands; `submit` calls `reply_to(reply)` exactly once per command.

    The reply map carries `seq`: the caller must not send it before `wal.durable_seq >= seq`.
    """

    def __init__(
        self, config: Config, state: State, storage: LmdbStorage, wal: WriteAheadLog, owners: Owners, outbox: Outbox,
        clock_ms: Callable[[], int] = wall_clock_ms,
    ):
        assert state.seq == wal.appended_seq, f"state at {state.seq}, log at {wal.appended_seq}"
        self.config = config
        self.state = state
        self.storage = storage
        self.wal = wal
        self.owners = owners
        self.outbox = outbox
        self.clock_ms = clock_ms
        self.tentative: dict[StockKey, int] = {}
        # rids whose `reserve` is being decided -> what waits for it (None: nothing yet).
        self._pending_rids: dict[str, deque[Callable[[], None]] | None] = {}
        self._parked: dict[StockKey, deque[Callable[[], None]]] = {}  # waiting for tentative holds there
        self._routes: dict[type, Callable[[int | None, Any, ReplySink], None]] = {
            Reserve: self._route_reserve,
            Release: self._route_to_reservation,
            Commit: self._route_to_reservation,
            Extend: self._route_to_reservation,
            Lookup: self._route_by_rid,
            Get: self._route_to_stock,
            Adjust: self._route_to_stock,
            Count: self._route_to_stock,
            Transfer: self._route_transfer,
            Query: self._decide,
            # A batch touches SKU-locations of many owners: decided at once, in this step.
            AdjustBatch: self._decide,
            CountBatch: self._decide,
        }
        self.expiry = ExpiryScheduler(clock_ms, self._expire)
        # Outcomes, counted where each is decided, in plain fields (read by `stats` and the
        # metrics collector): command type -> ok replies; (command type, error code) -> errors.
        self.ok_replies: Counter[type] = Counter()
        self.errors: Counter[tuple[type, str]] = Counter()
        self.duplicates: Counter[type] = Counter()  # ok replies that answered a retry from memory
        self.overloaded: Counter[str] = Counter()  # refusals by cause (`metrics.OVERLOADED_CAUSES`)
        self.request_latency = RequestLatency()  # observed by the connections as they write replies
        self.expiries = 0
        # SKU-locations that went below zero available (only adjust, count and transfer lower
        # it); `shortage_count` re-checks and prunes them, so it never scans every SKU-location.
        self.shortage_candidates: set[StockKey] = {key for key, stock in state.stocks.items() if stock.available < 0}
        self.started_at_ms = clock_ms()
        self.snapshots = Snapshotter(config, state, storage, wal, clock_ms)
        self.last_snapshot_monotonic: float | None = None  # when this process last wrote one
        self.snapshot_seconds = Histogram(SNAPSHOT_SECONDS_BUCKETS)
        # Read from the flat records' fields: building a `Reservation` view of each cost 0.35 s
        # of start-up per 300k reservations (0.02 s this way).
        for record in state.reservations.values():
            if record[RECORD_STATE] == HELD and record[RECORD_EXPIRES_AT_MS] is not None:
                self.expiry.schedule(record[RECORD_EXPIRES_AT_MS], record[0])

    # -- entry point -------------------------------------------------------------------------

    def submit(self, request_id: int | None, command: Any, reply_to: ReplySink) -> None:
        """Route one validated core command. `reply_to` is called once, now or later."""
        kind = type(command)
        if self.wal.failure is not None and kind not in _READS:
            self.errors[(kind, codes.INTERNAL)] += 1
            reply_to(error_reply(request_id, codes.INTERNAL, self.wal.failure))
            return
        if kind in _MUTATING and self.wal.backlog >= self.config.wal_backlog_max:
            why = f"write-ahead log backlog is at its bound ({self.config.wal_backlog_max} records)"
            reply_to(self._overloaded(request_id, kind, OVERLOADED_WAL_BACKLOG, why))
            return
        self._routes[kind](request_id, command, reply_to)

    def _route_reserve(self, request_id: int | None, command: Reserve, reply_to: ReplySink) -> None:
        if command.rid in self._pending_rids:
            self._with_rid(command.rid, partial(self._reserve, request_id, command, reply_to))
        else:
            self._reserve(request_id, command, reply_to)

    def _route_by_rid(self, request_id: int | None, command: Any, reply_to: ReplySink) -> None:
        if command.rid in self._pending_rids:
            self._with_rid(command.rid, partial(self._decide, request_id, command, reply_to))
        else:
            self._decide(request_id, command, reply_to)

    def _route_to_reservation(self, request_id: int | None, command: Any, reply_to: ReplySink) -> None:
        if command.rid in self._pending_rids:
            self._with_rid(command.rid, partial(self._behind_reservation_lines, request_id, command, reply_to))
        else:
            self._behind_reservation_lines(request_id, command, reply_to)

    def _behind_reservation_lines(self, request_id: int | None, command: Any, reply_to: ReplySink) -> None:
        """Decide a release, commit or extend of a held reservation behind everything queued at
        its lines' owners; the rid is in flight meanwhile (later requests naming it wait)."""
        rid = command.rid
        record = self.state.reservations.get(rid)
        if record is None or record[RECORD_STATE] != HELD:
            self._decide(request_id, command, reply_to)  # not found, or closed: it changes nothing
            return
        keys = [(sku, loc) for sku, loc, _ in record_lines(record)]
        if not self.owners.has_room(keys):
            reply_to(self._overloaded(request_id, type(command), OVERLOADED_OWNER_MAILBOX, "a SKU-location queue is full"))
            return
        self._pending_rids[rid] = None
        decide = partial(self._decide_then_rid_decided, request_id, command, reply_to)
        if len(keys) == 1:
            self.owners.send(keys[0], decide)
        else:
            run_after_owners(self.owners, keys, decide)

    def _decide_then_rid_decided(self, request_id: int | None, command: Any, reply_to: ReplySink) -> None:
        self._decide(request_id, command, reply_to)
        self._rid_decided(command.rid)

    def _route_to_stock(self, request_id: int | None, command: Any, reply_to: ReplySink) -> None:
        self._at_owner((command.sku, command.loc), request_id, command, reply_to)

    def _route_transfer(self, request_id: int | None, command: Transfer, reply_to: ReplySink) -> None:
        self._at_owner((command.sku, command.from_loc), request_id, command, reply_to)

    def _overloaded(self, request_id: int | None, kind: type, cause: str, why: str) -> dict[str, Any]:
        self.errors[(kind, codes.OVERLOADED)] += 1
        self.overloaded[cause] += 1
        return error_reply(request_id, codes.OVERLOADED, f"server overloaded: {why}; retry later", seq=0)

    # -- deciding ----------------------------------------------------------------------------

    def _decide(self, request_id: int | None, command: Any, reply_to: ReplySink) -> None:
        """Apply one command through the core, log its events, and hand back the reply.

        Once the log has stopped (`wal.failure`), only reads are decided: the outbox answers
        each that reflects durable changes only, and turns any other into `internal`."""
        if self.wal.failure is not None and type(command) not in _READS:
            self.errors[(type(command), codes.INTERNAL)] += 1
            reply_to(error_reply(request_id, codes.INTERNAL, self.wal.failure))
            return
        _, events, reply = apply(self.state, command, self.clock_ms())
        if events:
            self.wal.append(events)
            for event in events:
                event_type = event["type"]
                if event_type in _SCHEDULES_EXPIRY:
                    if event["expires_at_ms"] is not None:
                        self.expiry.schedule(event["expires_at_ms"], event["rid"])
                elif event_type in _MAY_LOWER_AVAILABLE:
                    self._note_shortages(event)
        if not reply["ok"]:
            self.errors[(type(command), reply["error"])] += 1
        else:
            self.ok_replies[type(command)] += 1
            if not events and "duplicate" in reply:
                self.duplicates[type(command)] += 1
        reply["id"] = request_id
        reply_to(reply)

    def _at_owner(self, key: StockKey, request_id: int | None, command: Any, reply_to: ReplySink) -> None:
        """Decide `command` in the owner of `key`, in order with what is queued there."""
        if not self.owners.try_send(key, partial(self._decide_unblocked, request_id, command, reply_to)):
            reply_to(self._overloaded(request_id, type(command), OVERLOADED_OWNER_MAILBOX, f"the queue of the owner of {key!r} is full"))

    def _decide_unblocked(self, request_id: int | None, command: Any, reply_to: ReplySink, then: Callable[[], None] | None = None) -> None:
        """Decide now or, if only other requests' tentative holds stand in the way, once they are lifted."""
        blocking_key = self._blocked_by_tentative(command)
        if blocking_key is not None:
            self._parked.setdefault(blocking_key, deque()).append(lambda: self._decide_unblocked(request_id, command, reply_to, then))
            return
        self._decide(request_id, command, reply_to)
        if then is not None:
            then()

    def _blocked_by_tentative(self, command: Any) -> StockKey | None:
        """A SKU-location whose tentative holds alone would make `command` fail, or None."""
        if not self.tentative:
            return None
        if isinstance(command, Reserve) and command.rid not in self.state.reservations:
            lines = [((line.sku, line.loc), line.qty) for line in command.lines]
        elif isinstance(command, Transfer) and command.key not in self.state.keys:
            lines = [((command.sku, command.from_loc), command.qty)]
        else:
            return None
        blocking_key = None
        for key, qty in lines:
            available = self._available(key)
            if available < qty:
                return None  # refused on the real state: nothing to wait for
            if blocking_key is None and available - self.tentative.get(key, 0) < qty:
                blocking_key = key
        return blocking_key

    def _holds_lifted(self, keys: list[StockKey]) -> None:
        for key in keys:
            for job in self._parked.pop(key, ()):
                job()

    # -- reservations ------------------------------------------------------------------------

    def _with_rid(self, rid: str, job: Callable[[], None]) -> None:
        """Run `job` now, or after the in-flight `reserve` of `rid` has been decided."""
        if rid not in self._pending_rids:
            job()
            return
        waiting = self._pending_rids[rid]
        if waiting is None:
            waiting = self._pending_rids[rid] = deque()
        waiting.append(job)

    def _rid_decided(self, rid: str) -> None:
        waiting = self._pending_rids.pop(rid)
        while waiting:
            waiting.popleft()()
            if rid in self._pending_rids:  # that job was another reserve of this rid: queue behind it
                for job in waiting:
                    self._with_rid(rid, job)
                return

    def _reserve(self, request_id: int | None, command: Reserve, reply_to: ReplySink) -> None:
        if command.rid in self.state.reservations:  # a retry: the core answers from memory
            self._decide(request_id, command, reply_to)
            return
        lines = command.lines
        if len(lines) == 1:
            decide = partial(self._reserve_one_line, request_id, command, reply_to)
            if not self.owners.try_send(lines[0][:2], decide):
                reply_to(self._overloaded(request_id, Reserve, OVERLOADED_OWNER_MAILBOX, "a SKU-location queue is full"))
                return
            self._pending_rids[command.rid] = None
            return
        keys = [(line.sku, line.loc) for line in lines]
        if not self.owners.has_room(keys):
            reply_to(self._overloaded(request_id, Reserve, OVERLOADED_OWNER_MAILBOX, "a SKU-location queue is full"))
            return
        self._pending_rids[command.rid] = None
        rid_decided = partial(self._rid_decided, command.rid)

        def decide_all() -> None:
            # The holds of this request are lifted now. It is decided first (it came first), then
            # whatever waited for those holds.
            self._decide_unblocked(request_id, command, reply_to, then=rid_decided)
            self._holds_lifted(keys)

        holds = [((line.sku, line.loc), line.qty) for line in lines]
        MultiLineHold(holds, self.tentative, self._available, decide_all).start(self.owners)

    def _reserve_one_line(self, request_id: int | None, command: Reserve, reply_to: ReplySink) -> None:
        """In the owner of the line's SKU-location: decide (unless tentative holds are in the way)."""
        if self.tentative:
            self._decide_unblocked(request_id, command, reply_to, partial(self._rid_decided, command.rid))
            return
        self._decide(request_id, command, reply_to)
        self._rid_decided(command.rid)

    def _available(self, key: StockKey) -> int:
        return self.state.stock(*key).available

    def _expire(self, rid: str) -> None:
        self._with_rid(rid, partial(self._decide_expiry, rid))

    def _decide_expiry(self, rid: str) -> None:
        # The timer only proposes: an extended or closed reservation is not expired (no event).
        seq_before = self.state.seq
        self._decide(None, Expire(rid), _ignore_reply)
        if self.state.seq != seq_before:
            self.expiries += 1

    # -- counting ----------------------------------------------------------------------------

    def _note_shortages(self, event: dict[str, Any]) -> None:
        """Remember the SKU-locations an adjust, count or transfer left below zero available."""
        event_type = event["type"]
        if event_type == TRANSFERRED:
            keys = [(event["sku"], event["from"])]
        elif event_type in (ADJUSTED, COUNTED):
            keys = [(event["sku"], event["loc"])]
        else:
            keys = [(line["sku"], line["loc"]) for line in event["lines"]]
        stocks = self.state.stocks
        for key in keys:
            if stocks[key].available < 0:
                self.shortage_candidates.add(key)

    def shortage_count(self) -> int:
        """SKU-locations with available < 0 now. Prunes the candidates that recovered: O(candidates)."""
        stocks = self.state.stocks
        recovered = [key for key in self.shortage_candidates if stocks[key].available >= 0]
        self.shortage_candidates.difference_update(recovered)
        return len(self.shortage_candidates)

    def count_reply(self, kind: type, reply: dict[str, Any]) -> None:
        """Count a reply made outside `_decide` (the commands a connection answers itself)."""
        if reply["ok"]:
            self.ok_replies[kind] += 1
        else:
            self.errors[(kind, reply["error"])] += 1

    # -- housekeeping ------------------------------------------------------------------------

    async def snapshot(self, *, on_loop: bool = False) -> int:
        """Write a snapshot covering every change applied so far; return the seq it covers
        (durable on return). Built off the event loop unless `on_loop` (see `Snapshotter`)."""
        started = time.monotonic()
        builds = self.snapshots.builds
        seq = await self.snapshots.take(on_loop=on_loop)
        if self.snapshots.builds > builds:  # not one that another request's snapshot covered
            self.last_snapshot_monotonic = time.monotonic()
            self.snapshot_seconds.observe(self.last_snapshot_monotonic - started)
        return seq

    @property
    def last_snapshot_seq(self) -> int:
        return self.snapshots.last_seq

    def forget_old_ids(self) -> None:
        """Drop idempotency memory older than the retention (logged, so replay agrees)."""
        cutoff_ms = self.clock_ms() - self.config.id_retention_ms
        self._decide(None, Forget(cutoff_ms, self.config.forget_batch_max), _ignore_reply)

    async def run_housekeeping(self) -> None:
        """Expiry timers, id retention, periodic snapshots and the snapshot builder, until cancelled."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.expiry.run)
            nursery.start_soon(self._every, self.config.forget_interval_seconds, self.forget_old_ids)
            nursery.start_soon(self._periodic_snapshots)
            nursery.start_soon(self.snapshots.run_builder)  # cancelled at shutdown: the builder is terminated

    @staticmethod
    async def _every(interval_seconds: float, job: Callable[[], None]) -> None:
        while True:
            await trio.sleep(interval_seconds)
            job()

    async def _periodic_snapshots(self) -> None:
        while True:
            await trio.sleep(self.config.snapshot_interval_seconds)
            if self.state.seq > self.last_snapshot_seq and self.wal.failure is None:
                try:
                    await self.snapshot()
                except RuntimeError as error:
                    log.error("periodic snapshot failed: %s", error)

    def stats(self) -> dict[str, Any]:
        return {
            "uptime_ms": self.clock_ms() - self.started_at_ms,
            "applied_seq": self.state.seq,
            "stocks": len(self.state.stocks),
            "reservations": len(self.state.reservations),
            "held": self.state.held_reservations,
            "held_units": self.state.held_units,
            "keys": len(self.state.keys),
            "owners": self.owners.owner_count,
            "owner_messages": self.owners.messages_processed,
            "owner_wakeups": self.owners.wakeups,
            "owner_queued": self.owners.queued,
            "tentative_holds": len(self.tentative),
            "parked": sum(len(jobs) for jobs in self._parked.values()),
            "rids_in_flight": len(self._pending_rids),
            "expiry_timers": len(self.expiry),
            "last_snapshot_seq": self.last_snapshot_seq,
            "snapshots": self.snapshots.stats(),
            "requests": self._requests_by_kind_name(),
            "errors": self._errors_by_code(),
            "wal": self.wal.stats(),
            "outbox_connections_visited": self.outbox.connections_visited,
        }


    def _requests_by_kind_name(self) -> dict[str, int]:
        """Answered requests per command type (ok and errors), as `stats` names them."""
        requests: Counter[str] = Counter()
        for kind, count in self.ok_replies.items():
            requests[kind.__name__.lower()] += count
        for (kind, _), count in self.errors.items():
            requests[kind.__name__.lower()] += count
        requests.pop("expire", None)  # the engine's own commands, not requests
        requests.pop("forget", None)
        return dict(requests)

    def _errors_by_code(self) -> dict[str, int]:
        errors: Counter[str] = Counter()
        for (_, code), count in self.errors.items():
            errors[code] += count
        return dict(errors)


def _ignore_reply(reply: dict[str, Any]) -> None:
    pass


_MUTATING = frozenset(MUTATING_COMMANDS)
_SCHEDULES_EXPIRY = (RESERVED, EXTENDED)
# Available drops below zero only through these (a reserve never takes more than is available,
# a commit leaves available as it was, and releases and expiries raise it).
_MAY_LOWER_AVAILABLE = frozenset({ADJUSTED, COUNTED, ADJUSTED_BATCH, COUNTED_BATCH, TRANSFERRED})

SNAPSHOT_SECONDS_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Still answered after the log stopped: they change nothing, and their replies wait for their
# seq like any other (so one that reflects a change that never became durable is refused).
_READS = frozenset((Get, Query, Lookup))

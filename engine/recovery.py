"""Recovery: the latest snapshot, then every later log record through `apply_event`.

Snapshots only shorten replay; the log is the source of truth. The snapshot builder
(`snapshot_builder`) replays the same way, through `replay_log`, up to a given seq.
"""

from __future__ import annotations

import logging
import time
from contextlib import closing
from typing import Iterator

from .core import Event, State, apply_event, check_invariants
from .pause_points import pause_point
from .storage import LmdbStorage

log = logging.getLogger("engine.recovery")

PROGRESS_EVERY_SECONDS = 2.0
PROGRESS_CHECK_RECORDS = 10_000  # look at the clock about this often


def recover(storage: LmdbStorage) -> tuple[State, int]:
    """Rebuild the state from `storage`. Returns `(state, records replayed)`. Blocking."""
    started = time.monotonic()
    snapshot = storage.latest_snapshot_sections()  # read a record at a time, not decoded whole first
    state = State.from_snapshot_sections(*snapshot) if snapshot is not None else State()
    if snapshot is not None:
        log.info("loaded snapshot at seq %d (%d SKU-locations, %d reservations)", state.seq, len(state.stocks), len(state.reservations))
    target_seq = storage.last_seq
    replayed = replay_log(storage, state, target_seq)
    check_invariants(state)
    log.info("recovered at seq %d: replayed %d records in %.2f s", state.seq, replayed, time.monotonic() - started)
    return state, replayed


def replay_log(storage: LmdbStorage, state: State, through_seq: int) -> int:
    """Apply every logged event after `state.seq` up to `through_seq` to `state`; return how
    many. Raises when the log does not continue `state` or does not reach `through_seq`."""
    # Entry by entry (a group commit each), straight from the log: `read_entries` checks every
    # event it reads back; the gap check below and `apply_event`'s seq assertion keep the seqs
    # consecutive from the snapshot's on.
    entries = storage.read_entries(state.seq + 1)
    with closing(entries):  # ends the read transaction even when replay stops early
        replayed = _apply_entries(entries, state, through_seq)
    if state.seq < through_seq:
        raise RuntimeError(f"the log ends at seq {state.seq}, its last record is {through_seq}")
    return replayed


def _apply_entries(entries: Iterator[list[Event]], state: State, through_seq: int) -> int:
    replayed = 0
    last_progress = time.monotonic()
    for events in entries:
        if state.seq >= through_seq:
            break
        if events[0]["seq"] != state.seq + 1:
            raise RuntimeError(f"the log has a gap: replay needs seq {state.seq + 1}, the log holds {events[0]['seq']}")
        if events[-1]["seq"] > through_seq:
            events = events[: through_seq - state.seq]
        for event in events:
            apply_event(state, event)
        if replayed == 0:
            pause_point("replay")  # crash tests: a kill lands during replay
        replayed += len(events)
        if replayed % PROGRESS_CHECK_RECORDS < len(events):
            now = time.monotonic()
            if now - last_progress >= PROGRESS_EVERY_SECONDS:
                log.info("replaying: seq %d of %d (%d records)", state.seq, through_seq, replayed)
                last_progress = now
    return replayed

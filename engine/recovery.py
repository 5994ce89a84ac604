"""Recovery: the latest snapshot, then every later log record through `apply_event`.

Snapshots only shorten replay; the log is the source of truth.
"""

from __future__ import annotations

import logging
import time

from .core import State, apply_event, check_invariants
from .storage import LmdbStorage

log = logging.getLogger("engine.recovery")

REPLAY_BATCH_RECORDS = 10_000
PROGRESS_EVERY_SECONDS = 2.0


def recover(storage: LmdbStorage) -> tuple[State, int]:
    """Rebuild the state from `storage`. Returns `(state, records replayed)`. Blocking."""
    started = time.monotonic()
    snapshot = storage.latest_snapshot()
    state = State.from_snapshot(snapshot) if snapshot is not None else State()
    if snapshot is not None:
        log.info("loaded snapshot at seq %d (%d SKU-locations, %d reservations)", state.seq, len(state.stocks), len(state.reservations))
    target_seq = storage.last_seq
    replayed = 0
    last_progress = started
    while state.seq < target_seq:
        events = storage.read(state.seq + 1, REPLAY_BATCH_RECORDS)
        if not events or events[0]["seq"] != state.seq + 1:
            found = events[0]["seq"] if events else None
            raise RuntimeError(f"the log has a gap: replay needs seq {state.seq + 1}, the log holds {found}")
        for event in events:
            apply_event(state, event)
        replayed += len(events)
        now = time.monotonic()
        if now - last_progress >= PROGRESS_EVERY_SECONDS:
            log.info("replaying: seq %d of %d (%d records)", state.seq, target_seq, replayed)
            last_progress = now
    check_invariants(state)
    log.info("recovered at seq %d: replayed %d records in %.2f s", state.seq, replayed, time.monotonic() - started)
    return state, replayed

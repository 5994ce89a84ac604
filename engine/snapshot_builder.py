"""The snapshot builder: a separate process that derives a snapshot from the log, so that
building one never pauses the server's event loop (and runs on another core).

    python -m engine.snapshot_builder LMDB_PATH THROUGH_SEQ PARENT_PID

It opens the server's environment read-only (LMDB serves readers in other processes), loads the
newest snapshot at or before THROUGH_SEQ, replays the log up to THROUGH_SEQ through recovery's
own loop (`replay_log`: the core's `apply_event`), checks the invariants and writes the snapshot
file (`SnapshotFiles.write`: durable on return). The server asks for a seq that is durable
already, so the snapshot never covers a change a crash could take back. Exit status 0 once the
file is durable; anything else means no new snapshot (and nothing lost: the log has it all).

It dies with its server (a watchdog thread), even when the server is killed with SIGKILL, and it
runs at the lowest priority (`_lower_priority`: SCHED_IDLE).
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import threading
import time

from .core import State, check_invariants
from .recovery import replay_log
from .storage import LmdbStorage

log = logging.getLogger("engine.snapshot_builder")

# Background work: the server's requests go first. SCHED_IDLE (Linux) runs the builder only on
# CPU time nothing else wants, so it takes the second core when that is idle and yields it at
# once when the server or its clients need it; elsewhere, the lowest niceness.
BUILDER_NICENESS = 19


def _lower_priority() -> None:
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        os.nice(BUILDER_NICENESS)


PARENT_CHECK_SECONDS = 0.2


def build_snapshot(lmdb_path: str, through_seq: int) -> dict[str, float]:
    """Write the snapshot at `through_seq` of the environment in `lmdb_path`; return figures
    (base snapshot, records replayed, bytes, seconds). Blocking."""
    started = time.monotonic()
    storage = LmdbStorage(lmdb_path, 0, read_only=True)
    try:
        base = storage.latest_snapshot_sections(through_seq)  # read a record at a time
        state = State.from_snapshot_sections(*base) if base is not None else State()
        base_seq = state.seq
        loaded_seconds = time.monotonic() - started
        replayed = replay_log(storage, state, through_seq)
        assert state.seq == through_seq, f"replay reached {state.seq}, not {through_seq}"
        check_invariants(state)
        size_bytes = storage.write_snapshot_file(state.to_snapshot())
    finally:
        storage.close()
    return {
        "seq": through_seq, "base_seq": base_seq, "replayed": replayed, "bytes": size_bytes,
        "load_seconds": round(loaded_seconds, 3), "seconds": round(time.monotonic() - started, 3),
    }


def _die_with_parent(parent_pid: int) -> None:
    """Exit as soon as the server that started us is gone (even killed with SIGKILL): a watchdog
    thread that looks at our parent every `PARENT_CHECK_SECONDS`. (Not PR_SET_PDEATHSIG: it
    fires when the parent's *thread* that forked us ends, and trio starts processes from a
    worker thread that ends after a few idle seconds.)"""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(PARENT_CHECK_SECONDS)
        os._exit(3)  # no cleanup: a partial file is removed by the next server

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


def main(argv: list[str]) -> int:
    """Entry point of the builder process."""
    lmdb_path, through_seq, parent_pid = argv[0], int(argv[1]), int(argv[2])
    _die_with_parent(parent_pid)
    _lower_priority()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    gc.disable()  # millions of acyclic objects, freed with the process (see server._recover_without_cyclic_gc)
    try:
        figures = build_snapshot(lmdb_path, through_seq)
    except Exception:
        log.exception("snapshot at seq %d failed", through_seq)
        return 1
    log.info(
        "snapshot at seq %d written (%d bytes) in %.2f s: base snapshot at %d (loaded in %.2f s), replayed %d records",
        figures["seq"], figures["bytes"], figures["seconds"], figures["base_seq"], figures["load_seconds"], figures["replayed"],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

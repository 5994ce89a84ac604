"""The snapshot builder: a long-lived process that keeps a copy of the state between snapshots,
so that building one never pauses the server's event loop (it runs on the other core) and, after
the first, costs the log tail since the previous one rather than a load of the whole state.

    python -m engine.snapshot_builder LMDB_PATH PARENT_PID

Requests on stdin, replies on stdout (`builder_protocol`): `build SEQ` is answered with the
build's figures once the snapshot at SEQ is durable. The server asks only for a durable seq, so
a snapshot never covers a change a crash could take back.

It opens the server's environment read-only (LMDB serves readers in other processes). Its first
build loads the newest snapshot at or before SEQ; each later one continues the state it holds,
replaying only the log records after it, through recovery's own `replay_log` (the core's
`apply_event`). It loads again when its state no longer continues the log (the log trimmed past
it) or is beyond SEQ. Every build checks the invariants before it writes: `TailCheck` for what
the tail changed, and `check_invariants` in full every `FULL_CHECK_EVERY_BUILDS` builds (a loaded
snapshot is checked in full as it loads). Then it writes the file (`SnapshotFiles.write`: packed
and fsync'd in pieces, renamed, the folder fsync'd). A failure is logged on stderr and ends the
process with status 1 and no reply (the state may be half-replayed: it is never continued; the
server's next snapshot starts a new builder, which loads again). At the end of its input it exits
with status 0: the server closes it when it has been idle too long, to free its copy of the state.

It dies with its server (a watchdog thread), even when the server is killed with SIGKILL, and it
runs at the lowest priority (`_lower_priority`: SCHED_IDLE).
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import sys
import threading
import time
from typing import Any, BinaryIO

from .builder_protocol import REQUEST_LINE_BYTES_MAX, BuilderProtocolError, parse_request, reply_line
from .core import State, check_invariants
from .core.tail_check import TailCheck
from .recovery import replay_log
from .storage import LmdbStorage

log = logging.getLogger("engine.snapshot_builder")

# Background work: the server's requests go first. SCHED_IDLE (Linux) runs the builder only on
# CPU time nothing else wants, so it takes the second core when that is idle and yields it at
# once when the server or its clients need it; elsewhere, the lowest niceness.
BUILDER_NICENESS = 19

PARENT_CHECK_SECONDS = 0.2

# A full `check_invariants` (~2 s at 1M SKU-locations and 1M reservations) every this many
# builds of one builder; `TailCheck` (~0.1 s) on the others. At the default snapshot interval
# (300 s), a full check every 80 minutes, and on every load.
FULL_CHECK_EVERY_BUILDS = 16


def _lower_priority() -> None:
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        os.nice(BUILDER_NICENESS)


class LiveBuilder:
    """The state a builder keeps between requests, and one build. Blocking."""

    def __init__(self, lmdb_path: str):
        self._storage = LmdbStorage(lmdb_path, 0, read_only=True)
        self._state: State | None = None
        self._tail_check: TailCheck | None = None
        self._builds_since_full_check = 0
        self.builds = 0

    def close(self) -> None:
        self._storage.close()

    def build(self, through_seq: int) -> dict[str, Any]:
        """Write the snapshot at `through_seq`, durably; return its figures (`REPLY_FIELDS`)."""
        started = time.monotonic()
        storage = self._storage
        assert through_seq <= storage.read_last_seq(), f"asked for seq {through_seq}, beyond the log's last ({storage.last_seq})"
        loaded_base = not self._continues(through_seq)
        if loaded_base:
            self._state = self._tail_check = None  # the old copy goes before the new one comes
            self._state = self._load(through_seq)
            self._tail_check = TailCheck(self._state)
            self._builds_since_full_check = 0
        state, tail_check = self._state, self._tail_check
        assert state is not None and tail_check is not None
        start_seq = state.seq
        loaded = time.monotonic()
        load_seconds = loaded - started if loaded_base else 0.0
        try:
            replayed = replay_log(storage, state, through_seq)
            assert state.seq == through_seq, f"replay reached {state.seq}, not {through_seq}"
            replayed_at = time.monotonic()
            check = self._check(state, tail_check)
            checked = time.monotonic()
            size_bytes = storage.write_snapshot_file(state.to_snapshot_arrays())
        except BaseException:
            self._state = self._tail_check = None  # half-replayed or unchecked: never continued
            raise
        self.builds += 1
        finished = time.monotonic()
        return {
            "seq": through_seq, "start_seq": start_seq, "loaded_base": loaded_base, "replayed": replayed, "check": check,
            "bytes": size_bytes, "load_seconds": round(load_seconds, 3), "replay_seconds": round(replayed_at - loaded, 3),
            "check_seconds": round(checked - replayed_at, 3), "write_seconds": round(finished - checked, 3),
            "seconds": round(finished - started, 3), "builds": self.builds,
        }

    def _continues(self, through_seq: int) -> bool:
        """Whether the state held can reach `through_seq` through the log as it is now."""
        state = self._state
        if state is None or state.seq > through_seq:
            return False
        first_seq = self._storage.first_seq()
        return state.seq == through_seq or (first_seq is not None and first_seq <= state.seq + 1)

    def _load(self, through_seq: int) -> State:
        # Read a record at a time; State.from_snapshot_sections checks it in full.
        base = self._storage.latest_snapshot_sections(through_seq)
        state = State.from_snapshot_sections(*base) if base is not None else State()
        log.info("loaded the snapshot at seq %d (%d SKU-locations, %d reservations)", state.seq, len(state.stocks), len(state.reservations))
        return state

    def _check(self, state: State, tail_check: TailCheck) -> str:
        if self._builds_since_full_check + 1 >= FULL_CHECK_EVERY_BUILDS:
            check_invariants(state)
            self._tail_check = TailCheck(state)
            self._builds_since_full_check = 0
            return "full"
        tail_check.check(state)
        self._builds_since_full_check += 1
        return "tail"


def serve(builder: LiveBuilder, requests: BinaryIO, replies: BinaryIO) -> int:
    """Answer build requests until the end of `requests` (0); 1 when a build fails, 2 when a
    request breaks the protocol. Each reply is written once the snapshot is durable."""
    while True:
        line = requests.readline(REQUEST_LINE_BYTES_MAX + 1)
        if not line:
            log.info("no more requests after %d builds: exiting", builder.builds)
            return 0
        try:
            through_seq = parse_request(line)
        except BuilderProtocolError as error:
            log.error("%s", error)
            return 2
        try:
            figures = builder.build(through_seq)
        except Exception:
            log.exception("snapshot at seq %d failed", through_seq)
            return 1
        log.info(
            "snapshot at seq %d written (%d bytes) in %.2f s: %s at seq %d, replayed %d records in %.2f s, %s check in %.2f s, "
            "packed and written in %.2f s (build %d of this builder)",
            through_seq, figures["bytes"], figures["seconds"],
            f"loaded the snapshot in {figures['load_seconds']:.2f} s" if figures["loaded_base"] else "continued its state",
            figures["start_seq"], figures["replayed"], figures["replay_seconds"], figures["check"], figures["check_seconds"],
            figures["write_seconds"], figures["builds"],
        )
        replies.write(reply_line(figures))
        replies.flush()


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
    lmdb_path, parent_pid = argv[0], int(argv[1])
    _die_with_parent(parent_pid)
    _lower_priority()
    # A Ctrl-C at the server's terminal reaches its whole process group; the server, stopping,
    # stops its builder itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    gc.disable()  # millions of acyclic objects, freed with the process (see server._recover_without_cyclic_gc)
    # Replies only on the real stdout; anything else printed goes to stderr, with the log.
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    try:
        builder = LiveBuilder(lmdb_path)
    except Exception:
        log.exception("cannot open %s", lmdb_path)
        return 1
    try:
        return serve(builder, sys.stdin.buffer, replies)
    finally:
        builder.close()


if __name__ == "__main__":
    status = main(sys.argv[1:])
    logging.shutdown()
    sys.stderr.flush()
    os._exit(status)  # the state is freed with the process, not object by object (~1 s at 1M)

"""`replay --to-seq N | --to-time T --into DIR2`: point-in-time recovery into a new data folder.

DIR2 gets the retained log up to seq N (the entry holding N cut after it), the base snapshot the
log continues from (when there is one), and a snapshot of the state at N. `serve --data DIR2`
then recovers exactly seq N and continues at N + 1; the history before N stays available to
`log`, `history`, `verify` and `watch --from`.

The new folder is written under a temporary name and renamed at the end, so an interrupted
replay never leaves a folder a server would start on. DIR2 is locked while it is written.
"""

from __future__ import annotations

import argparse
import os
import shutil
from contextlib import closing

from ..core import Event, check_invariants
from ..data_lock import DataFolderLocked, lock_data_folder
from ..storage import LmdbStorage
from .commands import OK, Command, Session
from .data_folder import LMDB_FOLDER_NAME, DataFolder, ShellError
from .render import Progress, format_time_ms, time_argument

# Log entries copied per LMDB transaction (one fsync each): large enough that fsyncs do not
# dominate, small enough that one transaction's dirty pages stay a few MiB.
ENTRIES_PER_COPY_TRANSACTION = 2_000
# The new folder's LMDB map (address space, not disk), as the server's default.
TARGET_MAP_SIZE_BYTES = 32 * 1024**3
PARTIAL_SUFFIX = ".partial"


def _arguments(parser: argparse.ArgumentParser) -> None:
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--to-seq", type=int, default=None, metavar="N", help="rebuild the state right after this seq")
    target.add_argument("--to-time", type=time_argument, default=None, metavar="T",
                        help="rebuild the state after the last event at or before this time (ISO-8601 or epoch ms)")
    parser.add_argument("--into", required=True, metavar="DIR2", help="a new (empty or absent) data folder to write")
    parser.add_argument("--map-size-mb", type=int, default=TARGET_MAP_SIZE_BYTES // 1024**2,
                        help="LMDB map size of the new folder (default %(default)s, as serve)")


def _run(session: Session, arguments: argparse.Namespace) -> int:
    target_dir = arguments.into
    with session.data_folder() as source:
        if os.path.realpath(target_dir) == os.path.realpath(source.path):
            raise ShellError("--into is the folder being read: choose a new, empty folder")
        target_seq = arguments.to_seq if arguments.to_time is None else source.seq_at_time(arguments.to_time)
        if not 0 <= target_seq <= source.last_seq:
            raise ShellError(f"seq {target_seq} is not in this folder (its last seq is {source.last_seq})")
        try:
            target_lock = lock_data_folder(target_dir)
        except DataFolderLocked:
            raise ShellError(f"{target_dir} is in use by a running server (it holds {target_dir}/engine.lock): refusing to write into it") from None
        try:
            _refuse_a_folder_with_data(target_dir)
            summary = _write_point_in_time(session, source, target_seq, target_dir, arguments.map_size_mb * 1024**2)
        finally:
            target_lock.release()
    session.printer.fields(summary, title=f"replayed into {target_dir}: `serve --data {target_dir}` starts at seq {target_seq}")
    return OK


def _refuse_a_folder_with_data(target_dir: str) -> None:
    for name in (LMDB_FOLDER_NAME, LMDB_FOLDER_NAME + PARTIAL_SUFFIX):
        if os.path.exists(os.path.join(target_dir, name)):
            what = "a log" if name == LMDB_FOLDER_NAME else "an interrupted replay"
            raise ShellError(f"{target_dir} already holds {what} ({name}): choose an empty folder")


def _write_point_in_time(session: Session, source: DataFolder, target_seq: int, target_dir: str, map_size_bytes: int) -> dict:
    base = source.nearest_base(target_seq)
    state = source.base_state(base)
    partial_path = os.path.join(target_dir, LMDB_FOLDER_NAME + PARTIAL_SUFFIX)
    target = LmdbStorage(partial_path, map_size_bytes)
    copied = 0
    try:
        first_kept = source.first_seq()
        # The log the copy keeps: every retained record from the base snapshot's on (from seq 1
        # when the log is whole), so that the copy can be verified and audited like the source.
        copy_from = first_kept if first_kept is not None and first_kept <= base.snapshot_seq + 1 else base.snapshot_seq + 1
        if copy_from > 1:
            target.continue_after(copy_from - 1)
        progress = session.progress("replay", target_seq - copy_from + 1)
        batch: list[list[Event]] = []
        with closing(source.storage.read_entries(copy_from)) as entries:  # ends the read transaction
            for entry in entries:
                entry = [event for event in entry if event["seq"] <= target_seq]
                if not entry:
                    break
                batch.append(entry)
                if len(batch) >= ENTRIES_PER_COPY_TRANSACTION:
                    copied += _copy(target, batch, progress)
                if entry[-1]["seq"] >= target_seq:
                    break
        copied += _copy(target, batch, progress)
        if target.last_seq == 0 and target_seq > 0:
            target.continue_after(target_seq)  # no record retained: the snapshot alone holds the state
        # The state at N: the base, then the log up to N (recovery's own apply_event).
        source.replay(state, target_seq)
        check_invariants(state)
        if 0 < base.snapshot_seq < target_seq:
            base_snapshot = source.storage.snapshot_at(base.snapshot_seq)
            if base_snapshot is not None:
                target.save_snapshot(base_snapshot)  # what the copied log continues from
        if target_seq > 0:
            target.save_snapshot(state.to_snapshot())
        progress.finish()
    except BaseException:
        target.close()
        shutil.rmtree(partial_path, ignore_errors=True)  # ours, half written: no trace of it
        raise
    target.close()
    final_path = os.path.join(target_dir, LMDB_FOLDER_NAME)
    os.rename(partial_path, final_path)
    _sync_folder(target_dir)
    last_event = source.event_at(target_seq) if target_seq else None
    return {
        "seq": target_seq,
        "time": format_time_ms(last_event["ts_ms"]) if last_event else None,
        "rebuilt_from": base.description,
        "log_records_copied": copied,
        "stocks": len(state.stocks),
        "reservations": len(state.reservations),
        "keys": len(state.keys),
    }


def _copy(target: LmdbStorage, batch: list[list[Event]], progress: Progress) -> int:
    if not batch:
        return 0
    target.append_entries(batch)
    records = sum(len(entry) for entry in batch)
    progress.advance(records)
    batch.clear()
    return records


def _sync_folder(path: str) -> None:
    # The rename is durable only once the folder's own entry is on disk.
    file_descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(file_descriptor)
    finally:
        os.close(file_descriptor)


COMMANDS = [
    Command(
        "replay", "point-in-time recovery into a new folder: --to-seq N | --to-time T --into DIR2", "offline", _arguments, _run,
        details=(
            "Writes DIR2 so that `python -m engine serve --data DIR2` starts at exactly seq N (and continues at N + 1):\n"
            "the retained log up to N and a snapshot at N. DIR2 must be new or empty; a folder a running server holds\n"
            "is refused. --to-time takes the last event at or before T (ISO-8601, UTC unless a zone is given, or epoch ms).\n"
            "As after any restart, a server started on DIR2 expires right away the held reservations whose time has passed."
        ),
    ),
]

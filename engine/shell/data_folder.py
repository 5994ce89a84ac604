"""A data folder opened read-only, and replay from it: the state at any retained seq.

Replay is recovery's own loop (`apply_event` on each logged event, from a snapshot or from the
empty state), stopped wherever the caller asks. Reading a running server's folder is safe: LMDB
serves readers in other processes, and a reader never resizes the map.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import lmdb

from ..core import Event, State, apply_event
from ..data_lock import data_folder_is_locked
from ..storage import LmdbStorage

LMDB_FOLDER_NAME = "lmdb"  # as `engine.server.storage_path`
PROGRESS_REPORT_RECORDS = 5_000  # replay tells its progress callback this often


class ShellError(Exception):
    """A command cannot do what it was asked; the message says why (no traceback is shown)."""


@dataclass(frozen=True)
class ReplayBase:
    """Where a replay starts: a snapshot's state (`snapshot_seq`), or the empty state (0)."""

    snapshot_seq: int  # 0: the empty state (the log is retained from seq 1)

    @property
    def description(self) -> str:
        return "the empty state (log from seq 1)" if self.snapshot_seq == 0 else f"the snapshot at seq {self.snapshot_seq}"


class DataFolder:
    """The log and snapshots of `path` (a server's `--data` folder), read-only."""

    def __init__(self, path: str):
        self.path = path
        lmdb_path = os.path.join(path, LMDB_FOLDER_NAME)
        try:
            self.storage = LmdbStorage(lmdb_path, 0, read_only=True)
        except FileNotFoundError as error:
            raise ShellError(f"{path} is not a data folder: {error}") from None
        except lmdb.Error as error:  # e.g. no write access to lock.mdb, which readers register in
            raise ShellError(f"cannot open {lmdb_path}: {type(error).__name__}: {error}") from None

    def close(self) -> None:
        self.storage.close()

    @property
    def last_seq(self) -> int:
        return self.storage.last_seq

    def first_seq(self) -> int | None:
        """The oldest retained record's seq (None: the log is empty)."""
        return self.storage.first_seq()

    def served_now(self) -> bool:
        """Whether a running server holds this folder."""
        return data_folder_is_locked(self.path)

    def events(self, from_seq: int = 1, through_seq: int | None = None) -> Iterator[Event]:
        """The retained events with `from_seq <= seq <= through_seq`, in order, one read transaction."""
        entries = self.storage.read_entries(from_seq)
        try:
            for entry in entries:
                for event in entry:
                    if through_seq is not None and event["seq"] > through_seq:
                        return
                    yield event
        finally:
            entries.close()  # ends the read transaction even when the caller stops early

    def event_at(self, seq: int) -> Event | None:
        """The retained event `seq`, or None."""
        for event in self.events(seq, seq):
            return event
        return None

    def replay_bases(self, target_seq: int) -> list[ReplayBase]:
        """Every start from which the retained log reaches `target_seq`, oldest first: the empty
        state when the log is retained from seq 1, and each snapshot at or before `target_seq`
        that the log continues (or that is at `target_seq` itself)."""
        first = self.first_seq()
        bases = []
        if first == 1 or target_seq == 0:
            bases.append(ReplayBase(0))
        for seq in self.storage.snapshot_seqs():
            if seq <= target_seq and (seq == target_seq or (first is not None and first <= seq + 1)):
                bases.append(ReplayBase(seq))
        return bases

    def base_state(self, base: ReplayBase) -> State:
        """The state a replay starts from."""
        if base.snapshot_seq == 0:
            return State()
        snapshot = self.storage.snapshot_at(base.snapshot_seq)
        if snapshot is None:
            raise ShellError(f"the snapshot at seq {base.snapshot_seq} is gone (a server trimmed it meanwhile?)")
        return State.from_snapshot(snapshot)

    def nearest_base(self, target_seq: int) -> ReplayBase:
        """The latest start that reaches `target_seq` (the shortest replay)."""
        bases = self.replay_bases(target_seq)
        if not bases:
            first = self.first_seq()
            raise ShellError(
                f"seq {target_seq} cannot be rebuilt: the log is retained from seq {first} and no snapshot at or after seq "
                f"{(first or 1) - 1} covers the records before it"
            )
        return bases[-1]

    def replay(self, state: State, through_seq: int, on_event: Callable[[Event, State], None] | None = None,
               on_progress: Callable[[int], None] | None = None) -> State:
        """Apply the retained events after `state.seq` through `through_seq` to `state` (in place).

        `on_event(event, state)` sees the state right after each event; `on_progress(n)` is told
        every few thousand records. Raises `ShellError` on a gap in the log."""
        applied_since_report = 0
        for event in self.events(state.seq + 1, through_seq):
            if event["seq"] != state.seq + 1:
                raise ShellError(f"the log has a gap: replay needs seq {state.seq + 1}, the log holds {event['seq']}")
            apply_event(state, event)
            if on_event is not None:
                on_event(event, state)
            applied_since_report += 1
            if on_progress is not None and applied_since_report >= PROGRESS_REPORT_RECORDS:
                on_progress(applied_since_report)
                applied_since_report = 0
        if on_progress is not None and applied_since_report:
            on_progress(applied_since_report)
        if state.seq < through_seq:
            raise ShellError(f"the log ends at seq {state.seq}, before seq {through_seq}")
        return state

    def state_at(self, target_seq: int, on_progress: Callable[[int], None] | None = None) -> State:
        """The state right after event `target_seq`, from the nearest snapshot and the log."""
        if not 0 <= target_seq <= self.last_seq:
            raise ShellError(f"seq {target_seq} is not in this folder (its last seq is {self.last_seq})")
        state = self.base_state(self.nearest_base(target_seq))
        return self.replay(state, target_seq, on_progress=on_progress)

    def seq_at_time(self, at_ms: int) -> int:
        """The seq of the last retained event with `ts_ms <= at_ms` (0 if the log starts later
        and holds from seq 1). Seqs are in log order; times follow it except across a clock step,
        so the last such event in log order is taken."""
        found: int | None = None
        first = self.first_seq()
        for event in self.events():
            if event["ts_ms"] <= at_ms:
                found = event["seq"]
        if found is None:
            if first == 1 or (first is None and not self.storage.snapshot_seqs()):
                return 0  # before the first change: the empty state
            raise ShellError(f"no retained event is at or before that time (the log starts at {first or 'no record'}); give --to-seq")
        return found


def event_stock_keys(event: Event) -> list[tuple[str, str]]:
    """The SKU-locations an event changes (or, for a reservation's closing events, the ones it names)."""
    kind = event["type"]
    if kind == "transferred":
        return [(event["sku"], event["from"]), (event["sku"], event["to"])]
    if "lines" in event:
        return [(line["sku"], line["loc"]) for line in event["lines"]]
    if "sku" in event and "loc" in event:
        return [(event["sku"], event["loc"])]
    return []


def event_summary(event: Event) -> str:
    """The fields of an event beyond seq, time and type, in one short line."""
    parts: list[str] = []
    for name, value in event.items():
        if name in ("seq", "ts_ms", "type"):
            continue
        if name == "lines":
            value = ", ".join(_line_text(line) for line in value)
            parts.append(f"lines=[{value}]")
        elif name in ("rids", "keys"):
            parts.append(f"{name}={len(value)}")
        elif value is not None:
            parts.append(f"{name}={value}")
    return " ".join(parts)


def _line_text(line: dict[str, Any]) -> str:
    figures = " ".join(f"{name}={value}" for name, value in line.items() if name not in ("sku", "loc"))
    return f"{line['sku']}@{line['loc']} {figures}"

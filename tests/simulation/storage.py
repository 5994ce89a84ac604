"""An in-memory stand-in for `LmdbStorage`: the simulated disk, and one server's handle on it.

`MemoryDisk` is what survives a crash: the log entries (as the bytes `encode_entry` made) and the
snapshots. `MemoryStorage` is one server process's open handle: it implements the calls the WAL,
the engine and recovery make, and it can be killed (a `kill -9`: every later write fails, so a
commit in flight at the crash is not durable). Writes fail on purpose when the disk's seeded
`fail_next_append` says so: the failed entry is not durable, as with LMDB.
"""

from __future__ import annotations

import random
from typing import Any, Iterator

import msgpack

from engine.core import Event
from engine.core.state import SNAPSHOT_SECTIONS
from engine.storage import StorageError, _checked_entry_events, _encode_checked_entry, _key

APPEND_FAILURE_MESSAGE = "simulated write failure"


class MemoryDisk:
    """The durable content of a simulated data folder, shared by the servers run on it."""

    def __init__(self, chooser: random.Random, append_failure_probability: float):
        assert 0 <= append_failure_probability < 1
        self.entries: list[tuple[int, int, bytes]] = []  # (first seq, last seq, packed events)
        self.snapshots: dict[int, bytes] = {}
        self.last_seq = 0
        self.append_failures = 0
        self._chooser = chooser
        self._append_failure_probability = append_failure_probability

    def fail_next_append(self) -> bool:
        """Whether the next append fails (seeded)."""
        return self._chooser.random() < self._append_failure_probability

    def events(self) -> list[Event]:
        """Every durable event, in seq order (each checked as it is read back)."""
        return [event for first_seq, _, data in self.entries for event in _checked_entry_events(_key(first_seq), data)]


class MemoryStorage:
    """One server's handle on a `MemoryDisk`, with the calls of `LmdbStorage` the shell makes."""

    def __init__(self, disk: MemoryDisk):
        self._disk = disk
        self.killed = False
        self.path = "<memory>"

    def kill(self) -> None:
        """The process died: nothing more is written through this handle."""
        self.killed = True

    def close(self) -> None:
        pass

    @property
    def last_seq(self) -> int:
        return self._disk.last_seq

    def first_seq(self) -> int | None:
        return self._disk.entries[0][0] if self._disk.entries else None

    def encode_entry(self, events: list[Event]) -> bytes:
        return _encode_checked_entry(events, self._disk.last_seq)

    def append_entry(self, first_seq: int, last_seq: int, data: bytes) -> int:
        disk = self._disk
        assert first_seq == disk.last_seq + 1 and last_seq >= first_seq, f"entry {first_seq}..{last_seq} after {disk.last_seq}"
        if self.killed:
            raise StorageError("the process was killed before the commit")
        if disk.fail_next_append():
            disk.append_failures += 1
            raise StorageError(APPEND_FAILURE_MESSAGE)
        disk.entries.append((first_seq, last_seq, bytes(data)))
        disk.last_seq = last_seq
        return last_seq

    def append(self, events: list[Event]) -> int:
        return self.append_entry(events[0]["seq"], events[-1]["seq"], self.encode_entry(events))

    def read_entries(self, from_seq: int) -> Iterator[list[Event]]:
        for first_seq, last_seq, data in self._disk.entries:
            if last_seq < from_seq:
                continue
            events = _checked_entry_events(_key(first_seq), data)
            yield [event for event in events if event["seq"] >= from_seq]

    def read(self, from_seq: int, limit: int, through_seq: int | None = None) -> list[Event]:
        events: list[Event] = []
        for entry in self.read_entries(from_seq):
            for event in entry:
                if (through_seq is not None and event["seq"] > through_seq) or len(events) >= limit:
                    return events
                events.append(event)
        return events

    def save_snapshot(self, snapshot: dict[str, Any], keep: int = 2) -> None:
        assert snapshot["seq"] <= self._disk.last_seq
        if self.killed:
            raise StorageError("the process was killed before the snapshot")
        snapshots = self._disk.snapshots
        snapshots[snapshot["seq"]] = msgpack.packb(snapshot, use_bin_type=True)
        for seq in sorted(snapshots)[: max(0, len(snapshots) - keep)]:
            del snapshots[seq]

    def latest_snapshot(self) -> dict[str, Any] | None:
        snapshots = self._disk.snapshots
        if not snapshots:
            return None
        return msgpack.unpackb(snapshots[max(snapshots)], raw=False, strict_map_key=False, use_list=True)

    def latest_snapshot_sections(self) -> tuple[dict[str, Any], Iterator[tuple[str, Any]]] | None:
        snapshot = self.latest_snapshot()
        return None if snapshot is None else (snapshot, ((name, snapshot[name]) for name in SNAPSHOT_SECTIONS))

    def snapshot_seqs(self) -> list[int]:
        return sorted(self._disk.snapshots)

    def trim(self, through_seq: int, before_ts_ms: int, limit: int) -> int:
        return 0  # the simulation keeps the whole log: its checks replay it from seq 1

    def map_stats(self) -> dict[str, Any]:
        """No map here: the figures of one that never fills."""
        return {"map_size_bytes": 0, "map_size_max_bytes": 0, "map_growths": 0, "map_full_at_ceiling": False}

    def stats(self) -> dict[str, int]:
        return {"map_size_bytes": 0, "last_seq": self._disk.last_seq, "page_size": 0}

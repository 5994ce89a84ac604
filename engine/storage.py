"""LMDB storage: the write-ahead log and the snapshots, behind four calls.

`append(events)`, `read(from_seq, limit)`, `save_snapshot(snapshot)`, `latest_snapshot()` (plus
`trim` and bookkeeping). Every call blocks (LMDB commits fsync): the shell runs them in a worker
thread. Keep this interface small so a replicated log can implement it later.

The log keeps one LMDB entry per `append` (a group commit): the key is the seq of its first
event, the value a msgpack array of its events. py-lmdb releases the GIL around every put, and a
thread that gives up the GIL waits for a busy event loop to hand it back (up to the switch
interval) before the next put: an entry per event made a commit of 500 events take 25 ms. One
put per commit costs one such wait. (An entry holding a single event map, as earlier versions
wrote, still reads.)
"""

from __future__ import annotations

import os
import struct
from contextlib import closing
from typing import Any, Iterator

import lmdb
import msgpack

from .core import Event, check_event

_SEQ = struct.Struct(">Q")  # big-endian so LMDB's byte order is seq order


def _key(seq: int) -> bytes:
    return _SEQ.pack(seq)


_PACKER = msgpack.Packer(use_bin_type=True)  # reused: building one per call costs as much as small packing


def _pack(value: Any) -> bytes:
    return _PACKER.pack(value)


def _unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False, use_list=True)


def _entry_events(data: bytes) -> list[Event]:
    """The events of one log entry: a list (one commit), or one event map (older versions)."""
    value = _unpack(data)
    return value if isinstance(value, list) else [value]


def _checked_entry_events(key: bytes, data: bytes) -> list[Event]:
    """The events of the entry stored under `key`, each checked as it is read back: well formed
    (`check_event`) and holding consecutive seqs from the key's."""
    entry_seq = _SEQ.unpack(key)[0]
    events = _entry_events(data)
    expected = entry_seq
    for event in events:
        check_event(event)
        assert event["seq"] == expected, f"log entry {entry_seq} holds seq {event['seq']} where {expected} belongs"
        expected += 1
    return events


def _encode_checked_entry(events: list[Event], after_seq: int) -> bytes:
    """`events` checked (well formed, consecutive seqs from `after_seq + 1`) and packed."""
    assert events
    expected = after_seq + 1
    for event in events:
        check_event(event)
        assert event["seq"] == expected, f"append of seq {event['seq']}, expected {expected}"
        expected += 1
    return _pack(events)


class StorageError(Exception):
    """The log could not be written; nothing in the failed batch is durable."""


class LmdbStorage:
    """One LMDB environment in `path` with two databases: `log` (first seq of a group commit ->
    its events) and `snapshots` (seq -> full state)."""

    def __init__(self, path: str, map_size_bytes: int, *, read_only: bool = False):
        """Open (creating it unless `read_only`) the environment in `path`.

        `read_only` is for tools reading a folder, possibly while its server runs (LMDB allows
        readers in other processes): it needs an existing environment, and takes the map size
        the environment has (`map_size_bytes` is ignored), so it never resizes the writer's map."""
        if read_only:
            if not os.path.isfile(os.path.join(path, "data.mdb")):
                raise FileNotFoundError(f"no LMDB environment in {path}")
        else:
            os.makedirs(path, exist_ok=True)
        self.path = path
        self._env = lmdb.open(
            path,
            map_size=0 if read_only else map_size_bytes,  # 0: the size the environment was made with
            readonly=read_only,
            subdir=True,
            max_dbs=4,
            sync=True,  # every write transaction fsyncs: an ack means on disk
            metasync=True,
            map_async=False,
            writemap=False,  # a stray pointer cannot corrupt the map
            readahead=False,  # random reads of a large map; readahead only evicts
            lock=True,
            max_readers=256,
        )
        try:
            self._log = self._env.open_db(b"log", create=not read_only)
            self._snapshots = self._env.open_db(b"snapshots", create=not read_only)
        except lmdb.NotFoundError as error:
            self._env.close()
            raise FileNotFoundError(f"{path} holds no engine log (no server has run on it)") from error
        self._last_seq = self._read_last_seq()

    def close(self) -> None:
        self._env.close()

    @property
    def last_seq(self) -> int:
        """The seq of the last record appended (0 for an empty log)."""
        return self._last_seq

    def _read_last_seq(self) -> int:
        with self._env.begin(db=self._log) as txn:
            cursor = txn.cursor()
            if cursor.last():
                return _entry_events(cursor.value())[-1]["seq"]
        latest = self.latest_snapshot()
        return latest["seq"] if latest else 0

    def first_seq(self) -> int | None:
        """The oldest retained log record's seq, or None when the log is empty."""
        with self._env.begin(db=self._log) as txn:
            cursor = txn.cursor()
            if cursor.first():
                return _SEQ.unpack(cursor.key())[0]
        return None

    def append(self, events: list[Event]) -> int:
        """Write `events` (consecutive seqs following `last_seq`) in one durable transaction."""
        return self.append_entry(events[0]["seq"], events[-1]["seq"], self.encode_entry(events))

    def encode_entry(self, events: list[Event]) -> bytes:
        """Check `events` (consecutive seqs following `last_seq`) and encode them as one log
        entry. Pure CPU: the WAL does it on the event loop, so that the commit thread needs the
        GIL as little as possible."""
        return _encode_checked_entry(events, self._last_seq)

    def append_entries(self, entries: list[list[Event]]) -> int:
        """Write several log entries (each the events of one group commit, consecutive seqs
        following `last_seq`) in one durable transaction: for copying a log, where a commit
        per entry would cost an fsync each."""
        encoded: list[tuple[int, bytes]] = []
        last_seq = self._last_seq
        for events in entries:
            encoded.append((events[0]["seq"], _encode_checked_entry(events, last_seq)))
            last_seq = events[-1]["seq"]
        try:
            with self._env.begin(write=True, db=self._log) as txn:
                for first_seq, data in encoded:
                    if not txn.put(_key(first_seq), data, append=True):
                        raise StorageError(f"log entry {first_seq} exists already")
        except lmdb.Error as error:
            raise StorageError(f"write-ahead log copy failed: {type(error).__name__}: {error}") from error
        self._last_seq = last_seq
        return last_seq

    def continue_after(self, seq: int) -> None:
        """Let an empty storage (no log, no snapshot) take `seq + 1` as its next record: a copy
        whose log starts after a snapshot (older records were trimmed) or holds none at all."""
        assert self._last_seq == 0 and self.first_seq() is None and not self.snapshot_seqs(), "continue_after on a storage that holds data"
        self._last_seq = seq

    def append_entry(self, first_seq: int, last_seq: int, data: bytes) -> int:
        """Write one entry made by `encode_entry` in one durable transaction."""
        assert first_seq == self._last_seq + 1 and last_seq >= first_seq, f"entry {first_seq}..{last_seq} after {self._last_seq}"
        try:
            with self._env.begin(write=True, db=self._log) as txn:
                if not txn.put(_key(first_seq), data, append=True):
                    raise StorageError(f"log entry {first_seq} exists already")
        except lmdb.Error as error:
            raise StorageError(f"write-ahead log commit failed: {type(error).__name__}: {error}") from error
        self._last_seq = last_seq
        return last_seq

    def read(self, from_seq: int, limit: int, through_seq: int | None = None) -> list[Event]:
        """Up to `limit` events with `from_seq <= seq <= through_seq`, in seq order."""
        events: list[Event] = []
        with closing(self.read_entries(from_seq)) as entries:  # ends the read transaction on return
            for entry in entries:
                for event in entry:
                    if through_seq is not None and event["seq"] > through_seq:
                        return events
                    events.append(event)
                    if len(events) >= limit:
                        return events
        return events

    def read_entries(self, from_seq: int) -> Iterator[list[Event]]:
        """The events from `from_seq` to the end of the log, one list per log entry (the first
        one without the events before `from_seq`), in seq order, each event checked as it is
        read back. Every entry is unpacked once, in one read transaction, as late as the
        caller asks for it: recovery iterates the whole log this way."""
        from_seq = max(from_seq, 1)
        with self._env.begin(db=self._log) as txn:
            cursor = txn.cursor()
            # The entry holding `from_seq` starts at or before it.
            if not cursor.set_range(_key(from_seq)):
                if not cursor.last():
                    return
            elif _SEQ.unpack(cursor.key())[0] > from_seq and not cursor.prev():
                cursor.first()
            first = True
            for key, value in cursor:
                events = _checked_entry_events(key, value)
                if first:
                    first = False
                    if events[0]["seq"] < from_seq:
                        events = [event for event in events if event["seq"] >= from_seq]
                        if not events:
                            continue
                yield events

    def save_snapshot(self, snapshot: dict[str, Any], keep: int = 2) -> None:
        """Store a full-state snapshot under its seq and drop all but the newest `keep`."""
        seq = snapshot["seq"]
        assert seq <= self._last_seq, f"snapshot at {seq} is ahead of the log ({self._last_seq})"
        data = _pack(snapshot)
        try:
            with self._env.begin(write=True, db=self._snapshots) as txn:
                txn.put(_key(seq), data)
                cursor = txn.cursor()
                seqs = [key for key, _ in cursor]
                for key in seqs[: max(0, len(seqs) - keep)]:
                    txn.delete(key)
        except lmdb.Error as error:
            raise StorageError(f"snapshot write failed: {type(error).__name__}: {error}") from error

    def latest_snapshot(self) -> dict[str, Any] | None:
        with self._env.begin(db=self._snapshots) as txn:
            cursor = txn.cursor()
            if not cursor.last():
                return None
            seq = _SEQ.unpack(cursor.key())[0]
            snapshot = _unpack(cursor.value())
        assert snapshot["seq"] == seq, f"snapshot under key {seq} covers seq {snapshot['seq']}"
        return snapshot

    def snapshot_at(self, seq: int) -> dict[str, Any] | None:
        """The snapshot stored under `seq`, or None."""
        with self._env.begin(db=self._snapshots) as txn:
            data = txn.get(_key(seq))
        return None if data is None else _unpack(data)

    def snapshot_sizes(self) -> list[tuple[int, int]]:
        """`(seq, packed size in bytes)` of every stored snapshot, oldest first."""
        with self._env.begin(db=self._snapshots) as txn:
            return [(_SEQ.unpack(key)[0], len(value)) for key, value in txn.cursor()]

    def snapshot_seqs(self) -> list[int]:
        with self._env.begin(db=self._snapshots) as txn:
            return [_SEQ.unpack(key)[0] for key in txn.cursor().iternext(keys=True, values=False)]

    def trim(self, through_seq: int, before_ts_ms: int, limit: int) -> int:
        """Delete up to `limit` oldest records with seq <= through_seq and ts_ms < before_ts_ms.
        Callers pass a snapshot's seq, so replay never needs what is deleted. An entry that is
        only partly old is rewritten with the records it keeps."""
        deleted = 0
        try:
            with self._env.begin(write=True, db=self._log) as txn:
                cursor = txn.cursor()
                while deleted < limit and cursor.first():
                    events = _entry_events(cursor.value())
                    keep = 0
                    while keep < len(events) and deleted < limit:
                        event = events[keep]
                        if event["seq"] > through_seq or event["ts_ms"] >= before_ts_ms:
                            break
                        keep += 1
                        deleted += 1
                    if keep == 0:
                        break
                    cursor.delete()
                    if keep < len(events):
                        rest = events[keep:]
                        txn.put(_key(rest[0]["seq"]), _pack(rest))
                        break
        except lmdb.Error as error:
            raise StorageError(f"log trim failed: {type(error).__name__}: {error}") from error
        return deleted

    def stats(self) -> dict[str, int]:
        info = self._env.info()
        stat = self._env.stat()
        return {"map_size_bytes": info["map_size"], "last_seq": self._last_seq, "page_size": stat["psize"]}

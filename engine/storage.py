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

import logging
import os
import struct
import threading
from contextlib import closing, contextmanager
from typing import Any, Callable, Iterator, TypeVar

import lmdb
import msgpack

from .core import Event, check_event
from .core.state import SNAPSHOT_SECTIONS
from .snapshot_files import SnapshotFileDamaged, SnapshotFiles

log = logging.getLogger("engine.storage")

T = TypeVar("T")
MIB = 1024**2

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


class MapFullAtCeiling(StorageError):
    """The LMDB map is full and has reached its configured ceiling: it may not grow further."""


class _TransactionGate:
    """Lets any number of transactions run at once (`shared`), or the map be resized with none
    open (`exclusive`): LMDB's `mdb_env_set_mapsize` may only be called while no transaction
    of this process is active. Writer-preferring: once a resize waits, new transactions wait
    for it, so a stream of short reads (watchers) cannot starve it. Transactions are short
    (one commit, one read batch); none waits for another while it is open."""

    def __init__(self) -> None:
        self._condition = threading.Condition(threading.Lock())
        self._open = 0
        self._resizing = False
        self._resizes_waiting = 0
        self._held = threading.local()  # shared holds of the current thread (re-entrant)

    @contextmanager
    def shared(self) -> Iterator[None]:
        nested = getattr(self._held, "count", 0)
        with self._condition:
            # A thread that holds the gate already goes on: waiting for a resize that waits
            # for this very thread would never end.
            while not nested and (self._resizing or self._resizes_waiting):
                self._condition.wait()
            assert not self._resizing, "a transaction inside a resize"
            self._open += 1
        self._held.count = nested + 1
        try:
            yield
        finally:
            self._held.count = nested
            with self._condition:
                self._open -= 1
                assert self._open >= 0
                if self._open == 0:
                    self._condition.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._condition:
            self._resizes_waiting += 1
            while self._open or self._resizing:
                self._condition.wait()
            self._resizes_waiting -= 1
            self._resizing = True
        try:
            yield
        finally:
            with self._condition:
                self._resizing = False
                self._condition.notify_all()


class LmdbStorage:
    """One LMDB environment in `path` with two databases: `log` (first seq of a group commit ->
    its events) and `snapshots` (seq -> full state, as earlier versions wrote them), and the
    snapshot files in `path/snapshots` (`snapshot_files`), where snapshots are written now.

    The map grows: a write that finds it full doubles it (up to `map_size_max_bytes`) and is
    retried, in the same call, so the caller sees one durable write or a `StorageError`."""

    def __init__(
        self, path: str, map_size_bytes: int, *, read_only: bool = False, map_size_max_bytes: int | None = None,
        map_release_after_bytes: int | None = None,
    ):
        """Open (creating it unless `read_only`) the environment in `path`.

        The map starts at `map_size_bytes` (or at the size of the data file, when larger) and
        grows up to `map_size_max_bytes` (default: it does not grow). The pages of the map this
        process has mapped in are released every `map_release_after_bytes` of log written
        (default `MAP_RELEASE_AFTER_BYTES`; see `release_map_pages`).

        `read_only` is for tools reading a folder, possibly while its server runs (LMDB allows
        readers in other processes): it needs an existing environment, and takes the map size
        the environment has (`map_size_bytes` is ignored), so it never resizes the writer's map;
        when the writer's map has grown past it, it adopts the new size and reads again."""
        data_path = os.path.join(path, "data.mdb")
        if read_only:
            if not os.path.isfile(data_path):
                raise FileNotFoundError(f"no LMDB environment in {path}")
        else:
            os.makedirs(path, exist_ok=True)
            # Start at least at what the data file holds: a restart with a small initial size
            # would otherwise begin with a full map (LMDB opens at the size of the data).
            if os.path.isfile(data_path):
                map_size_bytes = max(map_size_bytes, os.path.getsize(data_path))
        self.path = path
        self.read_only = read_only
        self.map_size_max_bytes = max(map_size_bytes, map_size_max_bytes or 0)
        self.map_growths = 0
        self.map_full_at_ceiling = False
        self.map_release_after_bytes = map_release_after_bytes or MAP_RELEASE_AFTER_BYTES
        self.map_releases = 0
        self._written_since_release_bytes = 0
        self._gate = _TransactionGate()
        self._files = SnapshotFiles(os.path.join(path, "snapshots"))
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
        # Kept here, not read from the environment, so that metrics read it from any thread
        # without a transaction or the resize gate.
        self.map_size_bytes: int = self._env.info()["map_size"]
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

    def read_last_seq(self) -> int:
        """`last_seq` read from the log again: what a reader in another process (a snapshot
        builder that stays open) must do to see the records its writer appended since."""
        self._last_seq = self._read_last_seq()
        return self._last_seq

    # -- transactions and the map's growth ---------------------------------------------------

    @contextmanager
    def _reading(self, db: Any) -> Iterator[Any]:
        """A read transaction on `db`. In a read-only process whose writer grew the map beyond
        ours, LMDB refuses to begin one (MapResizedError): adopt the new size, begin again."""
        with self._gate.shared():
            try:
                txn = self._env.begin(db=db)
            except lmdb.MapResizedError:
                txn = None
            if txn is not None:
                with txn:
                    yield txn
                return
        self._adopt_grown_map()
        with self._gate.shared(), self._env.begin(db=db) as txn:
            yield txn

    def _adopt_grown_map(self) -> None:
        with self._gate.exclusive():
            self._env.set_mapsize(0)  # 0: adopt the size the writer set (LMDB's documented way)
            self.map_size_bytes = self._env.info()["map_size"]

    def _write(self, db: Any, body: Callable[[Any], T]) -> T:
        """Run `body(txn)` in one durable write transaction on `db`. A full map is grown (see
        `_grow_map`) and `body` run again in a new transaction: the aborted one left nothing,
        so what `body` writes is written exactly once. `MapFullAtCeiling` when it may not grow."""
        while True:
            try:
                with self._gate.shared(), self._env.begin(write=True, db=db) as txn:
                    return body(txn)
            except lmdb.MapFullError as error:
                self._grow_map(error)

    def _grow_map(self, error: lmdb.MapFullError) -> None:
        """Double the map, up to `map_size_max_bytes`, with no transaction of this process open
        (LMDB's rule for `mdb_env_set_mapsize`)."""
        with self._gate.exclusive():
            size_bytes = self._env.info()["map_size"]
            if size_bytes >= self.map_size_max_bytes:
                self.map_full_at_ceiling = True
                raise MapFullAtCeiling(
                    f"LMDB map is full at its ceiling of {self.map_size_max_bytes // MIB} MiB ({type(error).__name__}); "
                    f"raise --map-size-max-mb and restart"
                ) from error
            grown_bytes = min(size_bytes * MAP_GROWTH_FACTOR, self.map_size_max_bytes)
            self._env.set_mapsize(grown_bytes)
            self.map_size_bytes = grown_bytes
            self.map_growths += 1
        log.warning(
            "LMDB map full at %d MiB: grown to %d MiB (ceiling %d MiB, growth %d)",
            size_bytes // MIB, grown_bytes // MIB, self.map_size_max_bytes // MIB, self.map_growths,
        )

    def release_map_pages(self) -> None:
        """Unmap every page of the map this process has mapped in, by mapping the environment
        again at the same size (LMDB's `mdb_env_set_mapsize`, with no transaction open).

        Why: every write transaction reads the B-tree's root, branch and last leaf pages through
        the map (LMDB copies a page from the map before changing it), and on each such fault the
        kernel maps in the page's whole 64 KiB neighbourhood from the page cache
        (`fault_around_bytes`; `readahead=False`, i.e. MADV_RANDOM, does not stop it). Those
        neighbours are the pages the last commits have just written, so without a release the
        process's resident size grows by the size of the log (116 MiB for 1M adjusts). The
        pages stay in the kernel's page cache either way; released, they are no longer in this
        process's page tables, nor counted in its RSS. The next commit faults in only the few
        pages it reads. Cost: ~1 ms per 64 MiB mapped (measured), and the wait for open
        transactions to end (a watcher's read, a trim)."""
        with self._gate.exclusive():
            self._env.set_mapsize(self.map_size_bytes)
        self._written_since_release_bytes = 0
        self.map_releases += 1

    def _written(self, size_bytes: int) -> None:
        """Count log bytes written; release the mapped pages every `map_release_after_bytes`."""
        self._written_since_release_bytes += size_bytes
        if self._written_since_release_bytes >= self.map_release_after_bytes:
            self.release_map_pages()

    def map_stats(self) -> dict[str, Any]:
        """The map's figures for stats and metrics: its size, growths, and whether it is full
        at its ceiling."""
        return {
            "map_size_bytes": self.map_size_bytes,
            "map_size_max_bytes": self.map_size_max_bytes,
            "map_growths": self.map_growths,
            "map_full_at_ceiling": self.map_full_at_ceiling,
        }

    # -- the log -------------------------------------------------------------------------------

    def _read_last_seq(self) -> int:
        with self._reading(self._log) as txn:
            cursor = txn.cursor()
            if cursor.last():
                return _entry_events(cursor.value())[-1]["seq"]
        seqs = self.snapshot_seqs()
        return seqs[-1] if seqs else 0

    def first_seq(self) -> int | None:
        """The oldest retained log record's seq, or None when the log is empty."""
        with self._reading(self._log) as txn:
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

        def put_all(txn: Any) -> None:
            for first_seq, data in encoded:
                if not txn.put(_key(first_seq), data, append=True):
                    raise StorageError(f"log entry {first_seq} exists already")

        try:
            self._write(self._log, put_all)
        except MapFullAtCeiling:
            raise
        except lmdb.Error as error:
            raise StorageError(f"write-ahead log copy failed: {type(error).__name__}: {error}") from error
        self._last_seq = last_seq
        self._written(sum(len(data) for _, data in encoded))
        return last_seq

    def continue_after(self, seq: int) -> None:
        """Let an empty storage (no log, no snapshot) take `seq + 1` as its next record: a copy
        whose log starts after a snapshot (older records were trimmed) or holds none at all."""
        assert self._last_seq == 0 and self.first_seq() is None and not self.snapshot_seqs(), "continue_after on a storage that holds data"
        self._last_seq = seq

    def append_entry(self, first_seq: int, last_seq: int, data: bytes) -> int:
        """Write one entry made by `encode_entry` in one durable transaction (growing the map
        when it is full: see `_write`)."""
        assert first_seq == self._last_seq + 1 and last_seq >= first_seq, f"entry {first_seq}..{last_seq} after {self._last_seq}"
        key = _key(first_seq)

        def put(txn: Any) -> None:
            if not txn.put(key, data, append=True):
                raise StorageError(f"log entry {first_seq} exists already")

        try:
            self._write(self._log, put)
        except MapFullAtCeiling:
            raise
        except lmdb.Error as error:
            raise StorageError(f"write-ahead log commit failed: {type(error).__name__}: {error}") from error
        self._last_seq = last_seq
        self._written(len(data))
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
        with self._reading(self._log) as txn:
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

    def trim(self, through_seq: int, before_ts_ms: int, limit: int) -> int:
        """Delete up to `limit` oldest records with seq <= through_seq and ts_ms < before_ts_ms.
        Callers pass a snapshot's seq, so replay never needs what is deleted. An entry that is
        only partly old is rewritten with the records it keeps."""

        def delete_oldest(txn: Any) -> int:
            deleted = 0
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
            return deleted

        try:
            return self._write(self._log, delete_oldest)
        except MapFullAtCeiling:
            raise
        except lmdb.Error as error:
            raise StorageError(f"log trim failed: {type(error).__name__}: {error}") from error

    # -- snapshots -------------------------------------------------------------------------------
    # Written as files (`snapshot_files`): a large snapshot in the LMDB environment would hold
    # LMDB's single writer lock, and so every log commit, for the whole of its write. Snapshots
    # that earlier versions stored in the `snapshots` database are still read, listed and pruned.

    def save_snapshot(self, snapshot: dict[str, Any], keep: int = 2) -> None:
        """Store a full-state snapshot (durably: see `SnapshotFiles.write`) and drop all but the
        newest `keep`."""
        seq = snapshot["seq"]
        assert seq <= self._last_seq, f"snapshot at {seq} is ahead of the log ({self._last_seq})"
        try:
            self._files.write(snapshot)
        except OSError as error:
            raise StorageError(f"snapshot write failed: {type(error).__name__}: {error}") from error
        self.prune_snapshots(keep)

    def write_snapshot_file(self, snapshot: dict[str, Any]) -> int:
        """Write `snapshot` as a file, durably, without pruning: for a builder process, which
        may not write the environment. Returns its size in bytes."""
        assert snapshot["seq"] <= self._last_seq, f"snapshot at {snapshot['seq']} is ahead of the log ({self._last_seq})"
        return self._files.write(snapshot)

    def prune_snapshots(self, keep: int) -> list[int]:
        """Drop all snapshots but the newest `keep` (files and stored ones), and the partial
        files a killed writer left. Returns the seqs kept, oldest first."""
        assert keep >= 1
        self._files.remove_partial()
        seqs = self.snapshot_seqs()
        dropped, kept = seqs[: max(0, len(seqs) - keep)], seqs[max(0, len(seqs) - keep) :]
        stored = set(self._stored_snapshot_seqs())
        for seq in dropped:
            self._files.remove(seq)
        stored_dropped = [seq for seq in dropped if seq in stored]
        if stored_dropped:

            def delete(txn: Any) -> None:
                for seq in stored_dropped:
                    txn.delete(_key(seq))

            try:
                self._write(self._snapshots, delete)
            except lmdb.Error as error:
                raise StorageError(f"snapshot prune failed: {type(error).__name__}: {error}") from error
        return kept

    def latest_snapshot(self) -> dict[str, Any] | None:
        """The newest snapshot that reads back whole; a damaged file is skipped (logged) for
        the one before it."""
        return self._newest_whole_snapshot(self.snapshot_seqs())

    def latest_snapshot_through(self, seq: int) -> dict[str, Any] | None:
        """The newest whole snapshot at or before `seq` (a builder's base), or None."""
        return self._newest_whole_snapshot([candidate for candidate in self.snapshot_seqs() if candidate <= seq])

    def latest_snapshot_sections(self, through_seq: int | None = None) -> tuple[dict[str, Any], Iterator[tuple[str, Any]]] | None:
        """The newest whole snapshot (at or before `through_seq`) as `State.from_snapshot_sections`
        reads it, `(head, sections)`, or None; a damaged file is skipped (logged) for the one
        before it. A file's records are decoded as they are read (`SnapshotFiles.read_sections`);
        a snapshot stored in the environment by an earlier version is decoded whole."""
        seqs = self.snapshot_seqs()
        for seq in reversed(seqs if through_seq is None else [candidate for candidate in seqs if candidate <= through_seq]):
            try:
                read = self._files.read_sections(seq)
            except SnapshotFileDamaged as damaged:
                log.warning("skipping a damaged snapshot: %s", damaged)
                continue
            if read is not None:
                return read
            snapshot = self._stored_snapshot(seq)
            if snapshot is not None:
                return snapshot, ((name, snapshot[name]) for name in SNAPSHOT_SECTIONS)
        return None

    def _newest_whole_snapshot(self, seqs: list[int]) -> dict[str, Any] | None:
        for seq in reversed(seqs):
            try:
                snapshot = self.snapshot_at(seq)
            except SnapshotFileDamaged as damaged:
                log.warning("skipping a damaged snapshot: %s", damaged)
                continue
            if snapshot is not None:
                return snapshot
        return None

    def snapshot_at(self, seq: int) -> dict[str, Any] | None:
        """The snapshot at `seq` (a file, else one stored in the environment), or None.
        `SnapshotFileDamaged` when its file does not read back whole."""
        snapshot = self._files.read(seq)
        return snapshot if snapshot is not None else self._stored_snapshot(seq)

    def _stored_snapshot(self, seq: int) -> dict[str, Any] | None:
        """The snapshot at `seq` an earlier version stored in the environment, or None."""
        with self._reading(self._snapshots) as txn:
            data = txn.get(_key(seq))
        snapshot = None if data is None else _unpack(data)
        if snapshot is not None:
            assert snapshot["seq"] == seq, f"snapshot under {seq} covers seq {snapshot['seq']}"
        return snapshot

    def snapshot_sizes(self) -> list[tuple[int, int]]:
        """`(seq, packed size in bytes)` of every snapshot, oldest first."""
        with self._reading(self._snapshots) as txn:
            sizes = dict((_SEQ.unpack(key)[0], len(value)) for key, value in txn.cursor())
        sizes.update(self._files.sizes())
        return sorted(sizes.items())

    def snapshot_seqs(self) -> list[int]:
        """The seqs of every snapshot (files and stored ones), oldest first."""
        return sorted(set(self._stored_snapshot_seqs()) | set(self._files.seqs()))

    def _stored_snapshot_seqs(self) -> list[int]:
        with self._reading(self._snapshots) as txn:
            return [_SEQ.unpack(key)[0] for key in txn.cursor().iternext(keys=True, values=False)]

    def stats(self) -> dict[str, int]:
        with self._gate.shared():  # both read the meta pages, inside the map: not during a remap
            stat, info = self._env.stat(), self._env.info()
        return {"map_size_bytes": info["map_size"], "last_seq": self._last_seq, "page_size": stat["psize"]}


# Each growth doubles the map: a few growths cover any size (1 GiB to 256 GiB in 8), and each
# costs a moment with no transaction open, not a copy (LMDB maps the file; the map is address
# space, and the file grows only as pages are written).
MAP_GROWTH_FACTOR = 2

# The log written between two releases of the map's pages (`LmdbStorage.release_map_pages`):
# about the most the map adds to the server's resident size. A release costs ~0.3 ms at this
# size (plus the wait for open read transactions); at 60k records/s (~7 MB/s of log) it runs
# about once a second.
MAP_RELEASE_AFTER_BYTES = 8 * MIB

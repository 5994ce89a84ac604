"""Snapshot files: one file per snapshot in a folder, written so that a crash at any moment
leaves either the whole new file or none of it.

`snapshot-<seq, 20 digits>.snap` holds a header (magic, body length, CRC-32 of the body) and the
msgpack body. A writer writes `<name>.partial-<pid>`, fsyncs it, renames it into place and
fsyncs the folder; a reader checks the length and the CRC, so a file damaged later (a bad disk)
is reported rather than loaded. A partial file is what a killed writer left: never read, removed
by `remove_partial`.

The body is packed and written a piece at a time (`packed_pieces`): its long arrays (millions of
SKU-locations and reservations) `ITEMS_PER_PIECE` items at a time, so that a writer never holds
the whole encoding (~145 MB at 1M SKU-locations and 1M reservations) nor, given
`State.to_snapshot_arrays`, lists of millions of tuples. The bytes are exactly
`msgpack.packb(snapshot)`'s, so a reader unpacks the body in one call.
"""

from __future__ import annotations

import os
import re
import struct
import time
import zlib
from itertools import islice
from typing import Any, BinaryIO, Iterator

import msgpack

from .core import SnapshotArray
from .core.state import SNAPSHOT_SECTIONS
from .pause_points import pause_point

MAGIC = b"ENGSNAP1"
_HEADER = struct.Struct(">8sQI")  # magic, body length in bytes, CRC-32 of the body
_NAME = re.compile(r"^snapshot-(\d{20})\.snap$")
_PARTIAL = re.compile(r"^snapshot-\d{20}\.snap\.partial-\d+$")
# Written and synced in pieces: the server's log commits fsync on the same disk, and one fsync
# of a whole snapshot (hundreds of MiB at millions of SKU-locations) would hold them up for its
# whole writeback; a piece at a time, a commit waits for one piece at most. Measured on the
# 2-core VM while 160 MiB were written: a 4 KiB write + fdatasync took p99 21 ms with 8 MiB
# pieces, 0.9 ms with 1 MiB pieces (idle: 0.3 ms), and the 1 MiB pieces wrote faster too.
# (The pause point of the crash tests falls between two pieces.)
WRITE_CHUNK_BYTES = 1024**2
# Items of a long array packed by one `packb` call: C speed for the items (a `Packer.pack` call
# per item costs twice the time), ~0.5-1 MiB at 60-120 bytes per packed item.
ITEMS_PER_PIECE = 8192
# Read in pieces too (`read_sections`): the checksum over the body, then the records, so that
# no copy of a whole file (hundreds of MiB) is ever held.
READ_CHUNK_BYTES = 1024**2


class SnapshotFileDamaged(Exception):
    """A snapshot file does not read back whole (wrong magic, length or checksum)."""


def file_name(seq: int) -> str:
    assert 0 <= seq < 10**20
    return f"snapshot-{seq:020d}.snap"


class SnapshotFiles:
    """The snapshot files in `folder` (created by the first write)."""

    def __init__(self, folder: str):
        self.folder = folder

    def seqs(self) -> list[int]:
        """The seqs of the complete snapshot files, oldest first."""
        return [seq for seq, _ in self.sizes()]

    def sizes(self) -> list[tuple[int, int]]:
        """`(seq, file size in bytes)` of every complete snapshot file, oldest first."""
        try:
            names = os.listdir(self.folder)
        except FileNotFoundError:
            return []
        found = []
        for name in names:
            match = _NAME.match(name)
            if match:
                try:
                    found.append((int(match.group(1)), os.path.getsize(os.path.join(self.folder, name))))
                except FileNotFoundError:  # removed meanwhile by the server's pruning
                    continue
        return sorted(found)

    def read(self, seq: int) -> dict[str, Any] | None:
        """The snapshot at `seq`, or None when there is no such file."""
        path = os.path.join(self.folder, file_name(seq))
        try:
            with open(path, "rb") as file:
                data = file.read()
        except FileNotFoundError:
            return None
        if len(data) < _HEADER.size:
            raise SnapshotFileDamaged(f"{path}: {len(data)} bytes, shorter than its header")
        magic, length, crc = _HEADER.unpack_from(data)
        body = memoryview(data)[_HEADER.size :]
        if magic != MAGIC or length != len(body) or zlib.crc32(body) != crc:
            raise SnapshotFileDamaged(f"{path}: bad magic, length or checksum")
        snapshot = msgpack.unpackb(body, raw=False, strict_map_key=False, use_list=True)
        if not isinstance(snapshot, dict) or snapshot.get("seq") != seq:
            raise SnapshotFileDamaged(f"{path}: does not hold the snapshot at seq {seq}")
        return snapshot

    def read_sections(self, seq: int) -> tuple[dict[str, Any], Iterator[tuple[str, Iterator[Any]]]] | None:
        """The snapshot at `seq` as `State.from_snapshot_sections` reads it, or None when there
        is no such file: its head (the fields before its lists of records: format, seq) and its
        sections, `(name, records)` in the file's order, each record decoded only as it is read.
        The magic, length and checksum are checked first (`SnapshotFileDamaged`), reading the
        body in pieces. The file stays open until the sections are read to their end."""
        path = os.path.join(self.folder, file_name(seq))
        try:
            file = open(path, "rb")
        except FileNotFoundError:
            return None
        try:
            _check_body(path, file)  # leaves the file at the start of the body
            unpacker = msgpack.Unpacker(file, raw=False, strict_map_key=False, use_list=True, read_size=READ_CHUNK_BYTES)
            fields = unpacker.read_map_header()
            head: dict[str, Any] = {}
            first_section = None
            while fields and first_section is None:
                name = unpacker.unpack()
                fields -= 1
                if name in SNAPSHOT_SECTIONS:
                    first_section = name
                else:
                    head[name] = unpacker.unpack()
            if head.get("seq") != seq:
                raise SnapshotFileDamaged(f"{path}: does not hold the snapshot at seq {seq}")
        except BaseException:
            file.close()
            raise
        return head, _sections(file, unpacker, first_section, fields)

    def write(self, snapshot: dict[str, Any]) -> int:
        """Write `snapshot` (lists or `SnapshotArray`s for its long arrays) durably: a partial
        file, fsync'd piece by piece, renamed into place, the folder fsync'd. Returns the file's
        size in bytes."""
        os.makedirs(self.folder, exist_ok=True)  # a write creates the folder, even a read-only environment's builder's
        name = file_name(snapshot["seq"])
        partial = os.path.join(self.folder, f"{name}.partial-{os.getpid()}")
        with open(partial, "wb") as file:
            # The header's length and checksum are known at the end: a placeholder first (the
            # file is partial, never read, until the rename), the header written over it last.
            file.write(bytes(_HEADER.size))
            length, crc = _write_synced_in_pieces(file, packed_pieces(snapshot))
            file.seek(0)
            file.write(_HEADER.pack(MAGIC, length, crc))
            file.flush()
            os.fsync(file.fileno())
        os.rename(partial, os.path.join(self.folder, name))
        _fsync_folder(self.folder)
        return _HEADER.size + length

    def remove(self, seq: int) -> None:
        """Remove the file of the snapshot at `seq`, if any."""
        try:
            os.remove(os.path.join(self.folder, file_name(seq)))
        except FileNotFoundError:
            pass

    def remove_partial(self, older_than_seconds: float = 0.0) -> int:
        """Remove the partial files killed writers left (older than `older_than_seconds`:
        a running writer's file is young). Returns how many."""
        try:
            names = os.listdir(self.folder)
        except FileNotFoundError:
            return 0
        removed = 0
        now = time.time()
        for name in names:
            if _PARTIAL.match(name):
                path = os.path.join(self.folder, name)
                try:
                    if now - os.path.getmtime(path) >= older_than_seconds:
                        os.remove(path)
                        removed += 1
                except FileNotFoundError:
                    continue
        return removed


def packed_pieces(snapshot: dict[str, Any]) -> Iterator[bytes | memoryview]:
    """`msgpack.packb(snapshot)`, byte for byte, in pieces: each long array (a list or a
    `SnapshotArray`) as its header, then its items `ITEMS_PER_PIECE` at a time."""
    packer = msgpack.Packer(use_bin_type=True)
    yield packer.pack_map_header(len(snapshot))
    for name, value in snapshot.items():
        yield packer.pack(name)
        if isinstance(value, SnapshotArray):
            length, items = value
        elif isinstance(value, list):
            length, items = len(value), iter(value)
        else:
            yield packer.pack(value)
            continue
        yield packer.pack_array_header(length)
        packed = 0
        while part := list(islice(items, ITEMS_PER_PIECE)):
            # The part packed as an array of its own, less that array's header: its items.
            whole, header = packer.pack(part), packer.pack_array_header(len(part))
            assert whole.startswith(header)
            yield memoryview(whole)[len(header) :]
            packed += len(part)
        assert packed == length, f"snapshot array {name!r}: {packed} items, its header says {length}"


def _write_synced_in_pieces(file: BinaryIO, pieces: Iterator[bytes | memoryview]) -> tuple[int, int]:
    """Write `pieces` at the file's position, `WRITE_CHUNK_BYTES` per write and fdatasync;
    return the bytes written and their CRC-32."""
    length = crc = 0
    pending = bytearray()
    synced_once = False
    for piece in pieces:
        length += len(piece)
        crc = zlib.crc32(piece, crc)
        pending += piece
        while len(pending) >= WRITE_CHUNK_BYTES:
            _write_synced(file, pending[:WRITE_CHUNK_BYTES])
            del pending[:WRITE_CHUNK_BYTES]  # cheap: a bytearray drops its front without copying the rest
            if not synced_once:
                synced_once = True
                pause_point("snapshot-write")  # crash tests: a kill lands mid-write
    _write_synced(file, pending)
    if not synced_once:
        pause_point("snapshot-write")
    return length, crc


def _write_synced(file: BinaryIO, data: bytes | bytearray) -> None:
    file.write(data)
    file.flush()
    os.fdatasync(file.fileno())
def _check_body(path: str, file: BinaryIO) -> None:
    """Check the magic, the length and the checksum of the body of the snapshot file open in
    `file`, reading it in pieces; leave the file at the start of the body."""
    header = file.read(_HEADER.size)
    if len(header) < _HEADER.size:
        raise SnapshotFileDamaged(f"{path}: {len(header)} bytes, shorter than its header")
    magic, length, crc = _HEADER.unpack(header)
    body_crc, body_length = 0, 0
    while piece := file.read(READ_CHUNK_BYTES):
        body_crc = zlib.crc32(piece, body_crc)
        body_length += len(piece)
    if magic != MAGIC or length != body_length or body_crc != crc:
        raise SnapshotFileDamaged(f"{path}: bad magic, length or checksum")
    file.seek(_HEADER.size)


def _sections(file: BinaryIO, unpacker: msgpack.Unpacker, name: str | None, fields: int) -> Iterator[tuple[str, Iterator[Any]]]:
    """The sections of a snapshot from `unpacker`, positioned at the list of section `name`,
    with `fields` fields of the map after it. Each section's records are read as they are
    asked for; a section left before its end is read to its end before the next one."""
    with file:
        while name is not None:
            assert name in SNAPSHOT_SECTIONS, f"snapshot field {name!r} after its sections"
            records = islice(unpacker, unpacker.read_array_header())  # the next n objects: the list's items
            yield name, records
            for _ in records:  # what the reader left of this section
                pass
            name = None
            if fields:
                name = unpacker.unpack()
                fields -= 1


def _fsync_folder(folder: str) -> None:
    descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)

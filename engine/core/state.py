"""The state of the engine: stock per SKU-location, reservations, and idempotency keys.

Plain data with no behaviour beyond derived figures. It changes only through
`engine.core.events.apply_event`; `to_snapshot`/`from_snapshot` turn it into msgpack-ready data.
"""

from __future__ import annotations

import hashlib
import struct
import sys
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, NamedTuple

import msgpack

HELD = "held"
COMMITTED = "committed"
RELEASED = "released"
EXPIRED = "expired"
RESERVATION_STATES = (HELD, COMMITTED, RELEASED, EXPIRED)

# 2: a used key is a packed `KeyRecord` (bytes), not its fingerprint tuple and reply map.
# Older snapshots are still read (converted on load), so existing data folders start.
# 4: key records with a 6-byte at_ms; 3: reservations as their flat records; 2: nested, keys
# packed; 1: keys with replies.
SNAPSHOT_FORMAT = 4
SNAPSHOT_FORMATS_READ = (1, 2, 3, 4)

StockKey = tuple[str, str]  # (sku, loc)
LineTuple = tuple[str, str, int]  # (sku, loc, qty)


@dataclass(slots=True)
class Stock:
    """One SKU-location. `available` may be negative only through adjust/count (a shortage)."""

    on_hand: int = 0
    reserved: int = 0
    last_seq: int = 0  # seq of the last logged change to this SKU-location

    @property
    def available(self) -> int:
        return self.on_hand - self.reserved

    def figures(self) -> dict[str, int]:
        return {"on_hand": self.on_hand, "reserved": self.reserved, "available": self.on_hand - self.reserved}


ZERO_STOCK = Stock()

# Stock levels are mostly small numbers. CPython shares one object for each int from -5 to 256;
# any other `on_hand` is an int object of its SKU-location's own (32 bytes: 24 MB for 1M
# SKU-locations holding 1 to 1000 units). `shared_int` shares those up to 4095 too, from one
# table (160 KiB); `events` stores every new `on_hand` through it.
SHARED_INT_MAX = 4095
SHARED_INTS = tuple(range(SHARED_INT_MAX + 1))


def shared_int(value: int) -> int:
    """`value`, as the one shared object for it when it is in 0..SHARED_INT_MAX."""
    return SHARED_INTS[value] if 0 <= value <= SHARED_INT_MAX else value


class Reservation(NamedTuple):
    """One reservation, as read from `State.reservations` (`State.reservation(rid)`).

    The state keeps each reservation as a flat record (`record()`): one tuple of strings,
    numbers and None, with no object of a class of ours and no tuple inside. The cyclic garbage
    collector stops tracking such a tuple the first time it scans it; an object, or a tuple
    holding a tuple, stays tracked and was rescanned by collection after collection (closed
    reservations stay for the id retention: millions of them, and generation-1 collections of
    100 ms under load). Change a reservation only in `events`, by storing a new record.
    """

    rid: str
    lines: tuple[LineTuple, ...]
    ttl_ms: int
    ref: str | None
    expires_at_ms: int | None
    created_at_ms: int
    # `available` per line right after the hold: the original reply, returned again to retries.
    granted_available: tuple[int, ...]
    state: str = HELD
    closed_at_ms: int | None = None
    committed: tuple[LineTuple, ...] | None = None
    last_seq: int = 0

    def fingerprint(self) -> tuple:
        return reserve_fingerprint(self.lines, self.ttl_ms, self.ref)

    def record(self) -> tuple:
        """The flat record the state stores: the head fields, then five per line."""
        committed_qty = [qty for _, _, qty in self.committed] if self.committed is not None else [0] * len(self.lines)
        body: list = []
        for (sku, loc, qty), granted, shipped in zip(self.lines, self.granted_available, committed_qty):
            body += (sku, loc, qty, granted, shipped)
        head = (
            self.rid, self.ttl_ms, self.ref, self.expires_at_ms, self.created_at_ms,
            self.state, self.closed_at_ms, self.last_seq, self.committed is not None,
        )
        return head + tuple(body)

    @classmethod
    def from_record(cls, record: tuple) -> "Reservation":
        rid, ttl_ms, ref, expires_at_ms, created_at_ms, status, closed_at_ms, last_seq, has_committed = record[:RECORD_HEAD]
        skus, locs = record[RECORD_HEAD::RECORD_PER_LINE], record[RECORD_HEAD + 1 :: RECORD_PER_LINE]
        lines = tuple(zip(skus, locs, record[RECORD_HEAD + 2 :: RECORD_PER_LINE]))
        committed = tuple(zip(skus, locs, record[RECORD_HEAD + 4 :: RECORD_PER_LINE])) if has_committed else None
        granted = record[RECORD_HEAD + 3 :: RECORD_PER_LINE]
        return cls(rid, lines, ttl_ms, ref, expires_at_ms, created_at_ms, granted, status, closed_at_ms, committed, last_seq)


# The flat reservation record: these head fields, then (sku, loc, qty, granted available,
# committed qty) per line. `events` builds and changes records; everything else reads them
# through `Reservation.from_record`, or these positions in loops over all of them.
RECORD_HEAD = 9
RECORD_PER_LINE = 5
RECORD_EXPIRES_AT_MS = 3
RECORD_STATE = 5
RECORD_CLOSED_AT_MS = 6
RECORD_LAST_SEQ = 7  # then, at 8: whether the lines carry committed quantities


def record_lines(record: tuple):
    """(sku, loc, qty) of each line of a reservation record."""
    if len(record) == RECORD_HEAD + RECORD_PER_LINE:  # one line: the common case, without slicing
        return ((record[RECORD_HEAD], record[RECORD_HEAD + 1], record[RECORD_HEAD + 2]),)
    return zip(record[RECORD_HEAD::RECORD_PER_LINE], record[RECORD_HEAD + 1 :: RECORD_PER_LINE], record[RECORD_HEAD + 2 :: RECORD_PER_LINE])


def reserve_fingerprint(lines: tuple[LineTuple, ...], ttl_ms: int, ref: str | None) -> tuple:
    """What makes two reserves 'the same payload'. Line order does not matter: each
    SKU-location appears at most once, so a reordered list names the same reservation."""
    return (tuple(sorted(lines)), ttl_ms, ref)


FINGERPRINT_BYTES = 16


def fingerprint(*payload: Any) -> bytes:
    """What identifies a keyed request's payload: 16 bytes of BLAKE2b over its msgpack encoding.

    A digest rather than the payload itself, so that remembering a key costs the same for one
    line as for thousands. 128 bits make an accidental match of two different payloads
    (which would turn a `conflict` into a wrong `duplicate`) about as likely as 2^-128 per pair,
    and finding one on purpose is beyond reach. msgpack is an exact encoding (types and lengths
    are explicit), so different payloads never encode alike. `payload` starts with the op, so
    one key reused by another op never matches.
    """
    return hashlib.blake2b(msgpack.packb(payload, use_bin_type=True), digest_size=FINGERPRINT_BYTES).digest()


# fingerprint, at_ms in 6 bytes (its low 32 bits, then its high 16: up to the year 10889),
# last_seq; then the figures, 8 bytes each. A single adjust or count packs into 46 bytes, a bytes
# object of 79, which the allocator serves from an 80-byte block (it hands out multiples of 16);
# with an 8-byte at_ms (snapshot formats 2 and 3) it was 81 bytes, a 96-byte block.
_KEY_RECORD_HEAD = struct.Struct("<16sIHq")
_KEY_RECORD_AT_MS = struct.Struct("<IH")  # at 16
_AT_MS_LIMIT = 1 << 48
_KEY_RECORD_HEAD_FORMAT_3 = struct.Struct("<16sqq")  # fingerprint, at_ms, last_seq (formats 2, 3)


class KeyRecord(NamedTuple):
    """An applied adjust/count/transfer (single or batch), remembered for idempotent retries.

    Only what identifies a retry and what its reply cannot be derived from: the payload's
    `fingerprint`, when (`at_ms`, for forgetting) and at which `last_seq` it was applied, and
    the `figures` after the change (per op: see `engine.core.events`). A retry carries the same
    payload, so the names in the original reply come from the retry itself.

    In `State.keys` a record is kept packed (`pack`): one bytes object of 30 + 8 x figures
    bytes, 80 bytes of memory for a single adjust or count, instead of a reply map and a tuple.
    """

    fingerprint: bytes
    at_ms: int
    last_seq: int
    figures: tuple[int, ...]

    def pack(self) -> bytes:
        # int64 figures: on_hand grows by at most 2^31 per change, so this bound is never near.
        at_ms = self.at_ms
        assert 0 <= at_ms < _AT_MS_LIMIT, f"key record at_ms {at_ms} is not a time since 1970 in 48 bits"
        return _key_record_struct(len(self.figures)).pack(self.fingerprint, at_ms & 0xFFFF_FFFF, at_ms >> 32, self.last_seq, *self.figures)

    @classmethod
    def unpack(cls, data: bytes) -> "KeyRecord":
        """The record packed in `data`."""
        fingerprint_bytes, at_ms_low, at_ms_high, last_seq, *figures = _key_record_struct((len(data) - _KEY_RECORD_HEAD.size) // 8).unpack(data)
        return cls(fingerprint_bytes, at_ms_high << 32 | at_ms_low, last_seq, tuple(figures))


_KEY_RECORD_STRUCTS: dict[int, struct.Struct] = {}


def _key_record_struct(figure_count: int) -> struct.Struct:
    # One compiled layout per figure count: 2 and 4 for single ops, 2 per line for batches, so
    # at most LINES_PER_BATCH_MAX + 1 layouts (a few hundred bytes each).
    layout = _KEY_RECORD_STRUCTS.get(figure_count)
    if layout is None:
        layout = _KEY_RECORD_STRUCTS[figure_count] = struct.Struct(f"<16sIHq{figure_count}q")
    return layout


def _closed_at_ms_of(item: tuple[int | None, str]) -> int:
    return item[0] if item[0] is not None else 0


def packed_key_at_ms(data: bytes) -> int:
    """`at_ms` of a packed `KeyRecord`, without unpacking the rest (forgetting scans every key)."""
    at_ms_low, at_ms_high = _KEY_RECORD_AT_MS.unpack_from(data, 16)
    return at_ms_high << 32 | at_ms_low


def key_record_from_format_3(data: bytes) -> bytes:
    """A key record as snapshot formats 2 and 3 packed it (an 8-byte at_ms), packed as now."""
    figure_count, rest = divmod(len(data) - _KEY_RECORD_HEAD_FORMAT_3.size, 8)
    assert figure_count >= 0 and rest == 0, f"a key record of {len(data)} bytes"
    fingerprint_bytes, at_ms, last_seq, *figures = struct.unpack(f"<16sqq{figure_count}q", data)
    return KeyRecord(fingerprint_bytes, at_ms, last_seq, tuple(figures)).pack()


class SnapshotArray(NamedTuple):
    """One long array of a snapshot (`State.to_snapshot_arrays`): its length and its items,
    produced as they are iterated (once)."""

    length: int
    items: Iterator[Any]


@dataclass(slots=True)
class State:
    seq: int = 0  # seq of the last applied event
    stocks: dict[StockKey, Stock] = field(default_factory=dict)
    # sku -> the keys of its SKU-locations in `stocks`, in the order they appeared (the index
    # for `query`). The keys themselves, not the location names: a new SKU-location of a known
    # SKU takes the SKU's string from them, so that all the locations of a SKU share one string
    # object instead of each keeping the one its first request decoded (64 bytes for a
    # 12-character SKU: 51 bytes per SKU-location at 5 locations per SKU). A list, not a set:
    # a key is added once, when its stock is created, and a small set costs 216 to 728 bytes
    # where a list costs 64 to 120.
    stock_keys_by_sku: dict[str, list[StockKey]] = field(default_factory=dict)
    reservations: dict[str, tuple] = field(default_factory=dict)  # rid -> Reservation record
    keys: dict[str, bytes] = field(default_factory=dict)  # key -> packed KeyRecord
    # Kept by `apply_event` as reservations open and close, so that counting them (`stats`, a
    # metrics scrape every second) never scans millions of reservations.
    held_reservations: int = 0
    held_units: int = 0  # sum of the held lines' quantities (= sum of `reserved`)
    # The rids of closed reservations, in the order they closed (oldest first), so that
    # forgetting visits only the ones old enough instead of scanning every reservation (at
    # 1M held reservations such a scan held the event loop for ~0.1-0.2 s every minute).
    # Derived, never snapshotted: `from_snapshot` rebuilds it. An entry may be stale (its rid
    # forgotten, or forgotten and reserved again): readers skip those, `apply_event` drops them
    # from the front. Each entry is the dict's own key string: 8 bytes of the deque. A rid
    # reserved again after it was forgotten can hold back forgetting until its new close is
    # old enough (never forgetting anything early). Not compared: two states equal in what
    # they hold may have closed in a different order (a replay from a snapshot sorts by time).
    closed_order: deque[str] = field(default_factory=deque, compare=False, repr=False)

    def stock(self, sku: str, loc: str) -> Stock:
        """The SKU-location's stock; an unknown one reads as zeros (and is not created)."""
        return self.stocks.get((sku, loc), ZERO_STOCK)

    def reservation(self, rid: str) -> Reservation | None:
        """The reservation `rid`, or None."""
        record = self.reservations.get(rid)
        return None if record is None else Reservation.from_record(record)

    def stock_for_update(self, sku: str, loc: str) -> Stock:
        """The SKU-location's stock, created (zeros) on first use."""
        stock = self.stocks.get((sku, loc))
        if stock is None:
            stock = self._new_stock(sku, loc)
        return stock

    def _new_stock(self, sku: str, loc: str) -> Stock:
        # Locations are few and shared by many SKUs: one string object per location name
        # instead of one per SKU-location (~50 bytes each). The SKU's string is its first
        # SKU-location's (see `stock_keys_by_sku`).
        loc = sys.intern(loc)
        keys = self.stock_keys_by_sku.get(sku)
        if keys is None:
            key = (sku, loc)
            self.stock_keys_by_sku[sku] = [key]
        else:
            key = (keys[0][0], loc)
            keys.append(key)
        stock = self.stocks[key] = Stock()
        return stock

    def locations_of(self, sku: str) -> list[str]:
        """The locations the SKU has stock records at, in the order they appeared."""
        return [loc for _, loc in self.stock_keys_by_sku.get(sku, ())]

    def key_record(self, key: str) -> KeyRecord | None:
        """The record of a used key, or None."""
        data = self.keys.get(key)
        return None if data is None else KeyRecord.unpack(data)

    def remember_key(self, key: str, record: KeyRecord) -> None:
        """Remember a newly used key (only `apply_event` calls this)."""
        assert key not in self.keys, f"seq {record.last_seq}: key {key!r} used twice"
        self.keys[key] = record.pack()

    # -- snapshots ------------------------------------------------------------------------------

    def to_snapshot(self) -> dict[str, Any]:
        """Plain, immutable-by-construction data (lists of tuples) describing the whole state."""
        return {name: list(value.items) if isinstance(value, SnapshotArray) else value for name, value in self.to_snapshot_arrays().items()}

    def to_snapshot_arrays(self) -> dict[str, Any]:
        """`to_snapshot` with its long lists given as `SnapshotArray`s (a length and an iterator),
        so that a writer packs them a piece at a time instead of holding lists of millions of
        tuples and their whole encoding at once. Iterate them before the state changes."""
        return {  # the head first, then the sections in the order of `SNAPSHOT_SECTIONS`: files are read in it
            "format": SNAPSHOT_FORMAT,
            "seq": self.seq,
            "stocks": SnapshotArray(len(self.stocks), ((sku, loc, s.on_hand, s.reserved, s.last_seq) for (sku, loc), s in self.stocks.items())),
            "reservations": SnapshotArray(len(self.reservations), iter(self.reservations.values())),  # flat records (see `Reservation`)
            "keys": SnapshotArray(len(self.keys), iter(self.keys.items())),  # (key, packed KeyRecord)
        }

    @classmethod
    def from_snapshot(cls, data: dict[str, Any]) -> "State":
        """The state a snapshot describes (format 4, or formats 1 to 3 converted)."""
        return cls.from_snapshot_sections(data, ((name, data[name]) for name in SNAPSHOT_SECTIONS))

    @classmethod
    def from_snapshot_sections(cls, head: dict[str, Any], sections: Iterable[tuple[str, Iterable[Any]]]) -> "State":
        """`from_snapshot`, from a snapshot's `head` (its format and seq) and its `sections`:
        `(name, records)` in the order of `SNAPSHOT_SECTIONS`, each `records` read once, in turn.

        A snapshot file is read this way, a record at a time (`SnapshotFiles.read_sections`).
        Decoded whole first, 1M SKU-locations and keys were ~300 MiB of lists and strings,
        freed after the state was built among its own objects, where the allocator cannot give
        them back to the system: a server restarted from its snapshot held 800 MiB, 465 before.
        """
        snapshot_format = head.get("format")
        if snapshot_format not in SNAPSHOT_FORMATS_READ:
            raise ValueError(f"unsupported snapshot format {snapshot_format!r}")
        state = cls(seq=head["seq"])
        names = []
        for name, records in sections:
            names.append(name)
            _SECTION_READERS[name](state, snapshot_format, records)
        assert tuple(names) == SNAPSHOT_SECTIONS, f"snapshot sections {names}, expected {SNAPSHOT_SECTIONS}"
        state.held_reservations, state.held_units = count_held(state)
        closed = [(record[RECORD_CLOSED_AT_MS], rid) for rid, record in state.reservations.items() if record[RECORD_STATE] != HELD]
        closed.sort(key=_closed_at_ms_of)
        state.closed_order.extend(rid for _, rid in closed)
        check_invariants(state)
        return state


# A snapshot's lists of records, in the order `to_snapshot` writes them (and so a snapshot file
# holds them), after its other fields (format, seq).
SNAPSHOT_SECTIONS = ("stocks", "reservations", "keys")


def _read_stocks(state: State, snapshot_format: int, records: Iterable[Any]) -> None:
    for sku, loc, on_hand, reserved, last_seq in records:
        stock = state.stock_for_update(sku, loc)
        stock.on_hand, stock.reserved, stock.last_seq = shared_int(on_hand), reserved, last_seq


def _read_reservations(state: State, snapshot_format: int, records: Iterable[Any]) -> None:
    reservations = state.reservations
    if snapshot_format >= 3:
        for record in records:
            assert len(record) > RECORD_HEAD and (len(record) - RECORD_HEAD) % RECORD_PER_LINE == 0, f"bad reservation record {record[:1]!r}"
            reservations[record[0]] = tuple(record)
        return
    # Formats 1 and 2 kept lines, granted figures and committed lines nested.
    for (rid, lines, ttl_ms, ref, expires_at_ms, created_at_ms, granted, status, closed_at_ms, committed, last_seq) in records:
        reservations[rid] = Reservation(
            rid, tuple(map(tuple, lines)), ttl_ms, ref, expires_at_ms, created_at_ms, tuple(granted),
            status, closed_at_ms, None if committed is None else tuple(map(tuple, committed)), last_seq,
        ).record()


def _read_keys(state: State, snapshot_format: int, records: Iterable[Any]) -> None:
    keys = state.keys
    if snapshot_format == 1:
        for key, old_fingerprint, reply, at_ms, last_seq in records:
            keys[key] = _key_record_from_format_1(old_fingerprint, reply, at_ms, last_seq).pack()
    elif snapshot_format < 4:
        for key, packed in records:
            assert isinstance(packed, bytes), f"key {key!r}: bad record"
            keys[key] = key_record_from_format_3(packed)
    else:
        for key, packed in records:
            assert isinstance(packed, bytes) and len(packed) >= _KEY_RECORD_HEAD.size and (len(packed) - _KEY_RECORD_HEAD.size) % 8 == 0, f"key {key!r}: bad record"
            keys[key] = packed


_SECTION_READERS = {"stocks": _read_stocks, "reservations": _read_reservations, "keys": _read_keys}


def _key_record_from_format_1(old_fingerprint: list, reply: dict[str, Any], at_ms: int, last_seq: int) -> KeyRecord:
    """Format 1 kept the fingerprint as a tuple (op, ...fields) and the whole reply. The digest of
    that tuple is the format 2 fingerprint (`events` digests the same fields in the same order),
    and the figures are read from the reply."""
    kind = old_fingerprint[0]
    if kind == "adjust":
        figures = (reply["on_hand"], reply["reserved"])
    elif kind == "count":
        figures = (reply["reserved"], reply["variance"])
    elif kind == "transfer":
        figures = (reply["from"]["on_hand"], reply["from"]["reserved"], reply["to"]["on_hand"], reply["to"]["reserved"])
    else:
        raise ValueError(f"format 1 snapshot: unknown key kind {kind!r}")
    return KeyRecord(fingerprint(*old_fingerprint), at_ms, last_seq, figures)


def held_by_stock(state: State) -> dict[StockKey, int]:
    """Sum of held reservation lines per SKU-location (what `reserved` must equal)."""
    held: dict[StockKey, int] = {}
    held_qty = held.get
    for record in state.reservations.values():
        if record[RECORD_STATE] == HELD:
            for sku, loc, qty in record_lines(record):
                key = (sku, loc)
                held[key] = held_qty(key, 0) + qty
    return held


def count_held(state: State) -> tuple[int, int]:
    """(held reservations, held units), counted over every reservation: O(reservations)."""
    reservations = units = 0
    for record in state.reservations.values():
        if record[RECORD_STATE] == HELD:
            reservations += 1
            units += sum(qty for _, _, qty in record_lines(record))
    return reservations, units


def check_invariants(state: State) -> None:
    """Assert what must always hold (O(size of state): for tests, recovery and `verify`)."""
    held = held_by_stock(state)
    counted = count_held(state)
    assert (state.held_reservations, state.held_units) == counted, f"held counts {(state.held_reservations, state.held_units)} != counted {counted}"
    for key, stock in state.stocks.items():
        assert stock.reserved == held.get(key, 0), f"{key}: reserved {stock.reserved} != held lines {held.get(key, 0)}"
        assert stock.on_hand >= 0, f"{key}: on_hand {stock.on_hand} < 0"
        assert stock.last_seq <= state.seq, f"{key}: last_seq {stock.last_seq} beyond state seq {state.seq}"
    for key in held:
        assert key in state.stocks, f"{key}: held lines on an unknown SKU-location"
    indexed = 0
    for sku, keys in state.stock_keys_by_sku.items():
        for key in keys:
            assert key[0] == sku and key in state.stocks, f"index of {sku!r} names unknown SKU-location {key}"
        indexed += len(keys)
    assert indexed == len(state.stocks), f"{len(state.stocks)} SKU-locations, {indexed} indexed"
    in_close_order = set(state.closed_order)
    for rid, record in state.reservations.items():
        assert record[RECORD_STATE] == HELD or rid in in_close_order, f"closed reservation {rid!r} missing from the close order"

"""The state of the engine: stock per SKU-location, reservations, and idempotency keys.

Plain data with no behaviour beyond derived figures. It changes only through
`engine.core.events.apply_event`; `to_snapshot`/`from_snapshot` turn it into msgpack-ready data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

HELD = "held"
COMMITTED = "committed"
RELEASED = "released"
EXPIRED = "expired"
RESERVATION_STATES = (HELD, COMMITTED, RELEASED, EXPIRED)

SNAPSHOT_FORMAT = 1

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


@dataclass(slots=True)
class Reservation:
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


def reserve_fingerprint(lines: tuple[LineTuple, ...], ttl_ms: int, ref: str | None) -> tuple:
    """What makes two reserves 'the same payload'. Line order does not matter: each
    SKU-location appears at most once, so a reordered list names the same reservation."""
    return (tuple(sorted(lines)), ttl_ms, ref)


@dataclass(slots=True)
class KeyRecord:
    """An applied adjust/count/transfer, remembered for idempotent retries."""

    key: str
    fingerprint: tuple
    reply: dict[str, Any]
    at_ms: int
    last_seq: int


@dataclass(slots=True)
class State:
    seq: int = 0  # seq of the last applied event
    stocks: dict[StockKey, Stock] = field(default_factory=dict)
    locations: dict[str, set[str]] = field(default_factory=dict)  # sku -> locs (index for `query`)
    reservations: dict[str, Reservation] = field(default_factory=dict)
    keys: dict[str, KeyRecord] = field(default_factory=dict)

    def stock(self, sku: str, loc: str) -> Stock:
        """The SKU-location's stock; an unknown one reads as zeros (and is not created)."""
        return self.stocks.get((sku, loc), ZERO_STOCK)

    def stock_for_update(self, sku: str, loc: str) -> Stock:
        stock = self.stocks.get((sku, loc))
        if stock is None:
            stock = self.stocks[(sku, loc)] = Stock()
            self.locations.setdefault(sku, set()).add(loc)
        return stock

    # -- snapshots ------------------------------------------------------------------------------

    def to_snapshot(self) -> dict[str, Any]:
        """Plain, immutable-by-construction data (lists of tuples) describing the whole state."""
        return {
            "format": SNAPSHOT_FORMAT,
            "seq": self.seq,
            "stocks": [(sku, loc, s.on_hand, s.reserved, s.last_seq) for (sku, loc), s in self.stocks.items()],
            "reservations": [
                (
                    r.rid, [list(line) for line in r.lines], r.ttl_ms, r.ref, r.expires_at_ms, r.created_at_ms,
                    list(r.granted_available), r.state, r.closed_at_ms,
                    None if r.committed is None else [list(line) for line in r.committed], r.last_seq,
                )
                for r in self.reservations.values()
            ],
            "keys": [(k.key, list(k.fingerprint), k.reply, k.at_ms, k.last_seq) for k in self.keys.values()],
        }

    @classmethod
    def from_snapshot(cls, data: dict[str, Any]) -> "State":
        if data.get("format") != SNAPSHOT_FORMAT:
            raise ValueError(f"unsupported snapshot format {data.get('format')!r}")
        state = cls(seq=data["seq"])
        for sku, loc, on_hand, reserved, last_seq in data["stocks"]:
            stock = state.stock_for_update(sku, loc)
            stock.on_hand, stock.reserved, stock.last_seq = on_hand, reserved, last_seq
        for (rid, lines, ttl_ms, ref, expires_at_ms, created_at_ms, granted, status, closed_at_ms, committed, last_seq) in data["reservations"]:
            state.reservations[rid] = Reservation(
                rid=rid, lines=tuple(tuple(line) for line in lines), ttl_ms=ttl_ms, ref=ref,
                expires_at_ms=expires_at_ms, created_at_ms=created_at_ms, granted_available=tuple(granted),
                state=status, closed_at_ms=closed_at_ms,
                committed=None if committed is None else tuple(tuple(line) for line in committed),
                last_seq=last_seq,
            )
        for key, fingerprint, reply, at_ms, last_seq in data["keys"]:
            state.keys[key] = KeyRecord(key, _deep_tuple(fingerprint), reply, at_ms, last_seq)
        check_invariants(state)
        return state


def _deep_tuple(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_deep_tuple(item) for item in value)
    return value


def held_by_stock(state: State) -> dict[StockKey, int]:
    """Sum of held reservation lines per SKU-location (what `reserved` must equal)."""
    held: dict[StockKey, int] = {}
    for reservation in state.reservations.values():
        if reservation.state == HELD:
            for sku, loc, qty in reservation.lines:
                held[(sku, loc)] = held.get((sku, loc), 0) + qty
    return held


def check_invariants(state: State) -> None:
    """Assert what must always hold (O(size of state): for tests, recovery and `verify`)."""
    held = held_by_stock(state)
    for key, stock in state.stocks.items():
        assert stock.reserved == held.get(key, 0), f"{key}: reserved {stock.reserved} != held lines {held.get(key, 0)}"
        assert stock.on_hand >= 0, f"{key}: on_hand {stock.on_hand} < 0"
        assert stock.last_seq <= state.seq, f"{key}: last_seq {stock.last_seq} beyond state seq {state.seq}"
    for key in held:
        assert key in state.stocks, f"{key}: held lines on an unknown SKU-location"
    for sku, locs in state.locations.items():
        for loc in locs:
            assert (sku, loc) in state.stocks, f"index names unknown SKU-location {(sku, loc)}"

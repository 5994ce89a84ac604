"""The invariants of `check_invariants`, checked after a replay for what the replay changed.

A long-lived snapshot builder replays a short log tail onto a large state before each snapshot.
`check_invariants` costs O(state) (~2 s at 1M SKU-locations and 1M reservations, as much as
the pack and the write of a snapshot); `TailCheck.check` costs what the tail
touched plus one pass over the SKU-locations and one over the reservations that each compare one
integer (~0.1 s at that size, with 10,000 reserves in the tail). It rests on two facts of
`events`, both asserted after every step of the stateful core test:

- every change to a reservation or a SKU-location sets its `last_seq` to the event's seq, so one
  whose `last_seq` is not beyond the last check's seq has not changed;
- a reservation record is an immutable tuple, replaced on every change, so the copy of the
  records this check keeps (the same objects: ~40 bytes per reservation) still holds each one as
  it was at the last check.

From the records that changed, it keeps the held quantity per SKU-location up to date (the sum
the full check recounts), and checks every SKU-location that changed or whose held lines did:
`reserved` equals its held lines, `on_hand` is not negative, `last_seq` is not beyond the state's.
It also checks the held counts `apply_event` keeps against its own. What it leaves to a full
check (`check_invariants`): a change made without setting `last_seq` (a bug of its own, which
the full check would show as a broken invariant if it broke one), and the `locations` index (it
changes only when a SKU-location is created).
"""

from __future__ import annotations

from .state import HELD, RECORD_LAST_SEQ, RECORD_STATE, State, StockKey, held_by_stock, record_lines


class TailCheck:
    """Made on a state that passes `check_invariants` (checked just before, or a snapshot just
    loaded: `State.from_snapshot` checks it); `check` after each replay onto that state."""

    def __init__(self, state: State):
        self._seq = state.seq
        self._records = dict(state.reservations)  # the records, shared (immutable): ~40 bytes per reservation
        self._held = held_by_stock(state)
        self._held_reservations, self._held_units = state.held_reservations, state.held_units

    def check(self, state: State) -> int:
        """Assert the invariants for what changed since the last check (or the full check);
        return how many SKU-locations were checked."""
        assert state.seq >= self._seq, f"state seq {state.seq} went back from {self._seq}"
        records = self._records
        since_seq = self._seq
        changed_keys: set[StockKey] = set()
        for rid, record in state.reservations.items():
            if record[RECORD_LAST_SEQ] <= since_seq:
                continue
            before = records.get(rid)
            if before is not None:
                self._count(before, -1, changed_keys)
            self._count(record, +1, changed_keys)
            records[rid] = record
        if len(records) != len(state.reservations):  # some were forgotten: one more pass, only then
            for rid in [rid for rid in records if rid not in state.reservations]:
                self._count(records.pop(rid), -1, changed_keys)
        changed_keys.update(key for key, stock in state.stocks.items() if stock.last_seq > since_seq)
        stocks, held = state.stocks, self._held
        for key in changed_keys:
            stock = stocks.get(key)
            assert stock is not None, f"{key}: held lines on an unknown SKU-location"
            assert stock.reserved == held.get(key, 0), f"{key}: reserved {stock.reserved} != held lines {held.get(key, 0)}"
            assert stock.on_hand >= 0, f"{key}: on_hand {stock.on_hand} < 0"
            assert stock.last_seq <= state.seq, f"{key}: last_seq {stock.last_seq} beyond state seq {state.seq}"
        counted = (self._held_reservations, self._held_units)
        assert (state.held_reservations, state.held_units) == counted, f"held counts {(state.held_reservations, state.held_units)} != counted {counted}"
        self._seq = state.seq
        return len(changed_keys)

    def _count(self, record: tuple, sign: int, changed_keys: set[StockKey]) -> None:
        """Add (`sign` +1) or take away (-1) what a held record holds."""
        if record[RECORD_STATE] != HELD:
            return
        held = self._held
        self._held_reservations += sign
        for sku, loc, qty in record_lines(record):
            key = (sku, loc)
            held[key] = held.get(key, 0) + sign * qty
            self._held_units += sign * qty
            changed_keys.add(key)

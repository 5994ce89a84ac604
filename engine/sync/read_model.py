"""The read model's arithmetic: what engine events change in the `stock` and `reservations` rows.

Pure: an event in, `RowChanges` out (`row_changes`); a batch of events in, `BatchChanges` out
(`batch_changes`: stock deltas summed, reservation writes grouped); no database. The figures are the core's
(`engine.core.events.apply_event`), written as *changes* rather than new values:

- every stock change is a pair of deltas (`on_hand`, `reserved`); `available` follows as
  `on_hand - reserved`. A `count` sets `on_hand` to the counted figure, and its event carries the
  `variance` (counted minus recorded; the core asserts `on_hand + variance == counted`), so it is
  the delta `+variance`.
- a reservation is opened (`reserved`), closed (`released`, `expired`, `committed`) or extended.

Why deltas rather than the core's `State`: a row the database rejects goes to the dead-letter
table and the stream goes on (see `sink.py`). Later events then land on rows that lack the
rejected event's effect, and the rejected event is applied again later, out of order, by
`--retry-dead-letters`. Deltas commute, so the figures come out right whatever the order; the
core's `apply_event` asserts its invariants (reserved >= 0, seq + 1, a held reservation to close)
and would crash on exactly that situation, as it should in the engine. `tests/test_sync.py`
folds the same events through `apply_event` and through the read model and compares.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..core.events import (
    ADJUSTED,
    ADJUSTED_BATCH,
    COUNTED,
    COUNTED_BATCH,
    EXTENDED,
    FORGOTTEN,
    RESERVED,
    TRANSFERRED,
    Event,
)
from ..core.state import COMMITTED, EXPIRED, HELD, RELEASED

LineMap = dict[str, Any]  # {"sku", "loc", "qty"}: a reservation line as the protocol writes it


@dataclass(frozen=True, slots=True)
class StockChange:
    """Deltas to one SKU-location's row. `available` changes by `on_hand_delta - reserved_delta`."""

    sku: str
    loc: str
    on_hand_delta: int
    reserved_delta: int


@dataclass(frozen=True, slots=True)
class ReservationOpened:
    """A new `held` reservation row."""

    rid: str
    lines: list[LineMap]
    ref: str | None
    expires_at_ms: int | None


@dataclass(frozen=True, slots=True)
class ReservationClosed:
    """A `held` reservation becomes `state`; `committed` lists the committed qty per line (commits only)."""

    rid: str
    state: str
    committed: list[LineMap] | None


@dataclass(frozen=True, slots=True)
class ReservationExtended:
    """A `held` reservation gets a new expiry."""

    rid: str
    expires_at_ms: int


ReservationChange = ReservationOpened | ReservationClosed | ReservationExtended


@dataclass(frozen=True, slots=True)
class RowChanges:
    """Everything one event changes in the read model. `stock` has one entry per SKU-location."""

    seq: int
    stock: tuple[StockChange, ...]
    reservation: ReservationChange | None


class UnknownReservation(Exception):
    """The event closes a reservation the read model does not hold (its `reserved` event is a dead letter)."""


# Held lines of a reservation in the read model, by rid (None when the read model has no such
# `held` reservation). A commit needs them: `reserved` drops by the held qty, `on_hand` by the
# committed qty, and the `committed` event carries only the latter.
HeldLinesLookup = Callable[[str], Sequence[LineMap] | None]


def row_changes(event: Event, held_lines_of: HeldLinesLookup) -> RowChanges:
    """The row changes of `event`. Raises `UnknownReservation` for a commit of a reservation the
    read model does not hold. `forgotten` changes nothing: the read model keeps closed reservations.
    """
    kind = event["type"]
    seq = event["seq"]
    if kind == RESERVED:
        stock = [StockChange(line["sku"], line["loc"], 0, line["qty"]) for line in event["lines"]]
        opened = ReservationOpened(event["rid"], _plain_lines(event["lines"]), event["ref"], event["expires_at_ms"])
        return RowChanges(seq, tuple(stock), opened)
    if kind in (RELEASED, EXPIRED):
        # The event lists the reservation's lines with their held qty.
        stock = [StockChange(line["sku"], line["loc"], 0, -line["qty"]) for line in event["lines"]]
        return RowChanges(seq, tuple(stock), ReservationClosed(event["rid"], kind, None))
    if kind == COMMITTED:
        return _committed(event, held_lines_of)
    if kind == EXTENDED:
        return RowChanges(seq, (), ReservationExtended(event["rid"], event["expires_at_ms"]))
    if kind == ADJUSTED:
        return RowChanges(seq, (StockChange(event["sku"], event["loc"], event["delta"], 0),), None)
    if kind == COUNTED:
        return RowChanges(seq, (StockChange(event["sku"], event["loc"], event["variance"], 0),), None)
    if kind == ADJUSTED_BATCH:
        return RowChanges(seq, tuple(StockChange(line["sku"], line["loc"], line["delta"], 0) for line in event["lines"]), None)
    if kind == COUNTED_BATCH:
        return RowChanges(seq, tuple(StockChange(line["sku"], line["loc"], line["variance"], 0) for line in event["lines"]), None)
    if kind == TRANSFERRED:
        qty = event["qty"]
        source = StockChange(event["sku"], event["from"], -qty, 0)
        target = StockChange(event["sku"], event["to"], qty, 0)
        return RowChanges(seq, (source, target), None)
    if kind == FORGOTTEN:
        return RowChanges(seq, (), None)
    raise AssertionError(f"event {seq}: unknown type {kind!r}")


@dataclass
class BatchChanges:
    """Everything a batch of events changes, gathered so that each kind of write is one
    statement run for many rows: stock deltas summed per SKU-location, and the reservation
    writes in the order that gives the same rows as writing them event by event."""

    # (sku, loc) -> [on_hand delta, reserved delta, last seq]
    stock: dict[tuple[str, str], list[int]]
    opened: list[tuple[ReservationOpened, int]]  # (change, seq), in log order
    extended: list[tuple[ReservationExtended, int]]
    closed: list[tuple[ReservationClosed, int]]


def rids_to_look_up(events: Sequence[Event]) -> set[str]:
    """The rids whose held lines `batch_changes` needs from the read model: committed in the
    batch but not reserved in it."""
    reserved_here = {event["rid"] for event in events if event["type"] == RESERVED}
    return {event["rid"] for event in events if event["type"] == COMMITTED and event["rid"] not in reserved_here}


def batch_changes(events: Sequence[Event], held_before: dict[str, list[LineMap]]) -> BatchChanges:
    """The changes of `events` (consecutive, log order). `held_before` holds the lines of the
    `held` reservations in the read model named by `rids_to_look_up(events)`. Raises
    `UnknownReservation` like `row_changes`.

    Writing `opened`, then `extended`, then `closed` (each in log order) gives the rows that
    event-by-event writes give: a reservation is opened before anything else happens to it,
    extended only while held, and closed once, last.
    """
    held_before = dict(held_before)  # changed below: the caller's stays as it was
    held_in_batch: dict[str, list[LineMap]] = {}

    def held_lines_of(rid: str) -> Sequence[LineMap] | None:
        lines = held_in_batch.get(rid)
        return lines if lines is not None else held_before.get(rid)

    batch = BatchChanges({}, [], [], [])
    for event in events:
        changes = row_changes(event, held_lines_of)
        seq = changes.seq
        for change in changes.stock:
            total = batch.stock.setdefault((change.sku, change.loc), [0, 0, seq])
            total[0] += change.on_hand_delta
            total[1] += change.reserved_delta
            total[2] = seq
        reservation = changes.reservation
        if isinstance(reservation, ReservationOpened):
            held_in_batch[reservation.rid] = reservation.lines
            batch.opened.append((reservation, seq))
        elif isinstance(reservation, ReservationExtended):
            batch.extended.append((reservation, seq))
        elif isinstance(reservation, ReservationClosed):
            held_in_batch.pop(reservation.rid, None)
            held_before.pop(reservation.rid, None)  # a second close is refused, as row by row
            batch.closed.append((reservation, seq))
    return batch


def _committed(event: Event, held_lines_of: HeldLinesLookup) -> RowChanges:
    rid = event["rid"]
    held = held_lines_of(rid)
    if held is None:
        raise UnknownReservation(f"reservation {rid!r} is not held in the read model (is its reserve a dead letter?)")
    shipped = {(line["sku"], line["loc"]): line["qty"] for line in event["lines"]}
    stock = [
        StockChange(line["sku"], line["loc"], -shipped.get((line["sku"], line["loc"]), 0), -line["qty"])
        for line in held
    ]
    return RowChanges(event["seq"], tuple(stock), ReservationClosed(rid, COMMITTED, _plain_lines(event["lines"])))


def _plain_lines(lines: Sequence[LineMap]) -> list[LineMap]:
    return [{"sku": line["sku"], "loc": line["loc"], "qty": line["qty"]} for line in lines]


__all__ = [
    "BatchChanges", "HELD", "HeldLinesLookup", "batch_changes", "rids_to_look_up", "ReservationChange", "ReservationClosed", "ReservationExtended", "ReservationOpened",
    "RowChanges", "StockChange", "UnknownReservation", "row_changes",
]

"""Batch availability: each channel decides on its own copy of the stock, synced every T minutes.

The way many order systems work without a real-time engine. At the opening every channel gets a
copy of the available units of every SKU. Between syncs a channel confirms an order if ITS copy
shows at least the quantity (and takes it off its copy), refuses it otherwise; a cancellation of
one of its own confirmed orders puts the quantity back on its copy. Deliveries and the other
channels' sales reach its copy only at the next sync. Orders reach the central truth as they are
taken (`channel_ledger.Ledger`, which scores them); only the availability they were decided on is
stale.

A sync happens at every multiple of T minutes after the opening that falls inside the day, and
once more at the close (the closing reconciliation); it sees every event up to and including its
moment. All channels sync at the same moments. At a sync each channel's copy is compared with
the truth, SKU by SKU: every (channel, SKU) whose copy differs is one RECONCILIATION CORRECTION,
of |truth - copy| units; then the copy is set to the truth.

Everything here is a pure function of the day and T.
"""

from __future__ import annotations

from dataclasses import dataclass

from bench.channel_day import Cancel, Day, Delivery, Order
from bench.channel_ledger import Ledger, Scores


@dataclass
class BatchRun:
    """The outcome of one day decided on copies synced every `sync_minutes`."""

    sync_minutes: float
    confirmed: dict[int, bool]     # order number -> confirmed by its channel's copy
    scores: Scores
    syncs: int                     # syncs after the opening, the closing one included
    corrections: int               # (channel, SKU) copies that differed from the truth at a sync
    correction_units: int          # sum of |truth - copy| over those corrections


def sync_times_ms(day_ms: int, sync_minutes: float) -> list[int]:
    """Every multiple of T inside the day, then the close (once, even when it is a multiple)."""
    interval_ms = round(sync_minutes * 60_000)
    assert interval_ms > 0, "a sync interval must be positive"
    return list(range(interval_ms, day_ms, interval_ms)) + [day_ms]


def simulate_batch(day: Day, sync_minutes: float) -> BatchRun:
    """Decide every order of `day` on channel copies synced every `sync_minutes`, and score it."""
    ledger = Ledger(day)
    copies = [list(day.opening_stock) for _ in day.channels]
    order_of_number: dict[int, Order] = {}
    confirmed: dict[int, bool] = {}
    pending_syncs = sync_times_ms(day.day_ms, sync_minutes)
    corrections = 0
    correction_units = 0

    def sync() -> None:
        nonlocal corrections, correction_units
        truth = ledger.available
        for copy in copies:
            for sku, units in enumerate(copy):
                if units != truth[sku]:
                    corrections += 1
                    correction_units += abs(truth[sku] - units)
                    copy[sku] = truth[sku]

    next_sync = 0
    for event in day.events:
        while next_sync < len(pending_syncs) and pending_syncs[next_sync] < event.at_ms:
            sync()
            next_sync += 1
        if isinstance(event, Order):
            order_of_number[event.number] = event
            copy = copies[event.channel]
            accepted = copy[event.sku] >= event.quantity
            if accepted:
                copy[event.sku] -= event.quantity
            confirmed[event.number] = accepted
            ledger.decide(event, accepted)
        elif isinstance(event, Delivery):
            ledger.deliver(event)
        elif isinstance(event, Cancel):
            order = order_of_number[event.number]
            if confirmed[event.number]:
                copies[order.channel][order.sku] += order.quantity
            ledger.cancel(event, order.sku)
        else:
            ledger.ship(event)
    while next_sync < len(pending_syncs):
        sync()
        next_sync += 1
    return BatchRun(sync_minutes, confirmed, ledger.scores, len(pending_syncs), corrections, correction_units)

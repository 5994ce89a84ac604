"""The central truth of `bench/channels.py`, and the scores of a run's decisions against it.

However availability was decided (a channel's stale copy, or the engine), the stock physically
there is one: the `Ledger` replays the day's stream in time order with a run's decisions
(confirmed or refused, per order) and says, for each decision, whether the stock was there.

- A confirmed order takes `min(quantity, available)` units of the truth: the warehouse ships what
  it has (a short pick). The rest, `quantity - taken`, is OVERSOLD: promised to a customer, not
  there. It is not made good from a later delivery (no backorders): the promise was broken.
- A refused order whose quantity the truth had available at that moment is a STALE REFUSAL: a
  sale lost only because the channel's figure was out of date. A refusal when the truth had less
  than the quantity is a genuine stock-out (the engine, all-or-nothing per order, refuses it too).
- A cancellation of a confirmed order gives back the units it took; a shipment changes nothing
  available (the units left the truth's availability when the order was confirmed).
- FILL RATE: units confirmed and backed by stock (taken), over all units ordered.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

from bench.channel_day import Cancel, Day, Delivery, Order, Ship


@dataclass
class Scores:
    """What a run's decisions did to the customers, counted against the truth."""

    orders: int = 0
    ordered_units: int = 0
    confirmed_orders: int = 0
    confirmed_units: int = 0
    refused_orders: int = 0
    oversold_orders: int = 0       # confirmed orders the truth could not fill in full
    oversold_units: int = 0        # the units those orders were short
    stale_refused_orders: int = 0  # refused while the truth had the whole quantity available
    stale_refused_units: int = 0
    filled_units: int = 0          # confirmed units the truth had (quantity - short)
    cancelled_orders: int = 0      # confirmed orders their customer cancelled
    shipped_units: int = 0         # units of confirmed orders that left (never more than filled)

    @property
    def fill_rate(self) -> float:
        """Units confirmed and backed by stock, over all units ordered (1.0 for an empty day)."""
        return self.filled_units / self.ordered_units if self.ordered_units else 1.0

    @property
    def shortfall_units(self) -> int:
        """Oversold units plus units refused although they were there."""
        return self.oversold_units + self.stale_refused_units

    def as_dict(self) -> dict:
        """The figures, with the fill rate, for the JSON."""
        return {**asdict(self), "fill_rate": round(self.fill_rate, 6), "shortfall_units": self.shortfall_units}


class Ledger:
    """The truth: units available per SKU, changed by the stream and the decisions, in time order."""

    def __init__(self, day: Day) -> None:
        self.available = list(day.opening_stock)
        self.taken: dict[int, int] = {}  # order number -> units the truth gave a confirmed order
        self.scores = Scores()

    def deliver(self, delivery: Delivery) -> None:
        """A receipt: more units available."""
        self.available[delivery.sku] += delivery.quantity

    def decide(self, order: Order, confirmed: bool) -> None:
        """Score one decision against the truth as it stands at the order's moment."""
        scores = self.scores
        scores.orders += 1
        scores.ordered_units += order.quantity
        available = self.available[order.sku]
        if confirmed:
            taken = min(order.quantity, available)
            self.available[order.sku] = available - taken
            self.taken[order.number] = taken
            scores.confirmed_orders += 1
            scores.confirmed_units += order.quantity
            scores.filled_units += taken
            if taken < order.quantity:
                scores.oversold_orders += 1
                scores.oversold_units += order.quantity - taken
        else:
            scores.refused_orders += 1
            if available >= order.quantity:
                scores.stale_refused_orders += 1
                scores.stale_refused_units += order.quantity

    def cancel(self, cancel: Cancel, sku: int) -> None:
        """A confirmed order's customer cancels: the units it took are available again."""
        taken = self.taken.pop(cancel.number, None)
        if taken is not None:
            self.available[sku] += taken
            self.scores.cancelled_orders += 1

    def ship(self, ship: Ship) -> None:
        """A confirmed order leaves with what it took."""
        taken = self.taken.pop(ship.number, None)
        if taken is not None:
            self.scores.shipped_units += taken


def score(day: Day, confirmed: dict[int, bool], observe: Callable[[Order, int], None] | None = None) -> Ledger:
    """Replay `day` with the decisions `confirmed` (order number -> confirmed?): the ledger at the end.

    Every order of the day needs a decision (KeyError otherwise). `observe(order, available)`,
    if given, is called after each decision with the truth's units of that SKU left available.
    """
    ledger = Ledger(day)
    sku_of_order: dict[int, int] = {}
    for event in day.events:
        if isinstance(event, Order):
            sku_of_order[event.number] = event.sku
            ledger.decide(event, confirmed[event.number])
            if observe is not None:
                observe(event, ledger.available[event.sku])
        elif isinstance(event, Delivery):
            ledger.deliver(event)
        elif isinstance(event, Cancel):
            ledger.cancel(event, sku_of_order[event.number])
        else:
            ledger.ship(event)
    return ledger

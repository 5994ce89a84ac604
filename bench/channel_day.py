"""The simulated trading day of `bench/channels.py`: channels, fast-moving SKUs, and one seeded,
time-ordered stream of deliveries, orders, cancellations and shipments.

The stream is generated once per run and fed unchanged to every way of deciding availability
(batch copies synced every T minutes, the real-time engine), so the runs differ only in how an
order is confirmed or refused. A `Day` can also be written by hand (the tests do).

Model:
- Channels have a kind (`field` reps, `web` shop, `pos` terminals). A kind has a share of the
  day's orders (split evenly over the channels of that kind) and a range of order sizes.
- Orders arrive as a Poisson process at `orders_per_hour` over `day_hours`. Each order is one
  line: one SKU (chosen by popularity, Zipf 1/rank) at the one location `LOCATION`, a quantity
  drawn uniformly from its channel kind's range.
- Opening stock per SKU covers `opening_stock_hours` of that SKU's expected demand; each
  delivery covers `delivery_stock_hours`. Deliveries arrive near the `delivery_hours` of the day,
  each SKU's truck up to `DELIVERY_JITTER_MINUTES` early or late (so they do not line up with
  the sync times of the batch runs).
- Every order is shipped (picked) 30 to 120 minutes after it was taken, unless its customer
  cancels it first: `cancel_percent` of orders carry a cancellation 1 minute to just before
  their shipment. A cancellation or shipment matters only for an order that was confirmed.
  Shipments after the close are in the stream too: at its end every order is settled.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

LOCATION = "DC-1"
DELIVERY_JITTER_MINUTES = 45
SHIP_AFTER_MINUTES_MIN = 30
SHIP_AFTER_MINUTES_MAX = 120
CANCEL_AFTER_MINUTES_MIN = 1
ZIPF_EXPONENT = 1.0  # popularity of the SKU of rank r is 1/r: a few SKUs sell most
ORDERS_PER_DAY_MAX = 2_000_000  # bounds the stream held in memory


@dataclass(frozen=True)
class ChannelKind:
    """What channels of one kind have in common."""

    name: str
    order_share: float   # fraction of all orders taken by channels of this kind
    quantity_min: int    # units per order, drawn uniformly from [quantity_min, quantity_max]
    quantity_max: int
    description: str


# Reps take fewer, larger orders; the web shop most of the orders, small ones; a till one or two.
CHANNEL_KINDS = {
    "field": ChannelKind("field", 0.15, 1, 12, "field sales rep (tablet)"),
    "web": ChannelKind("web", 0.55, 1, 3, "web shop"),
    "pos": ChannelKind("pos", 0.30, 1, 2, "point of sale (store till)"),
}


@dataclass(frozen=True)
class Channel:
    """One selling channel: its name (`web-1`) and its kind's name."""

    name: str
    kind: str


# Events. `at_ms` is milliseconds since the opening of the day. At the same instant a
# delivery comes first, then cancellations, shipments and orders (EVENT_ORDER).


@dataclass(frozen=True)
class Delivery:
    """`quantity` units of SKU `sku` arrive at the location (a receipt)."""

    at_ms: int
    sku: int
    quantity: int


@dataclass(frozen=True)
class Order:
    """Channel `channel` takes an order for `quantity` units of SKU `sku`."""

    at_ms: int
    number: int
    channel: int
    sku: int
    quantity: int


@dataclass(frozen=True)
class Cancel:
    """The customer of order `number` cancels it (it matters only if the order was confirmed)."""

    at_ms: int
    number: int


@dataclass(frozen=True)
class Ship:
    """Order `number` is picked and leaves (it matters only if the order was confirmed)."""

    at_ms: int
    number: int


Event = Delivery | Order | Cancel | Ship
EVENT_ORDER = {Delivery: 0, Cancel: 1, Ship: 2, Order: 3}


@dataclass
class Day:
    """A whole day: who sells what, the stock at the opening, and the time-ordered events."""

    skus: list[str]
    channels: list[Channel]
    opening_stock: list[int]          # units on hand per SKU at the opening
    day_ms: int                       # the length of the trading day (orders are taken before it)
    events: list[Event] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.events.sort(key=event_sort_key)

    def orders(self) -> list[Order]:
        """The orders of the day, in time order."""
        return [event for event in self.events if isinstance(event, Order)]

    def summary(self) -> dict:
        """Counts of the stream, for the JSON and the printed header."""
        orders = self.orders()
        deliveries = [event for event in self.events if isinstance(event, Delivery)]
        return {
            "skus": len(self.skus),
            "channels": {channel.name: channel.kind for channel in self.channels},
            "day_hours": self.day_ms / 3_600_000,
            "orders": len(orders),
            "ordered_units": sum(order.quantity for order in orders),
            "opening_units": sum(self.opening_stock),
            "deliveries": len(deliveries),
            "delivered_units": sum(delivery.quantity for delivery in deliveries),
            "cancellations": sum(isinstance(event, Cancel) for event in self.events),
        }


def event_sort_key(event: Event) -> tuple[int, int, int]:
    """Time, then the kind (EVENT_ORDER), then the order number or SKU: a total, stable order."""
    tie = event.sku if isinstance(event, Delivery) else event.number
    return event.at_ms, EVENT_ORDER[type(event)], tie


@dataclass(frozen=True)
class DayShape:
    """The knobs of a generated day (the command line of `bench/channels.py`)."""

    seed: int
    channel_counts: dict[str, int]    # kind name -> number of channels of that kind
    sku_count: int
    orders_per_hour: float
    day_hours: float
    opening_stock_hours: float        # opening stock covers this many hours of expected demand
    delivery_hours: tuple[float, ...]  # nominal hours after the opening when deliveries arrive
    delivery_stock_hours: float       # each delivery covers this many hours of expected demand
    cancel_percent: float


def parse_channel_counts(text: str) -> dict[str, int]:
    """`field=5,web=1,pos=4` -> {'field': 5, 'web': 1, 'pos': 4}; ValueError says what is wrong."""
    counts: dict[str, int] = {}
    for part in text.split(","):
        name, separator, count = part.strip().partition("=")
        if not separator or name not in CHANNEL_KINDS or not count.isdigit():
            raise ValueError(f"--channels wants KIND=COUNT,... with kinds {', '.join(CHANNEL_KINDS)}; got {part!r}")
        counts[name] = counts.get(name, 0) + int(count)
    if not any(counts.values()):
        raise ValueError("--channels: at least one channel")
    return counts


def generate_day(shape: DayShape) -> Day:
    """The seeded day of `shape`: the same shape and seed give the same stream, event for event."""
    generator = random.Random(shape.seed)
    channels = [Channel(f"{kind}-{number}", kind)
                for kind in CHANNEL_KINDS for number in range(1, shape.channel_counts.get(kind, 0) + 1)]
    kinds_present = [CHANNEL_KINDS[kind] for kind in CHANNEL_KINDS if shape.channel_counts.get(kind, 0)]
    share_total = sum(kind.order_share for kind in kinds_present)
    kind_weights = [kind.order_share / share_total for kind in kinds_present]
    channels_of_kind = {kind.name: [index for index, channel in enumerate(channels) if channel.kind == kind.name]
                        for kind in kinds_present}
    popularity = [1 / rank**ZIPF_EXPONENT for rank in range(1, shape.sku_count + 1)]
    popularity_total = sum(popularity)
    sku_weights = [weight / popularity_total for weight in popularity]
    mean_quantity = sum(weight * (kind.quantity_min + kind.quantity_max) / 2
                        for weight, kind in zip(kind_weights, kinds_present))
    units_per_hour = [shape.orders_per_hour * weight * mean_quantity for weight in sku_weights]

    day_ms = round(shape.day_hours * 3_600_000)
    skus = [f"FM-{index:03d}" for index in range(1, shape.sku_count + 1)]
    opening_stock = [round(rate * shape.opening_stock_hours) for rate in units_per_hour]
    events: list[Event] = []
    for sku, rate in enumerate(units_per_hour):
        quantity = round(rate * shape.delivery_stock_hours)
        for hour in shape.delivery_hours:
            jitter_ms = generator.uniform(-DELIVERY_JITTER_MINUTES, DELIVERY_JITTER_MINUTES) * 60_000
            at_ms = min(max(0, round(hour * 3_600_000 + jitter_ms)), day_ms - 1)
            if quantity > 0:
                events.append(Delivery(at_ms, sku, quantity))

    mean_gap_ms = 3_600_000 / shape.orders_per_hour
    at_ms = generator.expovariate(1 / mean_gap_ms)
    number = 0
    while at_ms < day_ms:
        if number >= ORDERS_PER_DAY_MAX:
            raise ValueError(f"more than {ORDERS_PER_DAY_MAX:,} orders in a day: lower --orders-per-hour")
        kind = generator.choices(kinds_present, kind_weights)[0]
        channel = generator.choice(channels_of_kind[kind.name])
        sku = generator.choices(range(shape.sku_count), sku_weights)[0]
        quantity = generator.randint(kind.quantity_min, kind.quantity_max)
        taken_ms = round(at_ms)
        events.append(Order(taken_ms, number, channel, sku, quantity))
        ship_after_ms = round(generator.uniform(SHIP_AFTER_MINUTES_MIN, SHIP_AFTER_MINUTES_MAX) * 60_000)
        if generator.random() * 100 < shape.cancel_percent:
            cancel_after_ms = round(generator.uniform(CANCEL_AFTER_MINUTES_MIN * 60_000, ship_after_ms - 1))
            events.append(Cancel(taken_ms + cancel_after_ms, number))
        else:
            events.append(Ship(taken_ms + ship_after_ms, number))
        number += 1
        at_ms += generator.expovariate(1 / mean_gap_ms)
    return Day(skus, channels, opening_stock, day_ms, events)

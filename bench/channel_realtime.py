"""Real-time availability: every channel reserves through one engine, started here for the run.

The day's stream is replayed against a real engine (`python -m engine serve` on a temporary
folder, started and stopped as `bench/systems.py` starts every bench server):
- opening stock: one `adjust` (reason `receipt`) per SKU, before the clock starts;
- a delivery: an `adjust` (reason `receipt`);
- an order: a single-line `reserve` (no ttl; `ref` names the channel and the order); an `ok`
  confirms it, `insufficient` refuses it;
- a shipment of a confirmed order: `commit`; a cancellation of a confirmed order: `release`.

Time is compressed: the events are sent in their simulated-time order as fast as the engine
answers, pipelined on one connection (at most `IN_FLIGHT_MAX` unanswered requests). A decision
depends only on the order in which the engine applies the changes of a SKU-location, not on the
wall clock, so the day's decisions are those of the day lived in real time. One connection keeps
that order: the requests of one SKU-location (`reserve`, `adjust`) are applied by its owner task
in arrival order. A `release`, though, is decided on arrival, ahead of reserves still waiting at
their owner; so before a cancellation the driver waits for the replies owed on that SKU (without
this, a run with many cancellations shows replies whose `available` is ahead of the stream), and
a shipment or cancellation waits for the reply to its own order (to know whether it was
confirmed).

The run is scored like the batch runs (`channel_ledger.score`), and checked three ways: every
reply's `available` equals the truth's at that point of the stream; the end-of-day `get` of each
SKU-location equals what the accepted orders leave (on_hand = opening + delivered - shipped,
reserved = the confirmed orders neither shipped nor cancelled: none, once the stream is through);
and no request failed.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

from bench import systems
from bench.channel_day import LOCATION, Cancel, Day, Delivery, Order, Ship
from bench.channel_ledger import Scores, score
from protocol import Client, requests

IN_FLIGHT_MAX = 128  # the blocking client's own pipelining bound (protocol.client.PIPELINE_IN_FLIGHT_MAX)
REPLY_TIMEOUT_SECONDS = 30.0
ERRORS_KEPT_MAX = 10
DISAGREEMENTS_KEPT_MAX = 5


@dataclass
class RealtimeRun:
    """The outcome of the day reserved through the engine."""

    engine: str                                      # version and address of the engine used
    confirmed: dict[int, bool]                       # order number -> the engine granted the reserve
    scores: Scores
    wall_seconds: float                              # first request of the day to its last reply
    requests: int                                    # requests of the day (opening stock excluded)
    replies: Counter = field(default_factory=Counter)  # "op:ok" / "op:error_code"
    errors: list[str] = field(default_factory=list)    # the first failed requests, described
    availability_disagreements: list[str] = field(default_factory=list)
    stock_check: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """No oversell, no stale refusal, no failed request, and the engine agrees with the truth."""
        return (self.scores.oversold_units == 0 and self.scores.stale_refused_orders == 0 and not self.errors
                and not self.availability_disagreements and self.stock_check.get("ok", False))


class _Pipeline:
    """Requests on one blocking connection with at most IN_FLIGHT_MAX unanswered, oldest reply first.

    Each request names the SKU it changes, so that the driver can wait for the replies owed on
    one SKU (`settle`) without waiting for the whole window.
    """

    def __init__(self, client: Client, on_reply) -> None:
        self.client = client
        self.on_reply = on_reply
        self.waiting: dict[int, tuple[str, object, int]] = {}  # request id -> (op, what it is for, SKU)
        self.waiting_by_sku: Counter = Counter()
        self.sent = 0

    def send(self, request: requests.Request, subject: object, sku: int) -> None:
        """Send one request, after taking the oldest reply when IN_FLIGHT_MAX are unanswered."""
        while len(self.waiting) >= IN_FLIGHT_MAX:
            self.receive_oldest()
        op, fields = request
        self.waiting[self.client.send(op, **fields)] = (op, subject, sku)
        self.waiting_by_sku[sku] += 1
        self.sent += 1

    def receive_oldest(self) -> None:
        """Wait for the reply to the oldest unanswered request and hand it to `on_reply`."""
        request_id = next(iter(self.waiting))
        op, subject, sku = self.waiting.pop(request_id)
        self.waiting_by_sku[sku] -= 1
        self.on_reply(op, subject, self.client.receive(request_id))

    def settle(self, sku: int) -> None:
        """Wait until no request that changes `sku` is unanswered (so every one of them was applied)."""
        while self.waiting_by_sku[sku] > 0:
            self.receive_oldest()

    def drain(self) -> None:
        """Wait for every reply owed."""
        while self.waiting:
            self.receive_oldest()


def _rid(order_number: int) -> str:
    return f"order-{order_number}"


@dataclass
class DayReplay:
    """What the engine answered to the day's stream."""

    confirmed: dict[int, bool]         # order number -> reserve ok (absent: the reserve failed otherwise)
    engine_available: dict[int, int]   # order number -> `available` in the reserve's reply
    replies: Counter                   # "op:ok" / "op:error_code"
    errors: list[str]                  # the first failed requests (not `insufficient`), described
    wall_seconds: float
    requests: int


def replay_day(day: Day, client: Client) -> DayReplay:
    """Send the day's stream through `client`, in order, pipelined; collect the answers."""
    confirmed: dict[int, bool] = {}
    engine_available: dict[int, int] = {}
    replies: Counter = Counter()
    errors: list[str] = []
    orders: dict[int, Order] = {}

    def on_reply(op: str, subject: object, reply: dict) -> None:
        code = "ok" if reply.get("ok") else reply.get("error", "?")
        replies[f"{op}:{code}"] += 1
        if op == "reserve" and code in ("ok", "insufficient"):
            confirmed[subject.number] = code == "ok"
            engine_available[subject.number] = reply["lines"][0]["available"]
        elif code != "ok":
            if len(errors) < ERRORS_KEPT_MAX:
                errors.append(f"{op} for {subject!r}: {code}: {reply.get('message', '')}")

    def outcome_of(number: int) -> bool:
        while number not in confirmed and pipeline.waiting:
            pipeline.receive_oldest()
        return confirmed.get(number, False)  # a reserve that failed otherwise is counted in `errors`

    pipeline = _Pipeline(client, on_reply)
    location = LOCATION
    started = time.perf_counter()
    for index, event in enumerate(day.events):
        if isinstance(event, Order):
            orders[event.number] = event
            channel = day.channels[event.channel].name
            request = requests.reserve_request(_rid(event.number), [(day.skus[event.sku], location, event.quantity)],
                                               ref=f"{channel}/SO-{event.number}")
            pipeline.send(request, event, event.sku)
        elif isinstance(event, Delivery):
            request = requests.adjust_request(f"delivery-{index}", day.skus[event.sku], location, event.quantity,
                                              "receipt")
            pipeline.send(request, event, event.sku)
        elif isinstance(event, Ship):
            if outcome_of(event.number):
                pipeline.send(requests.commit_request(_rid(event.number)), event, orders[event.number].sku)
        elif isinstance(event, Cancel):
            sku = orders[event.number].sku
            pipeline.settle(sku)  # a release is decided on arrival: the SKU's earlier changes land first
            if outcome_of(event.number):
                pipeline.send(requests.release_request(_rid(event.number)), event, sku)
    pipeline.drain()
    wall_seconds = time.perf_counter() - started
    return DayReplay(confirmed, engine_available, replies, errors, wall_seconds, pipeline.sent)


def load_opening_stock(day: Day, client: Client) -> None:
    """One receipt per SKU with opening stock (before the day's clock starts); raises if refused."""
    batch = [requests.adjust_request(f"opening-{sku}", name, LOCATION, units, "receipt")
             for sku, (name, units) in enumerate(zip(day.skus, day.opening_stock)) if units > 0]
    for reply in client.pipeline(batch, IN_FLIGHT_MAX):
        if not reply.get("ok"):
            raise RuntimeError(f"loading the opening stock failed: {reply}")


def expected_stock(day: Day, confirmed: dict[int, bool]) -> list[tuple[int, int]]:
    """(on_hand, reserved) per SKU that the accepted orders leave at the end of the stream."""
    on_hand = list(day.opening_stock)
    reserved = [0] * len(day.skus)
    orders: dict[int, Order] = {}
    for event in day.events:
        if isinstance(event, Delivery):
            on_hand[event.sku] += event.quantity
        elif isinstance(event, Order):
            orders[event.number] = event
            if confirmed.get(event.number):
                reserved[event.sku] += event.quantity
        elif confirmed.get(event.number):
            order = orders[event.number]
            reserved[order.sku] -= order.quantity
            if isinstance(event, Ship):
                on_hand[order.sku] -= order.quantity
    return list(zip(on_hand, reserved))


def check_stock(day: Day, expected: list[tuple[int, int]], found: list[tuple[int, int]]) -> dict:
    """Compare the engine's end-of-day figures with the expected ones; no SKU may hold reserved > on_hand."""
    mismatched = [f"{day.skus[sku]}/{LOCATION}: expected on_hand/reserved {want[0]}/{want[1]}, engine {got[0]}/{got[1]}"
                  for sku, (want, got) in enumerate(zip(expected, found)) if want != got]
    oversold = [f"{day.skus[sku]}/{LOCATION}: reserved {reserved} > on_hand {on_hand}"
                for sku, (on_hand, reserved) in enumerate(found) if reserved > on_hand or on_hand < 0]
    return {"ok": not mismatched and not oversold, "sku_locations": len(found),
            "mismatched": mismatched[:DISAGREEMENTS_KEPT_MAX], "mismatched_count": len(mismatched),
            "oversold": oversold[:DISAGREEMENTS_KEPT_MAX], "oversold_count": len(oversold)}


def read_stock(day: Day, client: Client) -> list[tuple[int, int]]:
    """(on_hand, reserved) of every SKU of the day, by `get`."""
    replies = client.pipeline([requests.get_request(sku, LOCATION) for sku in day.skus], IN_FLIGHT_MAX)
    for reply in replies:
        if not reply.get("ok"):
            raise RuntimeError(f"reading stock failed: {reply}")
    return [(reply["on_hand"], reply["reserved"]) for reply in replies]


def availability_disagreements(day: Day, confirmed: dict[int, bool], engine_available: dict[int, int]) -> tuple[Scores, list[str]]:
    """Score the engine's decisions; list the orders whose reply's `available` is not the truth's."""
    disagreements: list[str] = []

    def compare(order: Order, truth_available: int) -> None:
        reported = engine_available.get(order.number)
        if reported is not None and reported != truth_available and len(disagreements) < DISAGREEMENTS_KEPT_MAX:
            disagreements.append(f"order {order.number} ({day.skus[order.sku]}): engine said available "
                                 f"{reported}, the truth {truth_available}")

    ledger = score(day, confirmed, observe=compare)
    return ledger.scores, disagreements


def run_against(day: Day, host: str, port: int, engine: str) -> RealtimeRun:
    """Load the opening stock, replay the day, read the stock back, and score it all."""
    with Client(host, port, timeout_seconds=REPLY_TIMEOUT_SECONDS) as client:
        client.hello(client="bench.channels")
        load_opening_stock(day, client)
        replay = replay_day(day, client)
        found = read_stock(day, client)
    confirmed = {order.number: replay.confirmed.get(order.number, False) for order in day.orders()}
    scores, disagreements = availability_disagreements(day, confirmed, replay.engine_available)
    stock_check = check_stock(day, expected_stock(day, confirmed), found)
    return RealtimeRun(engine, confirmed, scores, replay.wall_seconds, replay.requests, replay.replies, replay.errors,
                       disagreements, stock_check)


def run_realtime(day: Day) -> RealtimeRun:
    """Start an engine on a temporary folder, run the day through it, stop it (always)."""
    system = systems.start_engine("channels")
    try:
        return run_against(day, system.host, system.port, f"{system.version} at {system.host}:{system.port}")
    finally:
        system.stop()

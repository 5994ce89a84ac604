"""The channels bench (issue 13): batch decisions on hand-made days whose answers are worked out below."""

from __future__ import annotations


from bench.channel_batch import simulate_batch, sync_times_ms
from bench.channel_day import Cancel, Channel, Day, Delivery, DayShape, Order, Ship, generate_day
from bench.channel_ledger import score

MINUTE_MS = 60_000
TWO_CHANNELS = [Channel("web-1", "web"), Channel("pos-1", "pos")]
WEB, POS = 0, 1


def _minutes(value: float) -> int:
    return round(value * MINUTE_MS)


def two_channels_sell_eight_each() -> Day:
    """One SKU of 10 units; before the first sync (30 min) each channel sells 8 single units,
    alternately (web at 1, 2, ... 8 min; pos half a minute later). Every order ships at 50 min."""
    events = []
    for index in range(8):
        events.append(Order(_minutes(1 + index), 2 * index, WEB, 0, 1))
        events.append(Order(_minutes(1.5 + index), 2 * index + 1, POS, 0, 1))
    events += [Ship(_minutes(50), number) for number in range(16)]
    return Day(["SKU-A"], TWO_CHANNELS, [10], _minutes(60), events)


def test_two_channels_selling_eight_of_ten_units_before_a_sync_oversell_six():
    run = simulate_batch(two_channels_sell_eight_each(), sync_minutes=30)
    scores = run.scores
    assert all(run.confirmed.values())  # each copy showed 10: every order was confirmed
    assert (scores.confirmed_orders, scores.confirmed_units) == (16, 16)
    # The truth fills the first 10 in time order (web 1-5, pos 1-5); the last 3 of each are short.
    assert (scores.oversold_orders, scores.oversold_units) == (6, 6)
    assert (scores.stale_refused_orders, scores.stale_refused_units) == (0, 0)
    assert scores.filled_units == 10 and scores.fill_rate == 10 / 16
    assert scores.shipped_units == 10
    # Sync at 30 min: truth 0, each copy 10 - 8 = 2: two corrections of 2 units. At the close
    # (60 min) every copy is 0 like the truth: nothing more.
    assert run.syncs == 2
    assert (run.corrections, run.correction_units) == (2, 4)


def test_a_sync_every_minute_lets_only_one_sale_slip_through():
    # A sync at t sees every event up to t. The copies synced at 5 min show 1 unit left (web 1-5,
    # pos 1-4 sold); pos takes it at 5.5 min, and web, on its copy, sells it again at 6 min:
    # 1 unit short. The sync at 6 min shows 0 to both; the rest are refused, and were not there.
    run = simulate_batch(two_channels_sell_eight_each(), sync_minutes=1)
    scores = run.scores
    assert (scores.oversold_orders, scores.oversold_units) == (1, 1)
    assert scores.confirmed_orders == 11 and scores.filled_units == 10
    assert (scores.stale_refused_orders, scores.refused_orders) == (0, 5)


def stale_copies_and_a_cancellation() -> Day:
    """One SKU, 4 units at the opening, a delivery of 10 at 10 min; worked out in the test below."""
    events = [
        Order(_minutes(5), 0, WEB, 0, 4), Ship(_minutes(50), 0),
        Delivery(_minutes(10), 0, 10),
        Order(_minutes(20), 1, WEB, 0, 3), Ship(_minutes(50), 1),
        Order(_minutes(25), 2, POS, 0, 5), Ship(_minutes(55), 2),
        Order(_minutes(30), 3, POS, 0, 4), Cancel(_minutes(75), 3),
        Order(_minutes(70), 4, WEB, 0, 2), Ship(_minutes(100), 4),
        Order(_minutes(80), 5, POS, 0, 9), Ship(_minutes(110), 5),
    ]
    return Day(["SKU-A"], TWO_CHANNELS, [4], _minutes(120), events)


def test_batch_counts_stale_refusals_after_a_delivery_and_a_cancellation_put_back_on_the_copy():
    run = simulate_batch(stale_copies_and_a_cancellation(), sync_minutes=60)
    # 5 min  web 4: copy 4 -> confirmed (copy web 0, truth 0).   10 min delivery: truth 10.
    # 20 min web 3: copy 0 -> refused, truth 10: stale (3).       25 min pos 5: copy 4 -> refused, stale (5).
    # 30 min pos 4: copy 4 -> confirmed (copy pos 0, truth 6).
    # 60 min sync: truth 6, copies 0 and 0: 2 corrections, 12 units; copies 6.
    # 70 min web 2: confirmed (copy web 4, truth 4).              75 min order 3 cancelled: truth 8, copy pos 10.
    # 80 min pos 9: copy 10 -> confirmed; truth 8: 1 unit short.  120 min close: truth 0, copies 4 and 1.
    assert run.confirmed == {0: True, 1: False, 2: False, 3: True, 4: True, 5: True}
    scores = run.scores
    assert (scores.orders, scores.ordered_units) == (6, 27)
    assert (scores.confirmed_orders, scores.confirmed_units, scores.refused_orders) == (4, 19, 2)
    assert (scores.stale_refused_orders, scores.stale_refused_units) == (2, 8)
    assert (scores.oversold_orders, scores.oversold_units) == (1, 1)
    assert (scores.filled_units, scores.cancelled_orders, scores.shipped_units) == (18, 1, 14)
    assert (run.corrections, run.correction_units) == (4, 17)
    # The same decisions, scored on their own, give the same figures.
    assert score(stale_copies_and_a_cancellation(), run.confirmed).scores == scores


def test_a_refusal_is_stale_when_the_truth_had_exactly_the_quantity_and_not_when_it_had_less():
    # Nothing at the opening; 3 units arrive at 5 min, before any sync. Web refuses 3 (its copy
    # shows 0; the truth has exactly 3: stale), pos refuses 4 (the truth has 3: a real stock-out).
    events = [Delivery(_minutes(5), 0, 3), Order(_minutes(10), 0, WEB, 0, 3), Ship(_minutes(40), 0),
              Order(_minutes(11), 1, POS, 0, 4), Ship(_minutes(41), 1)]
    run = simulate_batch(Day(["SKU-A"], TWO_CHANNELS, [0], _minutes(60), events), sync_minutes=60)
    assert run.confirmed == {0: False, 1: False}
    assert (run.scores.stale_refused_orders, run.scores.stale_refused_units) == (1, 3)
    assert run.scores.fill_rate == 0


def test_sync_times_include_the_close_once():
    assert sync_times_ms(_minutes(60), 30) == [_minutes(30), _minutes(60)]
    assert sync_times_ms(_minutes(60), 25) == [_minutes(25), _minutes(50), _minutes(60)]
    assert sync_times_ms(_minutes(60), 240) == [_minutes(60)]


def test_the_generated_day_is_the_same_for_the_same_seed():
    shape = DayShape(seed=1, channel_counts={"web": 1, "pos": 2}, sku_count=4, orders_per_hour=200, day_hours=2,
                     opening_stock_hours=1, delivery_hours=(1,), delivery_stock_hours=1, cancel_percent=5)
    first = generate_day(shape)
    assert first.events == generate_day(shape).events
    assert first.events != generate_day(DayShape(**{**shape.__dict__, "seed": 2})).events
    assert any(isinstance(event, Delivery) for event in first.events) and first.orders()

"""`python -m bench.channels` (issue 13): batch decisions on hand-made days whose answers are worked
out below, the scoring that must catch an oversell, a real engine on a hand-made day, and a tiny
generated day end to end (exit 0, JSON and PNG written).

No timing assertions: the machine may be busy.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

from bench.channel_batch import simulate_batch, sync_times_ms
from bench.channel_day import Cancel, Channel, Day, Delivery, Order, Ship, generate_day
from bench.channel_ledger import score
from bench.channel_realtime import RealtimeRun, check_stock, expected_stock, run_against
from bench.channel_report import realtime_lines
from bench.channels import day_shape, parse_args

ROOT = Path(__file__).resolve().parent.parent
RUN_TIMEOUT_SECONDS = 60
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


def test_the_real_time_check_fails_on_an_oversell_and_on_figures_that_disagree():
    day = two_channels_sell_eight_each()
    all_confirmed = {order.number: True for order in day.orders()}
    scores = score(day, all_confirmed).scores
    assert (scores.oversold_orders, scores.oversold_units) == (6, 6)
    # The engine's figures for those decisions would be on_hand 10 - 16 shipped: caught.
    assert expected_stock(day, all_confirmed) == [(-6, 0)]
    stock_check = check_stock(day, expected_stock(day, all_confirmed), [(-6, 0)])
    assert stock_check["ok"] is False and stock_check["oversold_count"] == 1
    disagreeing = check_stock(day, [(0, 0)], [(1, 0)])
    assert disagreeing["ok"] is False and disagreeing["mismatched_count"] == 1
    run = RealtimeRun("test", all_confirmed, scores, 1.0, 32, stock_check=check_stock(day, [(0, 0)], [(0, 0)]))
    assert run.ok is False
    result = {"day": {"day_hours": 1}, "realtime": {
        "requests": 32, "scores": scores.as_dict(), "wall_seconds": 1.0, "requests_per_second": 32,
        "orders_per_second": 16, "engine": "test", "stock_check": run.stock_check, "ok": run.ok,
        "availability_disagreements": [], "errors": []}}
    assert realtime_lines(result)[-1].startswith("real-time check: FAILED — 6 oversold units")


def test_the_engine_decides_the_hand_made_day_without_oversell_or_stale_refusal(server_process):
    server = server_process()
    day = stale_copies_and_a_cancellation()
    run = run_against(day, "127.0.0.1", server.port, "test engine")
    # 5 min 4 of 4: ok (0 left). Delivery: 10. 20 min 3: ok (7). 25 min 5: ok (2). 30 min 4: refused,
    # only 2 there. 70 min 2: ok (0). 75 min: order 3 was refused, nothing to release. 80 min 9: refused.
    assert run.confirmed == {0: True, 1: True, 2: True, 3: False, 4: True, 5: False}
    scores = run.scores
    assert (scores.oversold_units, scores.stale_refused_orders) == (0, 0)
    assert (scores.confirmed_units, scores.refused_orders, scores.shipped_units) == (14, 2, 14)
    assert run.replies == {"adjust:ok": 1, "reserve:ok": 4, "reserve:insufficient": 2, "commit:ok": 4}
    assert run.availability_disagreements == [] and run.errors == []
    assert run.stock_check["ok"] is True and run.ok is True
    assert expected_stock(day, run.confirmed) == [(0, 0)]  # 4 + 10 - 14 shipped, nothing held


def test_the_generated_day_is_the_same_for_the_same_seed():
    arguments = ["--orders-per-hour", "200", "--day-hours", "2", "--skus", "4"]
    first = generate_day(day_shape(parse_args(arguments)))
    assert first.events == generate_day(day_shape(parse_args(arguments))).events
    assert first.events != generate_day(day_shape(parse_args(arguments + ["--seed", "2"]))).events
    assert any(isinstance(event, Delivery) for event in first.events) and first.orders()


def run_channels(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench.channels", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=RUN_TIMEOUT_SECONDS)


def test_a_tiny_day_end_to_end_writes_the_table_json_and_plot(tmp_path):
    prefix = tmp_path / "channels"
    arguments = ["--orders-per-hour", "150", "--day-hours", "3", "--skus", "3", "--channels", "field=1,web=1,pos=2",
                 "--delivery-hours", "1.5", "--sync-minutes", "15,60"]
    completed = run_channels(*arguments, "--out", str(prefix))
    assert completed.returncode == 0, completed.stderr[-3000:] + completed.stdout[-3000:]
    assert "real-time  (engine)" in completed.stdout and "real-time check: OK" in completed.stdout
    result = json.loads(prefix.with_suffix(".json").read_text())
    realtime = result["realtime"]
    assert realtime["ok"] is True and realtime["stock_check"]["ok"] is True
    assert realtime["scores"]["oversold_units"] == 0 and realtime["scores"]["stale_refused_orders"] == 0
    assert realtime["scores"]["orders"] == result["day"]["orders"] > 0
    assert realtime["replies"]["reserve:ok"] == realtime["scores"]["confirmed_orders"]
    # The batch rows are those of the same day decided here.
    day = generate_day(day_shape(parse_args(arguments)))
    for entry, minutes in zip(result["batch"], (15, 60), strict=True):
        run = simulate_batch(day, minutes)
        assert entry["sync_minutes"] == minutes
        assert entry["scores"] == run.scores.as_dict()
        assert (entry["corrections"], entry["correction_units"]) == (run.corrections, run.correction_units)
    plot = prefix.with_suffix(".png")
    if importlib.util.find_spec("matplotlib") is not None:
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert not plot.exists() and "matplotlib is not installed" in completed.stderr


def test_help_and_bad_arguments():
    helped = run_channels("--help")
    assert helped.returncode == 0 and "--sync-minutes" in helped.stdout and "stale refused" in helped.stdout
    assert run_channels("--channels", "kiosk=3").returncode == 2
    assert run_channels("--sync-minutes", "0").returncode == 2

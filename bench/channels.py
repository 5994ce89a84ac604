"""`python -m bench.channels`: batch vs real-time availability, measured (issue 13).

N channels (field reps, a web shop, store tills) sell the same fast-moving SKUs at one location
for a simulated day. One seeded stream of orders, deliveries, cancellations and shipments
(`bench/channel_day.py`) is generated once and decided two ways:

- batch, for each T of --sync-minutes: every channel decides on its own copy of the stock,
  refreshed from the central truth every T minutes and reconciled at each sync
  (`bench/channel_batch.py`);
- real-time: every order is a `reserve` on a real engine started here on a temporary folder and
  stopped at the end, shipments `commit`, cancellations `release`, deliveries `adjust`
  (`bench/channel_realtime.py`). Time is compressed: the events go out in simulated-time order
  as fast as the engine answers; the decisions depend only on that order, not on the wall clock.

Both are scored against the same truth (`bench/channel_ledger.py`):
  oversold        confirmed orders the truth could not fill in full at their moment (the
                  warehouse ships what it has; no backorders); units: the units missing
  stale refused   refused orders whose whole quantity the truth had available at their moment;
                  units: their quantity
  corrections     at each sync and at the close, every (channel, SKU) copy that differs from the
                  truth, overwritten; units: sum of |truth - copy|. Real-time keeps no copies.
  fill rate       units confirmed and backed by stock / units ordered

It prints a table (one row per T and the real-time row), the engine's throughput for the day, and
writes PREFIX.json and PREFIX.png (shortfall, fill rate and corrections against T; needs
matplotlib), by default bench/results/channels.json and .png.

Exit status: 0 when the real-time run oversold nothing, refused nothing that was there, and the
engine's figures agree with the accepted orders; 1 otherwise; 2 on bad arguments or an engine
that would not start.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from bench import channel_report, systems
from bench.channel_batch import BatchRun, simulate_batch
from bench.channel_day import CHANNEL_KINDS, DELIVERY_JITTER_MINUTES, DayShape, generate_day, parse_channel_counts
from bench.channel_realtime import RealtimeRun, run_realtime
from bench.cli import machine_info

DEFAULT_OUT = systems.ROOT / "bench" / "results" / "channels"
SKUS_MAX = 10_000
CHANNELS_MAX = 1_000
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m bench.channels`."""
    parser = argparse.ArgumentParser(prog="python -m bench.channels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    # `%%`: argparse expands `%` in help texts.
    kinds = ", ".join(f"{name} ({kind.description}: {kind.order_share * 100:.0f}%% of orders, {kind.quantity_min}-"
                      f"{kind.quantity_max} units each)" for name, kind in CHANNEL_KINDS.items())
    parser.add_argument("--seed", type=int, default=1, help="seed of the day's stream (default %(default)s)")
    parser.add_argument("--channels", default="field=5,web=1,pos=4",
                        help=f"KIND=COUNT,... with kinds {kinds} (default %(default)s)")
    parser.add_argument("--skus", type=int, default=20, help="fast-moving SKUs, popularity 1/rank (default %(default)s)")
    rate = parser.add_mutually_exclusive_group()
    rate.add_argument("--orders-per-hour", type=float, default=None, help="order rate over the day (default 1200)")
    rate.add_argument("--orders-per-day", type=float, default=None, help="the same, as orders per day")
    parser.add_argument("--day-hours", type=float, default=12.0, help="length of the trading day (default %(default)s)")
    parser.add_argument("--opening-stock-hours", type=float, default=3.5,
                        help="opening stock of each SKU covers this many hours of its expected demand (default %(default)s)")
    parser.add_argument("--delivery-hours", default=None,
                        help=f"hours after the opening when a delivery arrives, each SKU's truck up to "
                             f"{DELIVERY_JITTER_MINUTES} min early or late; 'none' for no deliveries (default: a "
                             f"third and two thirds into the day, 4,8 for 12 h)")
    parser.add_argument("--delivery-stock-hours", type=float, default=4.0,
                        help="each delivery covers this many hours of the SKU's expected demand (default %(default)s)")
    parser.add_argument("--cancel-percent", type=float, default=2.0,
                        help="percentage of orders their customer cancels before shipment (default %(default)s)")
    parser.add_argument("--sync-minutes", default="5,15,30,60,240",
                        help="the batch runs' sync intervals T, in minutes (default %(default)s)")
    parser.add_argument("--out", metavar="PREFIX", default=None,
                        help=f"writes PREFIX.json and PREFIX.png (default {DEFAULT_OUT.relative_to(systems.ROOT)})")
    return parser


def _numbers(text: str, option: str, parser: argparse.ArgumentParser) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        parser.error(f"{option} wants numbers separated by commas, got {text!r}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parsed and checked arguments; a bad one exits with status 2 and says why."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.channel_counts = parse_channel_counts(args.channels)
    except ValueError as error:
        parser.error(str(error))
    if sum(args.channel_counts.values()) > CHANNELS_MAX:
        parser.error(f"--channels: at most {CHANNELS_MAX} channels")
    if not 1 <= args.skus <= SKUS_MAX:
        parser.error(f"--skus must be 1 to {SKUS_MAX:,}")
    if args.day_hours <= 0:
        parser.error("--day-hours must be positive")
    if args.orders_per_day is not None:
        args.orders_per_hour = args.orders_per_day / args.day_hours
    elif args.orders_per_hour is None:
        args.orders_per_hour = 1200.0
    if args.orders_per_hour <= 0:
        parser.error("the order rate must be positive")
    if args.opening_stock_hours < 0 or args.delivery_stock_hours < 0:
        parser.error("--opening-stock-hours and --delivery-stock-hours cannot be negative")
    if not 0 <= args.cancel_percent <= 100:
        parser.error("--cancel-percent must be 0 to 100")
    if args.delivery_hours is None:
        args.delivery_hour_list = (args.day_hours / 3, args.day_hours * 2 / 3)
    elif args.delivery_hours.strip().lower() == "none":
        args.delivery_hour_list = ()
    else:
        args.delivery_hour_list = _numbers(args.delivery_hours, "--delivery-hours", parser)
    if any(not 0 <= hour < args.day_hours for hour in args.delivery_hour_list):
        parser.error("--delivery-hours must fall inside the day (0 to --day-hours)")
    args.sync_minute_list = sorted(set(_numbers(args.sync_minutes, "--sync-minutes", parser)))
    if not args.sync_minute_list or any(minutes * 60_000 < 1 for minutes in args.sync_minute_list):
        parser.error("--sync-minutes wants at least one positive interval")
    return args


def day_shape(args: argparse.Namespace) -> DayShape:
    """The generator's knobs from the command line."""
    return DayShape(seed=args.seed, channel_counts=args.channel_counts, sku_count=args.skus,
                    orders_per_hour=args.orders_per_hour, day_hours=args.day_hours,
                    opening_stock_hours=args.opening_stock_hours, delivery_hours=args.delivery_hour_list,
                    delivery_stock_hours=args.delivery_stock_hours, cancel_percent=args.cancel_percent)


def batch_entry(run: BatchRun) -> dict:
    """One batch run in the JSON."""
    return {"sync_minutes": run.sync_minutes, "syncs": run.syncs, "corrections": run.corrections,
            "correction_units": run.correction_units, "scores": run.scores.as_dict()}


def realtime_entry(run: RealtimeRun) -> dict:
    """The real-time run in the JSON."""
    return {"engine": run.engine, "scores": run.scores.as_dict(), "corrections": 0, "correction_units": 0,
            "wall_seconds": round(run.wall_seconds, 4), "requests": run.requests,
            "requests_per_second": round(run.requests / run.wall_seconds, 1),
            "orders_per_second": round(run.scores.orders / run.wall_seconds, 1),
            "replies": dict(run.replies), "errors": run.errors,
            "availability_disagreements": run.availability_disagreements, "stock_check": run.stock_check,
            "ok": run.ok}


def main(argv: list[str] | None = None) -> int:
    """Generate the day, decide it in batch for every T and in real time, report; returns the exit status."""
    args = parse_args(argv)
    started = time.time()
    day = generate_day(day_shape(args))
    summary = day.summary()
    print(f"day: {summary['orders']:,} orders ({summary['ordered_units']:,} units) over {args.day_hours:g} h from "
          f"{len(day.channels)} channels ({args.channels}) on {args.skus} SKUs; opening stock {summary['opening_units']:,} "
          f"units, {summary['deliveries']} deliveries ({summary['delivered_units']:,} units), "
          f"{summary['cancellations']} cancellations; seed {args.seed}", file=sys.stderr, flush=True)
    batches = [simulate_batch(day, minutes) for minutes in args.sync_minute_list]
    print("starting an engine on a temporary folder for the real-time run ...", file=sys.stderr, flush=True)
    try:
        realtime = run_realtime(day)
    except systems.SystemMissing as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    result = {
        "tool": "python -m bench.channels",
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "machine": machine_info(),
        "config": {"seed": args.seed, "channels": args.channel_counts, "skus": args.skus,
                   "orders_per_hour": args.orders_per_hour, "day_hours": args.day_hours,
                   "opening_stock_hours": args.opening_stock_hours, "delivery_hours": list(args.delivery_hour_list),
                   "delivery_stock_hours": args.delivery_stock_hours, "cancel_percent": args.cancel_percent,
                   "sync_minutes": args.sync_minute_list},
        "day": summary,
        "definitions": channel_report.DEFINITIONS,
        "batch": [batch_entry(run) for run in batches],
        "realtime": realtime_entry(realtime),
        "ok": realtime.ok,
    }
    print(channel_report.table(result))
    print()
    for line in channel_report.realtime_lines(result):
        print(line)
    prefix = Path(args.out) if args.out else DEFAULT_OUT
    prefix.parent.mkdir(parents=True, exist_ok=True)
    json_path = prefix.with_name(prefix.name + ".json")
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {_shown(json_path)}", file=sys.stderr)
    print(channel_report.plot(result, str(_shown(prefix.with_name(prefix.name + ".png")))), file=sys.stderr)
    return EXIT_OK if realtime.ok else EXIT_FAILED


def _shown(path: Path) -> Path:
    """`path` relative to the current folder when it is below it (shorter to read), else as given."""
    try:
        return path.resolve().relative_to(Path.cwd())
    except ValueError:
        return path


if __name__ == "__main__":
    sys.exit(main())

"""What `bench/channels.py` prints and draws: the batch-vs-real-time table with its footnotes,
and the PNG of the shortfall against the sync interval T."""

from __future__ import annotations

from bench.report import NO_MATPLOTLIB, _pyplot

# The footnotes of the table; the JSON carries them too.
DEFINITIONS = {
    "orders": "orders taken in the day (one line each: one SKU at one location)",
    "confirmed": "orders the channel confirmed to its customer (batch: its copy showed enough; real-time: reserve ok)",
    "refused": "orders the channel refused (its copy, or the engine, showed less than the quantity)",
    "oversold": "confirmed orders the truth could not fill in full at their moment (a short pick, no backorder); "
                "units: the units missing",
    "stale refused": "refused orders whose whole quantity the truth had available at their moment; units: their quantity",
    "corrections": "at each sync (and the closing one), (channel, SKU) copies that differed from the truth and were "
                   "overwritten; units: sum of |truth - copy|. Real-time keeps no copies: none",
    "fill rate": "units confirmed and backed by stock, over units ordered",
    "shortfall": "oversold units + stale refused units",
}


def _row_cells(label: str, interval: str, scores: dict, corrections: int, correction_units: int) -> tuple[str, ...]:
    return (label, interval, f"{scores['orders']:,}", f"{scores['confirmed_orders']:,}", f"{scores['refused_orders']:,}",
            f"{scores['oversold_orders']:,}", f"{scores['oversold_units']:,}",
            f"{scores['stale_refused_orders']:,}", f"{scores['stale_refused_units']:,}",
            f"{corrections:,}", f"{correction_units:,}", f"{scores['fill_rate'] * 100:.2f}%")


def minutes_text(minutes: float) -> str:
    """5 -> '5 min', 240 -> '4 h', 90 -> '90 min'."""
    if minutes >= 60 and minutes % 60 == 0:
        return f"{minutes / 60:g} h"
    return f"{minutes:g} min"


# Titles over pairs of columns of the table: (first column, title).
COLUMN_GROUPS = ((5, "oversold"), (7, "stale refused"), (9, "corrections"))


def table(result: dict) -> str:
    """The batch rows (one per T) and the real-time row, aligned, with footnotes."""
    header = ("run", "sync every", "orders", "confirmed", "refused", "orders", "units", "orders", "units",
              "count", "units", "fill rate")
    rows = [header]
    for batch in result["batch"]:
        rows.append(_row_cells("batch", minutes_text(batch["sync_minutes"]), batch["scores"], batch["corrections"],
                               batch["correction_units"]))
    realtime = result["realtime"]
    rows.append(_row_cells("real-time", "(engine)", realtime["scores"], 0, 0))
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    for first, title in COLUMN_GROUPS:  # a pair of columns is at least as wide as its title
        missing = len(title) - (widths[first] + 2 + widths[first + 1])
        if missing > 0:
            widths[first] += missing
    starts = [sum(widths[:column]) + 2 * column for column in range(len(widths))]
    group_line = ""
    for first, title in COLUMN_GROUPS:
        span = widths[first] + 2 + widths[first + 1]
        group_line = group_line.ljust(starts[first]) + title.center(span)
    lines = [group_line.rstrip()]
    for number, row in enumerate(rows):
        cells = [cell.ljust(width) if column < 2 else cell.rjust(width)  # names left, figures right
                 for column, (cell, width) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
        if number == 0:
            lines.append("  ".join("-" * width for width in widths))
    lines.append("")
    lines.extend(f"{name}: {text}" for name, text in DEFINITIONS.items())
    return "\n".join(lines)


def realtime_lines(result: dict) -> list[str]:
    """The real-time run's throughput and checks, as printed under the table."""
    realtime = result["realtime"]
    day_seconds = result["day"]["day_hours"] * 3600
    lines = [
        f"real-time: the day's {realtime['requests']:,} requests ({realtime['scores']['orders']:,} reserves) took "
        f"{realtime['wall_seconds']:.2f} s wall on one pipelined connection: {realtime['requests_per_second']:,.0f} "
        f"requests/s, {realtime['orders_per_second']:,.0f} orders/s; time compressed {day_seconds / realtime['wall_seconds']:,.0f}x "
        f"(engine {realtime['engine']})",
    ]
    check = realtime["stock_check"]
    disagreements = realtime["availability_disagreements"]
    if realtime["ok"]:
        lines.append(f"real-time check: OK — 0 oversold, 0 stale refusals, every reply's available equals the truth's, "
                     f"and the engine's get of all {check['sku_locations']} SKU-locations equals what the accepted "
                     f"orders leave (reserved 0, on_hand = opening + delivered - shipped)")
        return lines
    problems = []
    scores = realtime["scores"]
    if scores["oversold_units"] or scores["stale_refused_orders"]:
        problems.append(f"{scores['oversold_units']} oversold units, {scores['stale_refused_orders']} stale refusals")
    if disagreements:
        problems.append("availability disagrees: " + "; ".join(disagreements))
    if not check.get("ok"):
        problems.append("; ".join(check.get("mismatched", []) + check.get("oversold", [])) or "the stock was not read")
    if realtime["errors"]:
        problems.append("failed requests: " + "; ".join(realtime["errors"]))
    lines.append("real-time check: FAILED — " + " | ".join(problems))
    return lines


def plot(result: dict, path: str) -> str:
    """The PNG: shortfall units, fill rate and reconciliation corrections against T, real-time beside.

    Returns what it did (the path written, or why there is no plot).
    """
    pyplot = _pyplot()
    if pyplot is None:
        return NO_MATPLOTLIB
    from matplotlib import ticker

    batches = result["batch"]
    if not batches:
        return "no plot: no batch runs"
    intervals = [batch["sync_minutes"] for batch in batches]
    realtime = result["realtime"]["scores"]
    # Real-time has no T: it gets its own place left of the smallest T, labelled.
    realtime_x = min(intervals) / 3
    ticks = [realtime_x] + intervals
    tick_labels = ["real-time"] + [f"{minutes:g}" for minutes in intervals]

    figure, (shortfall, fill, corrections) = pyplot.subplots(1, 3, figsize=(16, 4.8))
    series = (("oversold_units", "oversold units (confirmed, not there)", "tab:red", "o"),
              ("stale_refused_units", "stale refused units (refused, was there)", "tab:orange", "s"))
    for name, label, color, marker in series:
        shortfall.plot(intervals, [batch["scores"][name] for batch in batches], label=f"batch: {label}",
                       color=color, marker=marker)
        shortfall.plot([realtime_x], [realtime[name]], color=color, marker="*", markersize=14, linestyle="none")
    shortfall.axhline(realtime["shortfall_units"], color="tab:blue", linestyle="--",
                      label=f"real-time engine: {realtime['oversold_units']} oversold, "
                            f"{realtime['stale_refused_units']} stale refused units")
    shortfall.set_title("shortfall per day against the sync interval T")
    shortfall.set_ylabel("units per day")

    fill.plot(intervals, [batch["scores"]["fill_rate"] * 100 for batch in batches], color="tab:purple", marker="o",
              label="batch")
    fill.plot([realtime_x], [realtime["fill_rate"] * 100], color="tab:blue", marker="*", markersize=14, linestyle="none")
    fill.axhline(realtime["fill_rate"] * 100, color="tab:blue", linestyle="--",
                 label=f"real-time engine: {realtime['fill_rate'] * 100:.2f}%")
    fill.set_title("fill rate: units confirmed and in stock / units ordered")
    fill.set_ylabel("fill rate (%)")

    corrections.plot(intervals, [batch["corrections"] for batch in batches], color="tab:green", marker="o",
                     label="batch: (channel, SKU) copies corrected")
    corrections.plot([realtime_x], [0], color="tab:blue", marker="*", markersize=14, linestyle="none",
                     label="real-time engine: no copies, 0")
    corrections.set_title("reconciliation corrections per day")
    corrections.set_ylabel("corrections per day")

    for axis in (shortfall, fill, corrections):
        axis.set_xscale("log")
        axis.set_xticks(ticks)
        axis.set_xticklabels(tick_labels)
        axis.xaxis.set_minor_locator(ticker.NullLocator())
        axis.set_xlim(realtime_x / 1.6, max(intervals) * 1.6)
        axis.set_xlabel("sync interval T (minutes, log scale)")
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=8)
    for axis in (shortfall, corrections):
        top = axis.get_ylim()[1]
        axis.set_ylim(-0.03 * top, top)  # the real-time zero stays visible above the axis
    day = result["day"]
    figure.suptitle(f"batch vs real-time availability: {day['orders']:,} orders over {day['day_hours']:g} h, "
                    f"{len(day['channels'])} channels, {day['skus']} SKUs (seed {result['config']['seed']})", fontsize=11)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    pyplot.close(figure)
    return f"wrote {path}"

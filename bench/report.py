"""The bench's and the load test's output: ratios between systems, the printed table, the PNG plots."""

from __future__ import annotations

PEER_ORDER = ("echo", "engine", "baseline", "redis", "postgres")


def _key(measurement: dict) -> tuple:
    return measurement["workload"], measurement["mode"]


def add_ratios(output: dict) -> None:
    """Each closed-loop measurement gets `ratios`: its requests/s divided by each peer's (same workload and mode)."""
    peers: dict[tuple, dict[str, float]] = {}
    for measurement in output["measurements"]:
        if measurement["mode"] != "paced" and measurement.get("requests_per_second"):
            peers.setdefault(_key(measurement), {})[measurement["system"]] = measurement["requests_per_second"]
    for measurement in output["measurements"]:
        if measurement["mode"] == "paced" or not measurement.get("requests_per_second"):
            continue
        rate = measurement["requests_per_second"]
        measurement["ratios"] = {f"vs_{name}": round(rate / other, 3)
                                 for name, other in peers.get(_key(measurement), {}).items() if name != measurement["system"]}
    output["echo_over_engine"] = {
        f"{workload}/{mode}": round(rates["echo"] / rates["engine"], 2)
        for (workload, mode), rates in peers.items() if "echo" in rates and "engine" in rates
    }


def echo_warnings(output: dict, ratio_min: float) -> list[str]:
    """The generator must not be the bottleneck: echo must run well above the engine."""
    return [f"{name}: echo/engine = {ratio} < {ratio_min}: the generator may be the bottleneck; the engine "
            f"figures are a lower bound (try --generator-processes 2)"
            for name, ratio in output.get("echo_over_engine", {}).items() if ratio < ratio_min]


def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and digits == 0:
        return f"{value:,.0f}"
    return f"{value:,.{digits}f}"


def table(output: dict) -> str:
    header = ("workload", "mode", "system", "req/s", "granted/s", "p50 ms", "p99 ms", "p99.9 ms", "fsync p99", "cpu us/req",
              "x echo", "engine/x", "verified")
    rows = [header]
    ordered = sorted(output["measurements"], key=lambda m: (
        list(dict.fromkeys(x["workload"] for x in output["measurements"])).index(m["workload"]),
        ("pooled", "pipelined", "paced").index(m["mode"]) if m["mode"] in ("pooled", "pipelined", "paced") else 9,
        PEER_ORDER.index(m["system"]) if m["system"] in PEER_ORDER else 9,
        m.get("rate_target") or 0,
    ))
    for m in ordered:
        verification = m.get("verification", {})
        if m.get("error"):
            verified = "ERROR"
        elif not verification.get("checked"):
            verified = "n/a"
        elif verification.get("ok"):
            verified = "ok"
        else:
            verified = f"FAIL oversold={verification.get('oversold_sku_locations')} mism={verification.get('mismatched_sku_locations')}"
        ratios = m.get("ratios", {})
        engine_over = None
        if m["system"] != "engine" and ratios.get("vs_engine"):
            engine_over = 1 / ratios["vs_engine"]
        rows.append((
            m["workload"], m["label"], m["system"], _fmt(m.get("requests_per_second"), 0),
            _fmt(m.get("granted_reserves_per_second"), 0), _fmt(m.get("latency_ms_p50")), _fmt(m.get("latency_ms_p99")),
            _fmt(m.get("latency_ms_p999")), _fmt((m.get("disk_probe") or {}).get("fsync_ms_p99")),
            _fmt(m.get("server_cpu_us_per_request"), 1),
            _fmt(ratios.get("vs_echo")), _fmt(engine_over), verified,
        ))
    for name, info in output["systems"].items():
        if info["status"] == "missing":
            rows.append(("*", "*", name, "missing", "", "", "", "", "", "", "", "", info["reason"][:60]))
    widths = [max(len(str(row[column])) for row in rows) for column in range(len(header))]
    lines = []
    for number, row in enumerate(rows):
        cells = [str(cell).ljust(width) if column < 3 or column == len(header) - 1 else str(cell).rjust(width)
                 for column, (cell, width) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
        if number == 0:
            lines.append("  ".join("-" * width for width in widths))
    ratios = output.get("echo_over_engine", {})
    if ratios:
        lines.append("")
        lines.append("echo/engine requests/s (>= 1.5 for a valid run): " + ", ".join(f"{key} {value}" for key, value in ratios.items()))
    lines.append("x echo: requests/s relative to the echo server; engine/x: how many times the engine's requests/s")
    lines.append("paced: latency from each request's scheduled send time; cpu: server utime+stime per request")
    lines.append("fsync p99: one-record durable LMDB commits timed just before that paced run (bench/disk_probe.py)")
    return "\n".join(lines)


NO_MATPLOTLIB = ("no plot: matplotlib is not installed; install it with "
                 "`.venv/bin/python -m pip install -e '.[bench]'` (or run scripts/install-peers)")


def _pyplot():
    """matplotlib's pyplot on the Agg backend (files only, no display), or None when it is missing."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    return pyplot


def plot(output: dict, path: str) -> str:
    """The bench's PNG: per workload/mode, requests/s and p99 per second of every system. Returns what it did."""
    pyplot = _pyplot()
    if pyplot is None:
        return NO_MATPLOTLIB

    panels: dict[tuple, list] = {}
    for m in output["measurements"]:
        if m.get("series"):
            panels.setdefault((m["workload"], m["label"] if m["mode"] != "paced" else "paced"), []).append(m)
    if not panels:
        return "no plot: no measurements"
    keys = list(panels)
    figure, axes = pyplot.subplots(len(keys), 2, figsize=(13, 2.6 * len(keys)), squeeze=False)
    colors = {"echo": "tab:gray", "engine": "tab:blue", "baseline": "tab:cyan", "redis": "tab:red", "postgres": "tab:green"}
    for row, key in enumerate(keys):
        throughput, latency = axes[row]
        for m in panels[key]:
            seconds = [point["second"] + 0.5 for point in m["series"]]
            label = m["system"] if m["mode"] != "paced" else f"{m['system']} @{m['rate_target']:,.0f}/s"
            color = colors.get(m["system"])
            throughput.plot(seconds, [point["requests"] for point in m["series"]], label=label, color=color, marker=".")
            latency.plot(seconds, [point["latency_ms_p99"] or float("nan") for point in m["series"]], label=label,
                         color=color, marker=".")
        throughput.set_title(f"{key[0]} / {key[1]}: requests per second")
        latency.set_title(f"{key[0]} / {key[1]}: p99 latency (ms)")
        latency.set_yscale("log")
        throughput.set_ylim(bottom=0)
        for axis in (throughput, latency):
            axis.set_xlabel("second of the window")
            axis.grid(True, alpha=0.3)
            axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    pyplot.close(figure)
    return f"wrote {path}"


def plot_run(measurement: dict, title: str, path: str) -> str:
    """One run's PNG: requests/s and granted reserves/s per second, and p50/p99 latency per second.

    Returns what it did (the path written, or why there is no plot).
    """
    pyplot = _pyplot()
    if pyplot is None:
        return NO_MATPLOTLIB
    from matplotlib import ticker

    series = measurement["series"]
    if not series:
        return "no plot: no seconds measured"
    seconds = [point["second"] + 0.5 for point in series]  # each bucket drawn at its middle
    figure, (throughput, latency) = pyplot.subplots(1, 2, figsize=(13, 4.2))
    throughput.plot(seconds, [point["requests"] for point in series], label="requests/s", color="tab:blue", marker=".")
    throughput.plot(seconds, [point["granted"] for point in series], label="granted reserves/s", color="tab:green", marker=".")
    throughput.set_title("throughput, per second of the window")
    throughput.set_ylabel("replies per second")
    throughput.set_ylim(bottom=0)
    for name, color in (("p50", "tab:blue"), ("p99", "tab:red")):
        latency.plot(seconds, [point[f"latency_ms_{name}"] or float("nan") for point in series], label=name,
                     color=color, marker=".")
    latency.set_title("latency of the replies in each second")
    latency.set_ylabel("latency (ms, log scale)")
    latency.set_yscale("log")
    # Plain numbers (1, 1.5, 2, 3, 5, 7, 10 ms ...) instead of powers of ten.
    latency.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 1.5, 2.0, 3.0, 5.0, 7.0)))
    latency.yaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}"))
    latency.yaxis.set_minor_formatter(ticker.NullFormatter())
    for axis in (throughput, latency):
        axis.set_xlabel("seconds into the measured window")
        axis.set_xlim(0, len(series))
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    pyplot.close(figure)
    return f"wrote {path}"

"""What serving Prometheus metrics costs the engine: requests/s with `/metrics` served and
scraped every second against the same engine without metrics, in one run.

Two servers of this checkout run side by side: `engine` (no metrics) and `engine+metrics`
(`--metrics-port 0`, scraped every --scrape-interval seconds by a thread for the whole run).
The bench generator (`python -m bench`'s) loads one at a time, alternating which goes first
in each round, for --rounds rounds per mode; the machine is shared and noisy, so the medians
are compared. Every run is verified like `python -m bench` (no oversell, stock equals the
acknowledged history).

    .venv/bin/python -m bench.metrics_overhead --rounds 5 --seconds 8 [--baseline main]

With --baseline REV the engine of that revision (e.g. before the counting for metrics) joins
the rotation: what the counting on the request path costs, next to what serving costs.

Prints one line per run and a summary per mode; writes bench/results/metrics_overhead.json.
Exit status 1 if any run failed its verification or any scrape failed.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import threading
import time
import urllib.request

from bench import cli, systems
from bench.rotation import measure_in_rotation, rate_ratios

RESULTS = cli.RESULTS
# A periodic snapshot is built on the event loop (seconds, once millions of closed reservations
# are kept): it would land in one system's run and swamp what is measured here: periodic snapshots are off.
ENGINE_ARGS = ("--snapshot-interval-seconds", "86400")


class Scraper(threading.Thread):
    """GET /metrics every `interval_seconds` until stopped; counts scrapes, failures, time."""

    def __init__(self, url: str, interval_seconds: float):
        super().__init__(name="scraper", daemon=True)
        self.url = url
        self.interval_seconds = interval_seconds
        self.stopped = threading.Event()
        self.scrapes = 0
        self.failures: list[str] = []
        self.seconds_max = 0.0
        self.bytes_last = 0

    def run(self) -> None:
        next_at = time.monotonic()
        while not self.stopped.is_set():
            started = time.monotonic()
            try:
                with urllib.request.urlopen(self.url, timeout=5) as response:
                    body = response.read()
                if b"engine_requests_total" not in body:
                    raise ValueError("no engine_requests_total in the scrape")
                self.scrapes += 1
                self.bytes_last = len(body)
            except Exception as error:  # reported at the end, and fails the run
                self.failures.append(f"{type(error).__name__}: {error}")
            self.seconds_max = max(self.seconds_max, time.monotonic() - started)
            next_at += self.interval_seconds
            self.stopped.wait(max(0.0, next_at - time.monotonic()))


def metrics_url(system: systems.RunningSystem) -> str:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        match = re.search(r"metrics on (http://\S+/metrics)", system.log_tail(20_000))
        if match:
            return match.group(1)
        time.sleep(0.05)
    raise RuntimeError(f"{system.name}: no 'metrics on' line in its log")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.metrics_overhead", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="runs per system and mode (default %(default)s)")
    parser.add_argument("--seconds", type=float, default=8.0, help="measured seconds per run (default %(default)s)")
    parser.add_argument("--modes", default="pipelined,pooled", help="comma list of pooled, pipelined (default %(default)s)")
    parser.add_argument("--workload", default="hot", choices=sorted(cli.WORKLOADS), help="default %(default)s")
    parser.add_argument("--scrape-interval", type=float, default=1.0, help="seconds between scrapes (default %(default)s)")
    parser.add_argument("--baseline", metavar="REV", default=None,
                        help="also alternate the engine of git revision REV (e.g. main: before the counting for metrics)")
    parser.add_argument("--output", default=str(RESULTS / "metrics_overhead.json"))
    options = parser.parse_args(argv)
    args = cli.parse_args(["--systems", "engine", "--seconds", str(options.seconds), "--warmup-seconds", "1"])
    modes = [mode for mode in options.modes.split(",") if mode]

    running: list[systems.RunningSystem] = []
    scraper = None
    ok = True
    try:
        running.append(systems.start_engine("engine", extra_args=ENGINE_ARGS))
        served = systems.start_engine("engine+metrics", extra_args=(*ENGINE_ARGS, "--metrics-port", "0"))
        running.append(served)
        if options.baseline:
            running.append(systems.start_baseline(options.baseline, ENGINE_ARGS))
        scraper = Scraper(metrics_url(served), options.scrape_interval)
        scraper.start()
        results, ok = measure_in_rotation(
            args, running, options.workload, modes, options.rounds, options.seconds, int(time.time()) % 100_000 * 100, 15,
        )
    finally:
        if scraper is not None:
            scraper.stopped.set()
            scraper.join(timeout=10)
        for system in running:
            system.stop()

    print(f"\n{options.workload}, {args.connections} connections, {options.seconds:g} s per run, {options.rounds} rounds, "
          f"metrics scraped every {options.scrape_interval:g} s ({scraper.scrapes} scrapes, {len(scraper.failures)} failed, "
          f"longest {scraper.seconds_max * 1000:.1f} ms, {scraper.bytes_last:,} bytes)")
    summary: dict[str, dict] = {}
    for mode in modes:
        summary[mode] = {}
        reference = results[mode]["engine"]
        for name, runs in results[mode].items():
            rate = statistics.median(run["requests_per_second"] for run in runs)
            cpu = statistics.median(run["server_cpu_us_per_request"] or 0 for run in runs)
            entry = {"requests_per_second_median": rate, "cpu_us_per_request_median": cpu}
            line = f"{mode:>9} {name:>15}: {rate:>9,.0f} req/s, {cpu:5.1f} us/req (medians)"
            if name != "engine":
                # Each round's runs were back to back: their ratios are less exposed to slow drifts
                # of the machine's load than the ratio of the medians; server CPU per request is
                # less exposed to other processes taking the cores than requests/s.
                ratio_of_medians, paired = rate_ratios(runs, reference)
                paired_cpu = statistics.median(run["server_cpu_us_per_request"] / other["server_cpu_us_per_request"]
                                               for run, other in zip(runs, reference))
                entry.update(paired_ratio_median=round(paired, 4), paired_cpu_ratio_median=round(paired_cpu, 4))
                line += (f"; against engine: medians {(ratio_of_medians - 1) * 100:+.1f} %,"
                         f" median of the rounds' ratios: req/s {(paired - 1) * 100:+.1f} %, CPU per request {(paired_cpu - 1) * 100:+.1f} %")
            summary[mode][name] = entry
            print(line)
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(options.output, "w") as output:
        json.dump({"options": vars(options), "machine": cli.machine_info(), "summary": summary,
                   "scrapes": scraper.scrapes, "scrape_failures": scraper.failures[:10],
                   "runs": {mode: {name: [{key: run[key] for key in ("requests_per_second", "server_cpu_us_per_request", "latency_ms_p99")}
                                          for run in runs] for name, runs in by_system.items()} for mode, by_system in results.items()}},
                  output, indent=2)
    if scraper.failures:
        print(f"scrape failures: {scraper.failures[:3]}", file=sys.stderr)
    return 0 if ok and not scraper.failures else 1


if __name__ == "__main__":
    sys.exit(main())

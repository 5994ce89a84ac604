"""Systems measured in rotation: for A-versus-B figures on a shared, noisy machine.

Each round measures every system once per mode, back to back, and a different system goes first
in each round, so a slow drift of the machine's load falls on all of them alike. The medians
over rounds, and the median of each round's paired ratio, are what the overhead benches compare.
"""

from __future__ import annotations

import statistics
from typing import Any, Sequence

from bench import cli


def measure_in_rotation(
    args: Any, running: Sequence[Any], workload: str, modes: Sequence[str], rounds: int, seconds: float,
    run_number: int, name_width: int = 15,
) -> tuple[dict[str, dict[str, list[dict]]], bool]:
    """`rounds` rounds of one `cli.measure` per system and mode, each round starting with the
    next system. Returns the measurements by mode and system name, and whether all verified."""
    assert rounds >= 1 and running
    results: dict[str, dict[str, list[dict]]] = {mode: {system.name: [] for system in running} for mode in modes}
    ok = True
    for round_index in range(rounds):
        for mode in modes:
            shift = round_index % len(running)  # each system goes first in turn
            for system in [*running[shift:], *running[:shift]]:
                run_number += 1
                measurement = cli.measure(args, system, workload, mode, None, seconds, run_number)
                ok = ok and measurement["verification"]["ok"]
                results[mode][system.name].append(measurement)
                print(f"round {round_index + 1} {mode:>9} {system.name:>{name_width}}: {measurement['requests_per_second']:>9,.0f} req/s"
                      f"  cpu {measurement['server_cpu_us_per_request'] or 0:5.1f} us/req"
                      f"  p99 {measurement['latency_ms_p99'] or 0:6.2f} ms"
                      f"  {'ok' if measurement['verification']['ok'] else 'FAILED'}", flush=True)
    return results, ok


def rate_ratios(runs: Sequence[dict], reference: Sequence[dict]) -> tuple[float, float]:
    """`runs` against `reference`, measured in the same rounds (the i-th of each back to back):
    the ratio of their median requests/s, and the median of the rounds' paired ratios. The
    paired ratio is less exposed to slow drifts of the machine's load."""
    assert runs and len(runs) == len(reference)
    ratio_of_medians = (statistics.median(run["requests_per_second"] for run in runs)
                        / statistics.median(run["requests_per_second"] for run in reference))
    paired = statistics.median(run["requests_per_second"] / other["requests_per_second"] for run, other in zip(runs, reference))
    return ratio_of_medians, paired

"""What TLS costs the engine: requests/s over TLS against plaintext, in one run.

Two servers of this checkout run side by side: `engine` (plaintext) and `engine+tls`
(`--tls-cert`/`--tls-key`, a certificate made for this run by trustme; the generator verifies it
against that CA). The bench generator (`python -m bench`'s, its connections made with
`trio.SSLStream` for engine+tls) loads one at a time, alternating which goes first in each
round, for --rounds rounds per mode; the machine is shared and noisy, so medians are compared,
and the median of each round's back-to-back ratio. Every run is verified like `python -m bench`.

    .venv/bin/python -m bench.tls_overhead --rounds 5 --seconds 5

Needs trustme (the test extra: `pip install -e .[test]`). Prints one line per run and a summary
per mode; writes bench/results/tls_overhead.json. Exit status 1 if a run failed its verification.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench import cli, systems
from bench.rotation import measure_in_rotation, rate_ratios
from protocol import TlsOptions

RESULTS = cli.RESULTS
# As in metrics_overhead: a periodic snapshot landing in one system's run would swamp the figures.
ENGINE_ARGS = ("--snapshot-interval-seconds", "86400")
TARGET_RATIO_MIN = 0.75  # issue 12: TLS must not cost more than 25 % of plaintext throughput


def make_certificates(folder: Path) -> tuple[str, str, str]:
    """(CA file, server certificate file, server key file) for 127.0.0.1, made now."""
    import trustme

    ca = trustme.CA()
    server = ca.issue_cert(systems.HOST, "localhost")
    ca_file, cert_file, key_file = folder / "ca.pem", folder / "server.pem", folder / "server-key.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    server.cert_chain_pems[0].write_to_path(str(cert_file))
    server.private_key_pem.write_to_path(str(key_file))
    return str(ca_file), str(cert_file), str(key_file)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tls_overhead", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="runs per system and mode (default %(default)s)")
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per run (default %(default)s)")
    parser.add_argument("--modes", default="pooled,pipelined", help="comma list of pooled, pipelined (default %(default)s)")
    parser.add_argument("--workload", default="hot", choices=sorted(cli.WORKLOADS), help="default %(default)s")
    parser.add_argument("--generator-tls", choices=("lean", "sslstream"), default="lean",
                        help="the generator's TLS client: bench/tls_stream.py (lean) or trio.SSLStream (default %(default)s)")
    parser.add_argument("--output", default=str(RESULTS / "tls_overhead.json"))
    options = parser.parse_args(argv)
    args = cli.parse_args(["--systems", "engine", "--seconds", str(options.seconds), "--warmup-seconds", "1"])
    modes = [mode for mode in options.modes.split(",") if mode]

    certificates = Path(tempfile.mkdtemp(prefix="bench-tls-"))
    running: list[systems.RunningSystem] = []
    ok = True
    try:
        ca_file, cert_file, key_file = make_certificates(certificates)
        running.append(systems.start_engine("engine", extra_args=ENGINE_ARGS))
        over_tls = systems.start_engine("engine+tls", extra_args=(*ENGINE_ARGS, "--tls-cert", cert_file, "--tls-key", key_file))
        over_tls.tls = TlsOptions(ca_file=ca_file)
        over_tls.tls_library = options.generator_tls
        running.append(over_tls)
        results, ok = measure_in_rotation(
            args, running, options.workload, modes, options.rounds, options.seconds, int(time.time()) % 100_000 * 100, 11,
        )
    finally:
        for system in running:
            system.stop()
        shutil.rmtree(certificates, ignore_errors=True)

    print(f"\n{options.workload}, {args.connections} connections (pipelined: depth {args.depth}), "
          f"{options.seconds:g} s per run, {options.rounds} rounds, generator TLS: {options.generator_tls}")
    summary: dict[str, dict] = {}
    for mode in modes:
        summary[mode] = {}
        plain, over_tls = results[mode]["engine"], results[mode]["engine+tls"]
        for name, runs in results[mode].items():
            rate = statistics.median(run["requests_per_second"] for run in runs)
            cpu = statistics.median(run["server_cpu_us_per_request"] or 0 for run in runs)
            summary[mode][name] = {"requests_per_second_median": rate, "cpu_us_per_request_median": cpu}
            print(f"{mode:>9} {name:>11}: {rate:>9,.0f} req/s, {cpu:5.1f} us/req (medians)")
        ratio_of_medians, paired = rate_ratios(over_tls, plain)
        verdict = "meets" if min(ratio_of_medians, paired) >= TARGET_RATIO_MIN else "MISSES"
        summary[mode]["tls_over_plaintext"] = {"ratio_of_medians": round(ratio_of_medians, 4), "paired_ratio_median": round(paired, 4)}
        print(f"{mode:>9} TLS / plaintext: {ratio_of_medians:.2f} (medians), {paired:.2f} (median of the rounds' ratios): "
              f"{verdict} the target >= {TARGET_RATIO_MIN:.2f}")
    Path(options.output).parent.mkdir(parents=True, exist_ok=True)
    Path(options.output).write_text(json.dumps({"options": vars(options), "machine": cli.machine_info(),
                                                "summary": summary, "runs": results}, indent=1, default=str))
    print(f"wrote {options.output}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

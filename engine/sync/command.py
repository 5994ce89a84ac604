"""`python -m engine sync`: its arguments, signals and exit codes.

    python -m engine sync --connect 127.0.0.1:7440 --to sqlite:///sync.db --metrics-port 9480
    python -m engine sync --to postgresql://reports@db.internal/inventory
    ENGINE_TOKEN=... python -m engine sync --connect db.example:7440 --tls-ca ca.pem --to sqlite:///sync.db
    python -m engine sync --to sqlite:///sync.db --retry-dead-letters

Exit codes: 0 stopped by SIGTERM/SIGINT (the open batch commits first) or a finished
`--retry-dead-letters`; 2 bad arguments (an unusable TLS file among them), a database the sync
cannot use, or an engine that refuses the sync (a wrong token; TLS that a retry cannot mend: a
server certificate that does not verify, a client certificate missing or refused); 3 the read
model cannot resume from the engine's log (`CannotResume`); 4 too many dead letters.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from protocol import DEFAULT_HOST, DEFAULT_PORT, TlsOptionsError, add_connect_arguments, connect_options, parse_address

from .databases import UnsupportedDatabase, check_url, describe
from .settings import SyncSettings

log = logging.getLogger("engine.sync")

DEFAULT_URL = "sqlite:///sync.db"
EXIT_STOPPED = 0
EXIT_USAGE = 2
EXIT_CANNOT_RESUME = 3
EXIT_TOO_MANY_DEAD_LETTERS = 4


def add_sync_parser(commands: argparse._SubParsersAction) -> None:
    """Add the `sync` subcommand to the engine's command line."""
    defaults = SyncSettings(host=DEFAULT_HOST, port=DEFAULT_PORT, url=DEFAULT_URL)
    sync = commands.add_parser("sync", help="keep a SQL read model (stock, reservations) in step with the engine")
    sync.add_argument("--connect", default=f"{DEFAULT_HOST}:{DEFAULT_PORT}", metavar="HOST:PORT", help="the engine (default %(default)s)")
    sync.add_argument("--to", default=DEFAULT_URL, metavar="URL",
                      help="sqlite:///PATH (default %(default)s; sqlite:////abs/path for an absolute path) or postgresql://...")
    sync.add_argument("--retry-dead-letters", action="store_true", help="apply the dead letters again, report, and exit")
    sync.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics on this port")
    sync.add_argument("--metrics-host", default="127.0.0.1", help="address for --metrics-port (default %(default)s)")
    sync.add_argument("--batch-events-max", type=int, default=defaults.batch_events_max, help="events per database transaction")
    sync.add_argument("--batch-window-ms", type=int, default=int(defaults.batch_window_seconds * 1000),
                      help="how long a batch waits to fill (default %(default)s)")
    sync.add_argument("--progress-seconds", type=float, default=defaults.progress_seconds, help="progress line interval")
    sync.add_argument("--dead-letters-max", type=int, default=defaults.dead_letters_max,
                      help="stop when the dead-letter table holds this many (default %(default)s)")
    sync.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    add_connect_arguments(sync)  # --token, --token-file, --tls-ca, ...: as the shell and the load test


def run_sync_command(args: argparse.Namespace) -> int:
    """Run `python -m engine sync` with parsed `args`; return the exit code."""
    # Imported here, not at the top: `python -m engine serve` builds this parser too, and should
    # not load the sync (prometheus-client alone is ~20 ms of a start measured from process start).
    from .consumer import CannotResume, EngineRefused, TooManyDeadLetters, run_sync
    from .metrics import SyncMetrics

    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        settings = _settings(args)
        if args.retry_dead_letters:
            return _retry_dead_letters(settings.url)
    except (UnsupportedDatabase, ValueError) as error:
        log.error("%s", error)
        return EXIT_USAGE
    metrics = SyncMetrics()
    if args.metrics_port is not None:
        metrics.serve(args.metrics_port, args.metrics_host)
        log.info("metrics on http://%s:%d/metrics", args.metrics_host, args.metrics_port)
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        log.info("received %s: finishing the open batch and stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info("sync %s:%d%s -> %s", settings.host, settings.port, " (TLS)" if settings.tls else "", describe(settings.url))
    try:
        run_sync(settings, metrics, stop)
    except (UnsupportedDatabase, EngineRefused, TlsOptionsError) as error:
        log.error("%s", error)
        return EXIT_USAGE
    except CannotResume as error:
        log.error("cannot resume: %s", error)
        return EXIT_CANNOT_RESUME
    except TooManyDeadLetters as error:
        log.error("%s", error)
        return EXIT_TOO_MANY_DEAD_LETTERS
    log.info("stopped: %s", metrics.progress_line())
    return EXIT_STOPPED


def main(argv: list[str] | None = None) -> int:
    """`python -m engine.sync ...`: the same as `python -m engine sync ...`."""
    parser = argparse.ArgumentParser(prog="python -m engine")
    add_sync_parser(parser.add_subparsers(dest="command", required=True))
    return run_sync_command(parser.parse_args(["sync", *(sys.argv[1:] if argv is None else argv)]))


def _settings(args: argparse.Namespace) -> SyncSettings:
    try:
        host, port = parse_address(args.connect)
    except ValueError as error:
        raise ValueError(f"--connect: {error}") from None
    if args.batch_events_max < 1 or args.batch_window_ms < 0 or args.dead_letters_max < 1 or args.progress_seconds <= 0:
        raise ValueError("--batch-events-max, --dead-letters-max and --progress-seconds must be positive, --batch-window-ms >= 0")
    check_url(args.to)
    connect = connect_options(args)  # ConnectOptionsError is a ValueError
    return SyncSettings(
        host=host, port=port, url=args.to, token=connect.token, tls=connect.tls,
        batch_events_max=args.batch_events_max, batch_window_seconds=args.batch_window_ms / 1000,
        progress_seconds=args.progress_seconds, dead_letters_max=args.dead_letters_max,
    )


def _retry_dead_letters(url: str) -> int:
    from .databases import open_database
    from .sink import ReadModelSink

    sink = ReadModelSink(open_database(url))
    try:
        sink.create_schema()
        outcome = sink.retry_dead_letters()
        remaining = sink.dead_letter_count()
    finally:
        sink.database.close()
    print(f"retried {outcome.retried} dead letter(s): {outcome.applied} applied, {outcome.still_rejected} still rejected;"
          f" {remaining} left in dead_letters")
    return EXIT_STOPPED

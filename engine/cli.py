"""Command line: `python -m engine serve --host 127.0.0.1 --port 7440 --data DIR`, and `python -m engine shell`."""

from __future__ import annotations

import argparse
import logging
import signal
import sys

import trio

from .access import InsecureListenRefused
from .auth import AuthFileError
from .config import DAY_MS, HOUR_MS, OWNER_TASKS_MAX, SNAPSHOT_BUILDERS, Config
from .data_lock import DataFolderLocked
from .server import RunningServer, process_started_monotonic, run_server
from .tls import TlsConfigError
from .sync import add_sync_parser, run_sync_command

log = logging.getLogger("engine")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m engine", description="Inventory reservation engine")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the server")
    commands.add_parser("shell", help="the admin shell (python -m engine shell --help)", add_help=False)
    defaults = Config()
    serve.add_argument("--host", default=defaults.host, help="listen address (default %(default)s)")
    serve.add_argument("--port", type=int, default=defaults.port, help="listen port, 0 = any free port (default %(default)s)")
    serve.add_argument("--data", default=defaults.data_dir, help="data folder (default ./%(default)s)")
    serve.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics on http://HOST:PORT/metrics (0: any free port; default: not served)")
    serve.add_argument("--token", default=None, help="require `hello` with this token before any other op (one admin token named 'token')")
    serve.add_argument("--auth", metavar="FILE", default=None,
                       help="TOML file of [[tokens]] with name, secret and role (reader, order, admin); re-read on SIGHUP")
    serve.add_argument("--insecure", action="store_true",
                       help="allow listening on a non-loopback address without --auth/--token (logged as a warning)")
    serve.add_argument("--tls-cert", metavar="FILE", default=None, help="serve TLS with this certificate chain (PEM); needs --tls-key")
    serve.add_argument("--tls-key", metavar="FILE", default=None, help="the private key of --tls-cert (PEM)")
    serve.add_argument("--tls-client-ca", metavar="FILE", default=None,
                       help="require client certificates signed by this CA (PEM); needs --tls-cert")
    serve.add_argument("--idle-timeout-seconds", type=float, default=None,
                       help="close a connection with no request and no reply owed for this long (default: never)")
    serve.add_argument("--max-frame-bytes", type=int, default=defaults.max_frame_bytes)
    serve.add_argument("--map-size-mb", type=int, default=defaults.map_size_bytes // 1024**2, help="initial LMDB map size (address space, not disk; default %(default)s)")
    serve.add_argument(
        "--map-size-max-mb", type=int, default=defaults.map_size_max_bytes // 1024**2,
        help="ceiling the LMDB map grows to (doubling) when full; at it, changes are refused with internal (default %(default)s)",
    )
    serve.add_argument("--id-retention-hours", type=float, default=defaults.id_retention_ms / HOUR_MS)
    serve.add_argument("--log-retention-days", type=float, default=defaults.log_retention_ms / DAY_MS)
    serve.add_argument("--snapshot-interval-seconds", type=float, default=defaults.snapshot_interval_seconds)
    serve.add_argument(
        "--snapshot-builder", choices=SNAPSHOT_BUILDERS, default=defaults.snapshot_builder,
        help="build snapshots in a separate process from the log (default) or on the event loop (pauses serving)",
    )
    serve.add_argument(
        "--owner-tasks", type=int, default=defaults.owner_tasks,
        help="owner tasks, each owning a hash partition of the SKU-locations (default %(default)s)",
    )
    serve.add_argument(
        "--snapshot-builder-idle-seconds", type=float, default=defaults.snapshot_builder_idle_seconds,
        help="a snapshot builder idle this long exits, freeing its copy of the state (the next snapshot loads it again); 0: one builder per snapshot (default %(default)s)",
    )
    serve.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    add_sync_parser(commands)
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    return Config(
        host=args.host,
        port=args.port,
        data_dir=args.data,
        metrics_port=args.metrics_port,
        token=args.token,
        auth_file=args.auth,
        insecure=args.insecure,
        tls_cert_file=args.tls_cert,
        tls_key_file=args.tls_key,
        tls_client_ca_file=args.tls_client_ca,
        idle_timeout_seconds=args.idle_timeout_seconds,
        max_frame_bytes=args.max_frame_bytes,
        map_size_bytes=args.map_size_mb * 1024**2,
        map_size_max_bytes=max(args.map_size_max_mb, args.map_size_mb) * 1024**2,
        id_retention_ms=int(args.id_retention_hours * HOUR_MS),
        log_retention_ms=int(args.log_retention_days * DAY_MS),
        snapshot_interval_seconds=args.snapshot_interval_seconds,
        owner_tasks=args.owner_tasks,
        snapshot_builder=args.snapshot_builder,
        snapshot_builder_idle_seconds=args.snapshot_builder_idle_seconds,
    )


async def _serve_until_signalled(config: Config) -> None:
    """Serve until SIGINT or SIGTERM; SIGHUP re-reads the auth file (`AccessControl.reload`)."""
    shutdown = trio.Event()
    # Received from the start: a signal during recovery waits here until the server listens
    # (and SIGHUP, whose default action ends the process, never ends it).
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:

            async def serve(task_status: trio.TaskStatus[RunningServer] = trio.TASK_STATUS_IGNORED) -> None:
                await run_server(config, shutdown=shutdown, process_started_monotonic=process_started_monotonic(), task_status=task_status)
                nursery.cancel_scope.cancel()

            server: RunningServer = await nursery.start(serve)
            async for signum in signals:
                if signum == signal.SIGHUP:
                    log.info("received SIGHUP: re-reading the auth file")
                    server.access.reload()
                    continue
                log.info("received %s: flushing the log and stopping", signal.Signals(signum).name)
                shutdown.set()
                break


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["shell"]:  # the shell parses its own arguments
        from .shell import main as shell_main

        return shell_main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "sync":
        return run_sync_command(args)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if args.command == "serve":
        if (args.tls_cert is None) != (args.tls_key is None) or (args.tls_client_ca is not None and args.tls_cert is None):
            log.error("--tls-cert and --tls-key go together, and --tls-client-ca needs them")
            return 2
        if args.auth is not None and args.token is not None:
            log.error("--auth and --token do not go together: put the token in the auth file (role admin)")
            return 2
        if not 1 <= args.owner_tasks <= OWNER_TASKS_MAX:
            log.error("--owner-tasks must be between 1 and %d", OWNER_TASKS_MAX)
            return 2
        if args.idle_timeout_seconds is not None and args.idle_timeout_seconds <= 0:
            log.error("--idle-timeout-seconds must be positive")
            return 2
        if args.snapshot_builder_idle_seconds < 0:
            log.error("--snapshot-builder-idle-seconds must not be negative")
            return 2
        refusal = None
        exit_code = 0
        interrupted_again = False
        try:
            trio.run(_serve_until_signalled, config_from_args(args))
        except* DataFolderLocked as locked:  # raised inside the signal nursery: a group
            refusal, exit_code = locked.exceptions[0], 1
        except* (InsecureListenRefused, AuthFileError, TlsConfigError) as misconfigured:
            refusal, exit_code = misconfigured.exceptions[0], 2
        except* KeyboardInterrupt:
            # A second SIGINT while the first one's shutdown runs (Ctrl-C twice, or a supervisor
            # and its child both signalled): trio redelivers it when the signal receiver closes.
            # What was acknowledged is durable either way (the log is flushed before replies).
            interrupted_again = True
        if interrupted_again:
            log.warning("interrupted again while stopping")
            return 130
        if refusal is not None:
            log.error("%s", refusal)
            return exit_code
    return 0

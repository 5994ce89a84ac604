"""Command line: `python -m engine serve --host 127.0.0.1 --port 7440 --data DIR`, and `python -m engine shell`."""

from __future__ import annotations

import argparse
import logging
import signal
import sys

import trio

from .config import DAY_MS, HOUR_MS, SNAPSHOT_BUILDERS, Config
from .data_lock import DataFolderLocked
from .server import process_started_monotonic, run_server
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
    serve.add_argument("--metrics-port", type=int, default=None, help="Prometheus metrics port (reserved; not served yet)")
    serve.add_argument("--token", default=None, help="require `hello` with this token before any other op")
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
        max_frame_bytes=args.max_frame_bytes,
        map_size_bytes=args.map_size_mb * 1024**2,
        map_size_max_bytes=max(args.map_size_max_mb, args.map_size_mb) * 1024**2,
        id_retention_ms=int(args.id_retention_hours * HOUR_MS),
        log_retention_ms=int(args.log_retention_days * DAY_MS),
        snapshot_interval_seconds=args.snapshot_interval_seconds,
        snapshot_builder=args.snapshot_builder,
    )


async def _serve_until_signalled(config: Config) -> None:
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:

        async def on_signal() -> None:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for signum in signals:
                    log.info("received %s: flushing the log and stopping", signal.Signals(signum).name)
                    shutdown.set()
                    return

        nursery.start_soon(on_signal)
        await run_server(config, shutdown=shutdown, process_started_monotonic=process_started_monotonic())
        nursery.cancel_scope.cancel()


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
        if args.metrics_port is not None:
            log.warning("--metrics-port %d: metrics are not served yet (reserved for the metrics work)", args.metrics_port)
        refusal = None
        try:
            trio.run(_serve_until_signalled, config_from_args(args))
        except* DataFolderLocked as locked:  # raised inside the signal nursery: a group
            refusal = locked.exceptions[0]
        if refusal is not None:
            log.error("%s", refusal)
            return 1
    return 0

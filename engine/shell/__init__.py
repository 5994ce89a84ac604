"""The admin shell: `python -m engine shell` (and `scripts/shell`).

Interactive (a prompt with history, completion and `help`) or scripted (`-c "cmd; cmd"`, or
commands on stdin; the exit status is that of the first failing command). Offline commands read
a data folder (`--data DIR`), online ones talk to a server (`--connect HOST:PORT`).
"""

from __future__ import annotations

import argparse
import os
import sys

from protocol import ConnectOptionsError, TlsOptionsError, add_connect_arguments, connect_options, parse_address

from .commands import USAGE, Session
from .interactive import HISTORY_FILE_DEFAULT, run_interactive
from .registry import all_commands
from .render import Printer
from .script import run_script

BROKEN_PIPE = 141  # 128 + SIGPIPE, as a shell reports a writer whose reader left


def build_parser() -> argparse.ArgumentParser:
    """The shell's own options (each command has its own parser: `help COMMAND`)."""
    parser = argparse.ArgumentParser(
        prog="python -m engine shell",
        description="Admin shell of the inventory reservation engine. `help` inside lists the commands.",
        epilog='Examples:  python -m engine shell --data ./data -c "snapshots; verify"\n'
               '           python -m engine shell --connect 127.0.0.1:7440 -c "stats"\n'
               '           ENGINE_TOKEN=... python -m engine shell --connect db.example:7440 --tls-ca ca.pem -c "stats"',
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--data", default=None, help="a data folder for the offline commands (read-only)")
    parser.add_argument("--connect", type=parse_address, default=None, metavar="HOST:PORT", help="a running server for the online commands")
    parser.add_argument("--json", action="store_true", help="print JSON (one document per result) instead of tables")
    parser.add_argument("--progress", action="store_true", help="draw progress bars on stderr even when it is not a terminal")
    parser.add_argument("-c", dest="commands", default=None, metavar='"CMD; CMD"', help="run these commands and exit")
    parser.add_argument("--history-file", default=HISTORY_FILE_DEFAULT, help="interactive history (default %(default)s)")
    add_connect_arguments(parser)  # --token, --token-file, --tls-ca, ...: as the sync and the load test
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the shell; returns the exit status (0, or that of the first failing command)."""
    try:
        arguments = build_parser().parse_args(argv)
    except SystemExit as exit_request:
        return USAGE if exit_request.code else 0
    try:
        session = Session(
            Printer(sys.stdout, sys.stderr, arguments.json), data_path=arguments.data, address=arguments.connect,
            connect=connect_options(arguments), progress_forced=arguments.progress,
        )
    except (ConnectOptionsError, TlsOptionsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return USAGE
    commands = all_commands()
    try:
        if arguments.commands is not None:
            return run_script(session, commands, arguments.commands)
        if not sys.stdin.isatty():
            return run_script(session, commands, sys.stdin.read())
        return run_interactive(session, commands, arguments.history_file)
    except BrokenPipeError:
        # Whoever read stdout stopped (`export | head`). Point stdout at /dev/null so that the
        # interpreter's final flush does not fail again, and exit as a pipe writer does.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return BROKEN_PIPE
    finally:
        session.close()

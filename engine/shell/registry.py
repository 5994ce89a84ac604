"""Every shell command by name, and `help`, which lists them."""

from __future__ import annotations

import argparse

from . import commands_offline, commands_online, reconcile, replay, verify
from .commands import OK, Command, Session
from .data_folder import ShellError

GROUP_TITLES = {
    "offline": "Offline, on a data folder (--data DIR; read-only, safe on a running server's folder):",
    "reconcile": "Reconcile (--data DIR or --connect HOST:PORT):",
    "online": "Online, against a running server (--connect HOST:PORT; --token-file, --tls-ca: python -m engine shell --help):",
    "shell": "The shell:",
}


def _help_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("topic", nargs="?", metavar="COMMAND", help="a command to explain")


def _help(session: Session, arguments: argparse.Namespace) -> int:
    commands = all_commands()
    printer = session.printer
    if arguments.topic is not None:
        command = commands.get(arguments.topic)
        if command is None:
            raise ShellError(f"unknown command {arguments.topic!r}")
        printer.out.write(command.parser().format_help())
        return OK
    for group, title in GROUP_TITLES.items():
        printer.out.write(f"{title}\n")
        for command in commands.values():
            if command.group == group:
                printer.out.write(f"  {command.name:<10} {command.summary}\n")
    printer.out.write("\n`help COMMAND` or `COMMAND --help` for its options; --json on any command prints JSON.\n")
    return OK


HELP = Command("help", "list the commands, or explain one: help [COMMAND]", "shell", _help_arguments, _help)


def all_commands() -> dict[str, Command]:
    """Every command, by name, in the order `help` lists them."""
    commands = [
        *commands_offline.COMMANDS, *replay.COMMANDS, *verify.COMMANDS, *reconcile.COMMANDS, *commands_online.COMMANDS, HELP,
    ]
    return {command.name: command for command in commands}

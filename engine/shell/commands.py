"""What every shell command shares: its description, its argument parser, the session it runs
in (data folder, server connection, printer), and running one command line."""

from __future__ import annotations

import argparse
import shlex
import ssl
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import msgpack

from protocol import Client, ConnectionClosed, ConnectOptions, ProtocolViolation, ServerError, tls_refusal

from .data_folder import DataFolder, ShellError
from .render import Printer, Progress, progress_wanted

# Exit statuses of one command (and of the shell, which exits with its first failing one).
OK = 0
FAILED = 1  # the command ran and found a problem, or could not do its work
USAGE = 2  # the command line was wrong
INTERRUPTED = 130  # Ctrl-C, as a shell reports SIGINT

CLIENT_TIMEOUT_SECONDS = 10.0


class UsageError(Exception):
    """A command line the command's parser refuses."""


class HelpShown(Exception):
    """`CMD --help` printed its help: the command is done."""


class CommandParser(argparse.ArgumentParser):
    """argparse that raises instead of exiting the process (a shell outlives a bad command line)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}")

    def exit(self, status: int = 0, message: str | None = None) -> None:  # type: ignore[override]
        if message:
            raise UsageError(message.strip())
        raise HelpShown()


@dataclass
class Session:
    """What commands run against: the data folder and server given to the shell, and the printer.

    `connect` (token and TLS) applies to every connection, to `--connect` and to a command's own
    `--connect`. Its TLS context is built here, once: a CA or certificate file the shell cannot
    use raises `TlsOptionsError` before any command runs."""

    printer: Printer
    data_path: str | None = None
    address: tuple[str, int] | None = None
    connect: ConnectOptions = field(default_factory=ConnectOptions)
    progress_forced: bool = False
    _clients: dict[tuple[str, int], Client] = field(default_factory=dict, repr=False)
    _ssl_context: ssl.SSLContext | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.connect.tls is not None:
            self._ssl_context = self.connect.tls.ssl_context()

    @contextmanager
    def data_folder(self, path: str | None = None) -> Iterator[DataFolder]:
        """The data folder (`path`, or the shell's `--data`), opened read-only for one command:
        each command sees the folder as it is now, even while a server writes to it."""
        path = path or self.data_path
        if path is None:
            raise ShellError("this command reads a data folder: start the shell with --data DIR")
        folder = DataFolder(path)
        try:
            yield folder
        finally:
            folder.close()

    def client(self, address: tuple[str, int] | None = None) -> Client:
        """A connected, greeted client to the server at `address` (default: the shell's
        `--connect`), kept for the session and closed at its end."""
        address = address or self.address
        client = self._clients.get(address) if address is not None else None
        if client is None:
            client = self.new_client(address)
            self._clients[address] = client
        return client

    def new_client(self, address: tuple[str, int] | None) -> Client:
        """A fresh connection (a `watch` turns its connection into an event stream, so it gets its own)."""
        if address is None:
            raise ShellError("this command talks to a server: start the shell with --connect HOST:PORT")
        host, port = address
        tls = self.connect.tls
        try:
            client = Client(host, port, timeout_seconds=CLIENT_TIMEOUT_SECONDS, ssl_context=self._ssl_context,
                            server_hostname=None if tls is None else tls.server_hostname(host))
        except OSError as error:  # ssl.SSLError is one
            raise ShellError(f"cannot connect to {host}:{port}: {tls_refusal(error, tls) or error}") from None
        try:
            # With TLS 1.3 a server that refuses our client certificate says so at the first read.
            client.hello(token=self.connect.token, client="engine-shell")
        except (ConnectionClosed, OSError) as error:
            client.close()
            refusal = tls_refusal(error, tls)
            if refusal is None:
                raise
            raise ShellError(f"cannot connect to {host}:{port}: {refusal}") from None
        except BaseException:
            client.close()
            raise
        return client

    def progress(self, label: str, total: int) -> Progress:
        """A progress bar on stderr: drawn on a terminal or with `--progress`."""
        return Progress(label, total, self.printer.err, progress_wanted(self.printer.err, self.progress_forced))

    def close(self) -> None:
        """Close the session's connections (the next online command connects again)."""
        for client in self._clients.values():
            client.close()
        self._clients.clear()


@dataclass(frozen=True)
class Command:
    """One shell command: `add_arguments` builds its parser, `run` does the work and returns an
    exit status (OK, FAILED)."""

    name: str
    summary: str
    group: str  # "online", "offline", "reconcile", "shell": how `help` lists them
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[Session, argparse.Namespace], int]
    details: str = ""  # more help text after the summary

    def parser(self) -> CommandParser:
        """A fresh parser for this command (parsers keep no state between command lines)."""
        parser = CommandParser(
            prog=self.name, description=f"{self.summary}\n\n{self.details}".strip(), exit_on_error=False,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        self.add_arguments(parser)
        parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
        return parser


def run_command_line(session: Session, commands: dict[str, Command], line: str) -> int:
    """Parse and run one command line; print what went wrong and return the exit status."""
    printer = session.printer
    try:
        words = shlex.split(line)
    except ValueError as error:
        printer.note(f"error: {error}")
        return USAGE
    if not words:
        return OK
    command = commands.get(words[0])
    if command is None:
        printer.note(f"error: unknown command {words[0]!r} (`help` lists the commands)")
        return USAGE
    try:
        arguments = command.parser().parse_args(words[1:])
    except HelpShown:
        return OK
    except (UsageError, argparse.ArgumentError) as error:
        printer.note(f"error: {error}")
        return USAGE
    as_json_before = printer.as_json
    printer.as_json = printer.as_json or arguments.json
    try:
        return command.run(session, arguments)
    except ShellError as error:
        printer.note(f"error: {command.name}: {error}")
    except ServerError as error:
        printer.note(f"error: {command.name}: the server answered {error.code}: {error.reply.get('message', '')}")
    except BrokenPipeError:
        raise  # the reader of our output left (`| head`): nothing more to say, see `main`
    except (OSError, ConnectionClosed, ProtocolViolation) as error:
        session.close()  # the connection is unusable; the next command connects again
        printer.note(f"error: {command.name}: {type(error).__name__}: {error}")
    except (AssertionError, msgpack.UnpackException, msgpack.ExtraData) as error:
        # The storage and the core check every record and snapshot as they are read back:
        # here that means data that does not read back as written (or a bug). Say which.
        printer.note(f"error: {command.name}: the data does not read back as valid: {type(error).__name__}: {error}")
    except KeyboardInterrupt:
        printer.note(f"{command.name}: interrupted")
        return INTERRUPTED
    finally:
        printer.as_json = as_json_before
        printer.out.flush()
    return FAILED

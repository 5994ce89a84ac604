"""The server's access control at run time: the current token table (re-read on SIGHUP), the
counts by token name for metrics, and the rule about listening beyond loopback without auth.

Rotation: `reload` swaps the table that *new* `hello`s are checked against. A connection keeps
the identity it had at its `hello` until it closes or says `hello` again: removing a token stops
new connections with it, not the ones already open (restart, or let pools recycle, to cut them).
"""

from __future__ import annotations

import ipaddress
import logging
from collections import Counter

from .auth import AuthFileError, AuthTable, load_auth_file, single_token_table
from .config import Config

log = logging.getLogger("engine.access")

# Metric label of a connection that has no identity: no auth configured, or no valid hello yet.
ANONYMOUS_NAME = "-"
HELLO_ACCEPTED = "accepted"
HELLO_REFUSED = "refused"


class InsecureListenRefused(Exception):
    """Listening beyond loopback without auth, and without `--insecure`."""


def is_loopback_host(host: str) -> bool:
    """Whether `host` is a loopback address (127.0.0.0/8, ::1) or `localhost`."""
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name other than localhost may resolve anywhere


def check_listen_address(config: Config) -> None:
    """Refuse (raise `InsecureListenRefused`) to serve beyond loopback with no auth, unless
    `config.insecure`; warn when it is allowed that way."""
    if is_loopback_host(config.host) or config.auth_file is not None or config.token is not None:
        return
    if not config.insecure:
        raise InsecureListenRefused(
            f"refusing to listen on {config.host}, which is not a loopback address, without auth: "
            "give --auth FILE (or --token), or --insecure to serve without it"
        )
    log.warning("listening on %s without auth (--insecure): anyone who can reach it may do anything", config.host)


class AccessControl:
    """The current token table (None: no auth, every connection may do everything) and the
    counts by token name. Counting happens at `hello` and at refusals, never per request."""

    def __init__(self, table: AuthTable | None, auth_file: str | None = None):
        self.table = table
        self.auth_file = auth_file
        self.hellos: Counter[tuple[str, str]] = Counter()  # (token name, accepted/refused)
        self.unauthorized: Counter[tuple[str, str]] = Counter()  # (token name, op)
        self.connections_open: Counter[str] = Counter()  # by token name, after a successful hello
        self.reloads: Counter[str] = Counter()  # ok / failed

    @classmethod
    def from_config(cls, config: Config) -> AccessControl:
        """The access control `config` asks for. Raises `AuthFileError` for a bad auth file."""
        if config.auth_file is not None:
            return cls(load_auth_file(config.auth_file), config.auth_file)
        if config.token is not None:
            return cls(single_token_table(config.token))
        return cls(None)

    @property
    def required(self) -> bool:
        """Whether connections must `hello` with a token."""
        return self.table is not None

    def reload(self) -> bool:
        """Re-read the auth file (SIGHUP). On a bad file keep the current table and log why."""
        if self.auth_file is None:
            log.info("no --auth file to reload")
            return False
        try:
            table = load_auth_file(self.auth_file)
        except AuthFileError as error:
            self.reloads["failed"] += 1
            log.error("%s; keeping the %d token(s) loaded before", error, len(self.table or ()))
            return False
        self.table = table
        self.reloads["ok"] += 1
        log.info("reloaded %s: %d token(s): %s", self.auth_file, len(table), ", ".join(table.names))
        return True

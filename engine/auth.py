"""Who may do what: roles, the op -> role table, and the token table read from `--auth FILE`.

The auth file is TOML, an array of tables:

    [[tokens]]
    name = "web-shop"             # appears in logs and metrics; the secret never does
    secret = "..."                # at least SECRET_CHARACTERS_MIN characters
    role = "order"                # reader, order or admin

A presented token is compared with every secret in constant time (`hmac.compare_digest` over
SHA-256 digests, all of them, every time), so neither the reply's timing nor its content tells
which secret, or how much of one, matched.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import tomllib
from dataclasses import dataclass
from typing import Any, Mapping

# Roles, each including the ones below it.
class Role(enum.IntEnum):
    READER = 1
    ORDER = 2
    ADMIN = 3

    @property
    def label(self) -> str:
        """The role's name as the auth file, replies and logs write it."""
        return self.name.lower()


ROLE_OF_LABEL = {role.label: role for role in Role}

# The least role each op needs, by the op's wire name (`metrics.OP_OF_COMMAND` maps command types
# to these names). `hello` needs none. An op missing here needs `admin`: a new op is closed to
# readers and order systems until someone decides otherwise.
ROLE_NEEDED_BY_OP: Mapping[str, Role] = {
    "get": Role.READER, "query": Role.READER, "lookup": Role.READER, "watch": Role.READER,
    "stats": Role.READER, "ping": Role.READER,
    "reserve": Role.ORDER, "release": Role.ORDER, "commit": Role.ORDER, "extend": Role.ORDER,
    "adjust": Role.ADMIN, "count": Role.ADMIN, "transfer": Role.ADMIN, "snapshot": Role.ADMIN,
}


def role_needed(op: str) -> Role:
    """The least role allowed to send `op` (admin for any op the table does not name)."""
    return ROLE_NEEDED_BY_OP.get(op, Role.ADMIN)


# Bounds on the file: a secret short enough to guess is refused, and so is a file that is not an
# auth table (a mistaken path to a large file).
SECRET_CHARACTERS_MIN = 16
SECRET_BYTES_MAX = 1024
NAME_CHARACTERS_MAX = 64
TOKENS_MAX = 1000
AUTH_FILE_BYTES_MAX = 1024 * 1024
# The name of the one admin token of `--token SECRET` (kept for compatibility).
SINGLE_TOKEN_NAME = "token"


class AuthFileError(Exception):
    """The auth file cannot be used; the message names the file and the entry at fault."""


@dataclass(frozen=True)
class Identity:
    """Who a connection said it is at `hello`: the token's name and role (never its secret)."""

    name: str
    role: Role


class AuthTable:
    """Presented token -> `Identity`, in constant time over every secret."""

    def __init__(self, entries: list[tuple[str, str, Role]]):
        # Digests: equal lengths for compare_digest, whatever the lengths of the secrets.
        self._entries = [(_digest(secret), Identity(name, role)) for name, secret, role in entries]
        self.names = tuple(name for name, _, _ in entries)

    def identify(self, presented: str | None) -> Identity | None:
        """The identity whose secret is `presented`, or None. Compares with every secret."""
        if presented is None:
            presented = ""
        offered = _digest(presented)
        found = None
        for digest, identity in self._entries:
            if hmac.compare_digest(offered, digest):  # no early exit: each lookup costs the same
                found = identity
        return found

    def __len__(self) -> int:
        return len(self._entries)


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8")).digest()


def single_token_table(secret: str) -> AuthTable:
    """The table of `--token SECRET`: one admin token named `token`."""
    return AuthTable([(SINGLE_TOKEN_NAME, secret, Role.ADMIN)])


def load_auth_file(path: str) -> AuthTable:
    """Read and check an auth file. Raises `AuthFileError` naming the file and the entry at fault."""
    try:
        with open(path, "rb") as file:
            data = file.read(AUTH_FILE_BYTES_MAX + 1)
    except OSError as error:
        raise AuthFileError(f"auth file {path}: cannot read it: {error.strerror or error}") from error
    if len(data) > AUTH_FILE_BYTES_MAX:
        raise AuthFileError(f"auth file {path}: larger than {AUTH_FILE_BYTES_MAX} bytes")
    return parse_auth_file(data, path)


def parse_auth_file(data: bytes, path: str = "<auth file>") -> AuthTable:
    """Parse and check the TOML text of an auth file (see the module docstring)."""
    try:
        document = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise AuthFileError(f"auth file {path}: not valid TOML: {error}") from error
    unknown_keys = sorted(set(document) - {"tokens"})
    if unknown_keys:
        raise AuthFileError(f"auth file {path}: unknown top-level key(s) {', '.join(unknown_keys)} (expected [[tokens]] tables)")
    tokens = document.get("tokens")
    if not isinstance(tokens, list) or not tokens:
        raise AuthFileError(f"auth file {path}: no [[tokens]] tables")
    if len(tokens) > TOKENS_MAX:
        raise AuthFileError(f"auth file {path}: {len(tokens)} tokens, at most {TOKENS_MAX}")
    entries: list[tuple[str, str, Role]] = []
    names: set[str] = set()
    secrets: set[str] = set()
    for number, table in enumerate(tokens, start=1):
        where = f"auth file {path}: [[tokens]] table {number}"
        name, secret, role = _check_entry(table, where)
        where = f"{where} (name {name!r})"
        if name in names:
            raise AuthFileError(f"{where}: the name is used by an earlier table; names must be unique")
        if secret in secrets:
            raise AuthFileError(f"{where}: the secret is used by an earlier table; each token needs its own")
        names.add(name)
        secrets.add(secret)
        entries.append((name, secret, role))
    return AuthTable(entries)


def _check_entry(table: Any, where: str) -> tuple[str, str, Role]:
    if not isinstance(table, dict):
        raise AuthFileError(f"{where}: not a table")
    unknown_keys = sorted(set(table) - {"name", "secret", "role"})
    if unknown_keys:
        raise AuthFileError(f"{where}: unknown key(s) {', '.join(unknown_keys)} (expected name, secret, role)")
    name, secret, role = table.get("name"), table.get("secret"), table.get("role")
    if not isinstance(name, str) or not name.strip():
        raise AuthFileError(f"{where}: `name` must be a non-empty string")
    if len(name) > NAME_CHARACTERS_MAX or not name.isprintable():
        raise AuthFileError(f"{where}: `name` must be printable and at most {NAME_CHARACTERS_MAX} characters")
    where = f"{where} (name {name!r})"
    if not isinstance(secret, str):
        raise AuthFileError(f"{where}: `secret` must be a string")
    if len(secret) < SECRET_CHARACTERS_MIN:
        raise AuthFileError(f"{where}: `secret` must have at least {SECRET_CHARACTERS_MIN} characters")
    if len(secret.encode("utf-8")) > SECRET_BYTES_MAX:
        raise AuthFileError(f"{where}: `secret` must be at most {SECRET_BYTES_MAX} bytes")
    if role not in ROLE_OF_LABEL:
        raise AuthFileError(f"{where}: `role` must be one of {', '.join(ROLE_OF_LABEL)}, not {role!r}")
    return name, secret, ROLE_OF_LABEL[role]

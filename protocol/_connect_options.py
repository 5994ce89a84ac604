"""The options every tool that connects to a server shares (the admin shell's `--connect`,
`python -m engine sync`, `scripts/loadtest`): the token and TLS, parsed once, named the same in
each tool, and the words each tool uses when TLS refuses a connection.

The token: `--token SECRET` is visible to anyone who can list processes (`ps`, /proc/PID/cmdline),
so `--token-file FILE` and the environment variable ENGINE_TOKEN are offered too.
"""

from __future__ import annotations

import argparse
import os
import ssl
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from ._tls import TlsOptions

TOKEN_ENVIRONMENT_VARIABLE = "ENGINE_TOKEN"

# A token file holds one line. A file bigger than this is the wrong file (a certificate, a log),
# and reading it whole into a hello would only produce a confusing `unauthorized`.
TOKEN_FILE_BYTES_MAX = 4096

# OpenSSL's reasons for a refusal that a retry cannot mend, and what to do about each. The
# server's alerts reach the client during the handshake (TLS 1.2) or at its first read (TLS 1.3).
_REFUSAL_HINTS = {
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "the server requires a client certificate: give --tls-cert and --tls-key",
    "SSLV3_ALERT_HANDSHAKE_FAILURE": "the server refused the handshake (a client certificate it requires? give --tls-cert and --tls-key)",
    "TLSV1_ALERT_UNKNOWN_CA": "the server does not trust our client certificate (--tls-cert): it is not signed by the server's --tls-client-ca",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the server refused our client certificate (--tls-cert)",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "the server refused our client certificate (--tls-cert): it has expired",
    "WRONG_VERSION_NUMBER": "the server does not speak TLS on this port (leave out the --tls options, or check the port)",
}


class ConnectOptionsError(ValueError):
    """Options that do not go together, or a token file that cannot be read; the message says which."""


@dataclass(frozen=True)
class ConnectOptions:
    """The token to send in `hello` (None: none) and how to speak TLS (None: plaintext)."""

    token: str | None = None
    tls: TlsOptions | None = None


def add_connect_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `--token`, `--token-file`, `--tls`, `--tls-ca`, `--tls-cert`, `--tls-key` and
    `--tls-server-name` to a tool's parser; read them back with `connect_options`."""
    group = parser.add_argument_group(
        "token and TLS",
        f"The token: --token-file or --token (not both), else ${TOKEN_ENVIRONMENT_VARIABLE}. "
        "Any --tls-* option turns TLS on.",
    )
    tokens = group.add_mutually_exclusive_group()
    tokens.add_argument("--token", metavar="SECRET", default=None,
                        help="the token sent in hello (the server's --token, or a secret of its --auth file); "
                             f"anyone who can list processes sees it: prefer --token-file or ${TOKEN_ENVIRONMENT_VARIABLE}")
    tokens.add_argument("--token-file", metavar="FILE", default=None, help="read the token from the first line of FILE")
    group.add_argument("--tls", action="store_true",
                       help="connect with TLS, verifying the server against the system's CAs (implied by the options below)")
    group.add_argument("--tls-ca", metavar="FILE", default=None, help="connect with TLS, verifying the server's certificate against this CA (PEM)")
    group.add_argument("--tls-cert", metavar="FILE", default=None,
                       help="present this client certificate (PEM), for a server started with --tls-client-ca")
    group.add_argument("--tls-key", metavar="FILE", default=None, help="the private key of --tls-cert (PEM; default: in the --tls-cert file)")
    group.add_argument("--tls-server-name", metavar="NAME", default=None,
                       help="the name the server's certificate must carry (default: the HOST connected to)")


def connect_options(arguments: argparse.Namespace, environment: Mapping[str, str] = os.environ) -> ConnectOptions:
    """The options `add_connect_arguments` added, checked. Raises `ConnectOptionsError`.

    The TLS files are not opened here: `TlsOptions.ssl_context()` does that, and names the option
    of a file it cannot use."""
    if arguments.tls_key is not None and arguments.tls_cert is None:
        raise ConnectOptionsError("--tls-key goes with --tls-cert")
    if arguments.token_file is not None:
        token: str | None = _read_token_file(arguments.token_file)
    elif arguments.token is not None:
        token = arguments.token
    else:
        token = environment.get(TOKEN_ENVIRONMENT_VARIABLE) or None
    tls = None
    if arguments.tls or any(value is not None for value in (arguments.tls_ca, arguments.tls_cert, arguments.tls_server_name)):
        tls = TlsOptions(arguments.tls_ca, arguments.tls_cert, arguments.tls_key, arguments.tls_server_name)
    return ConnectOptions(token, tls)


DEFAULT_CONNECT_HOST = "127.0.0.1"


def parse_address(text: str) -> tuple[str, int]:
    """`HOST:PORT` as `(host, port)`, the one reading every tool's `--connect` shares.

    `:PORT` means 127.0.0.1; an IPv6 host goes in brackets (`[::1]:7440`). Raises ValueError
    naming what was given when it is not an address with a port from 1 to 65535."""
    host, separator, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not separator or not port.isdigit() or not 0 < int(port) < 65536 or ":" in host and not text.startswith("["):
        raise ValueError(f"expected HOST:PORT (or :PORT for {DEFAULT_CONNECT_HOST}), got {text!r}")
    return host or DEFAULT_CONNECT_HOST, int(port)


def _read_token_file(path: str) -> str:
    try:
        with open(path, "rb") as file:
            data = file.read(TOKEN_FILE_BYTES_MAX + 1)
    except OSError as error:
        raise ConnectOptionsError(f"cannot read --token-file {path}: {error.strerror or error}") from None
    if len(data) > TOKEN_FILE_BYTES_MAX:
        raise ConnectOptionsError(f"--token-file {path} is larger than {TOKEN_FILE_BYTES_MAX} bytes: a token file holds one line")
    try:
        lines = data.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise ConnectOptionsError(f"--token-file {path} is not UTF-8 text") from None
    token = lines[0].strip() if lines else ""
    if not token:
        raise ConnectOptionsError(f"--token-file {path}: its first line is empty")
    return token


def tls_refusal(error: BaseException, tls: TlsOptions | None) -> str | None:
    """What is wrong, and what to do, when `error` (or an exception it was raised from) is a TLS
    failure that trying again cannot mend: the server's certificate does not verify, the server
    wants or refuses our client certificate, or it does not speak TLS. None for anything else
    (a refused connection, a reset, a server gone mid-handshake: those may pass)."""
    for cause in _causes(error):
        if isinstance(cause, ssl.SSLCertVerificationError):
            against = f"--tls-ca {tls.ca_file}" if tls is not None and tls.ca_file is not None else "the system's CAs"
            return (f"the server's certificate does not verify against {against}: {cause.verify_message}"
                    " (check --tls-ca, and --tls-server-name when the certificate names another host)")
        if isinstance(cause, ssl.SSLError) and cause.reason in _REFUSAL_HINTS:
            return f"{_REFUSAL_HINTS[cause.reason]} [{cause.reason}]"
    return None


def _causes(error: BaseException) -> Iterator[BaseException]:
    """`error`, then what it was raised from or during, as far as the chain goes (bounded: a
    chain is short, and a cycle must not loop)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen and len(seen) < 16:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__

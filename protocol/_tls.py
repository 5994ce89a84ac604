"""TLS for the clients: the context both clients build from a CA file (and a client certificate),
and `TlsOptions`, the same settings as plain strings for tools that build their context later
(a load generator process builds its own)."""

from __future__ import annotations

import ssl
from dataclasses import dataclass


class TlsOptionsError(Exception):
    """A TLS file cannot be used; the message names the option and says why."""


def client_ssl_context(cafile: str | None = None, cert_file: str | None = None, key_file: str | None = None) -> ssl.SSLContext:
    """A context that verifies the server against `cafile` (None: the system's CAs) and its host
    name, and presents `cert_file`/`key_file` when the server asks for a client certificate."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cafile)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert_file is not None:
        context.load_cert_chain(cert_file, key_file)
    return context


def resolve_ssl_context(ssl_context: ssl.SSLContext | None, cafile: str | None) -> ssl.SSLContext | None:
    """The context a client connects with: `ssl_context` as given, else one made from `cafile`,
    else None (plaintext)."""
    if ssl_context is not None and cafile is not None:
        raise ValueError("give ssl_context or cafile, not both")
    if ssl_context is not None:
        return ssl_context
    if cafile is not None:
        return client_ssl_context(cafile)
    return None


@dataclass(frozen=True)
class TlsOptions:
    """How a tool connects with TLS. Each field is named after its command-line option
    (`--tls-ca`, `--tls-cert`, `--tls-key`, `--tls-server-name`)."""

    ca_file: str | None = None  # verify the server against this CA (PEM); None: the system's CAs
    cert_file: str | None = None  # a client certificate chain (PEM), for a server with --tls-client-ca
    key_file: str | None = None  # its private key (PEM); None: the key is in `cert_file`
    server_name: str | None = None  # the name the server's certificate must carry; None: the host connected to

    def ssl_context(self) -> ssl.SSLContext:
        """The client context these options describe. Raises `TlsOptionsError` naming the option
        whose file is missing or unusable (rather than OpenSSL's bare message)."""
        try:
            context = client_ssl_context(self.ca_file)
        except (OSError, ssl.SSLError) as error:  # SSLError is an OSError; named for the reader
            raise TlsOptionsError(f"cannot use --tls-ca {self.ca_file}: {_why(error)}") from error
        if self.cert_file is not None:
            try:
                context.load_cert_chain(self.cert_file, self.key_file)
            except (OSError, ssl.SSLError) as error:
                key = f" with --tls-key {self.key_file}" if self.key_file is not None else ""
                raise TlsOptionsError(f"cannot use --tls-cert {self.cert_file}{key}: {_why(error)}") from error
        return context

    def server_hostname(self, host: str) -> str:
        """The name to check the server's certificate against when connecting to `host`."""
        return self.server_name if self.server_name is not None else host


def _why(error: OSError) -> str:
    if isinstance(error, ssl.SSLError):
        return f"not a usable PEM file ({error.reason or error})"
    return error.strerror or str(error)

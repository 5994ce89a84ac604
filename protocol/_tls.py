"""TLS for the clients: the context both clients build from a CA file (and a client certificate)."""

from __future__ import annotations

import ssl


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

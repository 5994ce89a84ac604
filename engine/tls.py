"""TLS for accepted connections: the server's SSL context, and `TlsTransport`, which has the
interface of `transport.SocketTransport` (async `receive` and `wait_writable`, a synchronous
`try_send`) over the same non-blocking socket.

Why not `trio.SSLStream`: the outbox writes replies from whichever task made them sendable, with
a synchronous `try_send` (see transport.py); an SSLStream can only be written by awaiting
`send_all`. So this drives an `ssl.SSLObject` over two `ssl.MemoryBIO`s itself: OpenSSL
encrypts and decrypts in memory, and the bytes move through the socket exactly as in plaintext.

`try_send` returns how much *plaintext* is in the kernel's hands. It encrypts at most one TLS
record at a time and sends its ciphertext; when the kernel takes only part of a record, the rest
of the ciphertext waits in `_ciphertext` and the record's plaintext is not counted as taken. The
caller offers those same bytes again (as it does with a plain socket); they are then counted,
not encrypted twice, once the waiting ciphertext has gone out. So at most one record of
ciphertext (about 16 KiB) waits here per connection, and "owed until the kernel has it" keeps
its meaning for back-pressure.
"""

from __future__ import annotations

import logging
import socket
import ssl

import trio

from .transport import RECEIVE_BYTES_MAX, ConnectionLost, SocketTransport, send_through

log = logging.getLogger("engine.tls")

# Plaintext per TLS record (the protocol's maximum): one record is encrypted per step of `try_send`.
RECORD_PLAINTEXT_BYTES = 16 * 1024


class TlsConfigError(Exception):
    """The TLS files cannot be used; the message says which and why."""


def server_ssl_context(cert_file: str, key_file: str, client_ca_file: str | None = None) -> ssl.SSLContext:
    """The server's context: TLS 1.2 or newer, and with `client_ca_file`, client certificates
    signed by that CA required. Raises `TlsConfigError` for unreadable or unusable files."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # No TLS 1.3 session tickets: our clients hold long-lived connections and do not resume
    # sessions, so tickets would be bytes and CPU spent on every handshake for nothing.
    context.num_tickets = 0
    try:
        context.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as error:
        raise TlsConfigError(f"cannot use --tls-cert {cert_file} with --tls-key {key_file}: {error}") from error
    if client_ca_file is not None:
        try:
            context.load_verify_locations(cafile=client_ca_file)
        except (OSError, ssl.SSLError) as error:
            raise TlsConfigError(f"cannot use --tls-client-ca {client_ca_file}: {error}") from error
        context.verify_mode = ssl.CERT_REQUIRED
    else:
        context.verify_mode = ssl.CERT_NONE
    return context


class TlsHandshakeFailed(Exception):
    """The peer did not complete a TLS handshake (not TLS, a wrong certificate, gone)."""


class TlsTransport(SocketTransport):
    """One accepted TCP connection speaking TLS. Call `handshake` before anything else.

    The socket's own handling (its options, waiting until writable, the half-close, closing)
    is `SocketTransport`'s; reads and writes go through TLS."""

    __slots__ = ("_incoming", "_outgoing", "_tls", "_ciphertext", "_plaintext_sent_ahead", "_peer_closed_tls")

    def __init__(self, sock: socket.socket, context: ssl.SSLContext):
        super().__init__(sock)
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self._ciphertext = bytearray()  # encrypted, not yet taken by the kernel
        self._plaintext_sent_ahead = 0  # plaintext whose ciphertext is in `_ciphertext`, not yet counted as sent
        self._peer_closed_tls = False  # its close_notify was read: nothing more will come

    async def handshake(self) -> None:
        """Complete the TLS handshake. Raises `TlsHandshakeFailed`; the caller bounds the time."""
        while True:
            try:
                self._tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self._send_ciphertext()
                data = await self._receive_ciphertext()
                if not data:
                    raise TlsHandshakeFailed("the peer closed the connection during the handshake") from None
                self._incoming.write(data)
            except (ssl.SSLError, OSError, ConnectionLost) as error:
                try:
                    self._queue_outgoing()  # the alert that says why, best effort
                    self._send_waiting_ciphertext()
                except ConnectionLost:
                    pass
                raise TlsHandshakeFailed(str(error)) from error
        try:
            await self._send_ciphertext()
        except ConnectionLost as error:
            raise TlsHandshakeFailed(str(error)) from error

    async def receive(self) -> bytes:
        """The next plaintext from the peer; b"" when it closed, vanished or broke the TLS.

        Decrypts all it has (up to RECEIVE_BYTES_MAX) before reading the socket again."""
        waited = False
        while True:
            if self._peer_closed_tls:
                return b""
            chunks = []
            size = 0
            # Only ask OpenSSL when there is something to decrypt: a read that finds nothing
            # raises SSLWantReadError, which costs more than the decryption of a small request.
            while size < RECEIVE_BYTES_MAX and (self._incoming.pending or self._tls.pending()):
                try:
                    chunk = self._tls.read(min(RECORD_PLAINTEXT_BYTES, RECEIVE_BYTES_MAX - size))
                except ssl.SSLWantReadError:  # part of a record: the rest is still on its way
                    break
                except ssl.SSLZeroReturnError:  # the peer's close_notify
                    self._peer_closed_tls = True
                    break
                except ssl.SSLError as error:
                    log.debug("TLS error while reading: %s", error)
                    return b""
                if not chunk:
                    self._peer_closed_tls = True
                    break
                chunks.append(chunk)
                size += len(chunk)
            self._queue_outgoing()  # post-handshake messages (key updates) go out with the next send
            if chunks:
                if not waited:
                    await trio.lowlevel.checkpoint()  # as with a plain socket: each receive is a checkpoint
                return b"".join(chunks) if len(chunks) > 1 else chunks[0]
            if self._peer_closed_tls:
                return b""
            data = await self._receive_ciphertext()
            waited = True
            if not data:
                return b""
            self._incoming.write(data)

    def try_send(self, data: bytes | bytearray | memoryview) -> int:
        """Send what the kernel takes now; return the plaintext byte count taken (0 if its buffer
        is full). Bytes not taken must be offered again, first (see the module docstring)."""
        if self.closed:
            raise ConnectionLost("connection closed")
        if self._ciphertext and not self._send_waiting_ciphertext():
            return 0
        view = memoryview(data)
        taken = self._plaintext_sent_ahead  # their ciphertext has just gone out
        self._plaintext_sent_ahead = 0
        assert taken <= len(view), "try_send must be offered the bytes it did not take, first"
        while taken < len(view):
            record = view[taken : taken + RECORD_PLAINTEXT_BYTES]
            try:
                self._tls.write(record)
            except ssl.SSLError as error:
                raise ConnectionLost(f"TLS error while writing: {error}") from error
            self._queue_outgoing()
            if not self._send_waiting_ciphertext():
                self._plaintext_sent_ahead = len(record)
                return taken
            taken += len(record)
        return taken

    def _queue_outgoing(self) -> None:
        if self._outgoing.pending:
            self._ciphertext += self._outgoing.read()

    def _send_waiting_ciphertext(self) -> bool:
        """Send waiting ciphertext as far as the kernel takes it; True when none is left."""
        try:
            sent = self._socket.send(self._ciphertext)
        except BlockingIOError:
            return False
        except OSError as error:
            raise ConnectionLost(str(error)) from error
        del self._ciphertext[:sent]
        return not self._ciphertext

    async def _send_ciphertext(self) -> None:
        self._queue_outgoing()
        while self._ciphertext:
            if not self._send_waiting_ciphertext():
                await trio.lowlevel.wait_writable(self._socket)

    async def _receive_ciphertext(self) -> bytes:
        """What the socket has (`SocketTransport.receive`: b"" when the peer closed or vanished)."""
        return await SocketTransport.receive(self)

    async def send_all(self, data: bytes) -> None:
        """Send everything, waiting while the kernel buffer is full. Raises ConnectionLost."""
        await send_through(self, data)
        if self._ciphertext:  # the last record's tail
            try:
                await self._send_ciphertext()
            except OSError as error:
                raise ConnectionLost(str(error)) from error

    def send_eof(self) -> None:
        """Send TLS close_notify (best effort), then half-close the socket."""
        try:
            self._tls.unwrap()
        except (ssl.SSLError, ValueError):
            pass  # SSLWantReadError: our close_notify is written; the peer's is not awaited
        try:
            self._queue_outgoing()
            if self._ciphertext:
                self._send_waiting_ciphertext()
        except ConnectionLost:
            pass
        super().send_eof()

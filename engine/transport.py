"""Non-blocking TCP sockets on trio: the listener and one connection's byte transport.

Why not `trio.SocketStream`: a reply becomes sendable when the log commit that covers it
completes, in whichever task noticed that. With a stream, only an `await send_all` in the
connection's own task can write, so every commit would wake one sender task per connection
that has replies. Here the task that made replies sendable writes them at once with a
non-blocking `send`; only a socket whose kernel buffer is full falls back to the connection's
writer task, which waits until the socket is writable. All waiting goes through trio
(`trio.lowlevel.wait_readable` / `wait_writable`), so cancellation and fairness are trio's.
"""

from __future__ import annotations

import errno
import logging
import socket
from typing import Awaitable, Callable, Protocol

import trio

log = logging.getLogger("engine.transport")

RECEIVE_BYTES_MAX = 64 * 1024
LISTEN_BACKLOG = 1024
# accept() failing because the process or system is out of file descriptors or buffers: back off
# instead of spinning (as `trio.serve_listeners` does).
ACCEPT_RESOURCE_ERRORS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
ACCEPT_BACKOFF_SECONDS = 0.1
# TCP keepalive on accepted sockets: a peer that vanished without a FIN or RST (a crashed host, a
# dropped NAT entry) is noticed after IDLE + INTERVAL * COUNT seconds (2 minutes) instead of
# never, and its connection slot comes back. Probes cost nothing on a busy connection.
KEEPALIVE_IDLE_SECONDS = 60
KEEPALIVE_INTERVAL_SECONDS = 10
KEEPALIVE_PROBES = 6


def configure_accepted_socket(sock: socket.socket) -> None:
    """Non-blocking, no Nagle delay (replies are small and latency-bound), TCP keepalive."""
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    # Linux (and recent macOS) name these; elsewhere the system's keepalive timing applies.
    for option_name, value in (
        ("TCP_KEEPIDLE", KEEPALIVE_IDLE_SECONDS), ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL_SECONDS), ("TCP_KEEPCNT", KEEPALIVE_PROBES),
    ):
        option = getattr(socket, option_name, None)
        if option is not None:
            sock.setsockopt(socket.IPPROTO_TCP, option, value)


class ConnectionLost(Exception):
    """The peer reset or closed the connection while we were writing."""


class SocketTransport:
    """One accepted TCP connection. Reading and the writer's waits are async; `try_send` is not,
    so any task may push bytes as far as the kernel buffer takes them."""

    __slots__ = ("_socket", "closed")

    def __init__(self, sock: socket.socket):
        configure_accepted_socket(sock)
        self._socket = sock
        self.closed = False

    async def receive(self) -> bytes:
        """The next bytes from the peer; b"" when it closed or vanished.

        Waits first, then reads: the wait is this task's checkpoint (a busy pipelined peer cannot
        starve the others), and an idle peer costs no failed `recv`."""
        while True:
            try:
                await trio.lowlevel.wait_readable(self._socket)
                return self._socket.recv(RECEIVE_BYTES_MAX)
            except BlockingIOError:
                continue
            except (OSError, trio.ClosedResourceError) as error:  # reset, or closed under us
                log.debug("connection lost while reading: %s", error)
                return b""

    def try_send(self, data: bytes | bytearray | memoryview) -> int:
        """Send what the kernel takes now; return the byte count (0 if its buffer is full)."""
        if self.closed:
            raise ConnectionLost("connection closed")
        try:
            return self._socket.send(data)
        except BlockingIOError:
            return 0
        except OSError as error:
            raise ConnectionLost(str(error)) from error

    async def wait_writable(self) -> None:
        await trio.lowlevel.wait_writable(self._socket)

    async def send_all(self, data: bytes) -> None:
        """Send everything, waiting while the kernel buffer is full. Raises ConnectionLost."""
        await send_through(self, data)

    def send_eof(self) -> None:
        try:
            self._socket.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        trio.lowlevel.notify_closing(self._socket)  # wake any task waiting on it
        self._socket.close()


class _Sending(Protocol):
    def try_send(self, data: bytes | bytearray | memoryview) -> int: ...

    async def wait_writable(self) -> None: ...


async def send_through(transport: _Sending, data: bytes) -> None:
    """Send all of `data` with `transport.try_send`, waiting for `transport.wait_writable` while
    the kernel takes nothing more (plain or TLS transports alike). Raises ConnectionLost."""
    view = memoryview(data)
    while view:
        sent = transport.try_send(view)
        view = view[sent:]
        if view:
            await transport.wait_writable()


def open_listener(host: str, port: int) -> socket.socket:
    """A non-blocking listening socket on `host:port` (port 0: any free port)."""
    family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(address)
        listener.listen(LISTEN_BACKLOG)
        listener.setblocking(False)
    except OSError:
        listener.close()
        raise
    return listener


async def serve(
    listener: socket.socket,
    handler: Callable[[SocketTransport], Awaitable[None]],
    make_transport: Callable[[socket.socket], SocketTransport] = SocketTransport,
) -> None:
    """Accept connections until cancelled; each runs `handler(make_transport(socket))` in a child
    task, which closes the transport when it returns (`make_transport`: e.g. `tls.TlsTransport`)."""

    async def run(transport: SocketTransport) -> None:
        try:
            await handler(transport)
        finally:
            transport.close()

    try:
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    sock, _ = listener.accept()
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(listener)
                    continue
                except OSError as error:
                    if error.errno not in ACCEPT_RESOURCE_ERRORS:
                        raise
                    log.error("accept failed (%s); backing off for %.1f s", error, ACCEPT_BACKOFF_SECONDS)
                    await trio.sleep(ACCEPT_BACKOFF_SECONDS)
                    continue
                nursery.start_soon(run, make_transport(sock))
                await trio.lowlevel.checkpoint()  # a flood of connections must not starve the rest
    finally:
        trio.lowlevel.notify_closing(listener)
        listener.close()

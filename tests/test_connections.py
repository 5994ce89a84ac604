"""Connections: TCP keepalive on accepted sockets, and the optional idle timeout."""

from __future__ import annotations

import socket

import trio

from engine import transport
from protocol import open_trio_client
from raw_connection import open_raw

TIMEOUT = 10
IDLE_TIMEOUT_SECONDS = 0.3


async def test_accepted_sockets_have_tcp_keepalive():
    listener = transport.open_listener("127.0.0.1", 0)
    port = listener.getsockname()[1]
    options: list[tuple[int, ...]] = []

    async def record_options(accepted: transport.SocketTransport) -> None:
        sock = accepted._socket
        options.append((
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY),
        ))

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(transport.serve, listener, record_options)
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                while not options:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    assert options == [(1, transport.KEEPALIVE_IDLE_SECONDS, transport.KEEPALIVE_INTERVAL_SECONDS, transport.KEEPALIVE_PROBES, 1)]


async def test_no_idle_timeout_by_default(start_server):
    server = await start_server()
    assert server.engine.config.idle_timeout_seconds is None
    with trio.fail_after(TIMEOUT):
        async with open_trio_client(server.host, server.port) as client:
            await client.ping()
            await trio.sleep(IDLE_TIMEOUT_SECONDS * 3)
            assert (await client.ping())["ok"] is True


async def test_an_idle_connection_is_closed_after_the_idle_timeout(start_server):
    server = await start_server(idle_timeout_seconds=IDLE_TIMEOUT_SECONDS)
    with trio.fail_after(TIMEOUT):
        raw = await open_raw(server)
        async with raw.stream:
            await raw.send({"id": 1, "op": "ping"})
            assert (await raw.receive())["ok"] is True
            started = trio.current_time()
            await raw.expect_closed()  # no error frame: nothing was asked, nothing is answered
            waited_seconds = trio.current_time() - started
    assert IDLE_TIMEOUT_SECONDS * 0.9 <= waited_seconds < IDLE_TIMEOUT_SECONDS + 2
    assert server.engine is not None


async def test_a_busy_connection_and_a_watcher_are_not_idle(start_server):
    server = await start_server(idle_timeout_seconds=IDLE_TIMEOUT_SECONDS)
    with trio.fail_after(TIMEOUT):
        async with open_trio_client(server.host, server.port) as watcher, open_trio_client(server.host, server.port) as busy:
            await watcher.watch()
            for number in range(8):  # 8 x 0.1 s: well past the timeout, never idle that long
                await busy.adjust(f"busy-{number}", "sku", "loc", 1, "receipt")
                await trio.sleep(IDLE_TIMEOUT_SECONDS / 3)
            for number in range(8):
                assert (await watcher.next_event())["key"] == f"busy-{number}"
            await trio.sleep(IDLE_TIMEOUT_SECONDS * 2)  # a watcher waits for events as long as it likes
            async with open_trio_client(server.host, server.port) as late:
                await late.adjust("late", "sku", "loc", 1, "receipt")
            assert (await watcher.next_event())["key"] == "late"
            assert busy.closed  # it was idle for those 0.6 s

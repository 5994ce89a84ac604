"""`GET /metrics` over HTTP/1.1, served from the event loop itself.

The body is generated synchronously inside one task step (`prometheus_client.generate_latest`),
so the collector reads the engine between two steps of the loop: never a half-applied change,
and no lock anywhere. One request per connection (`Connection: close`), bounded in size, time
and concurrency: a scraper is one client, not a crowd.
"""

from __future__ import annotations

import logging
from typing import Any

import trio
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

log = logging.getLogger("engine.metrics")

METRICS_PATH = "/metrics"
REQUEST_HEAD_BYTES_MAX = 8 * 1024  # request line and headers; a scrape request is a few hundred bytes
REQUEST_TIMEOUT_SECONDS = 10.0  # to send the request and take the reply
SCRAPE_CONNECTIONS_MAX = 16  # open at once; more are closed at once without an answer
RECEIVE_BYTES_MAX = 4096
# After the reply: half-close, then discard what the client still sends (within these bounds)
# before closing, so that the kernel does not answer unread input with a reset that would
# destroy the reply (a too-large request is answered before it is all read).
LINGER_SECONDS = 1.0
LINGER_DISCARD_BYTES_MAX = 256 * 1024


async def serve_metrics(
    host: str, port: int, registry: Any, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `registry` on `http://host:port/metrics` until cancelled; `task_status.started`
    gets the port actually bound (port 0: any free port)."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound_port = listeners[0].socket.getsockname()[1]
    open_connections = 0

    async def handle(stream: trio.SocketStream) -> None:
        nonlocal open_connections
        if open_connections >= SCRAPE_CONNECTIONS_MAX:
            await stream.aclose()
            return
        open_connections += 1
        try:
            with trio.move_on_after(REQUEST_TIMEOUT_SECONDS):
                await _answer(stream, registry)
            await _linger(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the scraper went away: nothing to answer
        finally:
            open_connections -= 1
            await trio.aclose_forcefully(stream)

    log.info("metrics on http://%s:%d%s", host, bound_port, METRICS_PATH)
    task_status.started(bound_port)
    await trio.serve_listeners(handle, listeners)


async def _answer(stream: trio.SocketStream, registry: Any) -> None:
    head = await _read_head(stream)
    if head is None:
        await _respond(stream, 431, "text/plain; charset=utf-8", b"request head too large\n")
        return
    request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
    parts = request_line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        await _respond(stream, 400, "text/plain; charset=utf-8", b"bad request\n")
        return
    method, target, _ = parts
    path = target.split("?", 1)[0]
    if path != METRICS_PATH:
        await _respond(stream, 404, "text/plain; charset=utf-8", b"not found; try /metrics\n")
        return
    if method not in ("GET", "HEAD"):
        await _respond(stream, 405, "text/plain; charset=utf-8", b"method not allowed\n", extra_headers="Allow: GET, HEAD\r\n")
        return
    body = generate_latest(registry)  # synchronous: one consistent moment of the engine
    await _respond(stream, 200, CONTENT_TYPE_LATEST, body, send_body=method == "GET")


async def _linger(stream: trio.SocketStream) -> None:
    with trio.move_on_after(LINGER_SECONDS):
        await stream.send_eof()
        discarded_bytes = 0
        while discarded_bytes < LINGER_DISCARD_BYTES_MAX:
            data = await stream.receive_some(RECEIVE_BYTES_MAX)
            if not data:
                return
            discarded_bytes += len(data)


async def _read_head(stream: trio.SocketStream) -> bytes | None:
    """The request line and headers (up to the blank line); None when they are too large.
    A body, if any, is ignored (the connection closes after the reply)."""
    received = bytearray()
    while b"\r\n\r\n" not in received:
        if len(received) > REQUEST_HEAD_BYTES_MAX:
            return None
        data = await stream.receive_some(RECEIVE_BYTES_MAX)
        if not data:
            break  # the client stopped sending: answer what we have
        received += data
    return bytes(received[:REQUEST_HEAD_BYTES_MAX])


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 431: "Request Header Fields Too Large"}


async def _respond(stream: trio.SocketStream, status: int, content_type: str, body: bytes, *, send_body: bool = True, extra_headers: str = "") -> None:
    head = (
        f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
        f"{extra_headers}Connection: close\r\n\r\n"
    )
    await stream.send_all(head.encode("latin-1") + (body if send_body else b""))

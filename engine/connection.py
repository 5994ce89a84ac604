"""One client connection: read frames, route requests, send replies once they are durable.

Two tasks per connection. The receiver decodes every frame it has and submits requests; it stops
reading while `in_flight_per_connection_max` replies are owed (TCP back-pressure instead of an
unbounded queue). The sender waits until the log is durable up to each reply's `seq` and writes
every ready reply in one `send_all`. A `watch` turns the connection into an event stream.
"""

from __future__ import annotations

import hmac
import logging
import math
from typing import Any

import trio

import protocol
from protocol import Hello, Ping, RequestRejected, Snapshot, Stats, Watch, codes, error_reply

from .service import Engine

log = logging.getLogger("engine.connection")

RECEIVE_BYTES_MAX = 64 * 1024
# After a closing error reply: how long, and how much input, to discard before closing (`linger`).
LINGER_SECONDS = 2.0
LINGER_DISCARD_BYTES_MAX = 4 * 1024 * 1024
SERVER_NAME = "inventory-reservation-engine/0.1"


def _same_secret(offered: str | None, expected: str) -> bool:
    # Constant time, so the token cannot be guessed byte by byte from reply timing.
    return offered is not None and hmac.compare_digest(offered.encode("utf-8"), expected.encode("utf-8"))


async def linger(stream: trio.SocketStream, seconds: float = LINGER_SECONDS) -> None:
    """Close politely after an error reply, without the reply being lost. Closing a socket with
    unread input makes the kernel send a reset, which can destroy the reply before the client
    reads it; so half-close, then discard what the client still sends, within bounds."""
    with trio.move_on_after(seconds):
        try:
            await stream.send_eof()
            discarded_bytes = 0
            while discarded_bytes < LINGER_DISCARD_BYTES_MAX:
                data = await stream.receive_some(RECEIVE_BYTES_MAX)
                if not data:
                    return
                discarded_bytes += len(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return


class Connection:
    def __init__(self, stream: trio.SocketStream, engine: Engine, counters: dict[str, int]):
        self._stream = stream
        self._engine = engine
        self._config = engine.config
        self._counters = counters
        self._protocol = protocol.ServerProtocol(self._config.max_frame_bytes)
        self._authorized = self._config.token is None
        self._pending: list[dict[str, Any]] = []  # replies received, not yet sent
        self._owed = 0  # requests read whose reply has not been sent
        self._wake_sender = trio.Event()
        self._room = trio.Event()
        self._input_done = False
        self._watch_from_seq: int | None = None
        self._closed = False
        self._cancel_scope = trio.CancelScope()

    async def run(self) -> None:
        self._engine.wal.add_listener(self._wake)
        try:
            async with trio.open_nursery() as nursery:
                self._cancel_scope = nursery.cancel_scope
                nursery.start_soon(self._send_loop)
                await self._receive_loop(nursery)
                self._input_done = True
                self._wake_sender.set()
                if self._watch_from_seq is not None:
                    await self._discard_input()  # a watcher sends nothing more; notice its close
                    nursery.cancel_scope.cancel()
            if self._protocol.broken:
                await linger(self._stream)
        finally:
            self._engine.wal.remove_listener(self._wake)
            self._closed = True
            with trio.move_on_after(1) as cleanup:
                cleanup.shield = True
                await self._stream.aclose()

    # -- receiving ----------------------------------------------------------------------------

    async def _receive_loop(self, nursery: trio.Nursery) -> None:
        while True:
            room = self._config.in_flight_per_connection_max - self._owed
            if room <= 0:
                self._counters["reading_paused"] += 1
                self._room = trio.Event()
                await self._room.wait()
                continue
            events = self._protocol.next_events(room)
            if not events:
                if self._protocol.broken:
                    return
                data = await self._receive()
                if not data:
                    return
                events = self._protocol.receive_data(data, room)
            for event in events:
                self._owed += 1
                if isinstance(event, RequestRejected):
                    self._counters["rejected_frames"] += 1
                    self._deliver({**event.reply, "seq": 0})
                    if event.close:
                        return
                    continue
                if self._handle(event.request_id, event.command, nursery):
                    return  # watch: no more requests on this connection

    def _handle(self, request_id: int, command: Any, nursery: trio.Nursery) -> bool:
        """Route one request. Returns True when the connection became a watch stream."""
        if isinstance(command, Hello):
            self._deliver(self._hello(request_id, command))
        elif not self._authorized:
            self._deliver(error_reply(request_id, codes.UNAUTHORIZED, "send hello with a valid token first", seq=0))
        elif isinstance(command, Ping):
            self._deliver({"id": request_id, "ok": True, "seq": 0})
        elif isinstance(command, Stats):
            stats = self._engine.stats()
            stats["connections"] = dict(self._counters)
            # Counters reflect every applied change: the reply waits until all of them are durable.
            self._deliver({"id": request_id, "ok": True, **stats, "seq": self._engine.state.seq})
        elif isinstance(command, Snapshot):
            nursery.start_soon(self._snapshot, request_id)
        elif isinstance(command, Watch):
            return self._watch(request_id, command)
        else:
            self._engine.submit(request_id, command, self._deliver)
        return False

    def _hello(self, request_id: int, command: Hello) -> dict[str, Any]:
        if command.version != protocol.PROTOCOL_VERSION:
            return error_reply(
                request_id, codes.UNSUPPORTED_VERSION, f"protocol version {command.version} is not supported",
                supported=[protocol.PROTOCOL_VERSION], seq=0,
            )
        if self._config.token is not None and not _same_secret(command.token, self._config.token):
            self._authorized = False
            return error_reply(request_id, codes.UNAUTHORIZED, "invalid or missing token", seq=0)
        self._authorized = True
        return {"id": request_id, "ok": True, "server": SERVER_NAME, "version": protocol.PROTOCOL_VERSION, "seq": 0}

    async def _snapshot(self, request_id: int) -> None:
        try:
            seq = await self._engine.snapshot()
        except RuntimeError as error:
            self._deliver(error_reply(request_id, codes.INTERNAL, str(error), seq=0))
            return
        self._deliver({"id": request_id, "ok": True, "seq": seq})

    def _watch(self, request_id: int, command: Watch) -> bool:
        durable_seq = self._engine.wal.durable_seq
        from_seq = durable_seq + 1 if command.from_seq is None else max(command.from_seq, 1)
        if from_seq <= durable_seq:
            first_seq = self._engine.storage.first_seq()
            if first_seq is None or from_seq < first_seq:
                oldest = durable_seq + 1 if first_seq is None else first_seq
                self._deliver(error_reply(
                    request_id, codes.INVALID, f"events before seq {oldest} are no longer retained", first_seq=oldest, seq=0,
                ))
                return False
        self._counters["watchers"] += 1
        self._watch_from_seq = from_seq
        self._deliver({"id": request_id, "ok": True, "seq": durable_seq})
        return True

    async def _discard_input(self) -> None:
        while await self._receive():
            pass

    async def _receive(self) -> bytes:
        """Bytes from the client; b"" when it closed, vanished, or stalled inside a frame."""
        stalled = self._protocol.partial_frame_bytes > 0
        timeout_seconds = self._config.partial_frame_timeout_seconds if stalled else math.inf
        try:
            with trio.move_on_after(timeout_seconds):
                return await self._stream.receive_some(RECEIVE_BYTES_MAX)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as error:
            log.debug("connection lost while reading: %s", error)
            return b""
        self._counters["partial_frame_timeouts"] += 1
        log.info("closing a connection stalled for %.1f s inside a frame", timeout_seconds)
        return b""

    async def _send(self, data: bytes) -> None:
        """Write to the client; a vanished client ends the connection (its replies are dropped;
        what they acknowledge is durable already)."""
        try:
            await self._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as error:
            log.debug("connection lost while writing: %s", error)
            self._cancel_scope.cancel()
            await trio.lowlevel.checkpoint()

    # -- sending ------------------------------------------------------------------------------

    def _deliver(self, reply: dict[str, Any]) -> None:
        """The engine's reply sink: called once per request, now or later."""
        if self._closed:
            return
        self._pending.append(reply)
        self._wake_sender.set()

    def _wake(self) -> None:
        self._wake_sender.set()

    async def _send_loop(self) -> None:
        while True:
            if self._pending:
                ready, self._pending = self._partition()
                if ready:
                    await self._send(b"".join(protocol.pack(reply) for reply in ready))
                    self._owed -= len(ready)
                    self._room.set()
                    continue
            elif self._input_done and self._owed == 0:
                if self._watch_from_seq is not None:
                    await self._stream_events(self._watch_from_seq)
                self._cancel_scope.cancel()
                return
            # Woken by a new reply or by the log becoming durable further.
            self._wake_sender = trio.Event()
            await self._wake_sender.wait()

    def _partition(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Split pending replies into those that may go out now and those that wait for the log.
        Once the log has failed, a waiting reply can never be acknowledged: it becomes `internal`."""
        wal = self._engine.wal
        durable_seq, failed = wal.durable_seq, wal.failure is not None
        ready, waiting = [], []
        for reply in self._pending:
            if reply.get("seq", 0) <= durable_seq:
                ready.append(reply)
            elif failed:
                ready.append(self._failed(reply))
            else:
                waiting.append(reply)
        return ready, waiting

    @staticmethod
    def _failed(reply: dict[str, Any]) -> dict[str, Any]:
        return error_reply(reply.get("id"), codes.INTERNAL, "the change could not be made durable; the server must be restarted", seq=0)

    async def _stream_events(self, next_seq: int) -> None:
        """Push every durable event from `next_seq` on, in log order, until the client leaves."""
        engine = self._engine
        while engine.wal.failure is None:
            durable_seq = engine.wal.durable_seq
            if next_seq > durable_seq:
                await engine.wal.wait_durable_changed()
                continue
            events = await trio.to_thread.run_sync(engine.storage.read, next_seq, self._config.watch_batch_max, durable_seq)
            if not events or events[0]["seq"] != next_seq:
                log.warning("watcher fell behind the retained log at seq %d", next_seq)
                return
            await self._send(b"".join(protocol.pack({"event": event}) for event in events))
            next_seq = events[-1]["seq"] + 1

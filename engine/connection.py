"""One client connection: read frames, route requests; replies go out through the outbox.

The connection's own task reads and decodes every frame it has and submits the requests. Their
replies reach the outbox (`outbox.py`), which writes them to the socket as soon as the log is
durable up to their `seq`, from whichever task made them sendable. A second task, the writer,
sleeps until the socket's buffer is full (a client that does not read), then waits for it to
drain. Reading stops while `in_flight_per_connection_max` replies are owed (read, and not yet
taken by the kernel): TCP back-pressure instead of an unbounded queue. A `watch` turns the connection into an event
stream written by the writer task.
"""

from __future__ import annotations

import hmac
import logging
from collections import deque
from functools import partial
from typing import Any

import trio

import protocol
from protocol import Hello, Ping, RequestRejected, Snapshot, Stats, Watch, codes, error_reply

from .service import Engine
from .transport import ConnectionLost, SocketTransport

log = logging.getLogger("engine.connection")

# After a closing error reply: how long, and how much input, to discard before closing (`linger`).
LINGER_SECONDS = 2.0
LINGER_DISCARD_BYTES_MAX = 4 * 1024 * 1024
SERVER_NAME = "inventory-reservation-engine/0.1"


def _same_secret(offered: str | None, expected: str) -> bool:
    # Constant time, so the token cannot be guessed byte by byte from reply timing.
    return offered is not None and hmac.compare_digest(offered.encode("utf-8"), expected.encode("utf-8"))


async def linger(transport: SocketTransport, seconds: float = LINGER_SECONDS) -> None:
    """Close politely after an error reply, without the reply being lost. Closing a socket with
    unread input makes the kernel send a reset, which can destroy the reply before the client
    reads it; so half-close, then discard what the client still sends, within bounds."""
    with trio.move_on_after(seconds):
        transport.send_eof()
        discarded_bytes = 0
        while discarded_bytes < LINGER_DISCARD_BYTES_MAX:
            data = await transport.receive()
            if not data:
                return
            discarded_bytes += len(data)


class Connection:
    def __init__(self, transport: SocketTransport, engine: Engine, counters: dict[str, int]):
        self._transport = transport
        self._engine = engine
        self._outbox = engine.outbox
        self._config = engine.config
        self._counters = counters
        self._protocol = protocol.ServerProtocol(self._config.max_frame_bytes)
        self._authorized = self._config.token is None
        # The outbox's view of this connection (see `outbox.ReplyTarget`).
        self.closed = False
        self.ready: list[bytes] = []
        self.waiting: deque[tuple[int, bytes, Any]] = deque()
        self._unsent = bytearray()  # bytes the socket did not take yet: the writer task's job
        self._unsent_replies = 0  # replies (wholly or partly) in `_unsent`: still owed
        self._owed = 0  # requests read whose reply is not yet in the kernel's hands
        self._reader_wakeup: trio.Event | None = None
        self._writer_wakeup = trio.Event()
        self._input_done = False
        self._watch_from_seq: int | None = None
        self._cancel_scope = trio.CancelScope()
        # The engine's reply sink for this connection: called once per request, now or later.
        self._deliver = partial(self._outbox.deliver, self)

    async def run(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._cancel_scope = nursery.cancel_scope
                nursery.start_soon(self._write_loop)
                await self._receive_loop(nursery)
                self._input_done = True
                self._writer_wakeup.set()
                if self._watch_from_seq is not None:
                    await self._discard_input()  # a watcher sends nothing more; notice its close
                    nursery.cancel_scope.cancel()
            if self._protocol.broken and not self._transport.closed:
                await linger(self._transport)
        finally:
            self.closed = True
            self.ready.clear()
            self.waiting.clear()

    # -- receiving ----------------------------------------------------------------------------

    async def _receive_loop(self, nursery: trio.Nursery) -> None:
        in_flight_max = self._config.in_flight_per_connection_max
        while True:
            room = in_flight_max - self._owed
            if room <= 0:
                self._counters["reading_paused"] += 1
                self._reader_wakeup = trio.Event()
                await self._reader_wakeup.wait()
                continue
            events = self._protocol.next_events(room)
            if not events:
                if self._protocol.broken:
                    return
                data = await self._receive()
                if not data:
                    return
                events = self._protocol.receive_data(data, room)
            self._owed += len(events)
            submit = self._engine.submit
            deliver = self._deliver
            for index, event in enumerate(events):
                if type(event) is RequestRejected:
                    self._counters["rejected_frames"] += 1
                    deliver({**event.reply, "seq": 0})
                    stop = event.close
                else:
                    command = event.command
                    if self._authorized and not isinstance(command, _CONNECTION_COMMANDS):
                        submit(event.request_id, command, deliver)
                        continue
                    stop = self._handle(event.request_id, command, nursery)  # True: it became a watch
                if stop:
                    self._owed -= len(events) - 1 - index  # the requests after it are never answered
                    return

    def _handle(self, request_id: int, command: Any, nursery: trio.Nursery) -> bool:
        """A request the connection answers itself. Returns True when it became a watch stream."""
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
            # Once the log has stopped they never will be: the operator still gets the figures
            # (with the failure, and applied_seq beyond durable_seq).
            wal = self._engine.wal
            self._deliver({"id": request_id, "ok": True, **stats, "seq": self._engine.state.seq if wal.failure is None else wal.durable_seq})
        elif isinstance(command, Snapshot):
            nursery.start_soon(self._snapshot, request_id)
        elif isinstance(command, Watch):
            return self._watch(request_id, command)
        else:
            raise AssertionError(f"not a connection command: {command!r}")
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
        if self._protocol.partial_frame_bytes == 0:
            return await self._transport.receive()
        timeout_seconds = self._config.partial_frame_timeout_seconds
        with trio.move_on_after(timeout_seconds):
            return await self._transport.receive()
        self._counters["partial_frame_timeouts"] += 1
        log.info("closing a connection stalled for %.1f s inside a frame", timeout_seconds)
        return b""

    # -- sending ------------------------------------------------------------------------------

    def flush(self) -> None:
        """Hand every ready reply to the socket (called by the outbox)."""
        if self.closed or not self.ready:
            self.ready.clear()
            return
        count = len(self.ready)
        data = b"".join(self.ready)
        self.ready.clear()
        if self._unsent:
            self._unsent += data  # behind bytes the writer is waiting to send
            self._unsent_replies += count
            return
        try:
            sent = self._transport.try_send(data)
        except ConnectionLost as error:
            self._lost(error)
            return
        if sent < len(data):
            self._unsent += memoryview(data)[sent:]
            self._unsent_replies = count
            self._writer_wakeup.set()
        else:
            self._replies_sent(count)

    def _replies_sent(self, count: int) -> None:
        """`count` replies are in the kernel's hands: they are owed no more."""
        self._owed -= count
        if self._owed == 0 and self._input_done:
            self._writer_wakeup.set()
        if self._reader_wakeup is not None:
            self._reader_wakeup.set()
            self._reader_wakeup = None

    def _lost(self, error: Exception) -> None:
        """The client vanished: its replies are dropped (what they acknowledge is durable already)."""
        log.debug("connection lost while writing: %s", error)
        self.closed = True
        self._cancel_scope.cancel()

    async def _write_loop(self) -> None:
        while True:
            if self._unsent:
                await self._transport.wait_writable()
                try:
                    sent = self._transport.try_send(self._unsent)
                except ConnectionLost as error:
                    self._lost(error)
                    return
                del self._unsent[:sent]
                if not self._unsent:
                    self._replies_sent(self._unsent_replies)
                    self._unsent_replies = 0
                continue
            if self._input_done and self._owed == 0:
                if self._watch_from_seq is not None:
                    await self._stream_events(self._watch_from_seq)
                self._cancel_scope.cancel()
                return
            self._writer_wakeup = trio.Event()
            await self._writer_wakeup.wait()

    async def _stream_events(self, next_seq: int) -> None:
        """Push every durable event from `next_seq` on, in log order, until the client leaves."""
        engine = self._engine
        while engine.wal.failure is None or next_seq <= engine.wal.durable_seq:  # after a failure: what is durable
            durable_seq = engine.wal.durable_seq
            if next_seq > durable_seq:
                await engine.wal.wait_durable_changed()
                continue
            events = await trio.to_thread.run_sync(engine.storage.read, next_seq, self._config.watch_batch_max, durable_seq)
            if not events or events[0]["seq"] != next_seq:
                log.warning("watcher fell behind the retained log at seq %d", next_seq)
                return
            try:
                await self._transport.send_all(b"".join(protocol.pack({"event": event}) for event in events))
            except ConnectionLost as error:
                self._lost(error)
                return
            next_seq = events[-1]["seq"] + 1


# Requests the connection answers itself; every other command goes to the engine.
_CONNECTION_COMMANDS = (Hello, Ping, Stats, Snapshot, Watch)

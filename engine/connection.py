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

import logging
import math
import time
from collections import deque
from functools import partial
from typing import Any

import trio

import protocol
from protocol import Hello, Ping, RequestRejected, Snapshot, Stats, Watch, codes, error_reply

from .access import ANONYMOUS_NAME, HELLO_ACCEPTED, HELLO_REFUSED, AccessControl
from .auth import Identity, Role, role_needed
from .metrics import INVALID_FRAME_PREFIX, INVALID_OP_INDEX, OP_INDEX_OF_COMMAND, OP_OF_COMMAND
from .outbox import Stamp
from .service import Engine
from .transport import ConnectionLost, SocketTransport

log = logging.getLogger("engine.connection")

# After a closing error reply: how long, and how much input, to discard before closing (`linger`).
LINGER_SECONDS = 2.0
LINGER_DISCARD_BYTES_MAX = 4 * 1024 * 1024
SERVER_NAME = "inventory-reservation-engine/0.1"


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
    def __init__(self, transport: SocketTransport, engine: Engine, counters: dict[str, int], access: AccessControl):
        self._transport = transport
        self._engine = engine
        self._outbox = engine.outbox
        self._config = engine.config
        self._counters = counters
        self._protocol = protocol.ServerProtocol(self._config.max_frame_bytes)
        # Who this connection is (set by a successful hello when auth is on), and the engine
        # commands it may send: the request path checks membership in this set, nothing more.
        self._access = access
        self._identity: Identity | None = None
        self._engine_commands_allowed = _ENGINE_COMMANDS_ALLOWED[None if access.required else Role.ADMIN]
        # The outbox's view of this connection (see `outbox.ReplyTarget`).
        self.closed = False
        self.ready: list[bytes] = []
        self.ready_stamps: list[Stamp] = []
        self.waiting: deque[tuple[int, bytes, Any, Stamp]] = deque()
        self._latency = engine.request_latency
        self._unsent = bytearray()  # bytes the socket did not take yet: the writer task's job
        self._unsent_replies = 0  # replies (wholly or partly) in `_unsent`: still owed
        self._owed = 0  # requests read whose reply is not yet in the kernel's hands
        self._reader_wakeup: trio.Event | None = None
        self._writer_wakeup = trio.Event()
        self._input_done = False
        self._watch_from_seq: int | None = None
        self._cancel_scope = trio.CancelScope()
        # Idle timeout (off: None). While the reader waits between frames, its cancel scope is
        # here: the deadline is pushed to "now + timeout" whenever the last owed reply goes out.
        self._idle_timeout_seconds = self._config.idle_timeout_seconds
        self._idle_scope: trio.CancelScope | None = None
        # The engine's reply sinks for the requests of the last chunk read, one per op: each is
        # `outbox.deliver` bound to this connection and the stamp (read time, op index) of those
        # requests (`metrics.RequestLatency`), made once per chunk and op, not per request.
        self._read_ns = time.monotonic_ns()
        self._reply_sinks: dict[type, Any] = {}

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
            self._forget_identity()
            self.closed = True
            self.ready.clear()
            self.ready_stamps.clear()
            self.waiting.clear()

    # -- receiving ----------------------------------------------------------------------------

    async def _receive_loop(self, nursery: trio.Nursery) -> None:
        in_flight_max = self._config.in_flight_per_connection_max
        while True:
            room = in_flight_max - self._owed
            if room <= 0:
                self._counters["reading_paused"] += 1
                self._counters["reading_paused_now"] += 1
                self._reader_wakeup = trio.Event()
                try:
                    await self._reader_wakeup.wait()
                finally:
                    self._counters["reading_paused_now"] -= 1
                continue
            events = self._protocol.next_events(room)
            if not events:
                if self._protocol.broken:
                    return
                data = await self._receive()
                if not data:
                    return
                # One clock read per chunk: every request in it was read at this moment.
                self._read_ns = time.monotonic_ns()
                self._reply_sinks = {}
                events = self._protocol.receive_data(data, room)
            self._owed += len(events)
            submit = self._engine.submit
            reply_sinks = self._reply_sinks
            deliver_to_outbox = self._outbox.deliver
            allowed = self._engine_commands_allowed
            for index, event in enumerate(events):
                if type(event) is RequestRejected:
                    self._counters["rejected_frames"] += 1
                    self._counters[INVALID_FRAME_PREFIX + event.reply["error"]] += 1
                    self._outbox.deliver(self, (self._read_ns, INVALID_OP_INDEX), {**event.reply, "seq": 0})
                    stop = event.close
                else:
                    command = event.command
                    kind = type(command)
                    deliver = reply_sinks.get(kind)
                    if deliver is None:
                        stamp = (self._read_ns, OP_INDEX_OF_COMMAND[kind])
                        deliver = reply_sinks[kind] = partial(deliver_to_outbox, self, stamp)
                    if kind in allowed:
                        submit(event.request_id, command, deliver)
                        continue
                    stop = self._handle(event.request_id, command, nursery, deliver)  # True: it became a watch
                    allowed = self._engine_commands_allowed  # a hello may have changed it
                if stop:
                    self._owed -= len(events) - 1 - index  # the requests after it are never answered
                    return

    def _handle(self, request_id: int, command: Any, nursery: trio.Nursery, deliver: Any) -> bool:
        """A request the connection answers itself. Returns True when it became a watch stream."""
        kind = type(command)

        def counted(reply: dict[str, Any]) -> None:
            self._engine.count_reply(kind, reply)
            deliver(reply)

        if isinstance(command, Hello):
            counted(self._hello(request_id, command))
            return False
        refusal = self._refusal(request_id, kind)
        if refusal is not None:
            counted(refusal)
        elif isinstance(command, Ping):
            counted({"id": request_id, "ok": True, "seq": 0})
        elif isinstance(command, Stats):
            stats = self._engine.stats()
            stats["connections"] = dict(self._counters)
            # Counters reflect every applied change: the reply waits until all of them are durable.
            # Once the log has stopped they never will be: the operator still gets the figures
            # (with the failure, and applied_seq beyond durable_seq).
            wal = self._engine.wal
            counted({"id": request_id, "ok": True, **stats, "seq": self._engine.state.seq if wal.failure is None else wal.durable_seq})
        elif isinstance(command, Snapshot):
            nursery.start_soon(self._snapshot, request_id, counted)
        elif isinstance(command, Watch):
            return self._watch(request_id, command, counted)
        else:
            raise AssertionError(f"not a connection command: {command!r}")
        return False

    def _refusal(self, request_id: int, kind: type) -> dict[str, Any] | None:
        """The `unauthorized` reply to an op this connection's role does not allow, or None."""
        if not self._access.required:
            return None
        op = OP_OF_COMMAND[kind]
        needed = role_needed(op)
        identity = self._identity
        if identity is not None and identity.role >= needed:
            return None
        if identity is None:
            self._access.unauthorized[(ANONYMOUS_NAME, op)] += 1
            message = f"send hello with a valid token first (op {op} needs role {needed.label})"
        else:
            self._access.unauthorized[(identity.name, op)] += 1
            message = f"op {op} needs role {needed.label} (this connection: {identity.role.label}, token {identity.name!r})"
        return error_reply(request_id, codes.UNAUTHORIZED, message, role_needed=needed.label, seq=0)

    def _hello(self, request_id: int, command: Hello) -> dict[str, Any]:
        if command.version != protocol.PROTOCOL_VERSION:
            return error_reply(
                request_id, codes.UNSUPPORTED_VERSION, f"protocol version {command.version} is not supported",
                supported=[protocol.PROTOCOL_VERSION], seq=0,
            )
        access = self._access
        if access.table is not None:
            identity = access.table.identify(command.token)
            self._forget_identity()  # a later hello replaces the identity, or (refused) removes it
            if identity is None:
                access.hellos[(ANONYMOUS_NAME, HELLO_REFUSED)] += 1
                log.info("hello refused: invalid or missing token (client %r)", command.client)
                return error_reply(request_id, codes.UNAUTHORIZED, "invalid or missing token", seq=0)
            self._identity = identity
            self._engine_commands_allowed = _ENGINE_COMMANDS_ALLOWED[identity.role]
            access.hellos[(identity.name, HELLO_ACCEPTED)] += 1
            access.connections_open[identity.name] += 1
            log.info("hello: token %r, role %s (client %r)", identity.name, identity.role.label, command.client)
        return {"id": request_id, "ok": True, "server": SERVER_NAME, "version": protocol.PROTOCOL_VERSION, "seq": 0}

    def _forget_identity(self) -> None:
        if self._identity is not None:
            self._access.connections_open[self._identity.name] -= 1
            self._identity = None
        if self._access.required:
            self._engine_commands_allowed = _ENGINE_COMMANDS_ALLOWED[None]

    async def _snapshot(self, request_id: int, deliver: Any) -> None:
        try:
            seq = await self._engine.snapshot()
        except RuntimeError as error:
            deliver(error_reply(request_id, codes.INTERNAL, str(error), seq=0))
            return
        deliver({"id": request_id, "ok": True, "seq": seq})

    def _watch(self, request_id: int, command: Watch, deliver: Any) -> bool:
        durable_seq = self._engine.wal.durable_seq
        from_seq = durable_seq + 1 if command.from_seq is None else max(command.from_seq, 1)
        if from_seq <= durable_seq:
            first_seq = self._engine.storage.first_seq()
            if first_seq is None or from_seq < first_seq:
                oldest = durable_seq + 1 if first_seq is None else first_seq
                deliver(error_reply(
                    request_id, codes.INVALID, f"events before seq {oldest} are no longer retained", first_seq=oldest, seq=0,
                ))
                return False
        self._counters["watchers"] += 1
        self._watch_from_seq = from_seq
        deliver({"id": request_id, "ok": True, "seq": durable_seq})
        return True

    async def _discard_input(self) -> None:
        while await self._receive():
            pass

    async def _receive(self) -> bytes:
        """Bytes from the client; b"" when it closed, vanished, stalled inside a frame, or was idle
        for the idle timeout (a watcher is never idle: it waits for events, not for replies)."""
        if self._protocol.partial_frame_bytes == 0:
            if self._idle_timeout_seconds is not None and self._watch_from_seq is None:
                return await self._receive_unless_idle(self._idle_timeout_seconds)
            data = await self._transport.receive()
            self._counters["bytes_received"] += len(data)
            return data
        timeout_seconds = self._config.partial_frame_timeout_seconds
        with trio.move_on_after(timeout_seconds):
            data = await self._transport.receive()
            self._counters["bytes_received"] += len(data)
            return data
        self._counters["partial_frame_timeouts"] += 1
        log.info("closing a connection stalled for %.1f s inside a frame", timeout_seconds)
        return b""

    async def _receive_unless_idle(self, timeout_seconds: float) -> bytes:
        # Idle means: no request read and no reply owed for `timeout_seconds`. While replies are
        # owed the deadline is infinite; `_replies_sent` starts the clock when the last goes out.
        deadline = trio.current_time() + timeout_seconds if self._owed == 0 else math.inf
        with trio.CancelScope(deadline=deadline) as scope:
            self._idle_scope = scope
            try:
                data = await self._transport.receive()
            finally:
                self._idle_scope = None
            self._counters["bytes_received"] += len(data)
            return data
        self._counters["idle_timeouts"] += 1
        name = self._identity.name if self._identity is not None else None
        log.info("closing a connection idle for %.1f s (token %r)", timeout_seconds, name)
        return b""

    # -- sending ------------------------------------------------------------------------------

    def flush(self) -> None:
        """Hand every ready reply to the socket (called by the outbox)."""
        if self.closed or not self.ready:
            self.ready.clear()
            self.ready_stamps.clear()
            return
        count = len(self.ready)
        data = b"".join(self.ready)
        self.ready.clear()
        # Counted as written now: handed to the kernel, or (its buffer full) queued for the writer.
        self._latency.observe(self.ready_stamps)
        self.ready_stamps.clear()
        if self._unsent:
            self._unsent += data  # behind bytes the writer is waiting to send
            self._unsent_replies += count
            return
        try:
            sent = self._transport.try_send(data)
        except ConnectionLost as error:
            self._lost(error)
            return
        self._counters["bytes_sent"] += sent
        if sent < len(data):
            self._unsent += memoryview(data)[sent:]
            self._unsent_replies = count
            self._writer_wakeup.set()
        else:
            self._replies_sent(count)

    def _replies_sent(self, count: int) -> None:
        """`count` replies are in the kernel's hands: they are owed no more."""
        self._owed -= count
        if self._owed == 0:
            if self._input_done:
                self._writer_wakeup.set()
            if self._idle_scope is not None:
                self._idle_scope.deadline = trio.current_time() + self._idle_timeout_seconds
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
                self._counters["bytes_sent"] += sent
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
            data = b"".join(protocol.pack({"event": event}) for event in events)
            self._counters["bytes_sent"] += len(data)
            try:
                await self._transport.send_all(data)
            except ConnectionLost as error:
                self._lost(error)
                return
            next_seq = events[-1]["seq"] + 1


# Requests the connection answers itself; every other command goes to the engine.
_CONNECTION_COMMANDS = (Hello, Ping, Stats, Snapshot, Watch)

# The engine commands each role may send (None: no valid hello yet, when auth is on). A
# connection keeps the set of its role; the request path asks only `type(command) in set`.
_ENGINE_COMMANDS_ALLOWED: dict[Role | None, frozenset[type]] = {
    role: frozenset(
        kind for kind, op in OP_OF_COMMAND.items()
        if kind not in _CONNECTION_COMMANDS and role is not None and role >= role_needed(op)
    )
    for role in (None, *Role)
}

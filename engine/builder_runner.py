"""The server's side of its long-lived snapshot builder (`snapshot_builder`).

One task (`BuilderRunner.run`, in the service nursery) owns the builder process: it starts one
when a snapshot is asked for, writes each request on its stdin and reads each reply on its stdout
(`builder_protocol`), and keeps it between snapshots, holding its copy of the state, until it has
been idle for `idle_seconds`; then it closes its stdin and the builder exits (the next snapshot
starts a new one, which loads the newest snapshot again). The process runs in a nursery of this
task (`trio.run_process`), so cancelling the task (shutdown) terminates it.

A builder that fails, exits, takes longer than `build_seconds_max` or breaks the protocol fails
its request (`BuildFailed`: the snapshot is not made, nothing is lost, the log has it all) and is
done with: terminated if it still runs. One that exits while idle (killed, out of memory) is
logged; either way the next request starts a new one. Requests come one at a time (the
`Snapshotter` takes one snapshot at a time): the request channel holds none.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import trio

from .builder_protocol import REPLY_LINE_BYTES_MAX, BuilderProtocolError, LineBuffer, parse_reply, request_line

log = logging.getLogger("engine.snapshots")

RECEIVE_BYTES_MAX = 4096  # a reply is one short line
# After its stdin is closed, or once it has said no more, a builder has this long to exit
# before it is terminated (it exits at once: it frees its state with the process).
EXIT_WAIT_SECONDS = 10.0

_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # where `engine` imports from


class BuildFailed(Exception):
    """The builder made no snapshot for a request; the message says why (after "the builder")."""


@dataclass
class _Request:
    seq: int
    done: trio.Event = field(default_factory=trio.Event)
    figures: dict[str, Any] | None = None
    failure: str | None = None

    def answer(self, figures: dict[str, Any] | None = None, failure: str | None = None) -> None:
        assert (figures is None) != (failure is None) and not self.done.is_set()
        self.figures, self.failure = figures, failure
        self.done.set()


class BuilderRunner:
    """The builder process of one server, started on demand and kept while it is used."""

    def __init__(self, lmdb_path: str, *, build_seconds_max: float, idle_seconds: float):
        assert build_seconds_max > 0 and idle_seconds >= 0
        self._command = [sys.executable, "-m", "engine.snapshot_builder", lmdb_path, str(os.getpid())]
        self._build_seconds_max = build_seconds_max
        self._idle_seconds = idle_seconds
        self._requests, self._incoming = trio.open_memory_channel[_Request](0)
        self._running = False
        self._idle_scope: trio.CancelScope | None = None
        self.pid: int | None = None  # while a builder process is alive (building or idle)
        self.starts = 0
        self.idle_stops = 0

    async def build(self, seq: int) -> dict[str, Any]:
        """The figures of the snapshot at `seq` (`builder_protocol.REPLY_FIELDS`), durable on
        return; `BuildFailed` when none was made."""
        if not self._running:
            raise BuildFailed("is not running (the server is stopping)")
        request = _Request(seq)
        try:
            await self._requests.send(request)
        except trio.BrokenResourceError:
            raise BuildFailed("is not running (the server is stopping)") from None
        await request.done.wait()
        if request.failure is not None:
            raise BuildFailed(request.failure)
        assert request.figures is not None
        return request.figures

    async def run(self) -> None:
        """Serve build requests, through one builder process at a time, until cancelled."""
        self._running = True
        try:
            async with self._incoming:
                request: _Request | None = None
                while True:
                    if request is None:
                        request = await self._incoming.receive()
                    request = await self._with_builder(request)
        finally:
            self._running = False

    async def _with_builder(self, request: _Request) -> _Request | None:
        """Start a builder for `request` and keep it for the requests that follow, until it
        fails, exits or is idle for `idle_seconds`. Returns a request received as it exited
        while idle (for the next builder), else None."""
        current: _Request | None = request
        async with trio.open_nursery() as nursery:
            try:
                process: trio.Process = await nursery.start(self._run_process)
            except OSError as error:
                request.answer(failure=f"could not start: {error}")
                return None
            self.pid = process.pid
            self.starts += 1
            log.info("snapshot builder started (pid %d) for seq %d", process.pid, request.seq)
            replies = _ReplyReader(process)
            try:
                while current is not None:
                    if process.returncode is not None:  # it exited as this request came: the next builder takes it
                        log.warning("snapshot builder (pid %d) exited while idle, with status %d: starting a new one", process.pid, process.returncode)
                        handed_on, current = current, None
                        return handed_on
                    if not await self._exchange(process, replies, current):
                        nursery.cancel_scope.cancel()  # terminated, if it still runs
                        return None
                    current = None
                    with trio.move_on_after(self._idle_seconds) as idle:
                        self._idle_scope = idle  # cancelled by `_run_process` if the builder exits meanwhile
                        current = await self._incoming.receive()
                    self._idle_scope = None
                if process.returncode is not None:
                    log.warning("snapshot builder (pid %d) exited while idle, with status %d: the next snapshot starts a new one",
                                process.pid, process.returncode)
                    return None
                log.info("snapshot builder (pid %d) idle for %g s: stopping it (the next snapshot loads the newest one again)",
                         process.pid, self._idle_seconds)
                self.idle_stops += 1
                await self._dismiss(process, nursery)
                return None
            finally:
                self.pid = self._idle_scope = None
                if current is not None and not current.done.is_set():
                    current.answer(failure="was stopped with the server")
                with trio.CancelScope(shield=True):  # closed even when cancelled: no descriptor left open
                    await _close_pipes(process)

    async def _run_process(self, task_status: trio.TaskStatus[trio.Process]) -> None:
        try:
            await trio.run_process(
                self._command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, check=False, cwd=_PACKAGE_ROOT, task_status=task_status,
            )
        finally:
            if self._idle_scope is not None:  # exited while idle: stop waiting for a request for it
                self._idle_scope.cancel()

    async def _exchange(self, process: trio.Process, replies: "_ReplyReader", request: _Request) -> bool:
        """Send `request`, wait for its reply and answer it. False when the builder cannot go
        on: it failed or exited, took too long, or broke the protocol."""
        assert process.stdin is not None
        line: bytes | None = None
        why: str | None = None
        with trio.move_on_after(self._build_seconds_max) as deadline:
            try:
                await process.stdin.send_all(request_line(request.seq))
                line = await replies.line()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                line = None  # it exited: said below
            except BuilderProtocolError as error:
                why = f"broke the protocol: {error}"
        if deadline.cancelled_caught:
            why = f"took longer than {self._build_seconds_max:g} s"
        elif why is None and line is None:
            with trio.move_on_after(EXIT_WAIT_SECONDS):
                await process.wait()
            why = f"exited with status {process.returncode}" if process.returncode is not None else "closed its output"
        elif why is None:
            assert line is not None
            try:
                figures = parse_reply(line)
            except BuilderProtocolError as error:
                why = f"broke the protocol: {error}"
            else:
                if figures["seq"] != request.seq:
                    why = f"answered for seq {figures['seq']}, not {request.seq}"
        if why is not None:
            request.answer(failure=why)
            return False
        request.answer(figures=figures)
        return True

    async def _dismiss(self, process: trio.Process, nursery: trio.Nursery) -> None:
        """End an idle builder: end of input, then a while to exit, then terminated."""
        assert process.stdin is not None
        await process.stdin.aclose()
        with trio.move_on_after(EXIT_WAIT_SECONDS):
            await process.wait()
        if process.returncode is None:
            nursery.cancel_scope.cancel()


class _ReplyReader:
    """Lines from a builder's stdout, each at most `REPLY_LINE_BYTES_MAX`."""

    def __init__(self, process: trio.Process):
        assert process.stdout is not None
        self._stream = process.stdout
        self._buffer = LineBuffer(REPLY_LINE_BYTES_MAX)
        self._ready: deque[bytes] = deque()

    async def line(self) -> bytes | None:
        """The next line, or None at the end of output (the builder exited)."""
        while not self._ready:
            data = await self._stream.receive_some(RECEIVE_BYTES_MAX)
            if not data:
                return None
            self._ready.extend(self._buffer.feed(data))
        return self._ready.popleft()


async def _close_pipes(process: trio.Process) -> None:
    for stream in (process.stdin, process.stdout):
        if stream is not None:
            await stream.aclose()

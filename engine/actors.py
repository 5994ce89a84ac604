"""Actors: one trio task per SKU-location, started on first use, asleep when idle.

An actor owns the decisions about its SKU-location: every message for it runs in its task, one
at a time, in arrival order. It drains everything queued in one wake-up (batching), then waits;
after `idle_seconds` with nothing to do its task ends and only the stock figures remain, so
millions of SKU-locations cost no tasks. Messages are plain callables run synchronously: no
message awaits, so no lock is ever needed.
"""

from __future__ import annotations

from collections import deque
from typing import Callable, Hashable, Iterable

import trio

Message = Callable[[], None]


class _Actor:
    __slots__ = ("key", "mailbox", "wakeup")

    def __init__(self, key: Hashable):
        self.key = key
        self.mailbox: deque[Message] = deque()
        self.wakeup: trio.Event | None = None


class Router:
    """Maps a key (a `(sku, loc)` pair) to its actor, waking or starting it."""

    def __init__(self, nursery: trio.Nursery, mailbox_messages_max: int, actors_running_max: int, idle_seconds: float):
        assert mailbox_messages_max >= 1 and actors_running_max >= 1
        self._nursery = nursery
        self._mailbox_messages_max = mailbox_messages_max
        self._actors_running_max = actors_running_max
        self._idle_seconds = idle_seconds
        self._actors: dict[Hashable, _Actor] = {}
        self.actors_started = 0
        self.messages_processed = 0
        self.wakeups = 0

    @property
    def actors_running(self) -> int:
        return len(self._actors)

    def has_room(self, keys: Iterable[Hashable]) -> bool:
        """Whether a message for each key can be queued now (checked before sending any, so a
        multi-line request is either fully sent or refused as `overloaded`)."""
        new_actors = 0
        for key in keys:
            actor = self._actors.get(key)
            if actor is None:
                new_actors += 1
            elif len(actor.mailbox) >= self._mailbox_messages_max:
                return False
        return len(self._actors) + new_actors <= self._actors_running_max

    def send(self, key: Hashable, message: Message) -> None:
        """Queue `message` for the actor of `key`. The caller checked `has_room` first."""
        actor = self._actors.get(key)
        if actor is None:
            actor = self._actors[key] = _Actor(key)
            self.actors_started += 1
            self._nursery.start_soon(self._run, actor, name=f"actor {key!r}")
        assert len(actor.mailbox) < self._mailbox_messages_max, f"mailbox of {key!r} is full"
        actor.mailbox.append(message)
        if actor.wakeup is not None:
            actor.wakeup.set()
            actor.wakeup = None

    async def _run(self, actor: _Actor) -> None:
        while True:
            self.wakeups += 1
            # Everything queued now is handled in this wake-up; nothing can arrive meanwhile,
            # since messages run synchronously.
            while actor.mailbox:
                message = actor.mailbox.popleft()
                message()
                self.messages_processed += 1
            actor.wakeup = trio.Event()
            with trio.move_on_after(self._idle_seconds):
                await actor.wakeup.wait()
            if not actor.mailbox:
                actor.wakeup = None
                del self._actors[actor.key]
                return

"""Owner tasks: each SKU-location belongs to exactly one of a fixed set of trio tasks.

A SKU-location's messages all go to the owner of its hash partition and run there one at a
time, in arrival order, so no lock is ever needed. An owner drains everything queued in one
wake-up: under load, one task switch serves many messages, whatever the spread of keys (a task
per SKU-location would cost a switch for nearly every message once the load is spread over
many of them). The partition is also the unit that can later move to another process.
Messages are plain callables run synchronously: no message awaits.
"""

from __future__ import annotations

from collections import deque
from typing import Callable, Hashable, Iterable

import trio

Message = Callable[[], None]


class Owners:
    """Routes a key (a `(sku, loc)` pair) to the mailbox of the task that owns it."""

    def __init__(
        self, nursery: trio.Nursery, owner_count: int, mailbox_messages_max: int, key_hash: Callable[[Hashable], int] = hash,
    ):
        """`key_hash` picks a key's partition; the default, `hash`, is salted per process for
        strings, so the deterministic simulation passes a stable one."""
        assert owner_count >= 1 and mailbox_messages_max >= 1
        self._owner_count = owner_count
        self._key_hash = key_hash
        self._mailbox_messages_max = mailbox_messages_max
        self._mailboxes: list[deque[Message]] = [deque() for _ in range(owner_count)]
        self._wakeups: list[trio.Event | None] = [None] * owner_count
        self.messages_processed = 0
        self.wakeups = 0
        for index in range(owner_count):
            nursery.start_soon(self._run, index, name=f"owner {index}")

    @property
    def owner_count(self) -> int:
        return self._owner_count

    @property
    def awake(self) -> int:
        """Owner tasks woken or running (not waiting for a message)."""
        return sum(1 for wakeup in self._wakeups if wakeup is None)

    @property
    def queued(self) -> int:
        return sum(len(mailbox) for mailbox in self._mailboxes)

    def has_room(self, keys: Iterable[Hashable]) -> bool:
        """Whether a message for each key can be queued now (checked before sending any, so a
        multi-line request is either fully sent or refused as `overloaded`)."""
        added: dict[int, int] = {}
        for key in keys:
            index = self._key_hash(key) % self._owner_count
            added[index] = added.get(index, 0) + 1
        mailboxes, limit = self._mailboxes, self._mailbox_messages_max
        return all(len(mailboxes[index]) + count <= limit for index, count in added.items())

    def send(self, key: Hashable, message: Message) -> None:
        """Queue `message` for the owner of `key`. The caller checked `has_room` first."""
        index = self._key_hash(key) % self._owner_count
        mailbox = self._mailboxes[index]
        assert len(mailbox) < self._mailbox_messages_max, f"mailbox of owner {index} is full"
        mailbox.append(message)
        wakeup = self._wakeups[index]
        if wakeup is not None:
            wakeup.set()
            self._wakeups[index] = None

    def try_send(self, key: Hashable, message: Message) -> bool:
        """Queue `message` for the owner of `key` if its mailbox has room; else return False."""
        index = self._key_hash(key) % self._owner_count
        mailbox = self._mailboxes[index]
        if len(mailbox) >= self._mailbox_messages_max:
            return False
        mailbox.append(message)
        wakeup = self._wakeups[index]
        if wakeup is not None:
            wakeup.set()
            self._wakeups[index] = None
        return True

    async def _run(self, index: int) -> None:
        mailbox = self._mailboxes[index]
        while True:
            # Everything queued now is handled in this wake-up, including what its messages
            # queue here in turn (they run synchronously, nothing else runs meanwhile).
            count = 0
            while mailbox:
                mailbox.popleft()()
                count += 1
            self.messages_processed += count
            self.wakeups += 1
            wakeup = self._wakeups[index] = trio.Event()
            await wakeup.wait()

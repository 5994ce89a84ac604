"""The sync's settings: where it reads and writes, and the bounds of its loop.

A module of its own with no heavy imports: the engine's command line builds the `sync` parser
from these defaults without loading the sync itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from protocol import TlsOptions  # the sync's command line imports `protocol` anyway


@dataclass(frozen=True)
class SyncSettings:
    """Where to read, where to write, and the bounds of the loop."""

    host: str
    port: int
    url: str
    token: str | None = None
    tls: TlsOptions | None = None  # None: plaintext
    batch_events_max: int = 500  # events per database transaction
    batch_window_seconds: float = 0.05  # how long a batch waits to fill once it has one event
    idle_wait_seconds: float = 0.5  # a wait for the first event of a batch; then stop/lag/progress checks
    engine_timeout_seconds: float = 10.0  # connect, hello, watch reply, stats
    head_poll_seconds: float = 2.0  # `stats` for the engine's durable seq (the lag metric)
    progress_seconds: float = 10.0  # progress line in the log
    reconnect_delay_initial_seconds: float = 0.1
    reconnect_delay_max_seconds: float = 5.0  # the delay doubles per failure in a row, up to this
    dead_letters_max: int = 100_000  # past this many dead letters the sync stops (see `TooManyDeadLetters`)

"""Server configuration: every bound the server enforces, with its default and why."""

from __future__ import annotations

from dataclasses import dataclass

SNAPSHOT_BUILDERS = ("process", "loop")
OWNER_TASKS_MAX = 1024  # each is a task and a mailbox; more partitions than this buy nothing on one loop

from protocol import DEFAULT_HOST, DEFAULT_PORT, MAX_FRAME_BYTES

HOUR_MS = 3600 * 1000
DAY_MS = 24 * HOUR_MS


@dataclass(frozen=True)
class Config:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT  # 0 = any free port (tests)
    data_dir: str = "data"
    metrics_port: int | None = None  # Prometheus `/metrics` on host:metrics_port (None: off; 0: any free port)
    token: str | None = None  # when set, a connection must `hello` with it first (one admin token)
    auth_file: str | None = None  # TOML file of named tokens with roles (engine/auth.py); re-read on SIGHUP
    insecure: bool = False  # allow listening beyond loopback without auth (logged as a warning)
    # TLS (PEM files): with cert and key set, every connection is TLS; with the client CA set too,
    # clients must present a certificate signed by it.
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_client_ca_file: str | None = None

    max_frame_bytes: int = MAX_FRAME_BYTES
    # LMDB reserves address space, not disk: the data file grows only as pages are written. The
    # map starts at `map_size_bytes` and doubles whenever a write finds it full (the write is
    # retried), up to `map_size_max_bytes`: the disk the operator lets the log take. At that
    # ceiling the log stops acknowledging changes (`internal`, naming the cause); reads of
    # durable state are still answered. (Before the map grew it was a fixed 32 GiB.)
    map_size_bytes: int = 1024**3
    map_size_max_bytes: int = 256 * 1024**3

    # Back-pressure. At each bound the server answers `overloaded` or stops reading a socket.
    connections_max: int = 4096
    in_flight_per_connection_max: int = 4096  # unanswered requests; then the socket is not read
    # A frame begun and not finished within this time closes the connection: a client that
    # trickles (or stalls in) a frame would otherwise hold a connection slot forever. An idle
    # connection between frames is fine and is kept.
    partial_frame_timeout_seconds: float = 30.0
    # A connection that sends no request for this long while it is owed no reply is closed (None:
    # never; order systems keep pooled connections open for hours). Watchers are never idle.
    idle_timeout_seconds: float | None = None
    tls_handshake_timeout_seconds: float = 10.0  # a TLS client that does not finish its handshake is dropped
    mailbox_messages_max: int = 16_384  # per owner task (each owns a partition of SKU-locations)
    wal_backlog_max: int = 200_000  # records applied but not yet committed

    # Group commit: one LMDB transaction (one fsync) takes what has gathered, up to this many.
    records_per_commit_max: int = 20_000
    # Owner tasks, each owning a hash partition of the SKU-locations. Few enough that each
    # wake-up drains a batch under any spread of keys; more than one so that partitions are
    # ready to move to other processes later.
    owner_tasks: int = 8  # at most OWNER_TASKS_MAX
    # Freeze the survivors of a slow full garbage collection (`engine.gc_freezer`). Off in the
    # in-process test servers, which share the test runner's interpreter.
    freeze_after_slow_full_collections: bool = True

    id_retention_ms: int = DAY_MS  # rid/key remembered at least this long after the end
    forget_interval_seconds: float = 60.0
    forget_batch_max: int = 10_000
    log_retention_ms: int = 7 * DAY_MS  # log records kept (audit, watch) even when a snapshot covers them
    snapshot_interval_seconds: float = 300.0  # periodic snapshot when anything changed
    snapshots_kept: int = 2
    # Where snapshots are built: "process" (a builder process loads the previous snapshot and
    # replays the durable log through the same core: the event loop never pauses) or "loop"
    # (the state is copied on the event loop, which stalls serving: ~0.3 s per 100k
    # reservations). The final snapshot at shutdown is built on the loop (nothing is served).
    snapshot_builder: str = "process"
    snapshot_builder_seconds_max: float = 3600.0  # a build still running then is given up: its builder is killed
    # A builder process stays between snapshots with its copy of the state (about the server's
    # own memory: ~1.3 GB at 1M SKU-locations and 1M reservations), so that the next snapshot
    # replays only the log since the last one (at 1M: seconds, against ~10 s more to load the
    # newest snapshot first). Idle this long, it exits and frees that memory; the next snapshot
    # loads again. Above `snapshot_interval_seconds` (300 s), periodic snapshots keep it for good;
    # 0: a builder per snapshot (the memory only while one is built).
    snapshot_builder_idle_seconds: float = 600.0
    # Log trimming after a snapshot: records deleted per LMDB write transaction. Each holds
    # LMDB's writer lock, and so the log's commits, while it runs: keep it short (~10 ms).
    trim_records_per_transaction: int = 10_000
    watch_batch_max: int = 1000  # events read from the log per watcher step

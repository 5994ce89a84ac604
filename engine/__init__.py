"""The inventory reservation engine: a pure core (`engine.core`) inside a trio shell.

Shell modules, one job each: `storage` (LMDB log + snapshots), `wal` (group commit),
`owners` (hash partitions of SKU-locations, one task each), `coordinator` (multi-line holds), `expiry` (TTL timers),
`service` (routes commands, owns the state), `recovery` (snapshot + replay), `connection`
(one client), `server` (listener and lifecycle), `cli` (`python -m engine`).
"""

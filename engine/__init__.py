"""The inventory reservation engine: a pure core (`engine.core`) inside a trio shell.

Shell modules, one job each: `storage` (LMDB log + snapshots), `wal` (group commit),
`actors` (one task per SKU-location), `coordinator` (multi-line holds), `expiry` (TTL timers),
`service` (routes commands, owns the state), `recovery` (snapshot + replay), `connection`
(one client), `server` (listener and lifecycle), `cli` (`python -m engine`).
"""

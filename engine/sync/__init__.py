"""Downstream sync: `python -m engine sync` keeps a SQL read model of the engine's stock and
reservations, fed by `watch from_seq`, exactly once (see docs/ARCHITECTURE.md, "Downstream sync").

- `read_model`: what one event changes in the rows (pure);
- `databases`: open SQLite or PostgreSQL from a `--to` URL;
- `sink`: the tables, the batch transaction (rows and offset together), dead letters;
- `consumer`: the loop (watch, batch, apply, reconnect); `metrics`: the KPIs;
- `command`: `python -m engine sync`, its arguments and exit codes; `settings`: its bounds.
"""

from .command import add_sync_parser, main, run_sync_command

__all__ = ["add_sync_parser", "main", "run_sync_command"]

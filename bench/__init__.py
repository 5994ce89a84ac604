"""Load tools for the reservation engine.

`python -m bench` runs one load generator against the engine and its peers (a bare trio echo
server, Redis with Lua scripts, PostgreSQL) and reports them side by side; `scripts/loadtest`
(`python -m bench.loadtest`) runs the same generator and verdict against one engine, started
here or already running. `python -m bench.channels` replays a simulated day of orders from several
sales channels, decided on channel copies synced every T minutes and through the engine, and
reports what each oversold and refused. The older scripts
(`reserve_load.py`, `crash_torture.py`, `recovery_time.py`) still run as files.

Bench code imports only the public `protocol` package, never `engine`; nothing imports `bench`.
"""

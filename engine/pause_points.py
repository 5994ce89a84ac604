"""Pause points for the crash tests: a named place where, when the environment asks for it, the
process says so on stderr and sleeps, so that a test's kill -9 lands exactly there.

`ENGINE_PAUSE_AT=<name>:<seconds>[@<flag file>][,...]` (read once, at import). With a flag file,
only the process that removes it pauses (a child process inherits the variable: of several
snapshot builders, only the first pauses). Names in use:
`snapshot-write` (inside a snapshot file's write), `trim` (between two log-trimming
transactions), `replay` (after the first log entry recovery replays). Unset (always, outside
the tests), a pause point costs one dict lookup.
"""

from __future__ import annotations

import os
import sys
import time

ENVIRONMENT_VARIABLE = "ENGINE_PAUSE_AT"
PAUSE_SECONDS_MAX = 60.0  # a forgotten pause must not hang a process for ever


def _parse(value: str) -> dict[str, tuple[float, str | None]]:
    pauses: dict[str, tuple[float, str | None]] = {}
    for part in filter(None, (piece.strip() for piece in value.split(","))):
        name, _, rest = part.partition(":")
        seconds, _, flag_path = rest.partition("@")
        pauses[name] = (min(float(seconds or 0), PAUSE_SECONDS_MAX), flag_path or None)
    return pauses


_PAUSES = _parse(os.environ.get(ENVIRONMENT_VARIABLE, ""))


def pause_point(name: str) -> None:
    """Pause here for the configured time, once per process, if `name` is configured."""
    pause = _PAUSES.pop(name, None)
    if pause is None:
        return
    seconds, flag_path = pause
    if flag_path is not None:
        try:
            os.remove(flag_path)  # the one process that removes it pauses
        except FileNotFoundError:
            return
    print(f"pause point {name}: pausing {seconds:g} s (pid {os.getpid()})", file=sys.stderr, flush=True)
    time.sleep(seconds)

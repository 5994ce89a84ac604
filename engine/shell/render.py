"""How the shell prints: aligned tables or JSON, times, and a progress bar on stderr."""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from typing import Any, Iterable, Sequence, TextIO


def format_time_ms(ms: int | None) -> str:
    """Epoch milliseconds as ISO-8601 UTC with milliseconds (`-` for none)."""
    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def parse_time_ms(text: str) -> int:
    """A time given as epoch milliseconds (digits only) or ISO-8601 (a time without a zone is UTC)."""
    text = text.strip()
    if text.isdigit():
        return int(text)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"not a time: {text!r} (ISO-8601 such as 2026-11-27T16:30:00Z, or epoch milliseconds)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return int(moment.timestamp() * 1000)


def time_argument(text: str) -> int:
    """`parse_time_ms` for argparse: a bad time is a usage error with the reason."""
    try:
        return parse_time_ms(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class Printer:
    """Where a command's results go: aligned text tables, or one JSON document per result."""

    def __init__(self, out: TextIO, err: TextIO, as_json: bool):
        self.out = out
        self.err = err
        self.as_json = as_json

    def table(
        self,
        columns: Sequence[str],
        rows: Iterable[Sequence[Any]],
        *,
        title: str | None = None,
        totals: Sequence[Any] | None = None,
    ) -> None:
        """Rows under their column names, numbers right-aligned; `totals` as a last line.
        As JSON: `{"rows": [{column: value}], "totals": {...}}` (with `title` when given)."""
        rows = [list(row) for row in rows]
        if self.as_json:
            document: dict[str, Any] = {}
            if title:
                document["title"] = title
            document["rows"] = [dict(zip(columns, row)) for row in rows]
            if totals is not None:
                document["totals"] = {column: value for column, value in zip(columns, totals) if value is not None}
            self.json(document)
            return
        if title:
            self.out.write(f"{title}\n")
        lines = [[_cell(value) for value in row] for row in rows]
        total_cells = [_cell(value) if value is not None else "" for value in totals] if totals is not None else None
        widths = [len(column) for column in columns]
        for cells in lines + ([total_cells] if total_cells else []):
            for index, text in enumerate(cells):
                widths[index] = max(widths[index], len(text))
        numeric = [any(_is_number(row[index]) for row in rows) for index in range(len(columns))]

        def layout(cells: Sequence[str]) -> str:
            parts = [text.rjust(width) if right else text.ljust(width) for text, width, right in zip(cells, widths, numeric)]
            return "  ".join(parts).rstrip()

        self.out.write(layout(list(columns)) + "\n")
        for cells in lines:
            self.out.write(layout(cells) + "\n")
        if total_cells is not None:
            self.out.write(layout(["-" * width for width in widths]) + "\n")
            self.out.write(layout(total_cells) + "\n")

    def fields(self, values: dict[str, Any], *, title: str | None = None) -> None:
        """Name: value lines, names aligned. As JSON: the map itself."""
        if self.as_json:
            self.json(values)
            return
        if title:
            self.out.write(f"{title}\n")
        width = max((len(name) for name in values), default=0)
        for name, value in values.items():
            self.out.write(f"{name.ljust(width)}  {_cell(value)}\n")

    def json(self, document: Any) -> None:
        """One JSON document on one line."""
        self.out.write(json.dumps(document, separators=(",", ":"), default=_json_default) + "\n")

    def line(self, text: str) -> None:
        """A line of text on stdout (not in JSON mode: there it goes to stderr, keeping stdout parseable)."""
        (self.err if self.as_json else self.out).write(text + "\n")

    def note(self, text: str) -> None:
        """A remark for the operator, on stderr."""
        self.err.write(text + "\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, (tuple, set)):
        return list(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


PROGRESS_REDRAW_SECONDS = 0.2  # often enough to look alive, rarely enough to cost nothing
PROGRESS_BAR_WIDTH = 30


class Progress:
    """A one-line progress bar with records/s on stderr, redrawn in place; silent when disabled."""

    def __init__(self, label: str, total: int, stream: TextIO, enabled: bool):
        self.label = label
        self.total = max(total, 0)
        self.stream = stream
        self.enabled = enabled
        self.done = 0
        self._started = time.monotonic()
        self._last_drawn = 0.0

    def advance(self, records: int) -> None:
        """Count `records` more as done; redraw at most every PROGRESS_REDRAW_SECONDS."""
        self.done += records
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last_drawn >= PROGRESS_REDRAW_SECONDS:
            self._last_drawn = now
            self._draw(now, end="\r")

    def finish(self) -> None:
        """Draw the final figures and end the line."""
        if self.enabled:
            self._draw(time.monotonic(), end="\n")

    def _draw(self, now: float, end: str) -> None:
        elapsed_seconds = max(now - self._started, 1e-6)
        fraction = min(self.done / self.total, 1.0) if self.total else 1.0
        filled = int(fraction * PROGRESS_BAR_WIDTH)
        bar = "#" * filled + "." * (PROGRESS_BAR_WIDTH - filled)
        rate = self.done / elapsed_seconds
        self.stream.write(
            f"{self.label} [{bar}] {fraction * 100:5.1f}% {self.done}/{self.total} records, {rate:,.0f} records/s, {elapsed_seconds:.1f} s{end}"
        )
        self.stream.flush()


def progress_wanted(stream: TextIO, forced: bool) -> bool:
    """A progress bar is drawn on a terminal, or when asked for (`--progress`)."""
    return forced or (hasattr(stream, "isatty") and stream.isatty())


def default_streams() -> tuple[TextIO, TextIO]:
    """The process's stdout and stderr (looked up at call time, so tests can redirect them)."""
    return sys.stdout, sys.stderr

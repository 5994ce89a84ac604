"""`reconcile COUNTS.csv`: the variance between a physical count and the recorded stock, and
with `--apply` the count posted to the server, idempotently.

The file has columns `sku`, `loc`, `counted` (a header row; other columns are ignored). Recorded
is `on_hand` from the server (`--connect`) or else from the data folder (`--data`: the state a
restart would recover). Variance = counted - recorded, sorted by absolute size; `--threshold`
marks the lines to look at.

`--apply` posts one `count` per row (a count sets on_hand to the counted figure), each with the
key `reconcile-<first 16 hex of the file's sha256>-<row>`: running the same file again changes
nothing (every count is a duplicate, and the printed variance is the one recorded the first
time). A changed file is a new count with new keys.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
from dataclasses import dataclass

from protocol import parse_address
from protocol import requests as request_builders

from .commands import FAILED, OK, Command, Session
from .data_folder import ShellError

COUNT_ROWS_MAX = 1_000_000  # a count file is a warehouse's SKU-locations, not a log
DEFAULT_REASON = "reconcile"
ROWS_PER_PROGRESS_STEP = 1_000  # counts pipelined between two redraws of the progress bar


@dataclass(frozen=True)
class CountedRow:
    row: int  # data row number in the file, from 1 (the header is row 0)
    sku: str
    loc: str
    counted: int


def read_count_file(data: bytes, path: str) -> list[CountedRow]:
    """The rows of a count file; a `ShellError` names the first bad row."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise ShellError(f"{path} is not UTF-8: {error}") from None
    reader = csv.DictReader(io.StringIO(text))
    columns = {name.strip().lower(): name for name in reader.fieldnames or ()}
    missing = [name for name in ("sku", "loc", "counted") if name not in columns]
    if missing:
        raise ShellError(f"{path}: the header lacks column(s) {', '.join(missing)} (it needs sku, loc, counted)")
    rows: list[CountedRow] = []
    seen: dict[tuple[str, str], int] = {}
    for number, record in enumerate(reader, start=1):
        sku, loc, counted = (str(record.get(columns[name]) or "").strip() for name in ("sku", "loc", "counted"))
        if not (sku or loc or counted):
            continue  # a blank line
        if not sku or not loc:
            raise ShellError(f"{path} row {number}: sku and loc are required")
        if not counted.isdigit():
            raise ShellError(f"{path} row {number}: counted must be a whole number >= 0, not {counted!r}")
        if (sku, loc) in seen:
            raise ShellError(f"{path} row {number}: {sku} @ {loc} was counted already in row {seen[(sku, loc)]}")
        if len(rows) >= COUNT_ROWS_MAX:
            raise ShellError(f"{path}: more than {COUNT_ROWS_MAX} rows")
        seen[(sku, loc)] = number
        rows.append(CountedRow(number, sku, loc, int(counted)))
    return rows


def row_key(file_digest: str, row: int) -> str:
    """The idempotency key of one row's count: the same file and row give the same key."""
    return f"reconcile-{file_digest[:16]}-{row}"


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("counts_csv", metavar="COUNTS.csv", help="columns sku, loc, counted")
    parser.add_argument("--threshold", metavar="N", type=int, default=None, help="mark lines with |variance| >= this")
    parser.add_argument("--apply", action="store_true", help="post the counts to the server (--connect): on_hand becomes counted")
    parser.add_argument("--reason", default=DEFAULT_REASON, help="reason of the posted counts (default %(default)s; keep it for reruns)")
    parser.add_argument("--connect", metavar="HOST:PORT", type=parse_address, default=None, help="the server (default: the shell's --connect)")


def _run(session: Session, arguments: argparse.Namespace) -> int:
    try:
        with open(arguments.counts_csv, "rb") as count_file:
            data = count_file.read()
    except OSError as error:
        raise ShellError(f"cannot read {arguments.counts_csv}: {error}") from None
    rows = read_count_file(data, arguments.counts_csv)
    address = arguments.connect or session.address
    if arguments.apply:
        if address is None:
            raise ShellError("--apply posts counts to a server: give --connect HOST:PORT")
        lines, failures = _apply(session, address, rows, hashlib.sha256(data).hexdigest(), arguments.reason)
    elif address is not None:
        lines, failures = _variances_from_server(session, address, rows), []
    else:
        lines, failures = _variances_from_data(session, rows), []
    _print(session, lines, arguments.threshold, arguments.apply)
    for failure in failures:
        session.printer.line(f"failed: {failure}")
    return FAILED if failures else OK


# A line of the printout: (sku, loc, counted, recorded, variance, status)
Line = tuple[str, str, int, int, int, str]


def _variances_from_data(session: Session, rows: list[CountedRow]) -> list[Line]:
    with session.data_folder() as folder:
        progress = session.progress("reconcile", folder.last_seq)
        state = folder.state_at(folder.last_seq, on_progress=progress.advance)
        progress.finish()
    return [(row.sku, row.loc, row.counted, state.stock(row.sku, row.loc).on_hand,
             row.counted - state.stock(row.sku, row.loc).on_hand, "") for row in rows]


def _variances_from_server(session: Session, address: tuple[str, int], rows: list[CountedRow]) -> list[Line]:
    client = session.client(address)
    replies = client.pipeline([request_builders.get_request(row.sku, row.loc) for row in rows])
    lines = []
    for row, reply in zip(rows, replies):
        if reply.get("ok") is not True:
            raise ShellError(f"row {row.row}: get {row.sku} {row.loc}: {reply.get('error')}: {reply.get('message')}")
        lines.append((row.sku, row.loc, row.counted, reply["on_hand"], row.counted - reply["on_hand"], ""))
    return lines


def _apply(session: Session, address: tuple[str, int], rows: list[CountedRow], file_digest: str, reason: str) -> tuple[list[Line], list[str]]:
    client = session.client(address)
    progress = session.progress("apply", len(rows))
    replies: list[dict] = []
    for start in range(0, len(rows), ROWS_PER_PROGRESS_STEP):
        chunk = rows[start : start + ROWS_PER_PROGRESS_STEP]
        replies += client.pipeline([
            request_builders.count_request(row_key(file_digest, row.row), row.sku, row.loc, row.counted, reason) for row in chunk
        ])
        progress.advance(len(chunk))
    progress.finish()
    lines: list[Line] = []
    failures: list[str] = []
    for row, reply in zip(rows, replies):
        if reply.get("ok") is not True:
            failures.append(f"row {row.row} ({row.sku} @ {row.loc}): {reply.get('error')}: {reply.get('message')}")
            continue
        # The reply's variance is counted minus what was recorded when the count was applied
        # (for a duplicate: the first time), so recorded = counted - variance.
        variance = reply["variance"]
        lines.append((row.sku, row.loc, row.counted, row.counted - variance, variance, "duplicate" if reply.get("duplicate") else "applied"))
    return lines, failures


def _print(session: Session, lines: list[Line], threshold: int | None, applied: bool) -> None:
    lines = sorted(lines, key=lambda line: (-abs(line[4]), line[0], line[1]))
    columns = ["sku", "loc", "counted", "recorded", "variance", "check"]
    marked = 0
    rows = []
    for sku, loc, counted, recorded, variance, status in lines:
        flagged = threshold is not None and abs(variance) >= threshold
        marked += flagged
        row = [sku, loc, counted, recorded, variance, "!" if flagged else ""]
        if applied:
            row.append(status)
        rows.append(row)
    if applied:
        columns.append("count")
    totals = [
        f"{len(lines)} lines", "", sum(line[2] for line in lines), sum(line[3] for line in lines),
        sum(line[4] for line in lines), f"{marked} marked" if threshold is not None else "",
    ]
    if applied:
        duplicates = sum(1 for line in lines if line[5] == "duplicate")
        totals.append(f"{len(lines) - duplicates} applied, {duplicates} duplicate")
    session.printer.table(columns, rows, totals=totals)
    if not session.printer.as_json:
        absolute = sum(abs(line[4]) for line in lines)
        session.printer.line(f"net variance {sum(line[4] for line in lines)}, absolute variance {absolute}"
                             + (f", {marked} lines with |variance| >= {threshold}" if threshold is not None else ""))


COMMANDS = [
    Command(
        "reconcile", "variance of a physical count (CSV: sku, loc, counted) against the recorded stock", "reconcile",
        _arguments, _run,
        details=(
            "Recorded is on_hand from the server (--connect) or else from the data folder (--data). Variance =\n"
            "counted - recorded, largest first; --threshold N marks lines with |variance| >= N; totals at the end.\n"
            "--apply --connect HOST:PORT posts a `count` per row (on_hand becomes the counted figure; the variance\n"
            "printed is the server's at the moment of the count). Keys come from the file's sha256 and the row\n"
            "number: running the same file again changes nothing (every row a duplicate). Keep --reason the same\n"
            "for a rerun (another reason with the same key is a conflict)."
        ),
    ),
]

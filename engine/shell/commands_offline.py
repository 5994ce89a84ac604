"""Offline commands that read a data folder: `info`, `snapshots`, `log`, `history`, `export`.

(`replay` and `verify` have their own files.) All of them open the folder read-only, so they
are safe on a running server's folder.
"""

from __future__ import annotations

import argparse
import csv
from collections import deque
import json
from typing import Any, Iterator, TextIO

from ..core import Event, State
from .commands import OK, Command, Session
from .data_folder import DataFolder, ShellError, event_stock_keys, event_summary
from .render import Progress, format_time_ms, time_argument

LOG_ROWS_DEFAULT = 1_000
HISTORY_ROWS_DEFAULT = 10_000


# -- info ---------------------------------------------------------------------------------------


def _info_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def _info(session: Session, arguments: argparse.Namespace) -> int:
    with session.data_folder() as folder:
        sizes = folder.storage.snapshot_sizes()
        session.printer.fields({
            "folder": folder.path,
            "served_now": folder.served_now(),
            "first_seq": folder.first_seq(),
            "last_seq": folder.last_seq,
            "snapshots": ", ".join(str(seq) for seq, _ in sizes) or "none",
            "map_size_bytes": folder.storage.stats()["map_size_bytes"],
        })
    return OK


# -- snapshots ----------------------------------------------------------------------------------


def _snapshots_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def _snapshots(session: Session, arguments: argparse.Namespace) -> int:
    with session.data_folder() as folder:
        rows = []
        for seq, size_bytes in folder.storage.snapshot_sizes():
            event = folder.event_at(seq) if seq else None
            rows.append((seq, format_time_ms(event["ts_ms"]) if event else None, size_bytes))
        session.printer.table(("seq", "time", "size_bytes"), rows)
        first = folder.first_seq()
        session.printer.note(f"log: seq {first} to {folder.last_seq}" if first is not None else "log: no record retained")
    return OK


# -- event filters (log, export) ------------------------------------------------------------------


def add_event_filters(parser: argparse.ArgumentParser) -> None:
    """The range and field filters shared by `log` and `export`."""
    parser.add_argument("--from-seq", metavar="SEQ", type=int, default=None, help="first seq (inclusive)")
    parser.add_argument("--to-seq", metavar="SEQ", type=int, default=None, help="last seq (inclusive)")
    parser.add_argument("--since", metavar="T", type=time_argument, default=None, help="first time (ISO-8601 or epoch ms, inclusive)")
    parser.add_argument("--until", metavar="T", type=time_argument, default=None, help="last time (ISO-8601 or epoch ms, inclusive)")
    parser.add_argument("--sku", default=None, help="events touching this SKU")
    parser.add_argument("--loc", default=None, help="events touching this location")
    parser.add_argument("--rid", default=None, help="events of this reservation")
    parser.add_argument("--key", default=None, help="the event of this adjust/count/transfer key")
    parser.add_argument("--ref", default=None, help="events of reservations with this ref (e.g. an order number)")
    parser.add_argument("--type", dest="event_type", metavar="TYPE", default=None, help="events of this type (reserved, counted, ...)")


def filtered_events(folder: DataFolder, arguments: argparse.Namespace) -> Iterator[Event]:
    """The retained events in the range that pass every filter given."""
    from_seq = arguments.from_seq or 1
    rids_with_ref: set[str] = set()
    if arguments.ref is not None:
        # Only `reserved` carries the ref: learn the rids from the snapshot and from every
        # earlier event, so that a release in range is found even when its reserve is not.
        snapshot = folder.storage.latest_snapshot()
        if snapshot is not None and snapshot.get("format") in (3, 4):  # flat reservation records
            rids_with_ref.update(record[0] for record in snapshot["reservations"] if record[2] == arguments.ref)
        scan_from = 1
    else:
        scan_from = from_seq
    for event in folder.events(scan_from, arguments.to_seq):
        if arguments.ref is not None and event["type"] == "reserved" and event.get("ref") == arguments.ref:
            rids_with_ref.add(event["rid"])
        if event["seq"] < from_seq:
            continue
        if _passes(event, arguments, rids_with_ref):
            yield event


def _passes(event: Event, arguments: argparse.Namespace, rids_with_ref: set[str]) -> bool:
    if arguments.since is not None and event["ts_ms"] < arguments.since:
        return False
    if arguments.until is not None and event["ts_ms"] > arguments.until:
        return False
    if arguments.event_type is not None and event["type"] != arguments.event_type:
        return False
    if arguments.rid is not None and event.get("rid") != arguments.rid and arguments.rid not in event.get("rids", ()):
        return False
    if arguments.key is not None and event.get("key") != arguments.key and arguments.key not in event.get("keys", ()):
        return False
    if arguments.ref is not None and event.get("rid") not in rids_with_ref:
        return False
    if arguments.sku is not None or arguments.loc is not None:
        stock_keys = event_stock_keys(event)
        if not any(
            (arguments.sku is None or sku == arguments.sku) and (arguments.loc is None or loc == arguments.loc)
            for sku, loc in stock_keys
        ):
            return False
    return True


class _ScanProgress:
    """A progress bar over a scan of the log, advanced by the seq reached (filters skip records)."""

    def __init__(self, progress: Progress, start_seq: int):
        self.progress = progress
        self.start_seq = start_seq

    def reach(self, seq: int) -> None:
        self.progress.advance(seq - self.start_seq + 1 - self.progress.done)

    def finish(self) -> None:
        self.progress.finish()


def _scan_progress(session: Session, label: str, folder: DataFolder, arguments: argparse.Namespace) -> _ScanProgress:
    start_seq = max(folder.first_seq() or 1, arguments.from_seq or 1)
    end_seq = folder.last_seq if arguments.to_seq is None else min(arguments.to_seq, folder.last_seq)
    return _ScanProgress(session.progress(label, end_seq - start_seq + 1), start_seq)


# -- log ----------------------------------------------------------------------------------------


def _log_arguments(parser: argparse.ArgumentParser) -> None:
    add_event_filters(parser)
    parser.add_argument("--limit", metavar="N", type=int, default=LOG_ROWS_DEFAULT, help="at most this many records (default %(default)s)")
    parser.add_argument("--last", action="store_true", help="the last --limit matching records instead of the first")


def _log(session: Session, arguments: argparse.Namespace) -> int:
    if arguments.limit < 1:
        raise ShellError("--limit must be at least 1")
    # With --last, the window slides to the end (a bounded deque: memory stays --limit records).
    rows: deque[tuple[Any, ...]] = deque(maxlen=arguments.limit if arguments.last else None)
    more = False
    with session.data_folder() as folder:
        progress = _scan_progress(session, "log", folder, arguments)
        for event in filtered_events(folder, arguments):
            progress.reach(event["seq"])
            if len(rows) >= arguments.limit:
                more = True
                if not arguments.last:
                    break
            rows.append((event["seq"], format_time_ms(event["ts_ms"]), event["type"], event_summary(event)))
        progress.finish()
    session.printer.table(("seq", "time", "type", "details"), rows)
    if more:
        which = "last" if arguments.last else "first"
        session.printer.note(f"(more records match: showing the {which} {arguments.limit}; raise --limit or use export)")
    return OK


# -- history ------------------------------------------------------------------------------------


def _history_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sku")
    parser.add_argument("loc")
    parser.add_argument("--to-seq", metavar="SEQ", type=int, default=None, help="stop at this seq (default: the end of the log)")
    parser.add_argument("--limit", metavar="N", type=int, default=HISTORY_ROWS_DEFAULT, help="at most this many changes (default %(default)s)")


def _history(session: Session, arguments: argparse.Namespace) -> int:
    stock_key = (arguments.sku, arguments.loc)
    rows: list[tuple[Any, ...]] = []
    more = False
    with session.data_folder() as folder:
        through_seq = folder.last_seq if arguments.to_seq is None else min(arguments.to_seq, folder.last_seq)
        # From the oldest start the log reaches from: every retained change is shown.
        base = folder.replay_bases(through_seq)[:1]
        if not base:
            base = [folder.nearest_base(through_seq)]
        state = folder.base_state(base[0])
        start = state.stock(*stock_key)
        rows.append((state.seq, None, "(start)", base[0].description, None, None, start.on_hand, start.reserved, start.available))
        # Figures, not the Stock object: replay changes it in place.
        before = (start.on_hand, start.reserved)
        progress = session.progress("history", through_seq - state.seq)

        def on_event(event: Event, state_after: State) -> None:
            nonlocal more, before
            if stock_key not in event_stock_keys(event):
                return
            if len(rows) > arguments.limit:
                more = True
                return
            after = state_after.stock(*stock_key)
            rows.append((
                event["seq"], format_time_ms(event["ts_ms"]), event["type"], _who(event),
                after.on_hand - before[0], after.reserved - before[1], after.on_hand, after.reserved, after.available,
            ))
            before = (after.on_hand, after.reserved)

        folder.replay(state, through_seq, on_event=on_event, on_progress=progress.advance)
        progress.finish()
    session.printer.table(
        ("seq", "time", "type", "by", "on_hand_change", "reserved_change", "on_hand", "reserved", "available"), rows,
        title=f"{arguments.sku} @ {arguments.loc}",
    )
    if more:
        session.printer.note(f"(more changes: showing the first {arguments.limit}; raise --limit)")
    return OK


def _who(event: Event) -> str:
    if "rid" in event:
        return f"rid={event['rid']}" + (f" ref={event['ref']}" if event.get("ref") else "")
    if "key" in event:
        return f"key={event['key']}" + (f" reason={event['reason']}" if event.get("reason") else "")
    return ""


# -- export -------------------------------------------------------------------------------------

CSV_COLUMNS = (
    "seq", "ts_ms", "time", "type", "rid", "key", "ref", "reason", "sku", "loc", "qty", "delta", "on_hand", "variance",
    "from", "to", "ttl_ms", "expires_at_ms", "rids", "keys",
)


def _export_arguments(parser: argparse.ArgumentParser) -> None:
    add_event_filters(parser)
    parser.add_argument("--format", choices=("jsonl", "csv"), default="jsonl", help="JSON lines (one event each) or CSV (one row per event line)")
    parser.add_argument("--output", metavar="FILE", default=None, help="write to this file (default: stdout)")


def _export(session: Session, arguments: argparse.Namespace) -> int:
    output: TextIO = open(arguments.output, "w", newline="") if arguments.output else session.printer.out
    exported = 0
    try:
        with session.data_folder() as folder:
            progress = _scan_progress(session, "export", folder, arguments)
            writer = csv.DictWriter(output, CSV_COLUMNS, extrasaction="ignore") if arguments.format == "csv" else None
            if writer is not None:
                writer.writeheader()
            for event in filtered_events(folder, arguments):
                if writer is None:
                    output.write(json.dumps(event, separators=(",", ":")) + "\n")
                else:
                    writer.writerows(csv_rows(event))
                exported += 1
                progress.reach(event["seq"])
            progress.finish()
    finally:
        if arguments.output:
            output.close()
    session.printer.note(f"exported {exported} events" + (f" to {arguments.output}" if arguments.output else ""))
    return OK


def csv_rows(event: Event) -> list[dict[str, Any]]:
    """An event as CSV rows: one per line of an event with lines, else one."""
    common = {name: value for name, value in event.items() if name not in ("lines", "rids", "keys")}
    common["time"] = format_time_ms(event["ts_ms"])
    if "rids" in event:
        common["rids"] = " ".join(event["rids"])
        common["keys"] = " ".join(event["keys"])
    lines = event.get("lines")
    if not lines:
        return [common]
    return [{**common, **line} for line in lines]


COMMANDS = [
    Command("info", "what the data folder holds: log range, snapshots, whether a server runs on it", "offline", _info_arguments, _info),
    Command("snapshots", "the stored snapshots: seq, time of their last event, packed size", "offline", _snapshots_arguments, _snapshots),
    Command(
        "log", "log records in a seq or time range, filtered by sku, loc, rid, key, ref or type", "offline", _log_arguments, _log,
        details="Example: log --sku SKU-1 --loc DC-1 --since 2026-11-27T16:00:00Z --limit 50 --last",
    ),
    Command(
        "history", "every change of one SKU-location with running on_hand/reserved", "offline", _history_arguments, _history,
        details="Replays the retained log from its oldest start (a snapshot, or seq 1) and shows each event that touched SKU LOC.",
    ),
    Command(
        "export", "events as JSON lines or CSV", "offline", _export_arguments, _export,
        details="Takes the same filters as `log`, without a limit. CSV has one row per event line (seq repeats).",
    ),
]


"""Online commands, against a running server (`--connect HOST:PORT`, with the shell's token and
TLS options): `stats`, `get`, `query`, `lookup`, `snapshot`, `watch`, `adjust`, `count`."""

from __future__ import annotations

import argparse
import time
import uuid
from typing import Any

from protocol import parse_address

from .commands import OK, Command, Session
from .data_folder import event_summary
from .render import format_time_ms

STOCK_COLUMNS = ("sku", "loc", "on_hand", "reserved", "available")


def _address_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--connect", metavar="HOST:PORT", type=parse_address, default=None, help="the server (default: the shell's --connect)")


def _flatten(values: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for name, value in values.items():
        if isinstance(value, dict):
            rows.extend(_flatten(value, f"{prefix}{name}."))
        else:
            rows.append((f"{prefix}{name}", value))
    return rows


def _stats_arguments(parser: argparse.ArgumentParser) -> None:
    _address_argument(parser)


def _stats(session: Session, arguments: argparse.Namespace) -> int:
    reply = session.client(arguments.connect).stats()
    reply = {name: value for name, value in reply.items() if name not in ("id", "ok")}
    if session.printer.as_json:
        session.printer.json(reply)
    else:
        session.printer.table(("counter", "value"), _flatten(reply))
    return OK


def _get_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sku")
    parser.add_argument("loc")
    _address_argument(parser)


def _get(session: Session, arguments: argparse.Namespace) -> int:
    reply = session.client(arguments.connect).get(arguments.sku, arguments.loc)
    session.printer.table(STOCK_COLUMNS + ("seq",), [[reply[name] for name in STOCK_COLUMNS + ("seq",)]])
    return OK


def _query_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sku")
    _address_argument(parser)


def _query(session: Session, arguments: argparse.Namespace) -> int:
    reply = session.client(arguments.connect).query(arguments.sku)
    rows = [(location["loc"], location["on_hand"], location["reserved"], location["available"]) for location in reply["locations"]]
    total = reply["total"]
    session.printer.table(("loc", "on_hand", "reserved", "available"), rows, title=f"{arguments.sku}",
                          totals=("total", total["on_hand"], total["reserved"], total["available"]))
    return OK


def _lookup_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("rid")
    _address_argument(parser)


def _lookup(session: Session, arguments: argparse.Namespace) -> int:
    reply = session.client(arguments.connect).lookup(arguments.rid)
    if session.printer.as_json:
        session.printer.json({name: value for name, value in reply.items() if name not in ("id", "ok")})
        return OK
    session.printer.fields({
        "rid": reply["rid"], "state": reply["state"], "ref": reply.get("ref"),
        "expires_at": format_time_ms(reply.get("expires_at_ms")),
    })
    committed = {(line["sku"], line["loc"]): line["qty"] for line in reply.get("committed") or []}
    rows = [(line["sku"], line["loc"], line["qty"], committed.get((line["sku"], line["loc"]))) for line in reply["lines"]]
    session.printer.table(("sku", "loc", "qty", "committed"), rows)
    return OK


def _snapshot_arguments(parser: argparse.ArgumentParser) -> None:
    _address_argument(parser)


def _snapshot(session: Session, arguments: argparse.Namespace) -> int:
    reply = session.client(arguments.connect).snapshot()
    session.printer.fields({"snapshot_seq": reply["seq"]})
    return OK


def generated_key(op: str) -> str:
    """A fresh idempotency key for an operator's `adjust`/`count` (printed back: retry with `--key`)."""
    return f"shell-{op}-{uuid.uuid4().hex[:16]}"


def _adjust_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sku")
    parser.add_argument("loc")
    parser.add_argument("delta", type=int, help="change of on_hand (non-zero; negative for damage, shrinkage)")
    parser.add_argument("--reason", default="correction", help="receipt, return, damage, correction (default %(default)s)")
    parser.add_argument("--key", default=None, help="idempotency key (default: a new one, printed; reuse it to retry)")
    _address_argument(parser)


def _adjust(session: Session, arguments: argparse.Namespace) -> int:
    key = arguments.key or generated_key("adjust")
    reply = session.client(arguments.connect).adjust(key, arguments.sku, arguments.loc, arguments.delta, arguments.reason)
    session.printer.fields({
        "key": key, "duplicate": bool(reply.get("duplicate")), **{name: reply[name] for name in STOCK_COLUMNS}, "seq": reply.get("seq"),
    })
    return OK


def _count_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sku")
    parser.add_argument("loc")
    parser.add_argument("on_hand", type=int, help="the physically counted figure (>= 0): on_hand becomes this")
    parser.add_argument("--reason", default=None, help="e.g. cycle-count (optional)")
    parser.add_argument("--key", default=None, help="idempotency key (default: a new one, printed; reuse it to retry)")
    _address_argument(parser)


def _count(session: Session, arguments: argparse.Namespace) -> int:
    key = arguments.key or generated_key("count")
    reply = session.client(arguments.connect).count(key, arguments.sku, arguments.loc, arguments.on_hand, arguments.reason)
    session.printer.fields({
        "key": key, "duplicate": bool(reply.get("duplicate")), **{name: reply[name] for name in STOCK_COLUMNS},
        "variance": reply["variance"], "seq": reply.get("seq"),
    })
    return OK


WATCH_POLL_SECONDS = 0.5  # how often a quiet watch looks at its --seconds deadline


def _watch_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from", dest="from_seq", metavar="SEQ", type=int, default=None, help="start at this seq (default: only new events)")
    parser.add_argument("--limit", metavar="N", type=int, default=None, help="stop after this many events")
    parser.add_argument("--seconds", metavar="S", type=float, default=None, help="stop after this long")
    _address_argument(parser)


def _watch(session: Session, arguments: argparse.Namespace) -> int:
    # A watching connection sends no more requests: the watch gets a connection of its own.
    client = session.new_client(arguments.connect or session.address)
    seen = 0
    deadline = None if arguments.seconds is None else time.monotonic() + arguments.seconds
    printer = session.printer
    try:
        reply = client.watch(arguments.from_seq)
        printer.note(f"watching from seq {arguments.from_seq if arguments.from_seq is not None else reply['seq'] + 1} (Ctrl-C stops)")
        client.timeout_seconds = WATCH_POLL_SECONDS
        while arguments.limit is None or seen < arguments.limit:
            if deadline is not None and time.monotonic() >= deadline:
                break
            try:
                event = client.next_event()
            except TimeoutError:
                continue
            seen += 1
            if printer.as_json:
                printer.json(event)
            else:
                printer.out.write(f"{event['seq']:>8}  {format_time_ms(event['ts_ms'])}  {event['type']:<14}  {event_summary(event)}\n")
            printer.out.flush()
    except KeyboardInterrupt:
        pass  # Ctrl-C is how a watch ends
    finally:
        client.close()
    printer.note(f"watched {seen} events")
    return OK


COMMANDS = [
    Command("stats", "the server's counters", "online", _stats_arguments, _stats),
    Command("get", "stock of one SKU-location: get SKU LOC", "online", _get_arguments, _get),
    Command("query", "stock of a SKU at every location, and the total: query SKU", "online", _query_arguments, _query),
    Command("lookup", "a reservation's state and lines: lookup RID", "online", _lookup_arguments, _lookup),
    Command("snapshot", "ask the server to write a snapshot now; prints the seq it covers", "online", _snapshot_arguments, _snapshot),
    Command(
        "watch", "tail events live until Ctrl-C: watch [--from SEQ] [--limit N] [--seconds S]", "online", _watch_arguments, _watch,
    ),
    Command(
        "adjust", "change on_hand: adjust SKU LOC DELTA [--reason R] [--key K]", "online", _adjust_arguments, _adjust,
        details="Without --key a new idempotency key is generated and printed: to retry safely, run again with --key KEY.",
    ),
    Command(
        "count", "record a physical count: count SKU LOC ON_HAND [--reason R] [--key K]", "online", _count_arguments, _count,
        details="Sets on_hand to the counted figure; prints the variance. Without --key a new key is generated and printed.",
    ),
]

"""The checks every simulated run must pass, on the durable log and the recorded history.

1. No oversell (`check_log`): replaying the log from empty, every `reserved` event leaves each
   of its lines' `available >= 0`, every `transferred` its source's; a reservation is committed,
   released or extended only before its `expires_at_ms`, and expired only at or after it.
2. Durability: every reply (read, refusal or change) was received when the disk held its `seq`
   (`durable_seq_at_reply >= seq`), so a crash cannot take back anything a client saw; and each
   restart recovers at least the highest `seq` any client had seen (checked by the run).
3. Replay equals memory: the state rebuilt from the log from seq 1 equals the server's state
   (`State.to_snapshot()`), checked by the run after the last flush.
4. No phantom changes (`check_origins`): every `reserved` event matches a reserve some client
   sent (rid and payload), every keyed change a request sent under its key.
5. Linearizability (`check_replies`): the log is the sequential order. A reply with `seq = s`
   claims "this is what the objects I read looked like after event s". For each reply, the log
   is replayed to s and the reply's figures are compared with that state (stock figures,
   `available` after a hold, each `insufficient` line and that the other lines fit, the
   reservation's state and lines, duplicate replies equal to the original). Real time: when a
   request was sent, every event up to `seen_seq_at_send` was applied, so
   - a new change (not a duplicate) must get a seq above it, and
   - a read (or refusal, or duplicate) of objects O with seq s must not have missed an event on
     O in `(s, seen_seq_at_send]`.
   Objects are SKU-locations, rids and keys; each event names the ones it touches.
   Together: each reply is the one a sequential execution of the log gives at a point between
   its request's send and its reply's arrival.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from typing import Any, Iterable

from engine.core import HELD, State, apply_event
from engine.core.state import reserve_fingerprint

Obj = tuple  # ("stock", sku, loc) | ("rid", rid) | ("key", key)

_RESERVATION_EVENTS = {"reserved", "released", "committed", "expired"}


def event_objects(event: dict[str, Any]) -> list[Obj]:
    """The SKU-locations, rid and key an event changes."""
    kind = event["type"]
    objects: list[Obj] = []
    if kind in _RESERVATION_EVENTS:
        objects += [("stock", line["sku"], line["loc"]) for line in event["lines"]]
        objects.append(("rid", event["rid"]))
    elif kind == "extended":
        objects.append(("rid", event["rid"]))
    elif kind in ("adjusted", "counted"):
        objects += [("stock", event["sku"], event["loc"]), ("key", event["key"])]
    elif kind in ("adjusted_batch", "counted_batch"):
        objects += [("stock", line["sku"], line["loc"]) for line in event["lines"]]
        objects.append(("key", event["key"]))
    elif kind == "transferred":
        objects += [("stock", event["sku"], event["from"]), ("stock", event["sku"], event["to"]), ("key", event["key"])]
    elif kind == "forgotten":
        objects += [("rid", rid) for rid in event["rids"]] + [("key", key) for key in event["keys"]]
    return objects


def replay(events: Iterable[dict[str, Any]]) -> State:
    """The state the log gives from empty."""
    state = State()
    for event in events:
        apply_event(state, event)
    return state


def check_log(events: list[dict[str, Any]]) -> list[str]:
    """Check 1 (no oversell, expiry on time) over the whole log."""
    violations: list[str] = []
    state = State()
    for event in events:
        kind, seq = event["type"], event["seq"]
        if kind in ("released", "committed", "extended", "expired"):
            reservation = state.reservation(event["rid"])
            due_ms = None if reservation is None else reservation.expires_at_ms
            if kind == "expired" and (due_ms is None or event["ts_ms"] < due_ms):
                violations.append(f"seq {seq}: {event['rid']} expired at {event['ts_ms']} ms, due at {due_ms}")
            if kind != "expired" and due_ms is not None and event["ts_ms"] >= due_ms:
                violations.append(f"seq {seq}: {event['rid']} {kind} at {event['ts_ms']} ms, after its expiry at {due_ms}")
        apply_event(state, event)
        if kind == "reserved":
            for line in event["lines"]:
                if state.stock(line["sku"], line["loc"]).available < 0:
                    violations.append(f"seq {seq}: oversold {line['sku']}/{line['loc']}: {state.stock(line['sku'], line['loc']).figures()}")
        elif kind == "transferred" and state.stock(event["sku"], event["from"]).available < 0:
            violations.append(f"seq {seq}: transfer oversold {event['sku']}/{event['from']}")
    return violations


class _ReplyChecker:
    """Check 5 for one reply, given the state right after its seq and the event at its seq."""

    def __init__(self, state: State, event: dict[str, Any] | None, objects_index: dict[Obj, list[int]]):
        self.state = state
        self.event = event
        self._objects_index = objects_index

    def missed(self, record, objects: list[Obj]) -> list[str]:
        """Events on `objects` in (reply seq, seen_seq_at_send]: applied before the request was
        sent, yet not reflected by its reply."""
        seq, seen = record.reply.get("seq", 0), record.seen_seq_at_send
        problems = []
        for obj in objects:
            seqs = self._objects_index.get(obj, [])
            index = bisect.bisect_right(seqs, seq)
            if index < len(seqs) and seqs[index] <= seen:
                problems.append(f"missed seq {seqs[index]} on {obj} (applied before the request was sent)")
        return problems

    def event_is(self, kind: str, **fields: Any) -> list[str]:
        event = self.event
        if event is None or event["type"] != kind or any(event.get(name) != value for name, value in fields.items()):
            return [f"the event at its seq is {event!r}, not a {kind} {fields}"]
        return []

    def check(self, record) -> list[str]:
        reply, fields, op = record.reply, record.fields, record.op
        state, seq = self.state, reply.get("seq", 0)
        new_change = reply["ok"] and not reply.get("duplicate") and op in ("reserve", "release", "commit", "extend", "adjust", "count", "transfer")
        problems: list[str] = []
        if new_change and seq <= record.seen_seq_at_send:
            problems.append(f"a new change at seq {seq}, not after seq {record.seen_seq_at_send} seen before it was sent")
        if not reply["ok"] and reply["error"] in ("internal", "overloaded"):
            return problems
        checker = getattr(self, f"_{op}")
        return problems + checker(record, reply, fields, state, seq)

    # -- per op -----------------------------------------------------------------------------

    def _reserve(self, record, reply, fields, state: State, seq: int) -> list[str]:
        rid = fields["rid"]
        lines = [(line["sku"], line["loc"], line["qty"]) for line in fields["lines"]]
        stocks = [("stock", sku, loc) for sku, loc, _ in lines]
        reservation = state.reservation(rid)
        if reply["ok"]:
            problems = []
            if reservation is None or reservation.last_seq != seq:
                return [f"reservation {rid} at seq {seq} is {reservation}"]
            if reservation.fingerprint() != reserve_fingerprint(tuple(lines), fields.get("ttl_ms", 0) or 0, fields.get("ref")):
                problems.append("granted lines differ from the request's")
            granted = {(line["sku"], line["loc"]): line["available"] for line in reply["lines"]}
            if granted != {(sku, loc): available for (sku, loc, _), available in zip(reservation.lines, reservation.granted_available)}:
                problems.append(f"available figures {granted} differ from the log's {reservation.granted_available}")
            if any(available < 0 for available in granted.values()):
                problems.append("granted with available < 0")
            if reply.get("duplicate"):
                problems += self.missed(record, [("rid", rid)])
            else:
                problems += self.event_is("reserved", rid=rid)
                now = {(sku, loc): state.stock(sku, loc).available for sku, loc, _ in lines}
                if now != granted:
                    problems.append(f"available after the hold {granted} is not the log's {now}")
                if reply["expires_at_ms"] != reservation.expires_at_ms:
                    problems.append("expires_at_ms differs from the log's")
            return problems
        if reply["error"] == "insufficient":
            short = {(line["sku"], line["loc"]): (line["requested"], line["available"]) for line in reply["lines"]}
            expected = {
                (sku, loc): (qty, state.stock(sku, loc).available) for sku, loc, qty in lines if state.stock(sku, loc).available < qty
            }
            problems = [] if short == expected else [f"short lines {short}, the log at seq {seq} gives {expected}"]
            last_change = max(state.stock(sku, loc).last_seq for sku, loc, _ in lines)
            if last_change != seq:
                problems.append(f"seq {seq} is not the last change of its lines ({last_change})")
            return problems + self.missed(record, stocks)
        if reply["error"] == "conflict":
            if reservation is None or reservation.last_seq != seq:
                return [f"conflict on {rid}, which at seq {seq} is {reservation}"]
            return self.missed(record, [("rid", rid)])
        return [f"unexpected error {reply['error']}"]

    def _closing(self, record, reply, fields, state: State, seq: int, closed: str) -> list[str]:
        rid = fields["rid"]
        reservation = state.reservation(rid)
        if reply["ok"]:
            if reservation is None or reservation.state != closed or reservation.last_seq != seq:
                return [f"{closed} {rid}, which at seq {seq} is {reservation}"]
            problems = []
            if closed == "committed":
                committed = [{"sku": sku, "loc": loc, "qty": qty} for sku, loc, qty in reservation.committed]
                if committed != reply["lines"]:
                    problems.append(f"committed lines {reply['lines']}, the log's {committed}")
            if reply.get("duplicate"):
                return problems + self.missed(record, [("rid", rid)])
            return problems + self.event_is(closed, rid=rid)
        return self._refused_by_rid(record, reply, fields, state, seq)

    def _refused_by_rid(self, record, reply, fields, state: State, seq: int) -> list[str]:
        rid = fields["rid"]
        reservation = state.reservation(rid)
        error = reply["error"]
        if error == "not_found":
            problems = [] if reservation is None else [f"not_found, but at seq {seq} {rid} is {reservation.state}"]
            if seq < record.seen_seq_at_send:
                problems.append(f"not_found at seq {seq}, before seq {record.seen_seq_at_send} seen when it was sent")
            return problems
        if error == "invalid_state":
            if reservation is None or reservation.state != reply["state"] or reservation.state == HELD or reservation.last_seq != seq:
                return [f"invalid_state {reply['state']}, but at seq {seq} {rid} is {reservation}"]
            return self.missed(record, [("rid", rid)])
        if error == "invalid":
            return []  # a short pick beyond the hold or the goods on hand: not figures to compare
        return [f"unexpected error {error}"]

    def _release(self, record, reply, fields, state, seq):
        return self._closing(record, reply, fields, state, seq, "released")

    def _commit(self, record, reply, fields, state, seq):
        return self._closing(record, reply, fields, state, seq, "committed")

    def _extend(self, record, reply, fields, state: State, seq: int) -> list[str]:
        if not reply["ok"]:
            return self._refused_by_rid(record, reply, fields, state, seq)
        reservation = state.reservation(fields["rid"])
        problems = self.event_is("extended", rid=fields["rid"], expires_at_ms=reply["expires_at_ms"])
        if reservation is None or reservation.expires_at_ms != reply["expires_at_ms"]:
            problems.append(f"extended to {reply['expires_at_ms']}, the log says {reservation}")
        return problems

    def _lookup(self, record, reply, fields, state: State, seq: int) -> list[str]:
        if not reply["ok"]:
            return self._refused_by_rid(record, reply, fields, state, seq)
        reservation = state.reservation(fields["rid"])
        if reservation is None or reservation.last_seq != seq:
            return [f"lookup shows seq {seq}, the log's reservation is {reservation}"]
        lines = [{"sku": sku, "loc": loc, "qty": qty} for sku, loc, qty in reservation.lines]
        if (reply["state"], reply["lines"], reply["expires_at_ms"]) != (reservation.state, lines, reservation.expires_at_ms):
            return [f"lookup {reply}, the log's reservation {reservation}"]
        return self.missed(record, [("rid", fields["rid"])])

    def _get(self, record, reply, fields, state: State, seq: int) -> list[str]:
        stock = state.stock(fields["sku"], fields["loc"])
        problems = []
        if {name: reply[name] for name in ("on_hand", "reserved", "available")} != stock.figures() or stock.last_seq != seq:
            problems.append(f"get shows {reply}, the log at seq {seq} gives {stock}")
        return problems + self.missed(record, [("stock", fields["sku"], fields["loc"])])

    def _keyed(self, record, reply, fields, state: State, seq: int, kind: str) -> list[str]:
        if "lines" in fields:
            return self._keyed_batch(record, reply, fields, state, seq, f"{kind}_batch")
        sku, loc = fields["sku"], fields["loc"]
        stock = state.stock(sku, loc)
        if not reply["ok"]:
            if reply["error"] == "invalid" and kind == "adjusted":
                problems = [] if stock.on_hand + fields["delta"] < 0 and stock.last_seq == seq else [f"adjust refused, the log at {seq} gives {stock}"]
                return problems + self.missed(record, [("stock", sku, loc)])
            if reply["error"] == "conflict":
                return self.missed(record, [("key", fields["key"])])
            return [f"unexpected error {reply['error']}"]
        problems = self.event_is(kind, key=fields["key"], sku=sku, loc=loc)
        if {name: reply[name] for name in ("on_hand", "reserved", "available")} != stock.figures():
            problems.append(f"{kind} shows {reply}, the log at seq {seq} gives {stock}")
        if kind == "counted" and self.event is not None and reply.get("variance") != self.event.get("variance"):
            problems.append("variance differs from the log's")
        if reply.get("duplicate"):
            problems += self.missed(record, [("key", fields["key"])])
        return problems

    def _keyed_batch(self, record, reply, fields, state: State, seq: int, kind: str) -> list[str]:
        stocks = [("stock", line["sku"], line["loc"]) for line in fields["lines"]]
        if not reply["ok"]:
            if reply["error"] == "invalid" and kind == "adjusted_batch":
                # The refusal names the lines it refuses and reflects those (its seq is the last
                # change among them); the other lines fitted at the moment of the decision.
                refused = [(line["sku"], line["loc"], line["delta"], line["on_hand"]) for line in reply["lines"]]
                problems = [
                    f"line {sku}/{loc} refused with on_hand {on_hand}, the log at seq {seq} gives {state.stock(sku, loc)}"
                    for sku, loc, delta, on_hand in refused
                    if state.stock(sku, loc).on_hand != on_hand or on_hand + delta >= 0
                ]
                if max(state.stock(sku, loc).last_seq for sku, loc, _, _ in refused) != seq:
                    problems.append(f"seq {seq} is not the last change of the refused lines")
                return problems + self.missed(record, [("stock", sku, loc) for sku, loc, _, _ in refused])
            if reply["error"] == "conflict":
                return self.missed(record, [("key", fields["key"])])
            return [f"unexpected error {reply['error']}"]
        problems = self.event_is(kind, key=fields["key"])
        for line in reply["lines"]:
            figures = {name: line[name] for name in ("on_hand", "reserved", "available")}
            if figures != state.stock(line["sku"], line["loc"]).figures():
                problems.append(f"{kind} line {line}, the log at seq {seq} gives {state.stock(line['sku'], line['loc'])}")
        if reply.get("duplicate"):
            problems += self.missed(record, [("key", fields["key"])])
        return problems

    def _transfer(self, record, reply, fields, state: State, seq: int) -> list[str]:
        sku, source, target = fields["sku"], fields["from"], fields["to"]
        stocks = [("stock", sku, source), ("stock", sku, target)]
        if not reply["ok"]:
            if reply["error"] == "insufficient":
                available = state.stock(sku, source).available
                last_change = max(state.stock(sku, source).last_seq, state.stock(sku, target).last_seq)
                if reply["lines"] != [{"sku": sku, "loc": source, "requested": fields["qty"], "available": available}] or available >= fields["qty"] or last_change != seq:
                    return [f"transfer refused, the log at seq {seq} gives {state.stock(sku, source)}"]
                return self.missed(record, stocks)
            if reply["error"] == "conflict":
                return self.missed(record, [("key", fields["key"])])
            return [f"unexpected error {reply['error']}"]
        problems = self.event_is("transferred", key=fields["key"], sku=sku, qty=fields["qty"])
        for side, loc in (("from", source), ("to", target)):
            figures = {name: reply[side][name] for name in ("on_hand", "reserved", "available")}
            if figures != state.stock(sku, loc).figures():
                problems.append(f"transfer {side} {reply[side]}, the log at seq {seq} gives {state.stock(sku, loc)}")
        if reply.get("duplicate"):
            problems += self.missed(record, [("key", fields["key"])])
        return problems

    def _query(self, record, reply, fields, state: State, seq: int) -> list[str]:
        sku = fields["sku"]
        locations = sorted(state.locations_of(sku))
        expected = [{"loc": loc, **state.stock(sku, loc).figures()} for loc in locations]
        last_change = max((state.stock(sku, loc).last_seq for loc in locations), default=0)
        problems = []
        if reply["locations"] != expected or last_change != seq:
            problems.append(f"query shows {reply['locations']}, the log at seq {seq} gives {expected}")
        total = {name: sum(line[name] for line in expected) for name in ("on_hand", "reserved", "available")}
        if reply["total"] != total:
            problems.append(f"query total {reply['total']}, the log's {total}")
        objects = [obj for obj in self._objects_index if obj[0] == "stock" and obj[1] == sku]
        return problems + self.missed(record, objects)

    def _adjust(self, record, reply, fields, state, seq):
        return self._keyed(record, reply, fields, state, seq, "adjusted")

    def _count(self, record, reply, fields, state, seq):
        return self._keyed(record, reply, fields, state, seq, "counted")


def check_origins(events: list[dict[str, Any]], records: list) -> list[str]:
    """No phantom changes: every reservation and every keyed change in the log comes from a
    request some client sent with that rid or key and that payload (answered or not)."""
    sent_payloads: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        name = record.fields.get("rid") if record.op == "reserve" else record.fields.get("key")
        if name is not None:
            sent_payloads[name].append(record.fields)
    violations = []
    for event in events:
        kind = event["type"]
        if kind == "reserved":
            lines = tuple((line["sku"], line["loc"], line["qty"]) for line in event["lines"])
            logged = reserve_fingerprint(lines, event["ttl_ms"], event["ref"])
            sent = [
                reserve_fingerprint(tuple((line["sku"], line["loc"], line["qty"]) for line in fields["lines"]), fields.get("ttl_ms", 0), fields.get("ref"))
                for fields in sent_payloads.get(event["rid"], [])
            ]
            if logged not in sent:
                violations.append(f"seq {event['seq']}: reservation {event['rid']} that no client asked for: {event}")
        elif kind in ("adjusted", "counted", "transferred", "adjusted_batch", "counted_batch"):
            if not sent_payloads.get(event["key"]):
                violations.append(f"seq {event['seq']}: {kind} under key {event['key']} that no client sent: {event}")
    return violations


def check_replies(events: list[dict[str, Any]], records: list) -> list[str]:
    """Checks 2 and 5 for every reply received, in one replay of the log."""
    violations: list[str] = []
    objects_index: dict[Obj, list[int]] = defaultdict(list)
    for event in events:
        for obj in event_objects(event):
            objects_index[obj].append(event["seq"])
    answered = [record for record in records if record.reply is not None and record.reply.get("seq", 0) is not None]
    by_seq: dict[int, list] = defaultdict(list)
    last_seq = events[-1]["seq"] if events else 0
    for record in answered:
        seq = record.reply.get("seq", 0)
        if seq > record.durable_seq_at_reply:
            violations.append(f"reply before durability: seq {seq}, disk at {record.durable_seq_at_reply}: {_describe(record)}")
        elif seq > last_seq:
            violations.append(f"reply beyond the log: seq {seq}, log ends at {last_seq}: {_describe(record)}")
        else:
            by_seq[seq].append(record)
    state = State()
    event = None
    index = 0
    for seq in sorted(by_seq):
        while state.seq < seq:
            event = events[index]
            apply_event(state, event)
            index += 1
        checker = _ReplyChecker(state, event if seq else None, objects_index)
        for record in by_seq[seq]:
            violations += [f"{problem}: {_describe(record)}" for problem in checker.check(record)]
    return violations


def _describe(record) -> str:
    return f"client {record.client} {record.op} {record.fields} (tick {record.sent_tick}, seen seq {record.seen_seq_at_send}) -> {record.reply}"

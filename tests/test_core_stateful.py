"""Stateful property test: `engine.core.apply` against a small independent model of PROTOCOL.md.

The universe is tiny (2 SKUs x 3 locations, 5 rids, 5 keys, quantities 1..20) so that duplicates,
conflicts, shortages and expiries happen all the time. After every step the reply is compared with
what the model expects, and the core's state with the model's; at the end of every run, replaying
the emitted events onto a fresh `State` must give the very same state, and snapshots round-trip.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgpack
from hypothesis import HealthCheck, settings
from hypothesis import event as note
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from engine.core import (
    Expire,
    Forget,
    State,
    apply,
    apply_event,
    check_event,
    check_invariants,
    held_by_stock,
)
from engine.core.state import RECORD_LAST_SEQ
from engine.core.tail_check import TailCheck
from protocol import Adjust, AdjustBatch, Commit, Count, CountBatch, Extend, Get, Line, Lookup, Query, Release, Reserve, Transfer

SKUS = ("A", "B")
LOCS = ("X", "Y", "Z")
STOCKS = [(sku, loc) for sku in SKUS for loc in LOCS]
RIDS = ("r0", "r1", "r2", "r3", "r4")
KEYS = ("k0", "k1", "k2", "k3", "k4")

skus = st.sampled_from(SKUS)
locs = st.sampled_from(LOCS)
stock_keys = st.sampled_from(STOCKS)
rids = st.sampled_from(RIDS)
keys = st.sampled_from(KEYS)
qtys = st.integers(1, 20)
ttls = st.sampled_from([0, 0, 50, 200, 1_000])
refs = st.sampled_from([None, "order-1", "order-2"])
lines_strategy = st.lists(st.tuples(stock_keys, qtys), min_size=1, max_size=3, unique_by=lambda item: item[0])
count_lines = st.lists(st.tuples(stock_keys, st.integers(0, 20)), min_size=1, max_size=4, unique_by=lambda item: item[0])
adjust_lines = st.lists(
    st.tuples(stock_keys, st.integers(-20, -1) | st.integers(1, 20)), min_size=1, max_size=4, unique_by=lambda item: item[0],
)

HELD, COMMITTED, RELEASED, EXPIRED = "held", "committed", "released", "expired"


@dataclass
class ModelReservation:
    lines: tuple[tuple[str, str, int], ...]
    ttl_ms: int
    ref: str | None
    expires_at_ms: int | None
    reply: dict  # the original reply (without seq/message)
    state: str = HELD
    closed_at_ms: int | None = None
    committed: tuple[tuple[str, str, int], ...] | None = None
    closed_number: int = 0  # the order reservations closed in (forgetting takes the oldest first)

    def fingerprint(self):
        return (tuple(sorted(self.lines)), self.ttl_ms, self.ref)


def maps(lines) -> list[dict]:
    return [{"sku": sku, "loc": loc, "qty": qty} for sku, loc, qty in lines]


def plain(reply: dict) -> dict:
    return {name: value for name, value in reply.items() if name not in ("seq", "message")}


def normalized(snapshot: dict) -> dict:
    """A snapshot with tuples as lists and every list of records sorted by its id."""

    def lists(value):
        if isinstance(value, (list, tuple)):
            return [lists(item) for item in value]
        if isinstance(value, dict):
            return {name: lists(item) for name, item in value.items()}
        return value

    data = lists(snapshot)
    for name in ("stocks", "reservations", "keys"):
        data[name] = sorted(data[name], key=lambda record: (record[0], record[1]) if name == "stocks" else record[0])
    return data


class CoreMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.state = State()
        self.now = 0
        self.log: list[dict] = []
        # The model.
        self.on_hand: dict[tuple[str, str], int] = {}  # known SKU-locations only
        self.reservations: dict[str, ModelReservation] = {}
        self.keys: dict[str, tuple[tuple, dict]] = {}  # key -> (fingerprint, original reply)
        self.key_at: dict[str, int] = {}
        self.closes = 0
        # Granted requests, for exact retries.
        self.granted_reserves: dict[str, Reserve] = {}
        self.granted_keyed: dict[str, object] = {}
        # Seq of the last event touching each rid / key / SKU-location (for the durability bound).
        self.rid_seq: dict[str, int] = {}
        self.key_seq: dict[str, int] = {}
        self.stock_seq: dict[tuple[str, str], int] = {}

    # -- the model's figures --------------------------------------------------------------------

    def reserved(self, key) -> int:
        return sum(
            qty for r in self.reservations.values() if r.state == HELD
            for sku, loc, qty in r.lines if (sku, loc) == key
        )

    def available(self, key) -> int:
        return self.on_hand.get(key, 0) - self.reserved(key)

    def figures(self, key) -> dict:
        return {"on_hand": self.on_hand.get(key, 0), "reserved": self.reserved(key), "available": self.available(key)}

    def due(self, rid) -> bool:
        r = self.reservations[rid]
        return r.state == HELD and r.expires_at_ms is not None and r.expires_at_ms <= self.now

    def close(self, rid, new_state, committed=None):
        r = self.reservations[rid]
        assert r.state == HELD
        for sku, loc, qty in committed or ():
            self.on_hand[(sku, loc)] -= qty
        r.state, r.closed_at_ms, r.committed = new_state, self.now, committed
        self.closes += 1
        r.closed_number = self.closes

    def touch(self, rid) -> list[str]:
        """A rid op first expires a due reservation (lazily). Returns the expected event types."""
        if rid in self.reservations and self.due(rid):
            self.close(rid, EXPIRED)
            return [EXPIRED]
        return []

    # -- running one command --------------------------------------------------------------------

    def execute(self, command, expected_types: list[str], at_least: int = 0) -> dict:
        """Apply `command` to the core; check its events, the reply's seq, and the stock rules."""
        before = {key: self.state.stock(*key).available for key in STOCKS}
        figures_before = {key: (stock.on_hand, stock.reserved) for key, stock in self.state.stocks.items()}
        records_before = dict(self.state.reservations)
        seq_before = self.state.seq
        state, events, reply = apply(self.state, command, self.now)
        assert state is self.state
        # What `TailCheck` rests on: a SKU-location or a reservation that changed has a newer `last_seq`.
        for key, stock in self.state.stocks.items():
            if figures_before.get(key) != (stock.on_hand, stock.reserved):
                assert stock.last_seq > seq_before, (command, key)
        for rid, record in self.state.reservations.items():
            if records_before.get(rid) != record:
                assert record[RECORD_LAST_SEQ] > seq_before, (command, rid)
        assert [event["type"] for event in events] == expected_types, (command, events, plain(reply))
        for offset, event in enumerate(events, start=1):
            check_event(event)
            assert event["seq"] == seq_before + offset
            assert event["ts_ms"] == self.now
            self.track(event)
        self.log.extend(events)
        assert self.state.seq == seq_before + len(events)
        # The reply's seq covers every change it reflects (and nothing beyond the state).
        assert reply["seq"] <= self.state.seq
        if events:
            assert reply["seq"] == events[-1]["seq"]
        assert reply["seq"] >= at_least, (command, reply, at_least)
        assert isinstance(reply["ok"], bool)
        if not reply["ok"]:
            assert isinstance(reply["message"], str) and reply["message"]
        outcome = reply.get("error") or ("duplicate" if reply.get("duplicate") else "ok")
        note(f"{type(command).__name__}: {outcome}{' after expiry' if 'expired' in expected_types else ''}")
        # No oversell: available drops below zero only through adjust/count.
        if not isinstance(command, (Adjust, Count, AdjustBatch, CountBatch)):
            for key in STOCKS:
                after = self.state.stock(*key).available
                if after < before[key]:
                    assert after >= 0, (command, key, before[key], after)
        return plain(reply)

    def track(self, event):
        seq, kind = event["seq"], event["type"]
        if kind in ("reserved", "released", "expired", "committed"):
            self.rid_seq[event["rid"]] = seq
            for line in event["lines"]:
                self.stock_seq[(line["sku"], line["loc"])] = seq
        elif kind == "extended":
            self.rid_seq[event["rid"]] = seq
        elif kind in ("adjusted", "counted"):
            self.key_seq[event["key"]] = seq
            self.stock_seq[(event["sku"], event["loc"])] = seq
        elif kind in ("adjusted_batch", "counted_batch"):
            self.key_seq[event["key"]] = seq
            for line in event["lines"]:
                self.stock_seq[(line["sku"], line["loc"])] = seq
        elif kind == "transferred":
            self.key_seq[event["key"]] = seq
            self.stock_seq[(event["sku"], event["from"])] = seq
            self.stock_seq[(event["sku"], event["to"])] = seq
        elif kind == "forgotten":
            for rid in event["rids"]:
                del self.rid_seq[rid]
            for key in event["keys"]:
                del self.key_seq[key]

    def stocks_seq(self, stock_keys) -> int:
        return max((self.stock_seq.get(key, 0) for key in stock_keys), default=0)

    @initialize(amounts=st.lists(st.integers(0, 20), min_size=len(STOCKS), max_size=len(STOCKS)))
    def opening_stock(self, amounts):
        for index, (stock, amount) in enumerate(zip(STOCKS, amounts)):
            if amount:
                self.do_adjust(Adjust(f"opening-{index}", *stock, amount, "receipt"))

    # -- reservations ---------------------------------------------------------------------------

    def do_reserve(self, command: Reserve):
        lines = tuple((line.sku, line.loc, line.qty) for line in command.lines)
        existing = self.reservations.get(command.rid)
        if existing is not None:
            at_least = self.rid_seq[command.rid]
            if existing.fingerprint() == (tuple(sorted(lines)), command.ttl_ms, command.ref):
                expected = {**existing.reply, "duplicate": True}
            else:
                expected = {"ok": False, "error": "conflict"}
            reply = self.execute(command, [], at_least=at_least)
            assert reply == expected, (command, reply, expected)
            return reply
        short = []
        for sku, loc, qty in lines:
            free = self.available((sku, loc))
            if free < qty:
                short.append({"sku": sku, "loc": loc, "requested": qty, "available": free})
        if short:
            at_least = self.stocks_seq((sku, loc) for sku, loc, _ in lines)
            reply = self.execute(command, [], at_least=at_least)
            assert reply == {"ok": False, "error": "insufficient", "lines": short}, (command, reply)
            return reply
        expires_at_ms = self.now + command.ttl_ms if command.ttl_ms else None
        reply_lines = [
            {"sku": sku, "loc": loc, "qty": qty, "available": self.available((sku, loc)) - qty} for sku, loc, qty in lines
        ]
        expected = {"ok": True, "rid": command.rid, "lines": reply_lines, "expires_at_ms": expires_at_ms}
        self.reservations[command.rid] = ModelReservation(lines, command.ttl_ms, command.ref, expires_at_ms, expected)
        for sku, loc, _ in lines:
            self.on_hand.setdefault((sku, loc), 0)
        self.granted_reserves[command.rid] = command
        reply = self.execute(command, ["reserved"])
        assert reply == expected, (command, reply, expected)
        # A granted hold never leaves available below zero.
        for sku, loc, _ in lines:
            assert self.state.stock(sku, loc).available >= 0
        return reply

    @rule(rid=rids, lines=lines_strategy, ttl=ttls, ref=refs)
    def reserve(self, rid, lines, ttl, ref):
        self.do_reserve(Reserve(rid, tuple(Line(sku, loc, qty) for (sku, loc), qty in lines), ttl, ref))

    @rule(data=st.data())
    def retry_reserve(self, data):
        if not self.granted_reserves:
            return
        rid = data.draw(st.sampled_from(sorted(self.granted_reserves)))
        command = self.granted_reserves[rid]
        lines = data.draw(st.permutations(command.lines))  # same lines, any order: same payload
        self.do_reserve(Reserve(rid, tuple(lines), command.ttl_ms, command.ref))

    @rule(data=st.data(), ttl=ttls, ref=refs, qty=qtys)
    def retry_reserve_with_another_payload(self, data, ttl, ref, qty):
        if not self.granted_reserves:
            return
        rid = data.draw(st.sampled_from(sorted(self.granted_reserves)))
        command = self.granted_reserves[rid]
        first = command.lines[0]
        lines = (Line(first.sku, first.loc, qty),) + command.lines[1:]
        self.do_reserve(Reserve(rid, lines, ttl, ref))

    def pick_rid(self, data) -> str:
        """Mostly a rid the model knows (held ones first), sometimes any rid (often unknown)."""
        held = sorted(rid for rid, r in self.reservations.items() if r.state == HELD)
        choice = data.draw(st.integers(0, 9))
        if held and choice < 6:
            return data.draw(st.sampled_from(held))
        if self.reservations and choice < 8:
            return data.draw(st.sampled_from(sorted(self.reservations)))
        return data.draw(rids)

    def rid_op(self, command, rid) -> list[str] | None:
        """Common start of release/commit/extend/lookup/expire: not_found, or lazy expiry."""
        if rid not in self.reservations:
            reply = self.execute(command, [])
            assert reply == {"ok": False, "error": "not_found"}, (command, reply)
            return None
        return self.touch(rid)

    @rule(data=st.data())
    def release(self, data):
        rid = self.pick_rid(data)
        command = Release(rid)
        types = self.rid_op(command, rid)
        if types is None:
            return
        r = self.reservations[rid]
        if r.state == RELEASED:
            expected = {"ok": True, "rid": rid, "state": RELEASED, "duplicate": True}
        elif r.state == HELD:
            self.close(rid, RELEASED)
            types = types + [RELEASED]
            expected = {"ok": True, "rid": rid, "state": RELEASED}
        else:
            expected = {"ok": False, "error": "invalid_state", "state": r.state}
        reply = self.execute(command, types, at_least=self.rid_seq.get(rid, 0))
        assert reply == expected, (command, reply, expected)

    def do_commit(self, command: Commit):
        rid = command.rid
        types = self.rid_op(command, rid)
        if types is None:
            return
        r = self.reservations[rid]
        at_least = self.rid_seq.get(rid, 0)
        if r.state == COMMITTED:
            expected = {"ok": True, "rid": rid, "state": COMMITTED, "lines": maps(r.committed), "duplicate": True}
        elif r.state != HELD:
            expected = {"ok": False, "error": "invalid_state", "state": r.state}
        else:
            held = {(sku, loc): qty for sku, loc, qty in r.lines}
            invalid = False
            if command.lines is None:
                shipped = dict(held)
            else:
                shipped = {}
                for line in command.lines:
                    if (line.sku, line.loc) not in held or line.qty > held[(line.sku, line.loc)]:
                        invalid = True
                    shipped[(line.sku, line.loc)] = line.qty
            # Goods cannot leave a SKU-location that does not have them (after damage or a count):
            # that refusal reflects the stock too.
            if not invalid and any(qty > self.on_hand[key] for key, qty in shipped.items()):
                invalid = True
                at_least = max(at_least, self.stocks_seq(held))
            if invalid:
                expected = {"ok": False, "error": "invalid"}
            else:
                committed = tuple((sku, loc, shipped.get((sku, loc), 0)) for sku, loc, _ in r.lines)
                self.close(rid, COMMITTED, committed)
                types = types + [COMMITTED]
                expected = {"ok": True, "rid": rid, "state": COMMITTED, "lines": maps(committed)}
        reply = self.execute(command, types, at_least=at_least)
        assert reply == expected, (command, reply, expected)

    @rule(data=st.data())
    def commit_in_full(self, data):
        rid = self.pick_rid(data)
        self.do_commit(Commit(rid))

    @rule(data=st.data())
    def commit_with_lines(self, data):
        rid = self.pick_rid(data)
        r = self.reservations.get(rid)
        if r is None or data.draw(st.integers(0, 9)) == 0:
            lines = [Line(sku, loc, qty) for (sku, loc), qty in data.draw(lines_strategy)]
        else:
            lines = []
            for sku, loc, qty in r.lines:
                if data.draw(st.booleans()):
                    lines.append(Line(sku, loc, data.draw(st.integers(0, qty + 1))))  # sometimes over the hold
            if not lines or data.draw(st.integers(0, 5)) == 0:
                key = data.draw(stock_keys)
                if all((line.sku, line.loc) != key for line in lines):
                    lines.append(Line(*key, data.draw(st.integers(0, 3))))  # often a foreign line
        self.do_commit(Commit(rid, tuple(data.draw(st.permutations(lines)))))

    @rule(data=st.data(), ttl=st.integers(1, 1_000))
    def extend(self, data, ttl):
        rid = self.pick_rid(data)
        command = Extend(rid, ttl)
        types = self.rid_op(command, rid)
        if types is None:
            return
        r = self.reservations[rid]
        if r.state == HELD:
            r.expires_at_ms = self.now + ttl
            types = types + ["extended"]
            expected = {"ok": True, "rid": rid, "expires_at_ms": self.now + ttl}
        else:
            expected = {"ok": False, "error": "invalid_state", "state": r.state}
        reply = self.execute(command, types, at_least=self.rid_seq.get(rid, 0))
        assert reply == expected, (command, reply, expected)

    @rule(data=st.data())
    def expire(self, data):
        rid = self.pick_rid(data)
        command = Expire(rid)
        types = self.rid_op(command, rid)
        if types is None:
            return
        reply = self.execute(command, types, at_least=self.rid_seq.get(rid, 0))
        assert reply == {"ok": True, "rid": rid, "state": self.reservations[rid].state}, (command, reply)

    @rule(data=st.data())
    def lookup(self, data):
        rid = self.pick_rid(data)
        command = Lookup(rid)
        types = self.rid_op(command, rid)
        if types is None:
            return
        r = self.reservations[rid]
        expected = {
            "ok": True, "rid": rid, "state": r.state, "lines": maps(r.lines), "ref": r.ref, "expires_at_ms": r.expires_at_ms,
        }
        if r.committed is not None:
            expected["committed"] = maps(r.committed)
        reply = self.execute(command, types, at_least=self.rid_seq.get(rid, 0))
        assert reply == expected, (command, reply, expected)

    @rule(ms=st.sampled_from([1, 10, 49, 50, 51, 199, 200, 600, 1_000]))
    def advance_time(self, ms):
        self.now += ms

    @rule(data=st.data())
    def advance_to_an_expiry(self, data):
        """Jump to just before, exactly at, or just after a held reservation's expiry."""
        upcoming = sorted({
            r.expires_at_ms for r in self.reservations.values()
            if r.state == HELD and r.expires_at_ms is not None and r.expires_at_ms > self.now
        })
        if upcoming:
            self.now = max(self.now, data.draw(st.sampled_from(upcoming)) + data.draw(st.sampled_from([-1, 0, 1])))

    @rule(age=st.sampled_from([0, 100, 500, 2_000]), limit=st.integers(1, 4))
    def forget(self, age, limit):
        before = self.now - age
        # The oldest closed first (the model's clock never steps back, so close order is time order).
        closed = sorted((r.closed_number, rid) for rid, r in self.reservations.items() if r.state != HELD)
        forgotten_rids = [rid for _, rid in closed if self.reservations[rid].closed_at_ms < before][:limit]
        forgotten_keys = [key for key, at_ms in self.key_at.items() if at_ms < before][:limit]
        types = ["forgotten"] if forgotten_rids or forgotten_keys else []
        reply = self.execute(Forget(before, limit), types)
        assert reply == {"ok": True, "rids": len(forgotten_rids), "keys": len(forgotten_keys)}
        if types:
            assert self.log[-1]["rids"] == forgotten_rids and self.log[-1]["keys"] == forgotten_keys
        for rid in forgotten_rids:
            del self.reservations[rid]
        for key in forgotten_keys:
            del self.keys[key], self.key_at[key]

    # -- stock ----------------------------------------------------------------------------------

    def known_key(self, command, key, fingerprint) -> bool:
        """A retried or reused key: check the reply and return True; a new key: False."""
        if key not in self.keys:
            return False
        original_fingerprint, original = self.keys[key]
        expected = {**original, "duplicate": True} if original_fingerprint == fingerprint else {"ok": False, "error": "conflict"}
        reply = self.execute(command, [], at_least=self.key_seq[key])
        assert reply == expected, (command, reply, expected)
        return True

    def remember(self, command, key, fingerprint, reply):
        self.keys[key] = (fingerprint, reply)
        self.key_at[key] = self.now
        self.granted_keyed[key] = command

    def do_adjust(self, command: Adjust):
        fingerprint = ("adjust", command.sku, command.loc, command.delta, command.reason)
        if self.known_key(command, command.key, fingerprint):
            return
        stock = (command.sku, command.loc)
        if self.on_hand.get(stock, 0) + command.delta < 0:
            reply = self.execute(command, [], at_least=self.stock_seq.get(stock, 0))
            assert reply == {"ok": False, "error": "invalid"}, (command, reply)
            return
        self.on_hand[stock] = self.on_hand.get(stock, 0) + command.delta
        expected = {"ok": True, "sku": command.sku, "loc": command.loc, **self.figures(stock)}
        self.remember(command, command.key, fingerprint, expected)
        reply = self.execute(command, ["adjusted"])
        assert reply == expected, (command, reply, expected)

    def do_count(self, command: Count):
        fingerprint = ("count", command.sku, command.loc, command.on_hand, command.reason)
        if self.known_key(command, command.key, fingerprint):
            return
        stock = (command.sku, command.loc)
        variance = command.on_hand - self.on_hand.get(stock, 0)
        self.on_hand[stock] = command.on_hand
        expected = {"ok": True, "sku": command.sku, "loc": command.loc, **self.figures(stock), "variance": variance}
        self.remember(command, command.key, fingerprint, expected)
        reply = self.execute(command, ["counted"])
        assert reply == expected, (command, reply, expected)

    def do_transfer(self, command: Transfer):
        fingerprint = ("transfer", command.sku, command.from_loc, command.to_loc, command.qty)
        if self.known_key(command, command.key, fingerprint):
            return
        if command.from_loc == command.to_loc:
            reply = self.execute(command, [])
            assert reply == {"ok": False, "error": "invalid"}, (command, reply)
            return
        source, target = (command.sku, command.from_loc), (command.sku, command.to_loc)
        free = self.available(source)
        if free < command.qty:
            reply = self.execute(command, [], at_least=self.stocks_seq([source, target]))
            short = [{"sku": command.sku, "loc": command.from_loc, "requested": command.qty, "available": free}]
            assert reply == {"ok": False, "error": "insufficient", "lines": short}, (command, reply)
            return
        self.on_hand[source] -= command.qty
        self.on_hand[target] = self.on_hand.get(target, 0) + command.qty
        expected = {
            "ok": True,
            "from": {"loc": command.from_loc, **self.figures(source)},
            "to": {"loc": command.to_loc, **self.figures(target)},
        }
        self.remember(command, command.key, fingerprint, expected)
        reply = self.execute(command, ["transferred"])
        assert reply == expected, (command, reply, expected)
        assert self.state.stock(*source).available >= 0

    def do_count_batch(self, command: CountBatch):
        # A batch's payload is its lines in order (and the reason).
        fingerprint = ("count_batch", command.lines, command.reason)
        if self.known_key(command, command.key, fingerprint):
            return
        lines = []
        for sku, loc, on_hand in command.lines:
            variance = on_hand - self.on_hand.get((sku, loc), 0)
            self.on_hand[(sku, loc)] = on_hand
            lines.append({"sku": sku, "loc": loc, **self.figures((sku, loc)), "variance": variance})
        expected = {"ok": True, "lines": lines}
        self.remember(command, command.key, fingerprint, expected)
        reply = self.execute(command, ["counted_batch"])
        assert reply == expected, (command, reply, expected)

    def do_adjust_batch(self, command: AdjustBatch):
        fingerprint = ("adjust_batch", command.lines, command.reason)
        if self.known_key(command, command.key, fingerprint):
            return
        refused = [
            {"line": index, "sku": sku, "loc": loc, "delta": delta, "on_hand": self.on_hand.get((sku, loc), 0)}
            for index, (sku, loc, delta) in enumerate(command.lines) if self.on_hand.get((sku, loc), 0) + delta < 0
        ]
        if refused:
            at_least = self.stocks_seq((line["sku"], line["loc"]) for line in refused)
            reply = self.execute(command, [], at_least=at_least)
            assert reply == {"ok": False, "error": "invalid", "lines": refused}, (command, reply)
            return
        lines = []
        for sku, loc, delta in command.lines:
            self.on_hand[(sku, loc)] = self.on_hand.get((sku, loc), 0) + delta
            lines.append({"sku": sku, "loc": loc, **self.figures((sku, loc))})
        expected = {"ok": True, "lines": lines}
        self.remember(command, command.key, fingerprint, expected)
        reply = self.execute(command, ["adjusted_batch"])
        assert reply == expected, (command, reply, expected)

    @rule(key=keys, lines=count_lines, reason=st.sampled_from([None, "initial"]))
    def count_batch(self, key, lines, reason):
        self.do_count_batch(CountBatch(key, tuple((sku, loc, on_hand) for (sku, loc), on_hand in lines), reason))

    @rule(key=keys, lines=adjust_lines, reason=st.sampled_from(["receipt", "damage"]))
    def adjust_batch(self, key, lines, reason):
        self.do_adjust_batch(AdjustBatch(key, tuple((sku, loc, delta) for (sku, loc), delta in lines), reason))

    @rule(key=keys, stock=stock_keys, delta=st.integers(-20, -1) | st.integers(1, 20), reason=st.sampled_from(["receipt", "damage"]))
    def adjust(self, key, stock, delta, reason):
        self.do_adjust(Adjust(key, *stock, delta, reason))

    @rule(key=keys, stock=stock_keys, qty=qtys)
    def receive(self, key, stock, qty):
        """Receipts are frequent, so that there is stock to reserve."""
        self.do_adjust(Adjust(key, *stock, qty, "receipt"))

    @rule(key=keys, stock=stock_keys, on_hand=st.integers(0, 20), reason=st.sampled_from([None, "cycle"]))
    def count(self, key, stock, on_hand, reason):
        self.do_count(Count(key, *stock, on_hand, reason))

    @rule(key=keys, sku=skus, source=locs, destination=locs, qty=qtys)
    def transfer(self, key, sku, source, destination, qty):
        self.do_transfer(Transfer(key, sku, source, destination, qty))

    @rule(data=st.data())
    def retry_key(self, data):
        if not self.granted_keyed:
            return
        key = data.draw(st.sampled_from(sorted(self.granted_keyed)))
        command = self.granted_keyed[key]
        run = {
            Adjust: self.do_adjust, Count: self.do_count, Transfer: self.do_transfer,
            AdjustBatch: self.do_adjust_batch, CountBatch: self.do_count_batch,
        }[type(command)]
        run(command)

    # -- reads ----------------------------------------------------------------------------------

    @rule(stock=st.sampled_from(STOCKS + [("A", "W"), ("Q", "X")]))
    def get(self, stock):
        reply = self.execute(Get(*stock), [], at_least=self.stock_seq.get(stock, 0))
        assert reply == {"ok": True, "sku": stock[0], "loc": stock[1], **self.figures(stock)}

    @rule(sku=st.sampled_from(SKUS + ("Q",)))
    def query(self, sku):
        known = sorted(loc for s, loc in self.on_hand if s == sku)
        locations = [{"loc": loc, **self.figures((sku, loc))} for loc in known]
        total = {name: sum(location[name] for location in locations) for name in ("on_hand", "reserved", "available")}
        reply = self.execute(Query(sku), [], at_least=self.stocks_seq((sku, loc) for loc in known))
        assert reply == {"ok": True, "sku": sku, "locations": locations, "total": total}

    # -- invariants -----------------------------------------------------------------------------

    @invariant()
    def state_matches_the_model(self):
        check_invariants(self.state)
        held = held_by_stock(self.state)
        for key, stock in self.state.stocks.items():
            assert stock.reserved == held.get(key, 0)
        assert set(self.state.stocks) == set(self.on_hand)
        for key in STOCKS:
            stock = self.state.stock(*key)
            assert (stock.on_hand, stock.reserved, stock.available) == tuple(self.figures(key).values()), key
        assert {rid: self.state.reservation(rid).state for rid in self.state.reservations} == {rid: r.state for rid, r in self.reservations.items()}
        assert set(self.state.keys) == set(self.keys)
        assert [event["seq"] for event in self.log] == list(range(1, len(self.log) + 1))
        assert self.state.seq == len(self.log)

    def teardown(self):
        # Replaying every emitted event onto a fresh state gives exactly the same state.
        replayed = State()
        for event in self.log:
            apply_event(replayed, event)
        expected = normalized(self.state.to_snapshot())
        assert normalized(replayed.to_snapshot()) == expected
        # Snapshots round-trip, also through msgpack (what is written to disk).
        assert normalized(State.from_snapshot(self.state.to_snapshot()).to_snapshot()) == expected
        wire = msgpack.unpackb(msgpack.packb(self.state.to_snapshot()), strict_map_key=False)
        assert normalized(State.from_snapshot(wire).to_snapshot()) == expected
        # Replayed a few events at a time with the long-lived builder's check after each tail.
        tailed = State()
        tail_check = TailCheck(tailed)
        tail_length = 1 + len(self.log) % 5
        for start in range(0, len(self.log), tail_length):
            for event in self.log[start : start + tail_length]:
                apply_event(tailed, event)
            tail_check.check(tailed)
        assert normalized(tailed.to_snapshot()) == expected
        # Events survive msgpack unchanged too (the log stores them so).
        assert msgpack.unpackb(msgpack.packb(self.log)) == self.log


CoreMachine.TestCase.settings = settings(
    max_examples=500,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestCoreMachine = CoreMachine.TestCase

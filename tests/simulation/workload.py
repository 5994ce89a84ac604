"""What a simulated client asks for: seeded random requests on a few shared SKU-locations.

Few SKU-locations and little stock, so that reserves contend and many are refused; ttls short
enough that expiries race commits and extends; rids shared between clients, so that one client
commits what another releases; retries of earlier requests with the same rid or key (the
idempotency path); now and then a request whose outcome is unknown is retried on purpose.
"""

from __future__ import annotations

import random
from typing import Any

SKUS = ("apple", "pear", "plum")
LOCATIONS = ("north", "south")
STOCK_KEYS = tuple((sku, loc) for sku in SKUS for loc in LOCATIONS)
INITIAL_ON_HAND_MAX = 30
SHARED_RIDS_MAX = 64  # the most recent rids any client may act on


class Workload:
    """Draws one client's next request: `(op, fields, retry)`."""

    def __init__(self, client: int, chooser: random.Random, shared_rids: list[str]):
        self._client = client
        self._chooser = chooser
        self._shared_rids = shared_rids  # rids granted (or maybe granted) to any client, newest last (bounded)
        self._sent: list[tuple[str, dict[str, Any]]] = []  # this client's keyed requests, to retry
        self._counter = 0

    def _name(self, kind: str) -> str:
        self._counter += 1
        return f"c{self._client}-{kind}{self._counter}"

    def _rid(self) -> str | None:
        rids = self._shared_rids
        return rids[-self._chooser.randint(1, min(len(rids), 16))] if rids else None

    def next_request(self) -> tuple[str, dict[str, Any], bool]:
        chooser = self._chooser
        roll = chooser.random()
        if roll < 0.06 and self._sent:
            op, fields = chooser.choice(self._sent[-20:])
            return op, fields, True
        if roll < 0.34:
            return self._reserve(line_count=1)
        if roll < 0.52:
            return self._reserve(line_count=chooser.randint(2, 3))
        rid = self._rid()
        if roll < 0.62 and rid is not None:
            return "release", {"rid": rid}, False
        if roll < 0.74 and rid is not None:
            fields: dict[str, Any] = {"rid": rid}
            if chooser.random() < 0.3:
                sku, loc = chooser.choice(STOCK_KEYS)
                fields["lines"] = [{"sku": sku, "loc": loc, "qty": chooser.randint(0, 3)}]
            return "commit", fields, False
        if roll < 0.79 and rid is not None:
            return "extend", {"rid": rid, "ttl_ms": chooser.randint(10, 2000)}, False
        if roll < 0.84 and rid is not None:
            return "lookup", {"rid": rid}, False
        sku, loc = chooser.choice(STOCK_KEYS)
        if roll < 0.90:
            delta = chooser.randint(1, 12) if chooser.random() < 0.75 else -chooser.randint(1, 6)
            return self._keyed("adjust", {"key": self._name("k"), "sku": sku, "loc": loc, "delta": delta, "reason": "receipt" if delta > 0 else "damage"})
        if roll < 0.92:
            return self._keyed("count", {"key": self._name("k"), "sku": sku, "loc": loc, "on_hand": chooser.randint(0, INITIAL_ON_HAND_MAX)})
        if roll < 0.94:
            keys = chooser.sample(STOCK_KEYS, chooser.randint(2, 3))
            if chooser.random() < 0.5:
                lines = [{"sku": s, "loc": l, "delta": chooser.choice([-2, -1, 3, 5, 8])} for s, l in keys]
                return self._keyed("adjust", {"key": self._name("k"), "lines": lines, "reason": "correction"})
            lines = [{"sku": s, "loc": l, "on_hand": chooser.randint(0, INITIAL_ON_HAND_MAX)} for s, l in keys]
            return self._keyed("count", {"key": self._name("k"), "lines": lines})
        if roll < 0.97:
            source, target = chooser.sample(LOCATIONS, 2)
            return self._keyed("transfer", {"key": self._name("k"), "sku": sku, "from": source, "to": target, "qty": chooser.randint(1, 6)})
        if roll < 0.985:
            return "query", {"sku": sku}, False
        return "get", {"sku": sku, "loc": loc}, False

    def observe(self, op: str, fields: dict[str, Any], reply: dict[str, Any] | None) -> None:
        """Learn from a reply (None: the outcome is unknown): a rid that may be held is one
        that any client may release, commit, extend or look up from now on."""
        if op == "reserve" and (reply is None or reply["ok"]) and fields["rid"] not in self._shared_rids:
            self._shared_rids.append(fields["rid"])
            del self._shared_rids[:-SHARED_RIDS_MAX]

    def _keyed(self, op: str, fields: dict[str, Any]) -> tuple[str, dict[str, Any], bool]:
        self._sent.append((op, fields))
        return op, fields, False

    def _reserve(self, line_count: int) -> tuple[str, dict[str, Any], bool]:
        chooser = self._chooser
        keys = chooser.sample(STOCK_KEYS, line_count)
        fields: dict[str, Any] = {"rid": self._name("r"), "lines": [{"sku": sku, "loc": loc, "qty": chooser.randint(1, 5)} for sku, loc in keys]}
        if chooser.random() < 0.5:
            fields["ttl_ms"] = chooser.randint(5, 1500)
        if chooser.random() < 0.2:
            fields["ref"] = f"order-{chooser.randint(1, 99)}"
        self._sent.append(("reserve", fields))
        return "reserve", fields, False

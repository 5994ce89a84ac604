"""The layer both clients share: protocol arguments in, `(op, fields)` requests out.

Each `*_request` function is pure and builds one request as the wire contract spells it (for
example `transfer_request(..., from_loc=..., to_loc=...)` becomes the wire fields `from` and `to`).
They are public so that callers can build batches for `Client.pipeline`.

`RequestMethods` turns every builder into a method that hands the request to the client's `call`.
It is written once and shared: the blocking `Client.call` returns the reply map, the trio client's
`call` is a coroutine function, so the same methods return an awaitable there.

No validation happens here on purpose: the server is the one judge of a request, and tests must be
able to send requests the server will refuse.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Generic, TypeVar, Union

from ._commands import Line
from ._limits import PROTOCOL_VERSION

Request = tuple[str, dict[str, Any]]
"""One request before it gets an id: `(op, fields)`."""

LineLike = Union[Mapping[str, Any], tuple[str, str, int], Line]
"""A reservation or commit line: a `{sku, loc, qty}` map, a `(sku, loc, qty)` tuple or a `Line`."""


def _present(**fields: Any) -> dict[str, Any]:
    # Optional fields are left off the wire rather than sent as nil: absent is what the contract
    # defines (for example `ttl_ms` absent = no expiry).
    return {name: value for name, value in fields.items() if value is not None}


def line_maps(lines: Iterable[LineLike]) -> list[dict[str, Any]]:
    """Normalise lines to the wire's `{sku, loc, qty}` maps (tuples and `Line`s are converted)."""
    maps = []
    for line in lines:
        if isinstance(line, Mapping):
            maps.append(dict(line))
        elif isinstance(line, Line):
            maps.append({"sku": line.sku, "loc": line.loc, "qty": line.qty})
        else:
            sku, loc, qty = line
            maps.append({"sku": sku, "loc": loc, "qty": qty})
    return maps


def hello_request(version: int = PROTOCOL_VERSION, token: str | None = None, client: str | None = None) -> Request:
    """`hello`: announce the protocol version, and optionally a token and a client name."""
    return "hello", _present(version=version, token=token, client=client)


def ping_request() -> Request:
    """`ping`: a no-op round trip."""
    return "ping", {}


def reserve_request(rid: str, lines: Iterable[LineLike], ttl_ms: int | None = None, ref: str | None = None) -> Request:
    """`reserve`: hold every line or nothing; `ttl_ms` None or 0 means no expiry."""
    return "reserve", _present(rid=rid, lines=line_maps(lines), ttl_ms=ttl_ms, ref=ref)


def release_request(rid: str) -> Request:
    """`release`: give back everything a reservation holds."""
    return "release", {"rid": rid}


def commit_request(rid: str, lines: Iterable[LineLike] | None = None) -> Request:
    """`commit`: the goods leave; `lines` None commits every line in full, else a short pick."""
    return "commit", _present(rid=rid, lines=None if lines is None else line_maps(lines))


def extend_request(rid: str, ttl_ms: int) -> Request:
    """`extend`: a held reservation now expires `ttl_ms` from now."""
    return "extend", {"rid": rid, "ttl_ms": ttl_ms}


def adjust_request(key: str, sku: str, loc: str, delta: int, reason: str) -> Request:
    """`adjust`: change `on_hand` by a non-zero `delta` for a `reason` (receipt, damage, ...)."""
    return "adjust", {"key": key, "sku": sku, "loc": loc, "delta": delta, "reason": reason}


def count_request(key: str, sku: str, loc: str, on_hand: int, reason: str | None = None) -> Request:
    """`count`: record the physically counted `on_hand`."""
    return "count", _present(key=key, sku=sku, loc=loc, on_hand=on_hand, reason=reason)


StockLineLike = Union[Mapping[str, Any], tuple[str, str, int]]
"""A batch line: a `{sku, loc, on_hand}` / `{sku, loc, delta}` map, or a `(sku, loc, figure)` tuple."""


def stock_line_maps(lines: Iterable[StockLineLike], figure: str) -> list[dict[str, Any]]:
    """Normalise batch lines to the wire's `{sku, loc, <figure>}` maps (tuples are converted)."""
    maps = []
    for line in lines:
        if isinstance(line, Mapping):
            maps.append(dict(line))
        else:
            sku, loc, number = line
            maps.append({"sku": sku, "loc": loc, figure: number})
    return maps


def count_many_request(key: str, lines: Iterable[StockLineLike], reason: str | None = None) -> Request:
    """`count` with `lines` (`{sku, loc, on_hand}`): every line under one `key`, one log record."""
    return "count", _present(key=key, lines=stock_line_maps(lines, "on_hand"), reason=reason)


def adjust_many_request(key: str, lines: Iterable[StockLineLike], reason: str) -> Request:
    """`adjust` with `lines` (`{sku, loc, delta}`): every line or none, under one `key`."""
    return "adjust", {"key": key, "lines": stock_line_maps(lines, "delta"), "reason": reason}


def transfer_request(key: str, sku: str, from_loc: str, to_loc: str, qty: int) -> Request:
    """`transfer`: move `qty` on hand between locations (wire fields `from` and `to`)."""
    return "transfer", {"key": key, "sku": sku, "from": from_loc, "to": to_loc, "qty": qty}


def get_request(sku: str, loc: str) -> Request:
    """`get`: the stock of one SKU-location."""
    return "get", {"sku": sku, "loc": loc}


def query_request(sku: str) -> Request:
    """`query`: the stock of a SKU at every location, and the total."""
    return "query", {"sku": sku}


def lookup_request(rid: str) -> Request:
    """`lookup`: the state and lines of a reservation."""
    return "lookup", {"rid": rid}


def watch_request(from_seq: int | None = None) -> Request:
    """`watch`: turn the connection into an event stream, from `from_seq` or from now on."""
    return "watch", _present(from_seq=from_seq)


def snapshot_request() -> Request:
    """`snapshot`: ask the server to snapshot its state (admin)."""
    return "snapshot", {}


def stats_request() -> Request:
    """`stats`: the server's free-form counters."""
    return "stats", {}


def pushed_event(message: dict[str, Any]) -> dict[str, Any] | None:
    """The inner event if `message` is a pushed `{"event": {...}}` frame (it has no `id`), else None."""
    if "id" not in message and "event" in message:
        return message["event"]
    return None


ReplyT = TypeVar("ReplyT", covariant=True)


class RequestMethods(Generic[ReplyT]):
    """One method per op, each delegating to `call`. `ReplyT` is what `call` returns:
    the reply map for the blocking client, an awaitable of it for the trio client.
    """

    def call(self, op: str, **fields: Any) -> ReplyT:
        """Send one request and return its reply; raise `ServerError` if it is not ok."""
        raise NotImplementedError

    def _call_request(self, request: Request) -> ReplyT:
        op, fields = request
        return self.call(op, **fields)

    def hello(self, version: int = PROTOCOL_VERSION, token: str | None = None, client: str | None = None) -> ReplyT:
        """`hello`; the reply has `server` and `version`."""
        return self._call_request(hello_request(version, token, client))

    def ping(self) -> ReplyT:
        """`ping`."""
        return self._call_request(ping_request())

    def reserve(self, rid: str, lines: Iterable[LineLike], ttl_ms: int | None = None, ref: str | None = None) -> ReplyT:
        """`reserve`; the reply has `rid`, `lines` (with `available`) and `expires_at_ms`."""
        return self._call_request(reserve_request(rid, lines, ttl_ms, ref))

    def release(self, rid: str) -> ReplyT:
        """`release`; the reply has `rid` and `state`."""
        return self._call_request(release_request(rid))

    def commit(self, rid: str, lines: Iterable[LineLike] | None = None) -> ReplyT:
        """`commit`; the reply has `rid`, `state` and the committed `lines`."""
        return self._call_request(commit_request(rid, lines))

    def extend(self, rid: str, ttl_ms: int) -> ReplyT:
        """`extend`; the reply has `rid` and `expires_at_ms`."""
        return self._call_request(extend_request(rid, ttl_ms))

    def adjust(self, key: str, sku: str, loc: str, delta: int, reason: str) -> ReplyT:
        """`adjust`; the reply has the SKU-location's `on_hand`, `reserved` and `available`."""
        return self._call_request(adjust_request(key, sku, loc, delta, reason))

    def count(self, key: str, sku: str, loc: str, on_hand: int, reason: str | None = None) -> ReplyT:
        """`count`; the reply has the stock figures and the `variance`."""
        return self._call_request(count_request(key, sku, loc, on_hand, reason))

    def count_many(self, key: str, lines: Iterable[StockLineLike], reason: str | None = None) -> ReplyT:
        """Batch `count`; the reply's `lines` have each line's stock figures and `variance`."""
        return self._call_request(count_many_request(key, lines, reason))

    def adjust_many(self, key: str, lines: Iterable[StockLineLike], reason: str) -> ReplyT:
        """Batch `adjust` (all lines or none); the reply's `lines` have each line's stock figures."""
        return self._call_request(adjust_many_request(key, lines, reason))

    def transfer(self, key: str, sku: str, from_loc: str, to_loc: str, qty: int) -> ReplyT:
        """`transfer`; the reply has `from` and `to`, each with its stock figures."""
        return self._call_request(transfer_request(key, sku, from_loc, to_loc, qty))

    def get(self, sku: str, loc: str) -> ReplyT:
        """`get`; the reply has `on_hand`, `reserved` and `available`."""
        return self._call_request(get_request(sku, loc))

    def query(self, sku: str) -> ReplyT:
        """`query`; the reply has `locations` and `total`."""
        return self._call_request(query_request(sku))

    def lookup(self, rid: str) -> ReplyT:
        """`lookup`; the reply has `state`, `lines`, `ref` and `expires_at_ms`."""
        return self._call_request(lookup_request(rid))

    def watch(self, from_seq: int | None = None) -> ReplyT:
        """`watch`; the reply has `seq`. Then read pushed events; send no more requests."""
        return self._call_request(watch_request(from_seq))

    def snapshot(self) -> ReplyT:
        """`snapshot`; the reply has the `seq` the snapshot covers."""
        return self._call_request(snapshot_request())

    def stats(self) -> ReplyT:
        """`stats`; the reply holds free-form counters."""
        return self._call_request(stats_request())

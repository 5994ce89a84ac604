"""Requests pipelined on one connection that touch the same SKU-location are applied in the
order they were sent, whatever their op: a `release`, `commit` or `extend` queues behind a
`reserve` sent before it, as a `get` or `adjust` does (PROTOCOL: only requests that touch
different SKU-locations may be answered out of order)."""

from __future__ import annotations

import trio

from protocol import Client

STOCK = 5


def _pipelined_reserve_then_close(server, close_op: str, close_fields: dict) -> list[dict]:
    with Client(server.host, server.port) as client:
        client.call("adjust", key="receipt", sku="s", loc="l", delta=STOCK, reason="receipt")
        client.call("reserve", rid="first", lines=[{"sku": "s", "loc": "l", "qty": STOCK}])
        # Sent in one write, so the server reads both in one chunk: the reserve was sent first.
        return client.pipeline([
            ("reserve", {"rid": "second", "lines": [{"sku": "s", "loc": "l", "qty": STOCK}]}),
            (close_op, close_fields),
            ("get", {"sku": "s", "loc": "l"}),
        ])


async def test_a_release_sent_after_a_reserve_is_applied_after_it(server):
    second, release, figures = await trio.to_thread.run_sync(_pipelined_reserve_then_close, server, "release", {"rid": "first"})
    assert second["ok"] is False and second["error"] == "insufficient", second
    assert release["ok"] is True, release
    assert second["seq"] < release["seq"], (second, release)
    assert (figures["reserved"], figures["available"]) == (0, STOCK), figures


async def test_a_commit_sent_after_an_adjust_is_applied_after_it(server):
    # In the order sent: the damage takes on_hand to 0 (5 still reserved), so the commit of 5
    # is refused (goods that are not there cannot leave). Applied the other way round, the
    # commit would ship and the adjust would be refused.
    def run() -> list[dict]:
        with Client(server.host, server.port) as client:
            client.call("adjust", key="receipt", sku="s", loc="l", delta=STOCK, reason="receipt")
            client.call("reserve", rid="first", lines=[{"sku": "s", "loc": "l", "qty": STOCK}])
            return client.pipeline([
                ("adjust", {"key": "damage", "sku": "s", "loc": "l", "delta": -STOCK, "reason": "damage"}),
                ("commit", {"rid": "first"}),
            ])

    damage, commit = await trio.to_thread.run_sync(run)
    assert damage["ok"] is True, damage
    assert commit["ok"] is False and commit["error"] == "invalid", commit


async def test_a_multi_line_release_is_applied_after_what_was_queued_before_it(server):
    # `wide` holds one unit at l and one at m; `first` cannot be granted all of l meanwhile.
    def run() -> list[dict]:
        with Client(server.host, server.port) as client:
            client.call("adjust", key="receipt", sku="s", loc="l", delta=STOCK, reason="receipt")
            client.call("adjust", key="receipt-2", sku="s", loc="m", delta=STOCK, reason="receipt")
            client.call("reserve", rid="wide", lines=[{"sku": "s", "loc": "l", "qty": 1}, {"sku": "s", "loc": "m", "qty": 1}])
            return client.pipeline([
                ("reserve", {"rid": "all-of-l", "lines": [{"sku": "s", "loc": "l", "qty": STOCK}]}),
                ("release", {"rid": "wide"}),
            ])

    second, release = await trio.to_thread.run_sync(run)
    assert second["ok"] is False and second["error"] == "insufficient", second
    assert release["ok"] is True and second["seq"] < release["seq"], (second, release)

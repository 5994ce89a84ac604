"""No oversell under contention: 50 clients, 3 hot SKU-locations, single- and multi-line reserves."""

from __future__ import annotations

import random
from collections import Counter

import trio

from protocol import ServerError, open_trio_client

SKUS = [("sku-a", "dock"), ("sku-b", "dock"), ("sku-c", "dock")]
STOCK = 1000
CLIENTS = 50
REQUESTS_PER_CLIENT = 60


async def test_fifty_clients_never_oversell(server):
    granted: Counter = Counter()
    refused = 0
    with trio.fail_after(60):
        async with open_trio_client(server.host, server.port) as admin:
            for index, (sku, loc) in enumerate(SKUS):
                await admin.adjust(f"receipt-{index}", sku, loc, STOCK, "receipt")

            async def hammer(client_number: int) -> None:
                nonlocal refused
                chooser = random.Random(client_number)
                async with open_trio_client(server.host, server.port) as client:
                    for request_number in range(REQUESTS_PER_CLIENT):
                        chosen = chooser.sample(SKUS, chooser.randint(1, 3))
                        lines = [(sku, loc, chooser.randint(1, 8)) for sku, loc in chosen]
                        try:
                            reply = await client.reserve(f"c{client_number}-r{request_number}", lines)
                        except ServerError as error:
                            assert error.code == "insufficient", error.reply
                            refused += 1
                            continue
                        for line in reply["lines"]:
                            assert line["available"] >= 0, reply
                            granted[(line["sku"], line["loc"])] += line["qty"]

            async with trio.open_nursery() as nursery:
                for client_number in range(CLIENTS):
                    nursery.start_soon(hammer, client_number)

            assert refused > 0, "the load must exhaust stock for the test to mean anything"
            for sku, loc in SKUS:
                assert granted[(sku, loc)] <= STOCK
                figures = await admin.get(sku, loc)
                assert figures["reserved"] == granted[(sku, loc)]
                assert figures["on_hand"] == STOCK
                # Mop up what is left: granted quantity then equals stock exactly, never more.
                if figures["available"] > 0:
                    await admin.reserve(f"mop-{sku}", [(sku, loc, figures["available"])])
                    granted[(sku, loc)] += figures["available"]
                assert granted[(sku, loc)] == STOCK
                final = await admin.get(sku, loc)
                assert (final["on_hand"], final["reserved"], final["available"]) == (STOCK, STOCK, 0)
                try:
                    await admin.reserve(f"one-more-{sku}", [(sku, loc, 1)])
                    raise AssertionError("a reserve beyond stock was granted")
                except ServerError as error:
                    assert error.code == "insufficient"
                    assert error.reply["lines"] == [{"sku": sku, "loc": loc, "requested": 1, "available": 0}]


async def test_multi_line_reserve_is_all_or_nothing_under_contention(server):
    """Each pair reserve takes one of a scarce SKU and one of a plentiful one: a refused pair
    must leave the plentiful line untouched."""
    with trio.fail_after(30):
        async with open_trio_client(server.host, server.port) as admin:
            await admin.adjust("k-scarce", "scarce", "w", 10, "receipt")
            await admin.adjust("k-plenty", "plenty", "w", 1000, "receipt")
            outcomes: list[bool] = []

            async def one(number: int) -> None:
                try:
                    await admin.reserve(f"pair-{number}", [("plenty", "w", 1), ("scarce", "w", 1)])
                    outcomes.append(True)
                except ServerError as error:
                    assert error.code == "insufficient"
                    assert [line["sku"] for line in error.reply["lines"]] == ["scarce"]
                    outcomes.append(False)

            async with trio.open_nursery() as nursery:
                for number in range(60):
                    nursery.start_soon(one, number)
            assert outcomes.count(True) == 10
            scarce = await admin.get("scarce", "w")
            plenty = await admin.get("plenty", "w")
            assert scarce["reserved"] == 10 and scarce["available"] == 0
            assert plenty["reserved"] == 10 and plenty["available"] == 990
            stats = await admin.stats()
            assert stats["tentative_holds"] == 0

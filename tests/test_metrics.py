"""`/metrics`: the collector's values after known traffic, consistency under concurrent scrapes
during load, and the HTTP endpoint's answers to everything that is not a scrape."""

from __future__ import annotations

import random
import time

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from engine.core import count_held
from protocol import ServerError, open_trio_client

TIMEOUT = 10


async def http_get(port: int, target: str = "/metrics", method: str = "GET", raw: bytes | None = None) -> tuple[int, bytes]:
    """One HTTP/1.1 request to 127.0.0.1:port; returns (status, body)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        request = raw if raw is not None else f"{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
        await stream.send_all(request)
        received = bytearray()
        while data := await stream.receive_some(65536):
            received += data
    head, _, body = bytes(received).partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape: (name, sorted labels) -> value."""
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


async def scrape(server) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, body = await http_get(server.metrics_port)
    assert status == 200
    return samples(body.decode())


def value(scraped, name: str, **labels: str) -> float:
    return scraped[(name, tuple(sorted(labels.items())))]


async def test_collector_counts_known_traffic(start_server):
    server = await start_server(metrics_port=0)
    assert server.metrics_port and server.metrics_port != server.port
    with trio.fail_after(TIMEOUT):
        async with open_trio_client(server.host, server.port) as client:
            await client.hello()
            await client.adjust("receipt-1", "S", "L", 10, "receipt")
            await client.reserve("r1", [("S", "L", 3)])
            await client.reserve("r1", [("S", "L", 3)])  # a retry: duplicate
            with pytest.raises(ServerError) as refused:
                await client.reserve("r2", [("S", "L", 30)])
            assert refused.value.code == "insufficient"
            await client.reserve("r3", [("S", "L", 2)], ttl_ms=50)
            await client.adjust("receipt-2", "T", "L", 5, "receipt")
            await client.reserve("r4", [("S", "L", 1), ("T", "L", 4)])
            await client.release("r4")
            while server.engine.expiries < 1:
                await trio.sleep(0.02)
            await server.engine.wal.flush()  # the expiry's record is applied; wait until it is durable too
            scraped = await scrape(server)

            assert value(scraped, "engine_requests_total", op="reserve", result="ok") == 4
            assert value(scraped, "engine_requests_total", op="reserve", result="insufficient") == 1
            assert value(scraped, "engine_requests_total", op="adjust", result="ok") == 2
            assert value(scraped, "engine_requests_total", op="release", result="ok") == 1
            assert value(scraped, "engine_requests_total", op="hello", result="ok") == 1
            assert value(scraped, "engine_duplicates_total", op="reserve") == 1
            assert value(scraped, "engine_expiries_total") == 1
            # Every answered reserve was observed once, from frame read to reply written.
            assert value(scraped, "engine_request_duration_seconds_count", op="reserve") == 5
            assert value(scraped, "engine_request_duration_seconds_bucket", op="reserve", le="+Inf") == 5
            assert value(scraped, "engine_request_duration_seconds_sum", op="reserve") > 0
            assert value(scraped, "engine_wal_commit_records_sum") == server.engine.state.seq
            assert value(scraped, "engine_wal_commit_duration_seconds_count") >= 1
            # r1 (3 units) is still held; r3 expired, r4 was released.
            held = count_held(server.engine.state)
            assert held == (1, 3)
            assert value(scraped, "engine_reservations_held") == 1
            assert value(scraped, "engine_units_held") == 3
            assert value(scraped, "engine_applied_seq") == value(scraped, "engine_durable_seq") == server.engine.state.seq
            assert value(scraped, "engine_shortage_sku_locations") == 0
            assert value(scraped, "engine_received_bytes_total") > 0
            assert value(scraped, "engine_sent_bytes_total") > 0
            assert value(scraped, "engine_connections_open") == 1
            assert value(scraped, "engine_wal_failed") == 0
            assert value(scraped, "engine_owner_tasks") == server.engine.owners.owner_count
            assert ("process_cpu_seconds_total", ()) in scraped
            storage = server.engine.storage
            assert value(scraped, "engine_lmdb_map_size_bytes") == storage.map_size_bytes == storage._env.info()["map_size"]
            assert value(scraped, "engine_lmdb_map_growths_total") == 0
            assert value(scraped, "engine_lmdb_map_full_at_ceiling") == 0
            assert value(scraped, "engine_snapshot_builds_total") == 0

            await client.snapshot()
            after_snapshot = await scrape(server)
            assert value(after_snapshot, "engine_snapshot_builds_total") == 1
            assert value(after_snapshot, "engine_last_snapshot_seq") == server.engine.last_snapshot_seq > 0
            assert value(after_snapshot, "engine_snapshot_duration_seconds_count") == 1
            # The builder stays for the next snapshot, having loaded nothing (no snapshot before) and replayed the log.
            assert value(after_snapshot, "engine_snapshot_builder_running") == 1
            assert value(after_snapshot, "engine_snapshot_builder_starts_total") == value(after_snapshot, "engine_snapshot_builder_base_loads_total") == 1
            assert value(after_snapshot, "engine_snapshot_builder_replayed_records_total") == server.engine.last_snapshot_seq

            # A count below what is reserved (3 held at S/L) is a shortage until stock arrives.
            await client.count("count-1", "S", "L", 1, "cycle count")
            assert value(await scrape(server), "engine_shortage_sku_locations") == 1
            await client.adjust("receipt-3", "S", "L", 2, "receipt")
            assert value(await scrape(server), "engine_shortage_sku_locations") == 0
            assert server.engine.shortage_candidates == set()


async def test_held_counts_follow_a_random_history(start_server):
    """Held reservations and units are kept by apply_event; they must equal a full count."""
    server = await start_server(metrics_port=0)
    chooser = random.Random(11)
    with trio.fail_after(TIMEOUT * 3):
        async with open_trio_client(server.host, server.port) as client:
            for index in range(5):
                await client.adjust(f"receipt-{index}", f"S{index}", "L", 50, "receipt")
            open_rids = []
            for step in range(150):
                action = chooser.random()
                if action < 0.5 or not open_rids:
                    rid = f"r{step}"
                    lines = [(f"S{index}", "L", chooser.randint(1, 4)) for index in chooser.sample(range(5), chooser.randint(1, 3))]
                    try:
                        await client.reserve(rid, lines)
                        open_rids.append(rid)
                    except ServerError as error:
                        assert error.code == "insufficient"
                elif action < 0.75:
                    await client.release(open_rids.pop(chooser.randrange(len(open_rids))))
                else:
                    await client.commit(open_rids.pop(chooser.randrange(len(open_rids))))
                if step % 30 == 0:
                    scraped = await scrape(server)
                    counted = count_held(server.engine.state)
                    assert (value(scraped, "engine_reservations_held"), value(scraped, "engine_units_held")) == counted
            scraped = await scrape(server)
    reserved = sum(stock.reserved for stock in server.engine.state.stocks.values())
    assert value(scraped, "engine_reservations_held") == len(open_rids)
    assert value(scraped, "engine_units_held") == reserved == count_held(server.engine.state)[1]


async def test_overloaded_counts_by_cause(start_server):
    server = await start_server(metrics_port=0, wal_backlog_max=0, connections_max=1)
    with trio.fail_after(TIMEOUT):
        async with open_trio_client(server.host, server.port) as client:
            with pytest.raises(ServerError) as refused:
                await client.adjust("receipt-1", "S", "L", 10, "receipt")
            assert refused.value.code == "overloaded"
            # A second connection is over the bound of one: refused with `overloaded`.
            stream = await trio.open_tcp_stream(server.host, server.port)
            async with stream:
                assert await stream.receive_some(4096)
            scraped = await scrape(server)
    assert value(scraped, "engine_overloaded_total", cause="wal_backlog") == 1
    assert value(scraped, "engine_overloaded_total", cause="connections") == 1
    assert value(scraped, "engine_overloaded_total", cause="owner_mailbox") == 0
    assert value(scraped, "engine_requests_total", op="adjust", result="overloaded") == 1


COUNTER_SUFFIXES = ("_total", "_count", "_sum", "_bucket")


async def test_concurrent_scrapes_during_load_see_consistent_monotonic_values(start_server):
    """Scrapers loop on /metrics while pipelined clients load the server: every body parses,
    no counter or histogram series goes backwards, and durable never passes applied."""
    server = await start_server(metrics_port=0)
    scrapes = []
    load_done = trio.Event()

    async def load(lane: int) -> None:
        async with open_trio_client(server.host, server.port) as client:
            await client.adjust(f"receipt-{lane}", f"S{lane}", "L", 1_000_000, "receipt")
            for round_number in range(40):
                async with trio.open_nursery() as nursery:
                    for index in range(16):
                        nursery.start_soon(client.reserve, f"r{lane}-{round_number}-{index}", [(f"S{lane}", "L", 1)])
                async with trio.open_nursery() as nursery:
                    for index in range(0, 16, 2):
                        nursery.start_soon(client.release, f"r{lane}-{round_number}-{index}")

    async def scraper() -> None:
        previous: dict = {}
        while True:
            status, body = await http_get(server.metrics_port)
            assert status == 200
            current = samples(body.decode())
            assert value(current, "engine_applied_seq") >= value(current, "engine_durable_seq")
            for key, number in current.items():
                if key[0].startswith("engine_") and key[0].endswith(COUNTER_SUFFIXES) and key in previous:
                    assert number >= previous[key], f"{key} went back from {previous[key]} to {number}"
            scrapes.append(current)
            previous = current
            if load_done.is_set():
                return
            await trio.sleep(0.005)

    with trio.fail_after(TIMEOUT * 6):
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(scraper)
            async with trio.open_nursery() as loaders:
                for lane in range(4):
                    loaders.start_soon(load, lane)
            load_done.set()
    assert len(scrapes) >= 6
    last = scrapes[-1]
    assert value(last, "engine_requests_total", op="reserve", result="ok") == 4 * 40 * 16
    assert value(last, "engine_requests_total", op="release", result="ok") == 4 * 40 * 8
    assert value(last, "engine_request_duration_seconds_count", op="reserve") == 4 * 40 * 16
    assert value(last, "engine_units_held") == 4 * 40 * 8 == count_held(server.engine.state)[1]
    # Some scrape ran while the load did: the counters were seen moving.
    reserve_counts = {value(scraped, "engine_requests_total", op="reserve", result="ok") for scraped in scrapes}
    assert len(reserve_counts) >= 2


async def test_metrics_endpoint_answers_other_requests_and_keeps_serving(start_server):
    server = await start_server(metrics_port=0)
    port = server.metrics_port
    with trio.fail_after(TIMEOUT):
        assert (await http_get(port, "/"))[0] == 404
        assert (await http_get(port, "/metrics/x"))[0] == 404
        assert (await http_get(port, "/metrics", method="POST"))[0] == 405
        assert (await http_get(port, raw=b"\x00\x01garbage\r\n\r\n"))[0] == 400
        assert (await http_get(port, raw=b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 20_000 + b"\r\n\r\n"))[0] == 431
        # A client that connects and says nothing, or closes at once, does not stop the endpoint.
        silent = await trio.open_tcp_stream("127.0.0.1", port)
        await (await trio.open_tcp_stream("127.0.0.1", port)).aclose()
        status, body = await http_get(port, "/metrics?name=x")
        assert status == 200 and b"engine_requests_total" in body
        head_status, head_body = await http_get(port, "/metrics", method="HEAD")
        assert head_status == 200 and head_body == b""
        await silent.aclose()


async def test_metrics_are_off_by_default(server):
    assert server.metrics_port is None


def test_latency_histogram_counts_runs_of_shared_stamps():
    from engine.metrics import RequestLatency

    latency = RequestLatency((0.001, 1.0))
    now = time.monotonic_ns()
    recent, old = (now, 0), (now - 2_000_000_000, 1)  # op 0 just read; op 1 read 2 s ago
    latency.observe([recent, recent, old, recent])
    assert latency.counts[0][0] + latency.counts[0][1] == 3
    assert latency.counts[1] == [0, 0, 1]
    assert latency.sum_ns[1] >= 2_000_000_000

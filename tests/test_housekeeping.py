"""Background work of a running server: owner tasks batching, periodic snapshots, forgetting
old ids, trimming the log; and clients that read slowly or vanish."""

from __future__ import annotations

import socket

import trio

from protocol import ClientProtocol, ServerError, open_trio_client

TIMEOUT_SECONDS = 10


async def _eventually(predicate, what: str, timeout_seconds: float = 5.0) -> None:
    with trio.move_on_after(timeout_seconds):
        while not await predicate():
            await trio.sleep(0.02)
        return
    raise AssertionError(f"timed out waiting for {what}")


async def test_owner_tasks_drain_their_partitions_in_batches(start_server):
    server = await start_server(owner_tasks=4)
    with trio.fail_after(TIMEOUT_SECONDS):
        async with open_trio_client(server.host, server.port) as client:
            # 400 adjusts over 100 SKU-locations, all in flight at once.
            async with trio.open_nursery() as nursery:
                for index in range(400):
                    nursery.start_soon(client.adjust, f"k{index}", f"sku-{index % 100}", "w", 1, "receipt")
            stats = await client.stats()
            assert stats["owners"] == 4
            assert stats["owner_messages"] == 400
            # Each wake-up of an owner served many messages, not one.
            assert stats["owner_wakeups"] <= 400 / 4, stats
            assert all(server.engine.state.stock(f"sku-{index}", "w").on_hand == 4 for index in range(100))


async def test_periodic_snapshot_covers_the_changes(start_server):
    server = await start_server(snapshot_interval_seconds=0.1)
    with trio.fail_after(TIMEOUT_SECONDS):
        async with open_trio_client(server.host, server.port) as client:
            reply = await client.adjust("k", "sku", "w", 3, "receipt")

            async def snapshotted() -> bool:
                return (await client.stats())["last_snapshot_seq"] >= reply["seq"]

            await _eventually(snapshotted, "a periodic snapshot")
            assert server.engine.storage.latest_snapshot()["seq"] >= reply["seq"]


async def test_ids_are_forgotten_after_the_retention(start_server):
    server = await start_server(id_retention_ms=100, forget_interval_seconds=0.05)
    with trio.fail_after(TIMEOUT_SECONDS):
        async with open_trio_client(server.host, server.port) as client:
            await client.adjust("stock", "sku", "w", 10, "receipt")
            await client.reserve("r", [("sku", "w", 2)])
            held = await client.reserve("held-r", [("sku", "w", 1)])
            await client.release("r")
            # Within the retention a reused id is a conflict.
            try:
                await client.reserve("r", [("sku", "w", 5)])
                raise AssertionError("reuse within the retention must be a conflict")
            except ServerError as error:
                assert error.code == "conflict"

            async def forgotten() -> bool:
                try:
                    await client.lookup("r")
                except ServerError as error:
                    return error.code == "not_found"
                return False

            await _eventually(forgotten, "the closed reservation to be forgotten")
            assert (await client.reserve("r", [("sku", "w", 5)]))["lines"][0]["qty"] == 5
            assert (await client.adjust("stock", "sku", "w", 1, "receipt"))["on_hand"] == 11  # key reusable
            # A held reservation is never forgotten, however old.
            assert (await client.lookup("held-r"))["state"] == "held"
            assert held["rid"] == "held-r"


async def test_log_is_trimmed_after_a_snapshot_and_watch_says_what_is_gone(start_server):
    server = await start_server(log_retention_ms=0)
    with trio.fail_after(TIMEOUT_SECONDS):
        async with open_trio_client(server.host, server.port) as client:
            for index in range(5):
                await client.adjust(f"k{index}", "sku", "w", 1, "receipt")
            await trio.sleep(0.01)  # records must be older than "now - 0 ms"
            snapshot_seq = (await client.snapshot())["seq"]
            assert snapshot_seq == 5
            assert server.engine.storage.first_seq() is None
            async with open_trio_client(server.host, server.port) as watcher:
                try:
                    await watcher.watch(from_seq=1)
                    raise AssertionError("watch from a trimmed seq must be refused")
                except ServerError as error:
                    assert error.code == "invalid"
                    assert error.reply["first_seq"] == 6
            # Recovery does not need the trimmed records: the snapshot covers them.
            await client.adjust("k-after", "sku", "w", 1, "receipt")
        await server.aclose()
        again = await start_server(log_retention_ms=0)
        assert again.engine.state.stock("sku", "w").on_hand == 6


async def test_a_commit_visits_only_the_connections_with_replies_waiting_for_it(start_server):
    server = await start_server()
    with trio.fail_after(TIMEOUT_SECONDS):
        idle = [await trio.open_tcp_stream(server.host, server.port) for _ in range(200)]
        async with open_trio_client(server.host, server.port) as client:
            await client.adjust("k-0", "sku", "w", 100, "receipt")
            before = server.engine.outbox.connections_visited
            commits_before = server.engine.wal.commits
            for index in range(20):
                await client.reserve(f"r-{index}", [("sku", "w", 1)])
            visited = server.engine.outbox.connections_visited - before
            commits = server.engine.wal.commits - commits_before
        for stream in idle:
            await stream.aclose()
        # One connection had replies waiting; 200 idle ones were open all along.
        assert commits >= 20
        assert visited <= commits, (visited, commits)


async def test_a_client_that_writes_everything_before_reading_is_still_read(start_server):
    """Megabytes of pipelined requests with large replies, all written before the client reads a
    byte: the server keeps reading while it owes fewer replies than its bound, even though the
    replies it has made cannot be sent yet (otherwise both sides wait for each other forever)."""
    server = await start_server()
    with trio.fail_after(30):
        codec = ClientProtocol()
        sock = trio.socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        await sock.connect((server.host, server.port))
        stream = trio.SocketStream(sock)
        batches, lines_per_batch = 100, 3000
        requests = [
            codec.request("count", key=f"load-{batch}", reason="initial",
                          lines=[{"sku": f"s-{batch}-{line}", "loc": "w", "on_hand": 7} for line in range(lines_per_batch)])
            for batch in range(batches)
        ]
        await stream.send_all(b"".join(frame for _, frame in requests))  # ~10 MB, nothing read yet
        replies = {}
        while len(replies) < batches:
            data = await stream.receive_some(1 << 16)
            assert data, "server closed the connection"
            for reply in codec.receive_data(data):
                replies[reply["id"]] = reply
        await stream.aclose()
        assert all(reply["ok"] and len(reply["lines"]) == lines_per_batch for reply in replies.values())
        assert len(server.engine.state.stocks) == batches * lines_per_batch


async def test_a_connection_owing_its_bound_of_replies_is_not_read_until_it_owes_fewer(start_server):
    server = await start_server(in_flight_per_connection_max=32)
    with trio.fail_after(TIMEOUT_SECONDS):
        codec = ClientProtocol()
        stream = await trio.open_tcp_stream(server.host, server.port)
        requests = [codec.request("adjust", key=f"k{n}", sku="sku", loc=f"w{n % 7}", delta=1, reason="receipt") for n in range(2000)]
        # One write of 2,000 mutating requests: their replies wait for commits, so the server
        # must stop reading at 32 owed replies rather than queue all of them.
        await stream.send_all(b"".join(frame for _, frame in requests))
        async with open_trio_client(server.host, server.port) as other:
            assert (await other.get("other", "w"))["on_hand"] == 0  # other clients are served meanwhile
        replies = {}
        while len(replies) < len(requests):
            data = await stream.receive_some(1 << 16)
            assert data, "server closed the connection"
            for reply in codec.receive_data(data):
                replies[reply["id"]] = reply
        await stream.aclose()
        assert sorted(replies) == sorted(request_id for request_id, _ in requests)
        assert all(reply["ok"] for reply in replies.values())
        async with open_trio_client(server.host, server.port) as other:
            stats = await other.stats()
        assert stats["connections"]["reading_paused"] > 0
        assert sum(server.engine.state.stock("sku", f"w{n}").on_hand for n in range(7)) == 2000


async def test_a_vanishing_client_loses_nothing_acknowledged_and_harms_no_one(start_server):
    server = await start_server()
    with trio.fail_after(TIMEOUT_SECONDS):
        async with open_trio_client(server.host, server.port) as client:
            await client.adjust("stock", "sku", "w", 1000, "receipt")
        codec = ClientProtocol()
        stream = await trio.open_tcp_stream(server.host, server.port)
        await stream.send_all(b"".join(codec.request("reserve", rid=f"gone-{n}", lines=[{"sku": "sku", "loc": "w", "qty": 1}])[1] for n in range(500)))
        await stream.aclose()  # gone without reading a single reply
        async with open_trio_client(server.host, server.port) as client:
            await server.engine.wal.flush()
            held = 0
            for n in range(500):
                try:
                    held += (await client.lookup(f"gone-{n}"))["state"] == "held"
                except ServerError as error:
                    assert error.code == "not_found"
            assert (await client.get("sku", "w"))["reserved"] == held
            assert (await client.ping())["ok"] is True


async def test_a_connection_stalled_inside_a_frame_is_closed_and_an_idle_one_is_kept(start_server):
    server = await start_server(partial_frame_timeout_seconds=0.2)
    with trio.fail_after(TIMEOUT_SECONDS):
        idle = await trio.open_tcp_stream(server.host, server.port)
        stalled = await trio.open_tcp_stream(server.host, server.port)
        _, frame = ClientProtocol().request("ping")
        await stalled.send_all(frame[:3])  # half a header, then nothing
        assert await stalled.receive_some(1024) == b""  # closed by the server
        await trio.sleep(0.3)
        codec = ClientProtocol()
        request_id, frame = codec.request("ping")
        await idle.send_all(frame)  # idle between frames for longer than the timeout: still served
        replies = []
        while not replies:
            replies = codec.receive_data(await idle.receive_some(1024))
        assert replies[0]["id"] == request_id and replies[0]["ok"] is True
        await idle.aclose()
        await stalled.aclose()
        async with open_trio_client(server.host, server.port) as client:
            assert (await client.stats())["connections"]["partial_frame_timeouts"] == 1

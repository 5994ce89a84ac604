"""Tests of the blocking `Client` and the `TrioClient` against a tiny fake server.

The fake server is not the engine: it echoes each request as `{"id", "ok": True, "echo": op,
"fields": {...}}` and answers every batch of requests in REVERSED order, so a client that matched
replies by position instead of by id would fail. A few ops script the server's misbehaviour:
`fail` gets an error reply, `hang` gets none, `close` closes the connection, `garbage` sends a
frame that is not msgpack, `refuse` sends an id-less `frame_too_large` and closes, and `watch`
pushes `events` events after its reply (then closes if `close_after`; refused if `refuse`).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from functools import partial
from typing import Any

import msgpack
import pytest
import trio
import trio.testing

from protocol import (
    MAX_FRAME_BYTES,
    Client,
    ConnectionClosed,
    FrameDecoder,
    ProtocolViolation,
    ServerError,
    frame,
    open_trio_client,
    pack,
)
from protocol._requests import get_request, ping_request, query_request

TEST_TIMEOUT_SECONDS = 10

# ------------------------------------------------------------------------------------------------
# The fake server: sans-IO logic, driven by trio (in the test's own run, or in a thread)


class EchoLogic:
    """Bytes in, bytes out. Replies once at least `batch_size` requests are pending, reversed."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self.decoder = FrameDecoder(MAX_FRAME_BYTES)
        self.pending: list[dict[str, Any]] = []
        self.close = False

    def receive_data(self, data: bytes) -> bytes:
        self.decoder.feed(data)
        output = b""
        while (body := self.decoder.next_body()) is not None:
            try:
                message = msgpack.unpackb(body, raw=False)
            except Exception:
                output += pack({"id": None, "ok": False, "error": "bad_request", "message": "not msgpack"})
                continue
            self.pending.append(message)
        if len(self.pending) < self.batch_size:
            return output
        batch, self.pending = self.pending, []
        pushed = b""
        for message in reversed(batch):
            op = message["op"]
            if op == "close":
                self.close = True
                return output
            if op == "refuse":
                self.close = True
                return output + pack({"id": None, "ok": False, "error": "frame_too_large", "message": "too big"})
            if op == "garbage":
                output += frame(b"\xc1")
            elif op == "fail":
                output += pack({"id": message["id"], "ok": False, "error": "insufficient", "message": "asked to fail"})
            elif op == "watch" and message.get("refuse"):
                output += pack({"id": message["id"], "ok": False, "error": "unauthorized", "message": "no"})
            elif op == "watch":
                output += pack({"id": message["id"], "ok": True, "seq": 0})
                event_count = message.get("events", 0)
                pushed += b"".join(pack({"event": {"seq": seq, "type": "test"}}) for seq in range(1, event_count + 1))
                self.close = bool(message.get("close_after"))
            elif op != "hang":
                fields = {key: value for key, value in message.items() if key not in ("id", "op")}
                output += pack({"id": message["id"], "ok": True, "echo": op, "fields": fields})
        return output + pushed


async def serve_echo(batch_size: int, stream: trio.SocketStream) -> None:
    logic = EchoLogic(batch_size)
    async with stream:
        while not logic.close:
            try:
                data = await stream.receive_some(65536)
                if not data:
                    return
                output = logic.receive_data(data)
                if output:
                    await stream.send_all(output)
            except trio.BrokenResourceError:
                return


@asynccontextmanager
async def trio_echo_server(batch_size: int = 1) -> AsyncIterator[int]:
    """Run the fake server in this trio run; yield its port; stop it on exit."""
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, partial(serve_echo, batch_size), 0, host="127.0.0.1"))
        yield listeners[0].socket.getsockname()[1]
        nursery.cancel_scope.cancel()


@contextmanager
def threaded_echo_server(batch_size: int = 1) -> Iterator[int]:
    """Run the fake server in a thread of its own (for the blocking client); yield its port."""
    started: queue.Queue = queue.Queue()

    async def main() -> None:
        async with trio_echo_server(batch_size) as port:
            with trio.CancelScope() as scope:
                started.put((port, trio.lowlevel.current_trio_token(), scope))
                await trio.sleep_forever()

    thread = threading.Thread(target=trio.run, args=(main,), name="echo-server")
    thread.start()
    port, trio_token, scope = started.get(timeout=TEST_TIMEOUT_SECONDS)
    try:
        yield port
    finally:
        trio.from_thread.run_sync(scope.cancel, trio_token=trio_token)
        thread.join(timeout=TEST_TIMEOUT_SECONDS)
        assert not thread.is_alive()


@contextmanager
def connected_client(batch_size: int = 1, timeout_seconds: float = 5.0) -> Iterator[Client]:
    with threaded_echo_server(batch_size) as port:
        with Client(port=port, timeout_seconds=timeout_seconds) as client:
            yield client


# Every convenience method, the arguments it is called with, and what must reach the wire.
CONVENIENCE_CALLS = [
    ("hello", (), {"token": "t", "client": "tests"}, "hello", {"version": 1, "token": "t", "client": "tests"}),
    ("ping", (), {}, "ping", {}),
    (
        "reserve",
        ("r-1", [("s", "a", 2), {"sku": "s", "loc": "b", "qty": 3}]),
        {"ttl_ms": 500, "ref": "order-1"},
        "reserve",
        {"rid": "r-1", "lines": [{"sku": "s", "loc": "a", "qty": 2}, {"sku": "s", "loc": "b", "qty": 3}], "ttl_ms": 500, "ref": "order-1"},
    ),
    ("reserve", ("r-2", [("s", "a", 1)]), {}, "reserve", {"rid": "r-2", "lines": [{"sku": "s", "loc": "a", "qty": 1}]}),
    ("release", ("r-1",), {}, "release", {"rid": "r-1"}),
    ("commit", ("r-1",), {}, "commit", {"rid": "r-1"}),
    ("commit", ("r-1", [("s", "a", 0)]), {}, "commit", {"rid": "r-1", "lines": [{"sku": "s", "loc": "a", "qty": 0}]}),
    ("extend", ("r-1", 1000), {}, "extend", {"rid": "r-1", "ttl_ms": 1000}),
    ("adjust", ("k-1", "s", "a", -2, "damage"), {}, "adjust", {"key": "k-1", "sku": "s", "loc": "a", "delta": -2, "reason": "damage"}),
    ("count", ("k-2", "s", "a", 7), {}, "count", {"key": "k-2", "sku": "s", "loc": "a", "on_hand": 7}),
    ("count", ("k-2", "s", "a", 7, "cycle"), {}, "count", {"key": "k-2", "sku": "s", "loc": "a", "on_hand": 7, "reason": "cycle"}),
    ("transfer", ("k-3", "s", "a", "b", 4), {}, "transfer", {"key": "k-3", "sku": "s", "from": "a", "to": "b", "qty": 4}),
    ("get", ("s", "a"), {}, "get", {"sku": "s", "loc": "a"}),
    ("query", ("s",), {}, "query", {"sku": "s"}),
    ("lookup", ("r-1",), {}, "lookup", {"rid": "r-1"}),
    ("snapshot", (), {}, "snapshot", {}),
    ("stats", (), {}, "stats", {}),
]

# ------------------------------------------------------------------------------------------------
# Blocking client


def test_blocking_convenience_methods_send_the_wire_fields() -> None:
    with connected_client() as client:
        for method, arguments, keywords, op, fields in CONVENIENCE_CALLS:
            reply = getattr(client, method)(*arguments, **keywords)
            assert (reply["ok"], reply["echo"], reply["fields"]) == (True, op, fields), method


def test_blocking_replies_are_matched_by_id_not_by_order() -> None:
    with connected_client(batch_size=3) as client:
        first = client.send("get", sku="s", loc="a")
        second = client.send("get", sku="s", loc="b")
        third = client.send("get", sku="s", loc="c")
        # The server answers the batch reversed: the first frame to arrive is the third reply.
        assert client.receive_any()["id"] == third
        assert client.receive(second)["fields"] == {"sku": "s", "loc": "b"}
        assert client.receive(first)["fields"] == {"sku": "s", "loc": "a"}


def test_blocking_receive_buffers_replies_for_other_ids() -> None:
    with connected_client(batch_size=3) as client:
        request_ids = [client.send("ping", number=number) for number in range(3)]
        assert client.receive(request_ids[0])["fields"] == {"number": 0}
        assert client.receive(request_ids[2])["fields"] == {"number": 2}
        assert client.receive(request_ids[1])["fields"] == {"number": 1}


def test_blocking_receive_of_an_id_not_awaited_fails_at_once() -> None:
    with connected_client() as client:
        request_id = client.send("ping")
        client.receive(request_id)
        with pytest.raises(ValueError):
            client.receive(request_id)
        with pytest.raises(ValueError):
            client.receive(12345)


def test_blocking_call_raises_server_error_with_the_code() -> None:
    with connected_client() as client:
        with pytest.raises(ServerError) as raised:
            client.call("fail", sku="s")
        assert raised.value.code == "insufficient"
        assert raised.value.message == "asked to fail"
        assert raised.value.reply["ok"] is False
        assert client.ping()["echo"] == "ping"


def test_blocking_pipeline_returns_replies_in_request_order_without_raising() -> None:
    with connected_client(batch_size=4) as client:
        replies = client.pipeline(
            [get_request("s", "a"), ("fail", {}), query_request("s"), ping_request(),
             get_request("s", "b"), ("fail", {}), ("ping", {"number": 7}), get_request("s", "c")]
        )
    assert [reply["ok"] for reply in replies] == [True, False, True, True, True, False, True, True]
    assert [reply["id"] for reply in replies] == sorted(reply["id"] for reply in replies)
    assert replies[0]["fields"] == {"sku": "s", "loc": "a"}
    assert replies[1]["error"] == "insufficient"
    assert replies[2]["echo"] == "query"
    assert replies[6]["fields"] == {"number": 7}
    assert replies[7]["fields"] == {"sku": "s", "loc": "c"}


def test_blocking_pipeline_larger_than_its_in_flight_bound() -> None:
    with connected_client() as client:
        replies = client.pipeline([("ping", {"number": number}) for number in range(50)], in_flight_max=7)
    assert [reply["fields"]["number"] for reply in replies] == list(range(50))


def test_blocking_connection_closed_while_a_reply_is_awaited() -> None:
    with connected_client(batch_size=2) as client:
        pending = client.send("ping")
        closing = client.send("close")
        with pytest.raises(ConnectionClosed):
            client.receive(closing)
        with pytest.raises(ConnectionClosed):
            client.receive(pending)
        with pytest.raises(ConnectionClosed):
            client.ping()


def test_blocking_close_reason_quotes_the_id_less_error_the_server_sent() -> None:
    with connected_client() as client:
        with pytest.raises(ConnectionClosed) as raised:
            client.call("refuse")
        assert "frame_too_large" in str(raised.value)
        # The reply itself is still there for whoever wants it.
        assert client.receive_any()["error"] == "frame_too_large"


def test_blocking_malformed_reply_is_a_protocol_violation_and_closes() -> None:
    with connected_client() as client:
        with pytest.raises(ProtocolViolation):
            client.call("garbage")
        with pytest.raises(ConnectionClosed):
            client.ping()


def test_blocking_timeout_then_the_connection_is_still_usable() -> None:
    with connected_client(timeout_seconds=0.2) as client:
        with pytest.raises(TimeoutError):
            client.call("hang")
        assert client.ping()["echo"] == "ping"


def test_blocking_send_raw_and_receive_any() -> None:
    with connected_client() as client:
        client.send_raw(frame(b"\xc1"))
        reply = client.receive_any()
        assert (reply["id"], reply["error"]) == (None, "bad_request")


def test_blocking_watch_events_and_no_requests_after_watch() -> None:
    with connected_client() as client:
        reply = client.call("watch", events=3)
        assert reply["seq"] == 0
        assert [client.next_event()["seq"] for _ in range(3)] == [1, 2, 3]
        with pytest.raises(RuntimeError):
            client.ping()


def test_blocking_refused_watch_leaves_an_ordinary_connection() -> None:
    with connected_client() as client:
        with pytest.raises(ServerError):
            client.call("watch", refuse=True)
        assert client.ping()["ok"] is True


def test_blocking_next_event_after_the_server_closed_raises_connection_closed() -> None:
    with connected_client() as client:
        client.call("watch", events=2, close_after=True)
        assert [client.next_event()["seq"] for _ in range(2)] == [1, 2]
        with pytest.raises(ConnectionClosed):
            client.next_event()


def test_blocking_calls_after_close_raise_connection_closed() -> None:
    with connected_client() as client:
        client.close()
        with pytest.raises(ConnectionClosed):
            client.ping()


# ------------------------------------------------------------------------------------------------
# Trio client


async def test_trio_convenience_methods_send_the_wire_fields() -> None:
    with trio.fail_after(TEST_TIMEOUT_SECONDS):
        async with trio_echo_server() as port, open_trio_client("127.0.0.1", port) as client:
            for method, arguments, keywords, op, fields in CONVENIENCE_CALLS:
                reply = await getattr(client, method)(*arguments, **keywords)
                assert (reply["ok"], reply["echo"], reply["fields"]) == (True, op, fields), method


async def test_trio_concurrent_callers_each_get_their_own_reply() -> None:
    caller_count = 50
    replies: dict[int, dict[str, Any]] = {}

    async def caller(client: Any, number: int) -> None:
        replies[number] = await client.call("get", sku="s", loc=f"loc-{number}")

    with trio.fail_after(TEST_TIMEOUT_SECONDS):
        # The server waits for all 50 requests, then answers them in reverse.
        async with trio_echo_server(batch_size=caller_count) as port, open_trio_client("127.0.0.1", port) as client:
            async with trio.open_nursery() as nursery:
                for number in range(caller_count):
                    nursery.start_soon(caller, client, number)
    assert sorted(replies) == list(range(caller_count))
    for number, reply in replies.items():
        assert reply["fields"] == {"sku": "s", "loc": f"loc-{number}"}
    assert len({reply["id"] for reply in replies.values()}) == caller_count


async def test_trio_call_raises_server_error_and_request_does_not() -> None:
    with trio.fail_after(TEST_TIMEOUT_SECONDS):
        async with trio_echo_server() as port, open_trio_client("127.0.0.1", port) as client:
            with pytest.raises(ServerError) as raised:
                await client.call("fail")
            assert raised.value.code == "insufficient"
            reply = await client.request("fail")
            assert (reply["ok"], reply["error"]) == (False, "insufficient")
            assert (await client.ping())["ok"] is True


async def test_trio_every_waiter_gets_connection_closed() -> None:
    outcomes: list[str] = []

    async def hanging_caller(client: Any) -> None:
        try:
            await client.call("hang")
        except ConnectionClosed:
            outcomes.append("closed")

    with trio.fail_after(TEST_TIMEOUT_SECONDS):
        async with trio_echo_server() as port, open_trio_client("127.0.0.1", port) as client:
            async with trio.open_nursery() as nursery:
                for _ in range(5):
                    nursery.start_soon(hanging_caller, client)
                await trio.testing.wait_all_tasks_blocked()
                with pytest.raises(ConnectionClosed):
                    await client.call("close")
            assert outcomes == ["closed"] * 5
            assert client.closed
            with pytest.raises(ConnectionClosed):
                await client.ping()


async def test_trio_close_reason_quotes_the_id_less_error_the_server_sent() -> None:
    with trio.fail_after(TEST_TIMEOUT_SECONDS):
        async with trio_echo_server() as port, open_trio_client("127.0.0.1", port) as client:
            with pytest.raises(ConnectionClosed) as raised:
                await client.call("refuse")
            assert "frame_too_large" in str(raised.value)


async def test_trio_malformed_reply_closes_with_the_violation_as_cause() -> None:
    with trio.fail_after(TEST_TIMEOUT_SECONDS):
        async with trio_echo_server() as port, open_trio_client("127.0.0.1", port) as client:
            with pytest.raises(ConnectionClosed) as raised:
                await client.call("garbage")
            assert isinstance(raised.value.__cause__, ProtocolViolation)


async def test_trio_cancelled_caller_does_not_disturb_the_others() -> None:
    with trio.fail_after(TEST_TIMEOUT_SECONDS):
        async with trio_echo_server() as port, open_trio_client("127.0.0.1", port) as client:
            with trio.move_on_after(0.05) as scope:
                await client.call("hang")
            assert scope.cancelled_caught
            assert (await client.get("s", "a"))["fields"] == {"sku": "s", "loc": "a"}


async def test_trio_events_are_read_in_order_and_no_requests_after_watch() -> None:
    with trio.fail_after(TEST_TIMEOUT_SECONDS):
        async with trio_echo_server() as port, open_trio_client("127.0.0.1", port) as client:
            assert (await client.call("watch", events=4))["seq"] == 0
            assert (await client.next_event())["seq"] == 1
            seqs = []
            async for event in client.events():
                seqs.append(event["seq"])
                if len(seqs) == 3:
                    break
            assert seqs == [2, 3, 4]
            with pytest.raises(RuntimeError):
                await client.ping()


async def test_trio_exception_in_the_body_propagates_unwrapped_and_closes() -> None:
    with trio.fail_after(TEST_TIMEOUT_SECONDS):
        async with trio_echo_server() as port:
            with pytest.raises(KeyError):
                async with open_trio_client("127.0.0.1", port) as client:
                    raise KeyError("from the body")
            assert client.closed
            with pytest.raises(ConnectionClosed):
                await client.ping()


async def test_trio_buffered_events_are_read_before_connection_closed() -> None:
    with trio.fail_after(TEST_TIMEOUT_SECONDS):
        async with trio_echo_server() as port, open_trio_client("127.0.0.1", port) as client:
            await client.call("watch", events=2, close_after=True)
            seqs = []
            with pytest.raises(ConnectionClosed):
                async for event in client.events():
                    seqs.append(event["seq"])
            assert seqs == [1, 2]
            with pytest.raises(ConnectionClosed):
                await client.next_event()


async def test_trio_refused_watch_leaves_an_ordinary_connection() -> None:
    with trio.fail_after(TEST_TIMEOUT_SECONDS):
        async with trio_echo_server() as port, open_trio_client("127.0.0.1", port) as client:
            with pytest.raises(ServerError):
                await client.call("watch", refuse=True)
            assert (await client.ping())["ok"] is True

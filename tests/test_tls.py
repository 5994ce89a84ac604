"""TLS: both clients against a TLS server (certificates made at test time with trustme), the
transport's partial sends, wrong CA, required client certificates, plaintext and silent peers."""

from __future__ import annotations

import ssl
from functools import partial

import pytest
import trio
import trustme

from engine import transport
from engine.tls import TlsConfigError, TlsTransport, server_ssl_context
from protocol import Client, ConnectionClosed, client_ssl_context, open_trio_client
from raw_connection import open_raw

TIMEOUT = 10


async def test_trio_client_over_tls(start_server, certificates):
    server = await start_server(**certificates.server_config())
    with trio.fail_after(TIMEOUT):
        async with open_trio_client(server.host, server.port, cafile=certificates.ca_file) as client:
            assert (await client.hello())["ok"] is True
            await client.adjust("tls-stock", "sku", "dock", 5000, "receipt")
            replies: list[dict] = []

            async def reserve(number: int) -> None:
                replies.append(await client.reserve(f"tls-{number}", [("sku", "dock", 1)]))

            async with trio.open_nursery() as nursery:  # pipelined: many replies per write
                for number in range(2000):
                    nursery.start_soon(reserve, number)
            assert len(replies) == 2000 and all(reply["ok"] for reply in replies)
            assert (await client.get("sku", "dock"))["reserved"] == 2000


def test_blocking_client_over_tls(certificates, tmp_path):
    from conftest import ServerProcess

    server = ServerProcess(tmp_path / "data", "--tls-cert", certificates.cert_file, "--tls-key", certificates.key_file)
    try:
        assert "(TLS)" in server.log_text()
        with Client(port=server.port, cafile=certificates.ca_file, timeout_seconds=TIMEOUT) as client:
            client.hello()
            client.adjust("blocking-tls", "sku", "dock", 3, "receipt")
            replies = client.pipeline([("get", {"sku": "sku", "loc": "dock"})] * 500)
            assert {reply["on_hand"] for reply in replies} == {3}
        assert server.terminate() == 0
    finally:
        if server.process.poll() is None:
            server.kill()


async def test_a_client_that_does_not_trust_the_server_is_refused(start_server, certificates):
    server = await start_server(**certificates.server_config())
    other_ca = trustme.CA()
    context = ssl.create_default_context()
    other_ca.configure_trust(context)
    with trio.fail_after(TIMEOUT):
        with pytest.raises(trio.BrokenResourceError) as refused:
            async with open_trio_client(server.host, server.port, ssl_context=context):
                pass
        assert isinstance(refused.value.__cause__, ssl.SSLCertVerificationError)
        async with open_trio_client(server.host, server.port, cafile=certificates.ca_file) as client:
            assert (await client.ping())["ok"] is True  # the server is unharmed


async def test_client_certificates_when_required(start_server, certificates):
    server = await start_server(**certificates.server_config(client_ca=True))
    with trio.fail_after(TIMEOUT):
        with_certificate = client_ssl_context(certificates.ca_file, certificates.client_cert_file, certificates.client_key_file)
        async with open_trio_client(server.host, server.port, ssl_context=with_certificate) as client:
            assert (await client.ping())["ok"] is True
        # Without one: TLS 1.3 lets the client finish its side of the handshake before the
        # server checks, so the refusal arrives as an alert on the first read.
        with pytest.raises((ConnectionClosed, trio.BrokenResourceError)):
            async with open_trio_client(server.host, server.port, cafile=certificates.ca_file) as client:
                await client.ping()


def test_blocking_client_without_a_required_certificate_is_refused(certificates, tmp_path):
    from conftest import ServerProcess

    server = ServerProcess(tmp_path / "data", "--tls-cert", certificates.cert_file, "--tls-key", certificates.key_file,
                           "--tls-client-ca", certificates.ca_file)
    try:
        with pytest.raises((ConnectionClosed, ssl.SSLError)):
            with Client(port=server.port, cafile=certificates.ca_file, timeout_seconds=TIMEOUT) as client:
                client.ping()
        context = client_ssl_context(certificates.ca_file, certificates.client_cert_file, certificates.client_key_file)
        with Client(port=server.port, ssl_context=context, timeout_seconds=TIMEOUT) as client:
            assert client.ping()["ok"] is True
        assert server.terminate() == 0
        assert "TLS handshake failed" in server.log_text()
    finally:
        if server.process.poll() is None:
            server.kill()


async def test_a_plaintext_client_on_a_tls_port_is_closed_and_the_server_goes_on(start_server, certificates):
    server = await start_server(**certificates.server_config())
    with trio.fail_after(TIMEOUT):
        raw = await open_raw(server)
        async with raw.stream:
            await raw.send({"id": 1, "op": "ping"})
            await raw.expect_closed()
        async with open_trio_client(server.host, server.port, cafile=certificates.ca_file) as client:
            assert (await client.ping())["ok"] is True


async def test_a_silent_peer_is_dropped_after_the_handshake_timeout(start_server, certificates):
    server = await start_server(**certificates.server_config(), tls_handshake_timeout_seconds=0.3)
    with trio.fail_after(TIMEOUT):
        raw = await open_raw(server)
        async with raw.stream:
            await raw.expect_closed()


def test_unusable_tls_files_are_refused_clearly(certificates, tmp_path):
    with pytest.raises(TlsConfigError, match="--tls-cert"):
        server_ssl_context(certificates.cert_file, str(tmp_path / "missing-key.pem"))
    with pytest.raises(TlsConfigError, match="--tls-client-ca"):
        server_ssl_context(certificates.cert_file, certificates.key_file, certificates.cert_file + ".missing")


async def test_tls_transport_partial_sends_deliver_every_byte_in_order(certificates):
    """A peer that does not read: `try_send` takes what the kernel takes (whole records only), the
    caller re-offers the rest after `wait_writable`; the peer then reads it all, unchanged."""
    context = server_ssl_context(certificates.cert_file, certificates.key_file)
    listener = transport.open_listener("127.0.0.1", 0)
    port = listener.getsockname()[1]
    payload = bytes(range(256)) * (6 * 4096)  # 6 MiB: far beyond the socket buffers
    offers: list[int] = []

    async def push(tls: TlsTransport) -> None:
        await tls.handshake()
        view = memoryview(payload)
        while view:
            taken = tls.try_send(view)
            offers.append(taken)
            view = view[taken:]
            if view:
                await tls.wait_writable()
        await tls.send_all(b"")
        tls.send_eof()

    with trio.fail_after(TIMEOUT * 3):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(transport.serve, listener, push, partial(TlsTransport, context=context))
            client_context = client_ssl_context(certificates.ca_file)
            stream = trio.SSLStream(await trio.open_tcp_stream("127.0.0.1", port), client_context, server_hostname="127.0.0.1")
            await stream.do_handshake()
            await trio.sleep(0.3)  # let the server fill the socket buffers
            received = bytearray()
            while len(received) < len(payload):
                data = await stream.receive_some(65536)
                assert data
                received += data
            await trio.aclose_forcefully(stream)
            nursery.cancel_scope.cancel()
    assert received == payload
    assert len(offers) > 1, "the test must reach a full socket buffer (a partial send)"


@pytest.mark.parametrize("tls_library", ["lean", "sslstream"])
async def test_the_bench_driver_connects_over_tls(start_server, certificates, tls_library):
    from bench.engine_driver import EngineDriver
    from bench.workloads import OK

    server = await start_server(**certificates.server_config(), token="bench-token")
    driver = EngineDriver([("sku", "dock")])
    with trio.fail_after(TIMEOUT):
        context = client_ssl_context(certificates.ca_file)
        stream = await driver.connect(server.host, server.port, ssl_context=context, tls_library=tls_library)
        async with stream:
            await driver.hello(stream, "bench-token")
            await stream.send_all(b"".join(driver.get(number, 0) for number in range(3000)))  # many records each way
            replies = []
            while len(replies) < 3000:
                data = await stream.receive_some(65536)
                assert data
                replies += driver.feed(data)
    assert sorted(token for token, status, _ in replies if status == OK) == list(range(3000))


async def test_the_connection_limit_answers_overloaded_over_tls(start_server, certificates):
    server = await start_server(**certificates.server_config(), connections_max=1)
    with trio.fail_after(TIMEOUT):
        async with open_trio_client(server.host, server.port, cafile=certificates.ca_file) as first:
            assert (await first.ping())["ok"] is True
            with pytest.raises(ConnectionClosed, match="overloaded"):
                async with open_trio_client(server.host, server.port, cafile=certificates.ca_file) as second:
                    await second.ping()
            assert (await first.ping())["ok"] is True

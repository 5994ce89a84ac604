"""The tools that connect to a server (admin shell, sync, load test) over TLS: the options they
share (`protocol.add_connect_arguments`), and each tool against a real TLS server with
certificates made at test time, with the right CA and with a wrong one."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
import trio
import trustme

from protocol import (
    TOKEN_ENVIRONMENT_VARIABLE,
    ConnectOptions,
    ConnectOptionsError,
    TlsOptions,
    TlsOptionsError,
    add_connect_arguments,
    connect_options,
    open_trio_client,
    tls_refusal,
    parse_address,
)

from conftest import ROOT

TIMEOUT = 10


def parsed(*argv: str, environment: dict[str, str] | None = None) -> ConnectOptions:
    parser = argparse.ArgumentParser()
    add_connect_arguments(parser)
    return connect_options(parser.parse_args(argv), environment or {})


@pytest.fixture(scope="module")
def wrong_ca_file(tmp_path_factory) -> str:
    """A CA that signed nothing the servers here present."""
    path = str(tmp_path_factory.mktemp("wrong-ca") / "ca.pem")
    trustme.CA().cert_pem.write_to_path(path)
    return path


def test_the_token_comes_from_the_option_the_file_or_the_environment(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("from-the-file\n")
    environment = {TOKEN_ENVIRONMENT_VARIABLE: "from-the-environment"}
    assert parsed(environment=environment).token == "from-the-environment"
    assert parsed("--token", "from-the-option", environment=environment).token == "from-the-option"
    assert parsed("--token-file", str(token_file), environment=environment).token == "from-the-file"
    assert parsed().token is None
    with pytest.raises(SystemExit):  # argparse: not both
        parsed("--token", "a", "--token-file", str(token_file))
    with pytest.raises(ConnectOptionsError, match="cannot read --token-file"):
        parsed("--token-file", str(tmp_path / "missing"))
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConnectOptionsError, match="first line is empty"):
        parsed("--token-file", str(tmp_path / "empty"))


def test_any_tls_option_turns_tls_on():
    assert parsed().tls is None
    assert parsed("--tls").tls == TlsOptions()
    assert parsed("--tls-ca", "ca.pem").tls == TlsOptions(ca_file="ca.pem")
    assert parsed("--tls-server-name", "db.example").tls == TlsOptions(server_name="db.example")
    both = parsed("--tls-ca", "ca.pem", "--tls-cert", "c.pem", "--tls-key", "k.pem").tls
    assert both == TlsOptions("ca.pem", "c.pem", "k.pem")
    assert both.server_hostname("10.0.0.5") == "10.0.0.5"
    with pytest.raises(ConnectOptionsError, match="--tls-key goes with --tls-cert"):
        parsed("--tls-key", "k.pem")


def test_tls_options_name_the_file_they_cannot_use(certificates, tmp_path):
    with pytest.raises(TlsOptionsError, match=r"--tls-ca .*missing\.pem"):
        TlsOptions(str(tmp_path / "missing.pem")).ssl_context()
    (tmp_path / "garbage.pem").write_text("not a certificate\n")
    with pytest.raises(TlsOptionsError, match="--tls-ca .*not a usable PEM file"):
        TlsOptions(str(tmp_path / "garbage.pem")).ssl_context()
    with pytest.raises(TlsOptionsError, match="--tls-cert .* with --tls-key .*missing-key"):
        TlsOptions(certificates.ca_file, certificates.client_cert_file, str(tmp_path / "missing-key.pem")).ssl_context()
    context = TlsOptions(certificates.ca_file, certificates.client_cert_file, certificates.client_key_file).ssl_context()
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname


async def test_server_name_and_the_words_for_each_refusal(start_server, certificates, wrong_ca_file):
    server = await start_server(**certificates.server_config(client_ca=True))
    with_certificate = TlsOptions(certificates.ca_file, certificates.client_cert_file, certificates.client_key_file)

    async def refusal(options: TlsOptions, server_hostname: str | None = None) -> str | None:
        with pytest.raises(Exception) as refused:
            async with open_trio_client(server.host, server.port, ssl_context=options.ssl_context(),
                                        server_hostname=server_hostname) as client:
                await client.ping()
        return tls_refusal(refused.value, options)

    with trio.fail_after(TIMEOUT):
        # The certificate names 127.0.0.1 and localhost: connect to the address, check the name.
        async with open_trio_client(server.host, server.port, ssl_context=with_certificate.ssl_context(),
                                    server_hostname="localhost") as client:
            assert (await client.ping())["ok"] is True
        assert "Hostname mismatch" in await refusal(with_certificate, "db.example")
        wrong_ca = TlsOptions(wrong_ca_file, certificates.client_cert_file, certificates.client_key_file)
        assert f"does not verify against --tls-ca {wrong_ca_file}" in await refusal(wrong_ca)
        assert "requires a client certificate" in await refusal(TlsOptions(certificates.ca_file))
    assert tls_refusal(ConnectionRefusedError("refused"), None) is None


TOKEN = "tools-token-0123456789"


async def run_tool(*argv: str, environment: dict[str, str] | None = None, timeout_seconds: float = 30) -> subprocess.CompletedProcess:
    """`python ARGV...` from the project's root, to completion, without blocking the in-process server."""
    with trio.fail_after(timeout_seconds):
        return await trio.run_process(
            [sys.executable, *argv], cwd=ROOT, check=False, capture_stdout=True, capture_stderr=True,
            env={**os.environ, **(environment or {})},
        )


def text(completed: subprocess.CompletedProcess) -> tuple[str, str]:
    return completed.stdout.decode(), completed.stderr.decode()


@pytest.fixture
async def tls_server(start_server, certificates):
    """A server that wants TLS with a client certificate, and a token."""
    return await start_server(**certificates.server_config(client_ca=True), token=TOKEN)


async def test_the_shell_runs_online_commands_over_tls(tls_server, certificates, wrong_ca_file, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    address = f"127.0.0.1:{tls_server.port}"
    client_certificate = ("--tls-cert", certificates.client_cert_file, "--tls-key", certificates.client_key_file)
    shell = ("-m", "engine", "shell", "--connect", address)
    finished = await run_tool(*shell, "--tls-ca", certificates.ca_file, *client_certificate, "--token-file", str(token_file),
                              "--json", "-c", "adjust SKU-1 DC-1 7 --key tls-1; get SKU-1 DC-1")
    out, err = text(finished)
    assert finished.returncode == 0, err
    adjusted, got = (json.loads(line) for line in out.splitlines())
    assert adjusted["on_hand"] == 7 and got["rows"][0]["available"] == 7
    # The token from the environment, the name checked against the certificate's other name.
    from_environment = await run_tool(*shell, "--tls-ca", certificates.ca_file, *client_certificate, "--tls-server-name", "localhost",
                                      "-c", "get SKU-1 DC-1", environment={TOKEN_ENVIRONMENT_VARIABLE: TOKEN})
    assert from_environment.returncode == 0, text(from_environment)[1]
    assert " 7 " in text(from_environment)[0]

    wrong_ca = await run_tool(*shell, "--tls-ca", wrong_ca_file, *client_certificate, "--token-file", str(token_file), "-c", "stats")
    out, err = text(wrong_ca)
    assert wrong_ca.returncode == 1 and out == ""
    assert f"error: stats: cannot connect to {address}: the server's certificate does not verify against --tls-ca {wrong_ca_file}" in err
    assert "Traceback" not in err
    no_certificate = await run_tool(*shell, "--tls-ca", certificates.ca_file, "--token-file", str(token_file), "-c", "stats")
    assert no_certificate.returncode == 1 and "the server requires a client certificate" in text(no_certificate)[1]
    missing_ca = await run_tool(*shell, "--tls-ca", str(tmp_path / "missing.pem"), "-c", "stats")
    assert missing_ca.returncode == 2 and "error: cannot use --tls-ca" in text(missing_ca)[1]


async def test_the_sync_catches_up_over_tls(tls_server, certificates, wrong_ca_file, tmp_path):
    client_context = TlsOptions(certificates.ca_file, certificates.client_cert_file, certificates.client_key_file).ssl_context()
    with trio.fail_after(TIMEOUT):
        async with open_trio_client(tls_server.host, tls_server.port, ssl_context=client_context) as client:
            await client.hello(token=TOKEN)
            await client.adjust("sync-receipt", "SKU-1", "DC-1", 20, "receipt")
            await client.reserve("sync-order", [("SKU-1", "DC-1", 3)])
            head_seq = (await client.stats())["wal"]["durable_seq"]
    database = tmp_path / "sync.db"
    sync = ("-m", "engine", "sync", "--connect", f"127.0.0.1:{tls_server.port}", "--to", f"sqlite:///{database}",
            "--batch-window-ms", "10")
    client_certificate = ("--tls-cert", certificates.client_cert_file, "--tls-key", certificates.client_key_file)
    log_path = tmp_path / "sync.log"
    with open(log_path, "wb") as log:
        process = await trio.lowlevel.open_process(
            [sys.executable, *sync, "--tls-ca", certificates.ca_file, *client_certificate], cwd=ROOT, stdout=log, stderr=log,
            env={**os.environ, TOKEN_ENVIRONMENT_VARIABLE: TOKEN},
        )
        try:
            with trio.fail_after(TIMEOUT * 2):
                while _sqlite_rows(database, "SELECT seq FROM sync_offset") != [(head_seq,)]:
                    assert process.poll() is None, log_path.read_text()
                    await trio.sleep(0.1)
        finally:
            process.send_signal(signal.SIGTERM)
            with trio.fail_after(TIMEOUT):
                returncode = await process.wait()
    assert returncode == 0, log_path.read_text()
    assert _sqlite_rows(database, "SELECT sku, loc, on_hand, reserved FROM stock") == [("SKU-1", "DC-1", 20, 3)]
    assert f"sync 127.0.0.1:{tls_server.port} (TLS) -> " in log_path.read_text()

    # A wrong CA is not retried for ever: the sync stops at once, exit 2, and says why.
    wrong_ca = await run_tool(*sync, "--tls-ca", wrong_ca_file, *client_certificate, environment={TOKEN_ENVIRONMENT_VARIABLE: TOKEN})
    err = text(wrong_ca)[1]
    assert wrong_ca.returncode == 2, err
    assert (f"TLS with the engine at 127.0.0.1:{tls_server.port} failed: the server's certificate does not verify"
            f" against --tls-ca {wrong_ca_file}") in err
    assert "Traceback" not in err
    missing_key = await run_tool(*sync, "--tls-ca", certificates.ca_file, "--tls-cert", certificates.client_cert_file,
                                 "--tls-key", str(tmp_path / "missing-key.pem"))
    assert missing_key.returncode == 2 and "cannot use --tls-cert" in text(missing_key)[1]


def _sqlite_rows(path: Path, sql: str) -> list[tuple]:
    """Rows of `sql` on a short connection of its own (the sync writes meanwhile); [] before the table exists."""
    if not path.exists():
        return []
    connection = sqlite3.connect(path, timeout=5)
    try:
        return connection.execute(sql).fetchall()
    except sqlite3.OperationalError:  # no such table yet
        return []
    finally:
        connection.close()


async def test_the_load_test_runs_over_tls(tls_server, certificates, wrong_ca_file, tmp_path):
    loadtest = ("-m", "bench.loadtest", "--connect", f"127.0.0.1:{tls_server.port}")
    client_certificate = ("--tls-cert", certificates.client_cert_file, "--tls-key", certificates.client_key_file)
    tiny = ("--seconds", "1", "--warmup-seconds", "0.2", "--connections", "2", "--depth", "2")
    prefix = tmp_path / "run"
    finished = await run_tool(*loadtest, "--tls-ca", certificates.ca_file, *client_certificate, *tiny, "--out", str(prefix),
                              environment={TOKEN_ENVIRONMENT_VARIABLE: TOKEN}, timeout_seconds=60)
    out, err = text(finished)
    assert finished.returncode == 0, err[-3000:]
    assert "verdict: OK" in out and "errors by code: none" in out and "connection error" not in out
    result = json.loads(prefix.with_name("run.json").read_text())
    assert result["config"]["tls"] is True and result["config"]["token"] is True
    assert result["throughput"]["requests"] > 0

    wrong_ca = await run_tool(*loadtest, "--tls-ca", wrong_ca_file, *client_certificate, *tiny,
                              environment={TOKEN_ENVIRONMENT_VARIABLE: TOKEN})
    err = text(wrong_ca)[1]
    assert wrong_ca.returncode == 2, err
    assert (f"error: TLS with 127.0.0.1:{tls_server.port} failed: the server's certificate does not verify"
            f" against --tls-ca {wrong_ca_file}") in err
    assert "Traceback" not in err
    plaintext = await run_tool(*loadtest, *tiny, environment={TOKEN_ENVIRONMENT_VARIABLE: TOKEN})
    assert plaintext.returncode == 2 and "Traceback" not in text(plaintext)[1]
    own_server = await run_tool("-m", "bench.loadtest", "--tls-ca", certificates.ca_file, *tiny)
    assert own_server.returncode == 2 and "the --tls options are for --connect" in text(own_server)[1]


@pytest.mark.parametrize("text, address", [
    ("127.0.0.1:7440", ("127.0.0.1", 7440)), (":7440", ("127.0.0.1", 7440)),
    ("db1.example:80", ("db1.example", 80)), ("[::1]:7440", ("::1", 7440)),
])
def test_every_tool_reads_connect_addresses_alike(text, address):
    assert parse_address(text) == address


@pytest.mark.parametrize("text", ["db1", "db1:", "db1:0", "db1:65536", "db1:http", "::1:7440", ""])
def test_a_bad_connect_address_is_refused_naming_what_was_given(text):
    with pytest.raises(ValueError, match=r"expected HOST:PORT \(or :PORT for 127\.0\.0\.1\), got"):
        parse_address(text)


def test_the_sync_command_refuses_a_bad_connect_address():
    finished = subprocess.run([sys.executable, "-m", "engine", "sync", "--connect", "db1", "--to", "sqlite:///x.db"],
                              cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert finished.returncode == 2, finished.stderr
    assert "--connect: expected HOST:PORT" in finished.stderr and "Traceback" not in finished.stderr

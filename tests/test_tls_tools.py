"""The tools that connect to a server (admin shell, sync, load test) over TLS: the options they
share (`protocol.add_connect_arguments`), and each tool against a real TLS server with
certificates made at test time, with the right CA and with a wrong one."""

from __future__ import annotations

import argparse
import ssl

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
)

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

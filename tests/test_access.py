"""Who may do what: the auth file, the roles matrix over real TCP, rotation on SIGHUP, secrets kept
out of logs, and the refusal to listen beyond loopback without auth."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from conftest import ROOT
from engine.access import AccessControl, InsecureListenRefused, check_listen_address, is_loopback_host
from engine.auth import ROLE_NEEDED_BY_OP, AuthFileError, Role, parse_auth_file, role_needed
from engine.config import Config
from protocol import Client, ConnectionClosed, open_trio_client

TIMEOUT = 10

SECRETS = {
    "shop-reader": "reader-secret-0123456789",
    "web-shop": "order-secret-0123456789ab",
    "ops-admin": "admin-secret-0123456789abc",
}
ROLES = {"shop-reader": "reader", "web-shop": "order", "ops-admin": "admin"}


def auth_file_text(secrets: dict[str, str], roles: dict[str, str] = ROLES) -> str:
    return "".join(f'[[tokens]]\nname = "{name}"\nsecret = "{secret}"\nrole = "{roles[name]}"\n\n' for name, secret in secrets.items())


def write_auth_file(path: Path, secrets: dict[str, str]) -> Path:
    path.write_text(auth_file_text(secrets))
    return path


# -- the auth file ----------------------------------------------------------------------------


def test_auth_file_maps_each_secret_to_its_name_and_role():
    table = parse_auth_file(auth_file_text(SECRETS).encode())
    for name, secret in SECRETS.items():
        identity = table.identify(secret)
        assert identity is not None and (identity.name, identity.role.label) == (name, ROLES[name])
    for wrong in (None, "", "reader-secret-012345678", "reader-secret-0123456789x", SECRETS["web-shop"].upper()):
        assert table.identify(wrong) is None


@pytest.mark.parametrize("text, complaint", [
    ("", "no [[tokens]] tables"),
    ("tokens = 3", "no [[tokens]] tables"),
    ("[[tokens]]\nname = 'a'\nsecret = 'x'\n", "table 1 (name 'a'): `secret` must have at least 16"),
    ("[[tokens]]\nname = 'a'\nsecret = '0123456789abcdefg'\nrole = 'root'\n", "`role` must be one of reader, order, admin"),
    ("[[tokens]]\nsecret = '0123456789abcdefg'\nrole = 'admin'\n", "table 1: `name` must be a non-empty string"),
    ("[[tokens]]\nname = 'a'\nsecret = '0123456789abcdefg'\nrole = 'admin'\nextra = 1\n", "unknown key(s) extra"),
    ("[[tokens]]\nname = 'a'\nsecret = '0123456789abcdefg'\nrole = 'admin'\n"
     "[[tokens]]\nname = 'a'\nsecret = '0123456789abcdefh'\nrole = 'reader'\n", "table 2 (name 'a'): the name is used"),
    ("[[tokens]]\nname = 'a'\nsecret = '0123456789abcdefg'\nrole = 'admin'\n"
     "[[tokens]]\nname = 'b'\nsecret = '0123456789abcdefg'\nrole = 'reader'\n", "table 2 (name 'b'): the secret is used"),
    ("[[tokens]\n", "not valid TOML"),
    ("[server]\nport = 1\n", "unknown top-level key(s) server"),
])
def test_a_bad_auth_file_is_refused_with_the_entry_at_fault(text, complaint):
    with pytest.raises(AuthFileError) as refused:
        parse_auth_file(text.encode(), "auth.toml")
    assert complaint in str(refused.value)
    assert "0123456789abcdef" not in str(refused.value)  # a secret is never quoted back


def test_every_op_has_a_role_and_unknown_ops_need_admin():
    from engine.metrics import OP_OF_COMMAND

    assert {op for op in OP_OF_COMMAND.values() if op != "hello"} == set(ROLE_NEEDED_BY_OP)
    assert role_needed("some-future-op") is Role.ADMIN


# -- the roles matrix --------------------------------------------------------------------------


OPS_IN_MATRIX = ("ping", "stats", "get", "query", "lookup", "watch", "reserve", "release", "commit", "extend",
                 "adjust", "count", "transfer", "snapshot")
EXPECTED_ALLOWED = {
    "none": set(),
    "reader": {"ping", "stats", "get", "query", "lookup", "watch"},
    "order": {"ping", "stats", "get", "query", "lookup", "watch", "reserve", "release", "commit", "extend"},
    "admin": set(OPS_IN_MATRIX),
}


def request_fields(op: str, tag: str) -> dict:
    line = [{"sku": "matrix-sku", "loc": "dock", "qty": 1}]
    return {
        "ping": {}, "stats": {}, "snapshot": {}, "watch": {},
        "get": {"sku": "matrix-sku", "loc": "dock"}, "query": {"sku": "matrix-sku"}, "lookup": {"rid": "r-looked-up"},
        "reserve": {"rid": f"r-{tag}", "lines": line, "ttl_ms": 60_000}, "release": {"rid": f"r-{tag}"},
        "commit": {"rid": f"r-{tag}"}, "extend": {"rid": f"r-{tag}", "ttl_ms": 60_000},
        "adjust": {"key": f"a-{tag}", "sku": "matrix-sku", "loc": "dock", "delta": 1, "reason": "receipt"},
        "count": {"key": f"c-{tag}", "sku": "matrix-sku", "loc": "dock", "on_hand": 1000},
        "transfer": {"key": f"t-{tag}", "sku": "matrix-sku", "from": "dock", "to": "shelf", "qty": 1},
    }[op]


async def try_op(server, role: str, op: str) -> dict:
    """Send `op` on a fresh connection with `role`'s token (or no hello); after the reply, check
    that the connection is still usable with an op the role allows (or a hello)."""
    async with open_trio_client(server.host, server.port) as client:
        name = next((name for name, label in ROLES.items() if label == role), None)
        if name is not None:
            assert (await client.hello(token=SECRETS[name], client="matrix"))["ok"] is True
        reply = await client.request(op, **request_fields(op, f"{role}-{op}"))
        if op == "watch" and reply["ok"]:
            return reply  # a watching connection sends no more requests
        if name is None:
            assert (await client.hello(token=SECRETS["shop-reader"]))["ok"] is True
        assert (await client.ping())["ok"] is True, "the connection stays open after any reply"
        return reply


async def test_roles_matrix(start_server, tmp_path):
    auth_file = write_auth_file(tmp_path / "auth.toml", SECRETS)
    server = await start_server(auth_file=str(auth_file))
    with trio.fail_after(TIMEOUT * 3):
        async with open_trio_client(server.host, server.port) as admin:
            await admin.hello(token=SECRETS["ops-admin"])
            await admin.adjust("matrix-stock", "matrix-sku", "dock", 1000, "receipt")
            await admin.reserve("r-looked-up", [("matrix-sku", "dock", 1)])
            for role in ("order", "admin"):  # reservations for release, commit, extend to act on
                for op in ("release", "commit", "extend"):
                    await admin.reserve(f"r-{role}-{op}", [("matrix-sku", "dock", 1)], ttl_ms=60_000)
        rows = []
        for op in OPS_IN_MATRIX:
            row = []
            for role in ("none", "reader", "order", "admin"):
                reply = await try_op(server, role, op)
                allowed = reply.get("error") != "unauthorized"
                assert allowed == (op in EXPECTED_ALLOWED[role]), (role, op, reply)
                if allowed:
                    assert reply["ok"] is True, (role, op, reply)
                else:
                    needed = role_needed(op).label
                    assert reply["role_needed"] == needed
                    assert f"op {op} needs role {needed}" in reply["message"], reply
                    if role != "none":
                        name = next(name for name, label in ROLES.items() if label == role)
                        assert f"(this connection: {role}, token '{name}')" in reply["message"], reply
                    else:
                        assert "send hello with a valid token first" in reply["message"]
                    assert SECRETS["shop-reader"] not in reply["message"]
                row.append("allowed" if allowed else f"refused (needs {role_needed(op).label})")
            rows.append((op, row))
    print("\nroles matrix (op x role; 'none' = no hello; refused = `unauthorized`, connection stays open):")
    print(f"{'op':10} {'none':22} {'reader':22} {'order':22} {'admin':22}")
    for op, row in rows:
        print(f"{op:10} " + " ".join(f"{cell:22}" for cell in row))


async def test_a_refused_hello_takes_the_role_away_and_a_new_hello_replaces_it(start_server, tmp_path):
    server = await start_server(auth_file=str(write_auth_file(tmp_path / "auth.toml", SECRETS)))
    with trio.fail_after(TIMEOUT):
        async with open_trio_client(server.host, server.port) as client:
            await client.hello(token=SECRETS["ops-admin"])
            assert (await client.request("adjust", **request_fields("adjust", "x")))["ok"] is True
            await client.hello(token=SECRETS["shop-reader"])
            assert (await client.request("adjust", **request_fields("adjust", "y")))["error"] == "unauthorized"
            assert (await client.request("hello", version=1, token="wrong-secret-0123456789"))["error"] == "unauthorized"
            assert (await client.request("get", sku="a", loc="b"))["error"] == "unauthorized"
        access = server.access
        assert access.hellos[("ops-admin", "accepted")] == 1 and access.hellos[("-", "refused")] == 1
        assert access.unauthorized[("shop-reader", "adjust")] == 1 and access.unauthorized[("-", "get")] == 1
        with trio.fail_after(TIMEOUT):
            while sum(access.connections_open.values()) != 0:  # the connection's end is counted
                await trio.sleep(0.01)


async def test_the_single_token_is_an_admin_named_token(start_server):
    server = await start_server(token="s3cret")
    with trio.fail_after(TIMEOUT):
        async with open_trio_client(server.host, server.port) as client:
            await client.hello(token="s3cret")
            assert (await client.request("snapshot"))["ok"] is True
    assert server.access.hellos[("token", "accepted")] == 1


async def test_secrets_never_reach_the_logs(start_server, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    server = await start_server(auth_file=str(write_auth_file(tmp_path / "auth.toml", SECRETS)))
    with trio.fail_after(TIMEOUT):
        for name, secret in SECRETS.items():
            async with open_trio_client(server.host, server.port) as client:
                await client.hello(token=secret, client="log-test")
                await client.request("adjust", **request_fields("adjust", name))
                await client.request("hello", version=1, token=secret + "-wrong")
    names_logged = [name for name in SECRETS if f"token {name!r}" in caplog.text]
    assert names_logged == list(SECRETS)
    for secret in SECRETS.values():
        assert secret not in caplog.text


async def test_metrics_count_by_token_name(start_server, tmp_path):
    from engine.metrics_collector import EngineCollector

    server = await start_server(auth_file=str(write_auth_file(tmp_path / "auth.toml", SECRETS)))
    with trio.fail_after(TIMEOUT):
        async with open_trio_client(server.host, server.port) as client:
            await client.hello(token=SECRETS["web-shop"])
            await client.request("snapshot")
            families = {family.name: family for family in EngineCollector(server.engine, {}, 0.0, 0, server.access)._access_families(server.access)}
            samples = {(sample.name, tuple(sorted(sample.labels.items()))): sample.value for family in families.values() for sample in family.samples}
    assert samples[("engine_unauthorized_total", (("op", "snapshot"), ("token", "web-shop")))] == 1
    assert samples[("engine_hellos_total", (("result", "accepted"), ("token", "web-shop")))] == 1
    assert samples[("engine_connections_authenticated", (("token", "web-shop"),))] == 1
    assert not any(secret in repr(samples) for secret in SECRETS.values())


# -- rotation on SIGHUP (a real server process) -------------------------------------------------


def ask(client: Client, op: str, **fields) -> dict:
    """One request on a blocking client; the reply whether ok or not."""
    return client.receive(client.send(op, **fields))


def wait_for_log(server, text: str, count: int = 1) -> None:
    deadline = time.monotonic() + TIMEOUT
    while server.log_text().count(text) < count:
        assert time.monotonic() < deadline, f"no {text!r} in the log:\n{server.log_text()}"
        time.sleep(0.02)


def test_sighup_rotates_tokens_without_a_restart(server_process, tmp_path):
    auth_file = write_auth_file(tmp_path / "auth.toml", SECRETS)
    server = server_process("--auth", str(auth_file))
    with Client(port=server.port, timeout_seconds=TIMEOUT) as before_rotation:
        assert before_rotation.hello(token=SECRETS["web-shop"])["ok"] is True
        rotated = {**SECRETS, "web-shop": "order-secret-ROTATED-98765"}
        write_auth_file(auth_file, rotated)
        server.process.send_signal(signal.SIGHUP)
        wait_for_log(server, "reloaded")
        with Client(port=server.port, timeout_seconds=TIMEOUT) as old_token:
            assert ask(old_token, "hello", version=1, token=SECRETS["web-shop"])["error"] == "unauthorized"
        with Client(port=server.port, timeout_seconds=TIMEOUT) as new_token:
            assert new_token.hello(token=rotated["web-shop"])["ok"] is True
            assert ask(new_token, "reserve", rid="after-rotation", lines=[{"sku": "s", "loc": "l", "qty": 1}])["error"] == "insufficient"
        # The connection opened before the rotation keeps its role (documented).
        assert ask(before_rotation, "get", sku="s", loc="l")["ok"] is True

        # A broken file is refused and the table in force is kept.
        auth_file.write_text("[[tokens]]\nname = 'x'\n")
        server.process.send_signal(signal.SIGHUP)
        wait_for_log(server, "keeping the 3 token(s) loaded before")
        with Client(port=server.port, timeout_seconds=TIMEOUT) as still_rotated:
            assert still_rotated.hello(token=rotated["web-shop"])["ok"] is True
    assert server.terminate() == 0
    log_text = server.log_text()
    for secret in (*SECRETS.values(), rotated["web-shop"]):
        assert secret not in log_text


# -- listening beyond loopback -------------------------------------------------------------------


@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.1.2.3", True), ("::1", True), ("[::1]", True), ("localhost", True),
    ("0.0.0.0", False), ("::", False), ("10.0.0.5", False), ("example.com", False),
])
def test_loopback_hosts(host, loopback):
    assert is_loopback_host(host) is loopback


def test_listening_beyond_loopback_needs_auth_or_insecure(caplog, tmp_path):
    with pytest.raises(InsecureListenRefused, match="--insecure"):
        check_listen_address(Config(host="0.0.0.0"))
    check_listen_address(Config(host="0.0.0.0", token="t"))
    check_listen_address(Config(host="0.0.0.0", auth_file=str(tmp_path / "auth.toml")))
    assert "without auth" not in caplog.text
    with caplog.at_level(logging.WARNING):
        check_listen_address(Config(host="0.0.0.0", insecure=True))
    assert "listening on 0.0.0.0 without auth (--insecure)" in caplog.text


def test_the_server_process_refuses_to_listen_beyond_loopback_without_auth(tmp_path):
    # Refused before anything binds: no socket beyond loopback is opened by this test.
    completed = subprocess.run(
        [sys.executable, "-m", "engine", "serve", "--host", "0.0.0.0", "--port", "0", "--data", str(tmp_path / "data")],
        cwd=ROOT, capture_output=True, text=True, timeout=30,
    )
    assert completed.returncode == 2, completed.stderr
    assert "not a loopback address, without auth" in completed.stderr
    assert not (tmp_path / "data").exists()


def test_auth_file_and_single_token_do_not_go_together(tmp_path):
    auth_file = write_auth_file(tmp_path / "auth.toml", SECRETS)
    completed = subprocess.run(
        [sys.executable, "-m", "engine", "serve", "--port", "0", "--data", str(tmp_path / "data"), "--auth", str(auth_file), "--token", "t"],
        cwd=ROOT, capture_output=True, text=True, timeout=30,
    )
    assert completed.returncode == 2 and "--auth and --token do not go together" in completed.stderr


def test_a_bad_auth_file_stops_the_server_at_start(tmp_path):
    (tmp_path / "auth.toml").write_text("[[tokens]]\nname = 'x'\nsecret = 'short'\nrole = 'admin'\n")
    completed = subprocess.run(
        [sys.executable, "-m", "engine", "serve", "--port", "0", "--data", str(tmp_path / "data"), "--auth", str(tmp_path / "auth.toml")],
        cwd=ROOT, capture_output=True, text=True, timeout=30,
    )
    assert completed.returncode == 2, completed.stderr
    assert "`secret` must have at least 16 characters" in completed.stderr
    assert "short" not in completed.stderr.replace("shortage", "")

"""Fixtures: an in-process server (trio), a real server process (for kill -9 tests), and TLS
certificates made at test time (trustme)."""

from __future__ import annotations

import dataclasses
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trustme

from engine.config import Config
from engine.server import RunningServer, run_server

ROOT = Path(__file__).resolve().parent.parent


def test_config(data_dir: Path, **overrides) -> Config:
    """A config for tests: any free port, a small LMDB map, the given overrides."""
    # No freezing of the test runner's objects (the freezer is tested on its own).
    base = Config(port=0, data_dir=str(data_dir), map_size_bytes=256 * 1024**2, freeze_after_slow_full_collections=False)
    return dataclasses.replace(base, **overrides)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
async def start_server(nursery, data_dir):
    """`await start_server(**config_overrides) -> RunningServer`; every server is stopped at the end."""
    running: list[RunningServer] = []

    async def start(**overrides) -> RunningServer:
        config = test_config(data_dir, **overrides)
        server = await nursery.start(run_server, config)
        running.append(server)
        return server

    yield start
    for server in running:
        server.stop()


@pytest.fixture
async def server(start_server) -> RunningServer:
    return await start_server()


class ServerProcess:
    """`python -m engine serve` as a child process, on a free port."""

    LISTEN_LINE = re.compile(r"listening on [\d.]+:(\d+)")

    def __init__(self, data_dir: Path, *extra_args: str):
        self.data_dir = data_dir
        self.log_path = data_dir.parent / f"server-{time.monotonic_ns()}.log"
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "engine", "serve", "--port", "0", "--data", str(data_dir), "--map-size-mb", "256", *extra_args],
            cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
        )
        self.port = self._wait_for_port(timeout_seconds=20)

    def _wait_for_port(self, timeout_seconds: float) -> int:
        deadline = time.monotonic() + timeout_seconds
        while time.monotonic() < deadline:
            match = self.LISTEN_LINE.search(self.log_path.read_text())
            if match:
                return int(match.group(1))
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log_path.read_text()}")
            time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"server did not start in {timeout_seconds} s:\n{self.log_path.read_text()}")

    def kill(self) -> None:
        """kill -9: no flush, no snapshot."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)
        self._log.close()

    def terminate(self, timeout_seconds: float = 10) -> int:
        """SIGTERM: a clean shutdown. Returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=timeout_seconds)
        self._log.close()
        return code

    def log_text(self) -> str:
        return self.log_path.read_text()


@pytest.fixture
def server_process(data_dir):
    """`server_process(*args) -> ServerProcess`; every process is killed at the end."""
    started: list[ServerProcess] = []

    def start(*extra_args: str) -> ServerProcess:
        process = ServerProcess(data_dir, *extra_args)
        started.append(process)
        return process

    yield start
    for process in started:
        if process.process.poll() is None:
            process.kill()


class Certificates:
    """A CA, a server certificate for 127.0.0.1 and localhost, and a client certificate, as PEM files."""

    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        self.ca = trustme.CA()
        self.ca_file = str(folder / "ca.pem")
        self.ca.cert_pem.write_to_path(self.ca_file)
        server = self.ca.issue_cert("127.0.0.1", "localhost")
        self.cert_file = str(folder / "server.pem")
        self.key_file = str(folder / "server-key.pem")
        server.cert_chain_pems[0].write_to_path(self.cert_file)
        for pem in server.cert_chain_pems[1:]:
            pem.write_to_path(self.cert_file, append=True)
        server.private_key_pem.write_to_path(self.key_file)
        client = self.ca.issue_cert("order-system@example.com", common_name="order-system")
        self.client_cert_file = str(folder / "client.pem")
        self.client_key_file = str(folder / "client-key.pem")
        client.cert_chain_pems[0].write_to_path(self.client_cert_file)
        client.private_key_pem.write_to_path(self.client_key_file)

    def server_config(self, client_ca: bool = False) -> dict:
        """Config overrides for `start_server`."""
        return {"tls_cert_file": self.cert_file, "tls_key_file": self.key_file,
                "tls_client_ca_file": self.ca_file if client_ca else None}

    def serve_arguments(self, client_ca: bool = False) -> tuple[str, ...]:
        """`python -m engine serve` options (for `ServerProcess`)."""
        client_ca_arguments = ("--tls-client-ca", self.ca_file) if client_ca else ()
        return ("--tls-cert", self.cert_file, "--tls-key", self.key_file, *client_ca_arguments)


@pytest.fixture(scope="module")
def certificates(tmp_path_factory) -> Certificates:
    return Certificates(tmp_path_factory.mktemp("certificates"))

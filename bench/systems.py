"""Start and stop each system under test as a child process on a free loopback port.

Every system gets a temporary folder (data, logs) that is removed when it stops. Nothing is
started as a system service. A system that cannot be started raises `SystemMissing` with the
reason; the bench reports it as `missing` instead of dropping it.

Also here: the server CPU time of a system (utime + stime from /proc, summed over its
processes), and the admin calls every measurement needs (prepare, load stock, read stock).
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import trio

from bench.engine_driver import EngineDriver
from bench.postgres_peer import SCHEMA, PostgresDriver
from bench.redis_peer import SCRIPTS, RedisDriver
from bench.workloads import OK
from protocol import TlsOptions

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
START_TIMEOUT_SECONDS = 60
STOP_TIMEOUT_SECONDS = 60
CLOCK_TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")
ADMIN_IN_FLIGHT_MAX = 512  # pipelined admin requests (stock loading, reads) per connection

DRIVERS = {"engine": EngineDriver, "echo": EngineDriver, "redis": RedisDriver, "postgres": PostgresDriver}


class SystemMissing(Exception):
    """The system cannot be started here; the message says why (and how to fix it)."""


@dataclass
class RunningSystem:
    name: str                    # engine, baseline, echo, redis, postgres
    kind: str                    # driver: engine (also baseline), echo, redis, postgres
    port: int
    process: subprocess.Popen
    folder: Path
    version: str
    log_path: Path
    cleanup: list = field(default_factory=list)  # callables run after the process stopped
    token: str | None = None     # sent in `hello` on every connection (engine started with --token)
    tls: TlsOptions | None = None  # connect with TLS (engine started with --tls-cert)
    tls_library: str = "lean"    # the generator's TLS: lean (bench/tls_stream.py) or sslstream (trio.SSLStream)

    @property
    def host(self) -> str:
        return HOST

    def pids(self) -> list[int]:
        """The server's processes: the main one and (PostgreSQL) its backends and workers."""
        pids = [self.process.pid]
        if self.kind == "postgres":
            pids += _children(self.process.pid)
        return pids

    def cpu_seconds(self) -> float:
        ticks = 0
        for pid in self.pids():
            try:
                with open(f"/proc/{pid}/stat") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
            except (FileNotFoundError, ProcessLookupError, IndexError):
                continue
            ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
        return ticks / CLOCK_TICKS_PER_SECOND

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, characters: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-characters:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process.poll() is None:
            # postgres: SIGINT is the fast shutdown; the others flush and exit on SIGTERM.
            self.process.send_signal(signal.SIGINT if self.kind == "postgres" else signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for step in self.cleanup:
            try:
                step()
            except Exception as error:  # cleanup must not hide the results
                print(f"warning: cleanup of {self.name}: {error}", file=sys.stderr)
        shutil.rmtree(self.folder, ignore_errors=True)


@dataclass
class RemoteSystem:
    """An engine someone else runs (`scripts/loadtest --connect`): loaded and read like a started
    one, but its processes are not ours, so no CPU figure and nothing to stop."""

    host: str
    port: int
    token: str | None = None
    tls: TlsOptions | None = None
    tls_library: str = "lean"
    name: str = "engine"
    kind: str = "engine"
    version: str = "remote"

    def cpu_seconds(self) -> float | None:
        return None

    def alive(self) -> bool:
        return True

    def log_tail(self, characters: int = 2000) -> str:
        return ""

    def stop(self) -> None:
        """Nothing to stop: the server is not ours."""


def _children(parent: int) -> list[int]:
    children = []
    for stat_path in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat_path) as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == parent:
            children.append(int(stat_path.split("/")[2]))
    return children


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def _wait_for_listen_line(process: subprocess.Popen, log_path: Path, name: str) -> int:
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        match = re.search(r"listening on [\d.]+:(\d+)", log_path.read_text(errors="replace"))
        if match:
            return int(match.group(1))
        if process.poll() is not None:
            break
        time.sleep(0.05)
    process.kill()
    process.wait()
    raise SystemMissing(f"{name} did not start: {log_path.read_text(errors='replace')[-600:]}")


def _git(*args: str, cwd: Path = ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def _tree_version(tree: Path) -> str:
    try:
        revision = _git("rev-parse", "--short", "HEAD", cwd=tree)
        dirty = _git("status", "--porcelain", "--untracked-files=no", cwd=tree)
        return revision + ("+dirty" if dirty else "")
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unknown"


def start_engine(name: str = "engine", tree: Path = ROOT, extra_args: tuple[str, ...] = ()) -> RunningSystem:
    """`python -m engine serve` of `tree` (this checkout, or a baseline worktree)."""
    folder = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
    log_path = folder / "server.log"
    environment = dict(os.environ, PYTHONPATH=str(tree))
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "engine", "serve", "--port", "0", "--data", str(folder / "data"), *extra_args],
            cwd=tree, env=environment, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
    try:
        port = _wait_for_listen_line(process, log_path, name)
    except SystemMissing:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return RunningSystem(name, "engine", port, process, folder, _tree_version(tree), log_path)


def start_baseline(revision: str, extra_args: tuple[str, ...] = ()) -> RunningSystem:
    """The engine of another git revision, from a temporary `git worktree` (removed at stop)."""
    holder = Path(tempfile.mkdtemp(prefix="bench-baseline-tree-"))
    tree = holder / "tree"
    try:
        _git("worktree", "add", "--detach", str(tree), revision)
    except subprocess.CalledProcessError as error:
        shutil.rmtree(holder, ignore_errors=True)
        raise SystemMissing(f"git worktree add {revision} failed: {error.stderr.strip()}") from None

    def remove_tree() -> None:
        subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, capture_output=True)
        shutil.rmtree(holder, ignore_errors=True)

    try:
        system = start_engine("baseline", tree, extra_args)
    except SystemMissing:
        remove_tree()
        raise
    system.version = f"{revision} ({_tree_version(tree)})"
    system.cleanup.append(remove_tree)
    return system


def start_echo() -> RunningSystem:
    folder = Path(tempfile.mkdtemp(prefix="bench-echo-"))
    log_path = folder / "server.log"
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "bench.echo_server", "--port", "0"],
            cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
    port = _wait_for_listen_line(process, log_path, "echo")
    return RunningSystem("echo", "echo", port, process, folder, "bench/echo_server.py", log_path)


def _wait_for_port(process: subprocess.Popen, port: int, log_path: Path, name: str, probe=None) -> None:
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemMissing(f"{name} exited with {process.returncode}: {log_path.read_text(errors='replace')[-600:]}")
        try:
            if probe is None:
                socket.create_connection((HOST, port), timeout=1).close()
                return
            if probe():
                return
        except OSError:
            pass
        time.sleep(0.1)
    process.kill()
    process.wait()
    raise SystemMissing(f"{name} did not accept connections within {START_TIMEOUT_SECONDS} s")


def start_redis() -> RunningSystem:
    binary = shutil.which("redis-server") or ("/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None)
    if binary is None:
        raise SystemMissing("redis-server not installed (run scripts/install-peers)")
    version = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout.strip()
    folder = Path(tempfile.mkdtemp(prefix="bench-redis-"))
    log_path = folder / "redis.log"
    port = free_port()
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", HOST, "--appendonly", "yes", "--appendfsync", "always",
         "--save", "", "--dir", str(folder), "--logfile", str(log_path), "--daemonize", "no",
         "--protected-mode", "no", "--maxclients", "10000"],
        cwd=folder, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    log_path.touch()
    try:
        _wait_for_port(process, port, log_path, "redis")
    except SystemMissing:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return RunningSystem("redis", "redis", port, process, folder, version.split(" v=")[-1].split(" ")[0], log_path)


def _postgres_bin() -> Path | None:
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=lambda path: int(path.split("/")[4]))
    if candidates:
        return Path(candidates[-1]).parent
    found = shutil.which("postgres")
    return Path(found).parent if found else None


def _postgres_user() -> tuple[int, int] | None:
    """(uid, gid) to run PostgreSQL as, or None to run as ourselves. It refuses to run as root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        return entry.pw_uid, entry.pw_gid
    raise SystemMissing("running as root and there is neither a 'postgres' nor a 'nobody' user to run PostgreSQL as")


def start_postgres(max_connections: int) -> RunningSystem:
    bin_dir = _postgres_bin()
    if bin_dir is None:
        raise SystemMissing("PostgreSQL binaries not found (run scripts/install-peers)")
    user = _postgres_user()
    as_user = {} if user is None else {"user": user[0], "group": user[1], "extra_groups": []}
    folder = Path(tempfile.mkdtemp(prefix="bench-postgres-"))
    if user is not None:
        os.chown(folder, *user)
    data = folder / "data"
    log_path = folder / "postgres.log"
    with open(log_path, "w") as log_file:
        if user is not None:
            os.chown(log_path, *user)
        # --no-sync only makes initdb itself faster; the server below runs with fsync=on.
        initdb = subprocess.run(
            [str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"],
            cwd=folder, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, **as_user,
        )
    if initdb.returncode != 0:
        text = log_path.read_text(errors="replace")[-600:]
        shutil.rmtree(folder, ignore_errors=True)
        raise SystemMissing(f"initdb failed: {text}")
    version = subprocess.run([str(bin_dir / "postgres"), "--version"], capture_output=True, text=True).stdout.strip()
    port = free_port()
    log_file = open(log_path, "a")
    process = subprocess.Popen(
        [str(bin_dir / "postgres"), "-D", str(data), "-p", str(port), "-k", str(folder),
         "-c", f"listen_addresses={HOST}", "-c", "synchronous_commit=on", "-c", "fsync=on",
         "-c", "shared_buffers=256MB", "-c", f"max_connections={max_connections}",
         "-c", "logging_collector=off", "-c", "log_min_messages=warning"],
        cwd=folder, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, **as_user,
    )
    log_file.close()

    def ready() -> bool:
        probe = subprocess.run([str(bin_dir / "pg_isready"), "-h", HOST, "-p", str(port), "-q"], capture_output=True)
        return probe.returncode == 0

    try:
        _wait_for_port(process, port, log_path, "postgres", probe=ready)
    except SystemMissing:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return RunningSystem("postgres", "postgres", port, process, folder, version.split(")")[-1].strip(), log_path)


def start(name: str, *, baseline_revision: str | None = None, postgres_max_connections: int = 200) -> RunningSystem:
    if name == "engine":
        system = start_engine()
    elif name == "baseline":
        if not baseline_revision:
            raise SystemMissing("no --baseline REV given")
        system = start_baseline(baseline_revision)
    elif name == "echo":
        system = start_echo()
    elif name == "redis":
        system = start_redis()
    elif name == "postgres":
        system = start_postgres(postgres_max_connections)
    else:
        raise SystemMissing(f"unknown system {name!r}")
    try:
        trio.run(prepare, system)
    except BaseException:
        system.stop()
        raise
    return system


# --- admin calls (not timed) --------------------------------------------------------------


async def connect_driver(driver, host: str, port: int, token: str | None, tls: TlsOptions | None,
                         ssl_context: ssl.SSLContext | None, tls_library: str) -> trio.abc.Stream:
    """A stream for `driver` (the generator's connections and the admin ones): TLS when `tls` is
    given (with `ssl_context`, built from it by the caller, once), then `hello` with `token`."""
    if tls is None:
        stream = await driver.connect(host, port)
    else:
        stream = await driver.connect(host, port, ssl_context=ssl_context, server_hostname=tls.server_hostname(host),
                                      tls_library=tls_library)
    if token is not None:
        try:
            await driver.hello(stream, token)
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
    return stream


async def _admin_connection(system: RunningSystem | RemoteSystem, keys: list) -> tuple:
    driver = DRIVERS[system.kind](keys)
    ssl_context = None if system.tls is None else system.tls.ssl_context()
    stream = await connect_driver(driver, system.host, system.port, system.token, system.tls, ssl_context, system.tls_library)
    return driver, stream


async def call_pipelined(system: RunningSystem, keys: list, encoders: list) -> list[tuple[int, object]]:
    """Send `encoder(driver, token)` for each encoder, pipelined; return (status, detail) in order."""
    driver, stream = await _admin_connection(system, keys)
    results: list = [None] * len(encoders)
    async with stream:
        sent = 0
        received = 0
        while received < len(encoders):
            batch = []
            while sent < len(encoders) and sent - received < ADMIN_IN_FLIGHT_MAX:
                batch.append(encoders[sent](driver, sent))
                sent += 1
            if batch:
                await stream.send_all(b"".join(batch))
            data = await stream.receive_some(1 << 16)
            if not data:
                raise ConnectionError(f"{system.name} closed the admin connection")
            for token, status, detail in driver.feed(data):
                results[token] = (status, detail)
                received += 1
    return results


async def prepare(system: RunningSystem) -> None:
    """Once per system: Lua scripts (redis), schema (postgres)."""
    if system.kind == "redis":
        await call_pipelined(system, [], [lambda driver, token, body=body: driver.raw(token, "SCRIPT", "LOAD", body)
                                          for body in SCRIPTS.values()])
    elif system.kind == "postgres":
        driver = PostgresDriver([])
        stream = await driver.connect(system.host, system.port, prepare=False)
        async with stream:
            await driver.execute(stream, SCHEMA)


async def read_stock(system: RunningSystem, keys: list) -> list[tuple[int, int]]:
    """(on_hand, reserved) of every key, through the system's own API."""
    results = await call_pipelined(system, keys, [lambda driver, token: driver.get(token, token)] * len(keys))
    stock = []
    for status, detail in results:
        if status != OK:
            raise RuntimeError(f"{system.name}: reading stock failed: {detail}")
        stock.append(DRIVERS[system.kind].stock(detail))
    return stock


async def top_up_stock(system: RunningSystem, keys: list, target: int, tag: str) -> int:
    """Adjust every key up to `on_hand == target` (unique keys): returns how many adjusts it took."""
    current = await read_stock(system, keys)
    encoders = []
    for index, (on_hand, _) in enumerate(current):
        if on_hand < target:
            encoders.append(lambda driver, token, index=index, delta=target - on_hand:
                            driver.adjust(token, f"load-{tag}-{index}", index, delta))
    results = await call_pipelined(system, keys, encoders)
    failed = [detail for status, detail in results if status != OK]
    if failed:
        raise RuntimeError(f"{system.name}: loading stock failed: {failed[:3]}")
    return len(encoders)

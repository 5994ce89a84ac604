"""`python -m engine sync` end to end: a real engine process, the sync as a process, traffic from a
client thread, and kills mid-stream (the sync, the engine, the database connection). At the end
every `stock` row must equal the engine's `get` and every reservation its `lookup`."""

from __future__ import annotations

import json
import random
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable

import pytest

from protocol import Client, ConnectionClosed, ProtocolViolation, ServerError
from protocol import requests as wire

ROOT = Path(__file__).resolve().parent.parent

SKUS = [f"sku-{number}" for number in range(5)]
LOCS = ["dock-a", "dock-b"]
STOCK_KEYS = [(sku, loc) for sku in SKUS for loc in LOCS]
SHORT_TTL_MS = 30  # some reserves expire by the server's timer
LONG_TTL_MS = 600_000  # extends: never expire within a test
CATCH_UP_TIMEOUT_SECONDS = 45
EVENTS_PER_PHASE = 250  # the sync applies this many more events before each kill
SYNC_KILLS = 3
DATABASE_FAULTS = 3
TRAFFIC_SECONDS_MAX = 90


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class SyncProcess:
    """`python -m engine sync` as a child process."""

    def __init__(self, folder: Path, engine_port: int, url: str, metrics_port: int):
        self.log_path = folder / f"sync-{time.monotonic_ns()}.log"
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "engine", "sync", "--connect", f"127.0.0.1:{engine_port}", "--to", url,
             "--progress-seconds", "1", "--batch-window-ms", "20", "--batch-events-max", "200",
             "--metrics-port", str(metrics_port)],
            cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )

    def kill(self) -> None:
        """kill -9: mid-batch, mid-transaction, wherever it is."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)
        self._log.close()

    def terminate(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=15)
        self._log.close()
        return code

    def log_text(self) -> str:
        return self.log_path.read_text()


class Traffic(threading.Thread):
    """A client that sends a mix of every op until stopped, riding out engine restarts."""

    def __init__(self, port: int, seed: int):
        super().__init__(daemon=True)
        self.port = port
        self.chooser = random.Random(seed)
        self.stopping = threading.Event()
        self.rids: dict[str, list] = {}  # every rid sent, with its lines
        self.granted: list[str] = []  # rids whose reserve was acknowledged
        self.rounds = 0
        self.error: BaseException | None = None
        self._numbers = 0

    def run(self) -> None:
        deadline = time.monotonic() + TRAFFIC_SECONDS_MAX
        client: Client | None = None
        try:
            while not self.stopping.is_set() and time.monotonic() < deadline:
                try:
                    if client is None:
                        client = Client("127.0.0.1", self.port, timeout_seconds=5)
                        if self.rounds == 0:
                            client.adjust_many(self._key("load"), [(sku, loc, 100) for sku, loc in STOCK_KEYS], "receipt")
                    self._round(client)
                    self.rounds += 1
                except (ConnectionClosed, ProtocolViolation, OSError):
                    if client is not None:
                        client.close()
                    client = None
                    time.sleep(0.05)  # the engine is being restarted
        except BaseException as error:  # reported by the test
            self.error = error
        finally:
            if client is not None:
                client.close()

    def _key(self, prefix: str) -> str:
        self._numbers += 1
        return f"{prefix}-{self._numbers}"

    def _lines(self, count: int) -> list[tuple[str, str, int]]:
        return [(sku, loc, self.chooser.randint(1, 4)) for sku, loc in self.chooser.sample(STOCK_KEYS, count)]

    def _round(self, client: Client) -> None:
        chooser = self.chooser
        requests: list = []
        reserves: list[str] = []
        for _ in range(4):
            rid = self._key("order")
            lines = self._lines(chooser.choice([1, 1, 2, 3]))
            ttl_ms = SHORT_TTL_MS if chooser.random() < 0.2 else None
            self.rids[rid] = lines
            reserves.append(rid)
            requests.append(wire.reserve_request(rid, lines, ttl_ms=ttl_ms, ref=chooser.choice([None, f"po-{rid}"])))
        if len(self.granted) > 6:
            release, commit, short, extend = chooser.sample(self.granted[-40:], 4)
            requests.append(wire.release_request(release))
            requests.append(wire.commit_request(commit))
            sku, loc, qty = self.rids[short][0]
            requests.append(wire.commit_request(short, [(sku, loc, qty - 1)]))
            requests.append(wire.extend_request(extend, LONG_TTL_MS))
        sku, loc = chooser.choice(STOCK_KEYS)
        requests.append(wire.adjust_request(self._key("adjust"), sku, loc, chooser.choice([5, 3, -1]), chooser.choice(["receipt", "damage"])))
        if self.rounds % 3 == 0:
            sku, loc = chooser.choice(STOCK_KEYS)
            requests.append(wire.count_request(self._key("count"), sku, loc, chooser.randint(20, 80), "cycle"))
        if self.rounds % 5 == 0:
            batch = chooser.sample(STOCK_KEYS, 3)
            requests.append(wire.count_many_request(self._key("counts"), [(sku, loc, chooser.randint(30, 90)) for sku, loc in batch]))
            requests.append(wire.adjust_many_request(self._key("adjusts"), [(sku, loc, 7) for sku, loc in batch], "receipt"))
        if self.rounds % 2 == 0:
            sku = chooser.choice(SKUS)
            source, target = chooser.sample(LOCS, 2)
            requests.append(wire.transfer_request(self._key("move"), sku, source, target, chooser.randint(1, 5)))
        replies = client.pipeline(requests)
        for rid, reply in zip(reserves, replies):
            if reply.get("ok"):
                self.granted.append(rid)


def _engine_durable_seq(port: int) -> int:
    with Client("127.0.0.1", port, timeout_seconds=10) as client:
        return int(client.stats()["wal"]["durable_seq"])


def _traffic_then_caught_up(traffic: "Traffic", port: int, model: "ReadModel", log: Callable[[], str]) -> int:
    """Run `traffic` for 1.5 s, let its short-ttl reserves expire, and wait until the read model's
    offset reaches the engine's durable seq, which is returned."""
    traffic.start()
    time.sleep(1.5)
    traffic.stopping.set()
    traffic.join(timeout=20)
    assert traffic.error is None, traffic.error
    time.sleep(0.3)  # the last short-ttl reserves expire
    durable_seq = _engine_durable_seq(port)
    _wait_for(lambda: model.offset() >= durable_seq, CATCH_UP_TIMEOUT_SECONDS, f"offset {durable_seq}", log)
    return durable_seq


def _wait_for(condition: Callable[[], bool], timeout_seconds: float, what: str, log: Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_seconds} s waiting for {what}; sync log tail:\n{log()[-3000:]}")


class ReadModel:
    """Read the sync's tables from the test (its own connection)."""

    def __init__(self, query: Callable[[str], list[tuple]]):
        self.query = query

    def offset(self) -> int:
        try:
            rows = self.query("SELECT seq FROM sync_offset")
        except Exception:  # noqa: BLE001 - the sync has not created its tables yet
            return 0
        return int(rows[0][0]) if rows else 0

    def stock(self) -> dict:
        rows = self.query("SELECT sku, loc, on_hand, reserved, available FROM stock")
        return {(sku, loc): {"on_hand": on_hand, "reserved": reserved, "available": available} for sku, loc, on_hand, reserved, available in rows}

    def reservations(self) -> dict:
        rows = self.query("SELECT rid, state, lines, ref, expires_at_ms, committed FROM reservations")
        return {
            rid: {"state": state, "lines": json.loads(lines), "ref": ref, "expires_at_ms": expires_at_ms,
                  "committed": None if committed is None else json.loads(committed)}
            for rid, state, lines, ref, expires_at_ms, committed in rows
        }

    def dead_letters(self) -> int:
        return int(self.query("SELECT COUNT(*) FROM dead_letters")[0][0])


def _compare_with_engine(port: int, model: ReadModel, rids: dict) -> tuple[int, int]:
    """Assert the read model equals the engine's figures; return (stock rows, reservations) compared."""
    stock = model.stock()
    reservations = model.reservations()
    with Client("127.0.0.1", port, timeout_seconds=10) as client:
        for (sku, loc), row in stock.items():
            reply = client.get(sku, loc)
            assert row == {name: reply[name] for name in ("on_hand", "reserved", "available")}, (sku, loc)
        for sku, loc in STOCK_KEYS:
            if (sku, loc) not in stock:
                reply = client.get(sku, loc)
                assert (reply["on_hand"], reply["reserved"]) == (0, 0), (sku, loc)
        assert set(reservations) <= set(rids), "the read model has reservations nobody made"
        for rid in rids:
            try:
                reply = client.lookup(rid)
            except ServerError as error:
                assert error.code == "not_found"
                assert rid not in reservations, rid
                continue
            expected = {"state": reply["state"], "lines": reply["lines"], "ref": reply["ref"],
                        "expires_at_ms": reply["expires_at_ms"], "committed": reply.get("committed")}
            assert reservations.get(rid) == expected, rid
    return len(stock), len(reservations)


def _metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    match = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", text, re.MULTILINE)
    assert match, f"{name} not in the metrics:\n{text}"
    return float(match.group(1))


def _metric_or_zero(port: int, name: str) -> float:
    try:
        return _metric(port, name)
    except OSError:  # the sync is starting: its metrics server is not up yet
        return 0.0


def run_kill_scenario(
    server_process, folder: Path, url: str, model: ReadModel, label: str,
    database_fault: Callable[[], str] | None = None,
) -> None:
    """Traffic flows while the sync (a) is SIGKILLed and restarted, (b) loses the engine to a
    SIGKILL and a restart on the same data and port, (c) loses its database connection (when
    `database_fault` is given); then the read model must equal the engine's figures."""
    engine = server_process()
    port = engine.port
    metrics_port = _free_port()
    sync = SyncProcess(folder, port, url, metrics_port)
    syncs = [sync]
    traffic = Traffic(port, seed=13)
    traffic.start()
    kills = []
    try:
        def applied_at_least(count: int) -> None:
            _wait_for(lambda: model.offset() >= count, CATCH_UP_TIMEOUT_SECONDS, f"offset {count}", syncs[-1].log_text)

        timing = random.Random(5)
        for _ in range(SYNC_KILLS):
            applied_at_least(model.offset() + EVENTS_PER_PHASE)
            time.sleep(timing.uniform(0, 0.05))
            sync.kill()  # (a) the sync, mid-stream: gathering a batch, in its transaction, or idle
            kills.append(f"sync SIGKILL at offset {model.offset()}")
            time.sleep(timing.uniform(0, 0.3))  # traffic goes on while no sync runs
            sync = SyncProcess(folder, port, url, metrics_port)
            syncs.append(sync)

        applied_at_least(model.offset() + EVENTS_PER_PHASE)
        engine.kill()  # (b) the engine, mid-stream
        kills.append(f"engine SIGKILL at offset {model.offset()}")
        engine = server_process("--port", str(port))
        # The sync may still be applying what the old engine sent; it must notice the loss (and
        # count it) before the next fault, or that one would mask this one.
        _wait_for(
            lambda: _metric_or_zero(metrics_port, 'engine_sync_failures_total{cause="engine"}') >= 1,
            CATCH_UP_TIMEOUT_SECONDS, "the sync to notice the engine's death", sync.log_text,
        )

        applied_at_least(model.offset() + EVENTS_PER_PHASE)
        if database_fault is not None:
            for _ in range(DATABASE_FAULTS):
                where = database_fault()  # (c) the database connection, mid-stream
                kills.append(f"database connection terminated at offset {model.offset()} ({where})")
                applied_at_least(model.offset() + EVENTS_PER_PHASE)

        traffic.stopping.set()
        traffic.join(timeout=20)
        assert not traffic.is_alive()
        assert traffic.error is None, traffic.error
        time.sleep(0.3)  # the last short-ttl reserves expire
        for _ in range(5):  # bounded: stop when no event arrives between catching up and comparing
            durable_seq = _engine_durable_seq(port)
            _wait_for(lambda: model.offset() >= durable_seq, CATCH_UP_TIMEOUT_SECONDS, f"offset {durable_seq}", sync.log_text)
            stock_rows, reservation_rows = _compare_with_engine(port, model, traffic.rids)
            if _engine_durable_seq(port) == durable_seq and model.offset() == durable_seq:
                break
        else:
            raise AssertionError("the engine kept logging events after the traffic stopped")
        assert model.dead_letters() == 0
        assert _metric(metrics_port, "engine_sync_seq_behind") == 0
        assert _metric(metrics_port, 'engine_sync_failures_total{cause="engine"}') >= 1
        if database_fault is not None:
            assert _metric(metrics_port, 'engine_sync_failures_total{cause="database"}') >= 1
        assert _metric(metrics_port, "engine_sync_events_total") > 0
        assert sync.terminate() == 0
        assert not any("one event at a time" in process.log_text() for process in syncs), "no row was refused: the fast path only"
        print(
            f"\n{label}: {'; '.join(kills)}; {traffic.rounds} traffic rounds, {len(traffic.granted)} reserves granted;"
            f" at seq {durable_seq} compared {stock_rows} stock rows with `get` and {reservation_rows} reservations"
            f" with `lookup` ({len(traffic.rids)} rids checked): all equal"
        )
    finally:
        traffic.stopping.set()
        traffic.join(timeout=20)
        for process in syncs:
            if process.process.poll() is None:
                process.kill()


def _sqlite_query(path: Path) -> Callable[[str], list[tuple]]:
    """A query function on its own short connection per call (the test reads while the sync writes)."""

    def query(sql: str) -> list[tuple]:
        connection = sqlite3.connect(path, timeout=10)
        try:
            return connection.execute(sql).fetchall()
        finally:
            connection.close()

    return query


def test_sqlite_sync_survives_kills_and_equals_the_engine(server_process, tmp_path):
    """SQLite: (a) sync killed, (b) engine killed. A lost SQLite "connection" is a failure of any
    statement of the batch transaction: tests/test_sync_sink.py fails each one in turn."""
    path = tmp_path / "read-model.db"
    run_kill_scenario(server_process, tmp_path, f"sqlite:///{path}", ReadModel(_sqlite_query(path)), "sqlite kill test")


@pytest.fixture(scope="module")
def postgres_server():
    """A throwaway PostgreSQL cluster on a free loopback port (bench/systems.py starts it)."""
    from bench.systems import SystemMissing, start_postgres

    try:
        system = start_postgres(max_connections=20)
    except SystemMissing as error:
        pytest.skip(f"PostgreSQL is not available ({error}); install it with scripts/install-peers or apt-get install postgresql")
    try:
        yield system
    finally:
        system.stop()


_databases_made = iter(range(1_000_000))


@pytest.fixture
def postgres_url(postgres_server) -> str:
    """A new, empty database in the test cluster."""
    psycopg = pytest.importorskip("psycopg", reason="psycopg 3 is needed: pip install -e '.[test]'")
    name = f"sync_{next(_databases_made)}"
    with psycopg.connect(f"postgresql://postgres@127.0.0.1:{postgres_server.port}/postgres", autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    return f"postgresql://postgres@127.0.0.1:{postgres_server.port}/{name}"


def test_postgresql_sync_survives_kills_and_equals_the_engine(server_process, tmp_path, postgres_url):
    """PostgreSQL: (a) sync killed, (b) engine killed, (c) the sync's backend terminated with
    `pg_terminate_backend` mid-stream."""
    import psycopg

    url = postgres_url
    admin = psycopg.connect(url, autocommit=True)

    def query(sql: str) -> list[tuple]:
        return admin.execute(sql).fetchall()

    def terminate_sync_backend() -> str:
        """Terminate the sync's backend, inside a transaction if it is in one within 2 s."""
        deadline = time.monotonic() + 10
        in_transaction_until = time.monotonic() + 2
        while time.monotonic() < deadline:
            states = "('active', 'idle in transaction')" if time.monotonic() < in_transaction_until else "('active', 'idle in transaction', 'idle')"
            rows = query(
                "SELECT state, pg_terminate_backend(pid) FROM pg_stat_activity"
                f" WHERE application_name = 'engine-sync' AND state IN {states}"
            )
            for state, terminated in rows:
                if terminated:
                    return f"backend {state}"
            time.sleep(0.002)
        raise AssertionError("no engine-sync backend to terminate")

    try:
        run_kill_scenario(server_process, tmp_path, url, ReadModel(query), "postgresql kill test", terminate_sync_backend)
    finally:
        admin.close()


def _database(kind: str, tmp_path: Path, request) -> tuple[str, Callable[[str], list[tuple]], Callable[[], None]]:
    """(url, query, close) of a new read-model database of `kind` for one test."""
    if kind == "sqlite":
        path = tmp_path / "read-model.db"
        return f"sqlite:///{path}", _sqlite_query(path), lambda: None
    import psycopg

    url = request.getfixturevalue("postgres_url")
    connection = psycopg.connect(url, autocommit=True)

    def query(sql: str) -> list[tuple]:
        cursor = connection.execute(sql)
        return cursor.fetchall() if cursor.description is not None else []

    return url, query, connection.close


# The operator forbids rows for one SKU (a constraint the sync knows nothing about), then lifts it.
REJECTED_SKU = "sku-4"
REJECT_SQL = {
    "sqlite": [f"CREATE TRIGGER no_{REJECTED_SKU.replace('-', '_')} BEFORE INSERT ON stock WHEN NEW.sku = '{REJECTED_SKU}'"
               " BEGIN SELECT RAISE(ABORT, 'this SKU is not reported'); END"],
    "postgresql": [f"ALTER TABLE stock ADD CONSTRAINT not_reported CHECK (sku <> '{REJECTED_SKU}')"],
}
ACCEPT_SQL = {
    "sqlite": [f"DROP TRIGGER no_{REJECTED_SKU.replace('-', '_')}"],
    "postgresql": ["ALTER TABLE stock DROP CONSTRAINT not_reported"],
}


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_rejected_rows_become_dead_letters_and_retry_dead_letters_replays_them(server_process, tmp_path, request, kind):
    url, query, close_database = _database(kind, tmp_path, request)
    from engine.sync.databases import open_database
    from engine.sync.sink import ReadModelSink

    sink = ReadModelSink(open_database(url))
    sink.create_schema()
    sink.database.close()
    for statement in REJECT_SQL[kind]:
        query(statement)
    model = ReadModel(query)
    engine = server_process()
    metrics_port = _free_port()
    sync = SyncProcess(tmp_path, engine.port, url, metrics_port)
    traffic = Traffic(engine.port, seed=29)
    try:
        _traffic_then_caught_up(traffic, engine.port, model, sync.log_text)
        dead_letters = model.dead_letters()
        assert dead_letters > 0
        assert _metric(metrics_port, "engine_sync_dead_letters_total") == dead_letters
        assert not any(sku == REJECTED_SKU for sku, _ in model.stock()), "the rejected SKU's rows stay out"
        reasons = query("SELECT reason FROM dead_letters")
        known = ("IntegrityError: ", "CheckViolation: ", "RowRejected: ", "UnknownReservation: ")
        assert all(reason.startswith(known) for (reason,) in reasons), reasons
        # Still refused: the retry reports them and keeps them.
        retry = subprocess.run([sys.executable, "-m", "engine", "sync", "--to", url, "--retry-dead-letters"],
                               cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert retry.returncode == 0, retry.stderr
        assert f"retried {dead_letters} dead letter(s): 0 applied, {dead_letters} still rejected; {dead_letters} left" in retry.stdout

        for statement in ACCEPT_SQL[kind]:
            query(statement)
        retry = subprocess.run([sys.executable, "-m", "engine", "sync", "--to", url, "--retry-dead-letters"],
                               cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert retry.returncode == 0, retry.stderr
        assert f"retried {dead_letters} dead letter(s): {dead_letters} applied, 0 still rejected; 0 left" in retry.stdout
        stock_rows, reservation_rows = _compare_with_engine(engine.port, model, traffic.rids)
        assert any(sku == REJECTED_SKU for sku, _ in model.stock())
        assert sync.terminate() == 0
        print(f"\n{kind} dead letters: {dead_letters} events refused, replayed by --retry-dead-letters;"
              f" compared {stock_rows} stock rows and {reservation_rows} reservations: all equal")
    finally:
        traffic.stopping.set()
        traffic.join(timeout=20)
        if sync.process.poll() is None:
            sync.kill()
        close_database()


def _run_sync_once(engine_port: int, url: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "engine", "sync", "--connect", f"127.0.0.1:{engine_port}", "--to", url],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )


def test_sync_stops_with_a_clear_error_when_the_log_no_longer_holds_its_events(server_process, tmp_path):
    engine = server_process("--log-retention-days", "0")
    with Client("127.0.0.1", engine.port) as client:
        for number in range(5):
            client.adjust(f"receipt-{number}", "sku-1", "dock-a", 10, "receipt")
        assert client.snapshot()["seq"] == 5  # trims the log records the snapshot covers
    finished = _run_sync_once(engine.port, f"sqlite:///{tmp_path / 'fresh.db'}")
    assert finished.returncode == 3, finished.stderr
    assert "no longer retains the events after the read model's offset 0" in finished.stderr
    assert "rebuild the read model into an empty database" in finished.stderr


def test_sync_refuses_a_read_model_ahead_of_the_engine(server_process, tmp_path, data_dir):
    url = f"sqlite:///{tmp_path / 'read-model.db'}"
    engine = server_process()
    with Client("127.0.0.1", engine.port) as client:
        for number in range(5):
            client.adjust(f"receipt-{number}", "sku-1", "dock-a", 10, "receipt")
    sync = SyncProcess(tmp_path, engine.port, url, _free_port())
    try:
        model = ReadModel(_sqlite_query(tmp_path / "read-model.db"))
        _wait_for(lambda: model.offset() == 5, CATCH_UP_TIMEOUT_SECONDS, "offset 5", sync.log_text)
        assert sync.terminate() == 0
    finally:
        if sync.process.poll() is None:
            sync.kill()
    engine.kill()
    other_engine = server_process("--data", str(data_dir.parent / "other-data"))  # a new, empty engine
    finished = _run_sync_once(other_engine.port, url)
    assert finished.returncode == 3, finished.stderr
    assert "the read model is at seq 5 but the engine's log ends at seq 0" in finished.stderr


def test_sync_with_a_wrong_token_stops_at_once(server_process, tmp_path):
    engine = server_process("--token", "secret")
    finished = subprocess.run(
        [sys.executable, "-m", "engine", "sync", "--connect", f"127.0.0.1:{engine.port}", "--to", f"sqlite:///{tmp_path / 'x.db'}",
         "--token", "wrong"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert finished.returncode == 2, finished.stderr
    assert "the engine refuses the sync: unauthorized" in finished.stderr


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_two_syncs_on_one_database_apply_each_event_once(server_process, tmp_path, request, kind):
    """The offset is read again under the write lock in every batch: what one sync committed, the
    other skips as duplicates (counted), and the figures are still the engine's."""
    url, query, close_database = _database(kind, tmp_path, request)
    model = ReadModel(query)
    engine = server_process()
    metrics_ports = [_free_port(), _free_port()]
    syncs = [SyncProcess(tmp_path, engine.port, url, port) for port in metrics_ports]
    traffic = Traffic(engine.port, seed=41)
    try:
        durable_seq = _traffic_then_caught_up(traffic, engine.port, model, syncs[0].log_text)
        stock_rows, reservation_rows = _compare_with_engine(engine.port, model, traffic.rids)
        duplicates = sum(_metric(port, "engine_sync_duplicates_total") for port in metrics_ports)
        assert duplicates > 0
        for sync in syncs:
            assert sync.terminate() == 0
        print(f"\n{kind}, two syncs, one database: {duplicates:.0f} duplicates skipped; at seq {durable_seq} compared"
              f" {stock_rows} stock rows and {reservation_rows} reservations: all equal")
    finally:
        traffic.stopping.set()
        traffic.join(timeout=20)
        for sync in syncs:
            if sync.process.poll() is None:
                sync.kill()
        close_database()

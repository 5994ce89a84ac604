"""The admin shell in scripted mode, on data written by a real server run.

One server process writes a known history (receipts, reserves, a commit, a release, an expiry,
a count, a transfer); the figures at seq N are recorded from `stats`/`get`, more is written, the
server stops. Then every offline command runs through `python -m engine shell`, `replay
--to-seq N` is served and compared with the figures of N, `verify` checks a good and a
corrupted copy, and `reconcile --apply` runs twice against a live server.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import lmdb
import msgpack
import pytest

from engine.shell.script import split_commands
from engine.snapshot_files import SnapshotFiles
from protocol import Client

import conftest

SHELL_TIMEOUT_SECONDS = 60
STOCK_KEYS = [("SKU-1", "DC-1"), ("SKU-1", "DC-2"), ("SKU-2", "DC-1")]
STATS_COMPARED = ("applied_seq", "stocks", "reservations", "held", "keys")


def run_shell(*arguments: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    """`python -m engine shell ARGUMENTS` to completion (bounded by a timeout)."""
    return subprocess.run(
        [sys.executable, "-m", "engine", "shell", *arguments], cwd=conftest.ROOT, input=stdin,
        capture_output=True, text=True, timeout=SHELL_TIMEOUT_SECONDS,
    )


def json_documents(output: str) -> list:
    return [json.loads(line) for line in output.splitlines() if line.strip()]


@dataclass
class RecordedRun:
    data_dir: Path
    seq_n: int
    time_n_ms: int
    stats_n: dict
    stocks_n: dict
    last_seq: int
    stocks_end: dict


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> RecordedRun:
    data_dir = tmp_path_factory.mktemp("shell") / "data"
    server = conftest.ServerProcess(data_dir)
    try:
        with Client("127.0.0.1", server.port) as client:
            client.hello()
            client.adjust("receipt-1", "SKU-1", "DC-1", 100, "receipt")
            client.adjust("receipt-2", "SKU-2", "DC-1", 40, "receipt")
            client.adjust("receipt-3", "SKU-1", "DC-2", 10, "receipt")
            client.reserve("order-1", [("SKU-1", "DC-1", 5), ("SKU-2", "DC-1", 3)], ref="SO-1")
            client.reserve("order-2", [("SKU-1", "DC-1", 7)], ref="SO-2")
            client.commit("order-1")
            client.release("order-2")
            client.reserve("order-3", [("SKU-1", "DC-2", 2)], ttl_ms=30, ref="SO-3")
            deadline = time.monotonic() + 10
            while client.lookup("order-3")["state"] != "expired":
                assert time.monotonic() < deadline, "order-3 did not expire"
                time.sleep(0.02)
            client.count("count-1", "SKU-2", "DC-1", 35, "cycle")
            client.snapshot()
            client.reserve("order-4", [("SKU-1", "DC-1", 4)], ref="SO-4")
            stats_n = client.stats()
            stocks_n = {key: _figures(client.get(*key)) for key in STOCK_KEYS}
            seq_n = stats_n["applied_seq"]
            time.sleep(0.01)  # the events after N are later than N's time
            client.adjust("damage-1", "SKU-1", "DC-1", -3, "damage")
            client.transfer("transfer-1", "SKU-1", "DC-1", "DC-2", 10)
            client.reserve("order-5", [("SKU-2", "DC-1", 1)], ref="SO-5")
            last_seq = client.stats()["applied_seq"]
            stocks_end = {key: _figures(client.get(*key)) for key in STOCK_KEYS}
    finally:
        assert server.terminate() == 0
    log_entries = json_documents(run_shell("--data", str(data_dir), "--json", "-c", f"log --from-seq {seq_n} --to-seq {seq_n}").stdout)
    time_n_ms = _time_ms(log_entries[0]["rows"][0]["time"])
    return RecordedRun(data_dir, seq_n, time_n_ms, stats_n, stocks_n, last_seq, stocks_end)


def _figures(reply: dict) -> dict:
    return {name: reply[name] for name in ("on_hand", "reserved", "available")}


def _time_ms(text: str) -> int:
    from engine.shell.render import parse_time_ms

    return parse_time_ms(text)


def test_snapshots_log_and_info(recorded):
    data = str(recorded.data_dir)
    finished = run_shell("--data", data, "--json", "-c", "info; snapshots; log; log --sku SKU-2; log --ref SO-3; log --type counted")
    assert finished.returncode == 0, finished.stderr
    info, snapshots, whole_log, sku_2, ref_3, counted = json_documents(finished.stdout)
    assert info["last_seq"] == recorded.last_seq and info["first_seq"] == 1 and info["served_now"] is False
    seqs = [row["seq"] for row in snapshots["rows"]]
    assert seqs[-1] == recorded.last_seq and all(row["size_bytes"] > 0 and row["time"].endswith("Z") for row in snapshots["rows"])
    assert [row["seq"] for row in whole_log["rows"]] == list(range(1, recorded.last_seq + 1))
    assert {row["type"] for row in whole_log["rows"]} >= {"adjusted", "reserved", "committed", "released", "expired", "counted", "transferred"}
    assert all("SKU-2" in row["details"] for row in sku_2["rows"]) and len(sku_2["rows"]) == 5
    assert [row["type"] for row in ref_3["rows"]] == ["reserved", "expired"]  # the expiry carries no ref: found by rid
    assert [row["seq"] for row in counted["rows"]] == [10]
    by_time = run_shell("--data", data, "--json", "-c", f"log --until {recorded.time_n_ms}")
    assert json_documents(by_time.stdout)[0]["rows"][-1]["seq"] >= recorded.seq_n
    last_two = json_documents(run_shell("--data", data, "--json", "-c", "log --limit 2 --last").stdout)[0]
    assert [row["seq"] for row in last_two["rows"]] == [recorded.last_seq - 1, recorded.last_seq]
    text = run_shell("--data", data, "-c", "snapshots; log --limit 2")
    assert text.returncode == 0 and "size_bytes" in text.stdout and "more records match" in text.stderr


def test_history_shows_every_change_with_running_figures(recorded):
    finished = run_shell("--data", str(recorded.data_dir), "--json", "-c", "history SKU-1 DC-1")
    assert finished.returncode == 0, finished.stderr
    rows = json_documents(finished.stdout)[0]["rows"]
    assert rows[0]["type"] == "(start)" and rows[0]["on_hand"] == 0
    assert [row["type"] for row in rows[1:]] == ["adjusted", "reserved", "reserved", "committed", "released", "reserved", "adjusted", "transferred"]
    at_n = [row for row in rows if row["seq"] <= recorded.seq_n][-1]
    assert {name: at_n[name] for name in ("on_hand", "reserved", "available")} == recorded.stocks_n[("SKU-1", "DC-1")]
    assert {name: rows[-1][name] for name in ("on_hand", "reserved", "available")} == recorded.stocks_end[("SKU-1", "DC-1")]
    commit = next(row for row in rows if row["type"] == "committed")
    assert (commit["on_hand_change"], commit["reserved_change"]) == (-5, -5)


@pytest.mark.parametrize("target", ["--to-seq", "--to-time"])
def test_replay_into_a_new_folder_serves_exactly_the_state_at_n(recorded, tmp_path, target):
    into = tmp_path / "at-n"
    value = str(recorded.seq_n) if target == "--to-seq" else str(recorded.time_n_ms)
    finished = run_shell("--data", str(recorded.data_dir), "--json", "-c", f"replay {target} {value} --into {into}")
    assert finished.returncode == 0, finished.stderr
    assert json_documents(finished.stdout)[0]["seq"] == recorded.seq_n
    server = conftest.ServerProcess(into)
    try:
        with Client("127.0.0.1", server.port) as client:
            client.hello()
            stats = client.stats()
            assert {name: stats[name] for name in STATS_COMPARED} == {name: recorded.stats_n[name] for name in STATS_COMPARED}
            for key in STOCK_KEYS:
                assert _figures(client.get(*key)) == recorded.stocks_n[key], key
            assert client.lookup("order-4")["state"] == "held"
            assert client.adjust("after-n", "SKU-1", "DC-1", 1, "receipt")["seq"] == recorded.seq_n + 1
    finally:
        assert server.terminate() == 0
    verified = run_shell("--data", str(into), "-c", "verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_replay_refuses_a_folder_with_data_or_in_use(recorded, tmp_path):
    data = str(recorded.data_dir)
    refused = run_shell("--data", data, "-c", f"replay --to-seq 3 --into {data}")
    assert refused.returncode == 1 and "folder being read" in refused.stderr
    into = tmp_path / "once"
    assert run_shell("--data", data, "-c", f"replay --to-seq 3 --into {into}").returncode == 0
    again = run_shell("--data", data, "-c", f"replay --to-seq 4 --into {into}")
    assert again.returncode == 1 and "already holds a log" in again.stderr and "choose an empty folder" in again.stderr
    beyond = run_shell("--data", data, "-c", f"replay --to-seq {recorded.last_seq + 1} --into {tmp_path / 'beyond'}")
    assert beyond.returncode == 1 and "not in this folder" in beyond.stderr


def test_reading_a_live_folder_works_and_writing_into_it_is_refused(tmp_path):
    live = tmp_path / "live"
    server = conftest.ServerProcess(live)
    try:
        with Client("127.0.0.1", server.port) as client:
            client.hello()
            client.adjust("a", "SKU-1", "DC-1", 5, "receipt")
        source = tmp_path / "source"
        shutil.copytree(live, source)  # a copy of the live folder to replay from
        finished = run_shell("--data", str(live), "--json", "-c", "info; log")
        assert finished.returncode == 0, finished.stderr
        info, log = json_documents(finished.stdout)
        assert info["served_now"] is True and [row["seq"] for row in log["rows"]] == [1]
        refused = run_shell("--data", str(source), "-c", f"replay --to-seq 1 --into {live}")
        assert refused.returncode == 1 and "in use by a running server" in refused.stderr
        with pytest.raises(RuntimeError, match="in use"):
            conftest.ServerProcess(live)
    finally:
        assert server.terminate() == 0


def test_verify_passes_on_good_data_and_names_each_difference_in_a_corrupted_copy(recorded, tmp_path):
    good = run_shell("--data", str(recorded.data_dir), "-c", "verify")
    assert good.returncode == 0, good.stdout + good.stderr
    assert "verify: ok" in good.stdout
    corrupted = tmp_path / "corrupted"
    shutil.copytree(recorded.data_dir, corrupted)
    sku, loc, on_hand = _corrupt_latest_snapshot(corrupted / "lmdb")
    bad = run_shell("--data", str(corrupted), "-c", "verify")
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "verify: FAILED" in bad.stdout
    difference = next(line for line in bad.stdout.splitlines() if f"{sku} @ {loc}" in line and "on_hand" in line)
    assert str(on_hand) in difference and str(on_hand + 7) in difference
    as_json = json_documents(run_shell("--data", str(corrupted), "--json", "-c", "verify").stdout)
    assert any(row["field"] == "on_hand" and row["other"] == on_hand + 7 for row in as_json[1]["rows"])


def _corrupt_latest_snapshot(lmdb_path: Path) -> tuple[str, str, int]:
    """Add 7 to the on_hand of the first stock in the latest snapshot (a file, rewritten with a
    valid checksum: a figure that is wrong, not a damaged file); return its old figure."""
    files = SnapshotFiles(str(lmdb_path / "snapshots"))
    snapshot = files.read(files.seqs()[-1])
    sku, loc, on_hand, reserved, last_seq = snapshot["stocks"][0]
    snapshot["stocks"][0] = [sku, loc, on_hand + 7, reserved, last_seq]
    files.write(snapshot)
    return sku, loc, on_hand


def test_export_as_json_lines_and_csv(recorded, tmp_path):
    target = tmp_path / "events.csv"
    finished = run_shell("--data", str(recorded.data_dir), "-c", f"export; export --format csv --output {target}")
    assert finished.returncode == 0, finished.stderr
    events = json_documents(finished.stdout)
    assert [event["seq"] for event in events] == list(range(1, recorded.last_seq + 1))
    rows = list(csv.DictReader(io.StringIO(target.read_text())))
    assert sorted({int(row["seq"]) for row in rows}) == list(range(1, recorded.last_seq + 1))
    order_1 = [row for row in rows if row["rid"] == "order-1" and row["type"] == "reserved"]
    assert [(row["sku"], row["loc"], row["qty"]) for row in order_1] == [("SKU-1", "DC-1", "5"), ("SKU-2", "DC-1", "3")]
    filtered = run_shell("--data", str(recorded.data_dir), "-c", "export --rid order-2")
    assert [event["type"] for event in json_documents(filtered.stdout)] == ["reserved", "released"]


def test_reconcile_prints_variance_largest_first_with_marks_and_totals(recorded, tmp_path):
    counts = tmp_path / "counts.csv"
    end = recorded.stocks_end
    counts.write_text(
        "sku,loc,counted,note\n"
        f"SKU-1,DC-1,{end[('SKU-1', 'DC-1')]['on_hand'] - 2},shelf A\n"
        f"SKU-2,DC-1,{end[('SKU-2', 'DC-1')]['on_hand'] + 1},\n"
        "SKU-9,DC-1,5,never received\n"
    )
    finished = run_shell("--data", str(recorded.data_dir), "--json", "-c", f"reconcile {counts} --threshold 2")
    assert finished.returncode == 0, finished.stderr
    document = json_documents(finished.stdout)[0]
    assert [(row["sku"], row["variance"], row["check"]) for row in document["rows"]] == [
        ("SKU-9", 5, "!"), ("SKU-1", -2, "!"), ("SKU-2", 1, ""),
    ]
    assert document["totals"]["variance"] == 4 and document["totals"]["check"] == "2 marked"
    text = run_shell("--data", str(recorded.data_dir), "-c", f"reconcile {counts} --threshold 2")
    assert "net variance 4, absolute variance 8, 2 lines" in text.stdout
    bad = tmp_path / "bad.csv"
    bad.write_text("sku,loc,counted\nSKU-1,DC-1,many\n")
    refused = run_shell("--data", str(recorded.data_dir), "-c", f"reconcile {bad}")
    assert refused.returncode == 1 and "row 1" in refused.stderr


def test_reconcile_apply_twice_changes_nothing_the_second_time(tmp_path):
    server = conftest.ServerProcess(tmp_path / "data")
    try:
        with Client("127.0.0.1", server.port) as client:
            client.hello()
            client.adjust("receipt-1", "SKU-1", "DC-1", 50, "receipt")
            client.adjust("receipt-2", "SKU-2", "DC-1", 20, "receipt")
            client.reserve("order-1", [("SKU-1", "DC-1", 5)])
            counts = tmp_path / "counts.csv"
            counts.write_text("sku,loc,counted\nSKU-1,DC-1,47\nSKU-2,DC-1,20\nSKU-3,DC-1,4\n")
            address = f"127.0.0.1:{server.port}"
            first = run_shell("--connect", address, "--json", "-c", f"reconcile {counts} --apply")
            assert first.returncode == 0, first.stderr
            seq_after_first = client.stats()["applied_seq"]
            figures_after_first = {sku: _figures(client.get(sku, "DC-1")) for sku in ("SKU-1", "SKU-2", "SKU-3")}
            assert figures_after_first["SKU-1"] == {"on_hand": 47, "reserved": 5, "available": 42}
            assert figures_after_first["SKU-3"]["on_hand"] == 4
            second = run_shell("--connect", address, "--json", "-c", f"reconcile {counts} --apply")
            assert second.returncode == 0, second.stderr
            first_rows, second_rows = json_documents(first.stdout)[0]["rows"], json_documents(second.stdout)[0]["rows"]
            assert {row["count"] for row in first_rows} == {"applied"}
            assert {row["count"] for row in second_rows} == {"duplicate"}
            assert [(row["sku"], row["variance"]) for row in first_rows] == [("SKU-3", 4), ("SKU-1", -3), ("SKU-2", 0)]
            assert [row["variance"] for row in second_rows] == [row["variance"] for row in first_rows]
            assert client.stats()["applied_seq"] == seq_after_first
            assert {sku: _figures(client.get(sku, "DC-1")) for sku in ("SKU-1", "SKU-2", "SKU-3")} == figures_after_first
            preview = run_shell("--connect", address, "--json", "-c", f"reconcile {counts}")
            assert {row["variance"] for row in json_documents(preview.stdout)[0]["rows"]} == {0}
    finally:
        assert server.terminate() == 0


def test_online_commands(tmp_path):
    server = conftest.ServerProcess(tmp_path / "data", "--token", "secret")
    try:
        address = f"127.0.0.1:{server.port}"
        finished = run_shell(
            "--connect", address, "--token", "secret", "--json", "-c",
            "adjust SKU-1 DC-1 30 --reason receipt; count SKU-1 DC-2 8 --key count-1; count SKU-1 DC-2 8 --key count-1; "
            "get SKU-1 DC-1; query SKU-1; snapshot; stats; watch --from 1 --limit 2",
        )
        assert finished.returncode == 0, finished.stderr
        adjusted, counted, repeated, got, queried, snapshot, stats, *events = json_documents(finished.stdout)
        assert adjusted["key"].startswith("shell-adjust-") and adjusted["on_hand"] == 30 and adjusted["duplicate"] is False
        assert counted["key"] == "count-1" and counted["variance"] == 8 and repeated["duplicate"] is True
        assert got["rows"] == [{"sku": "SKU-1", "loc": "DC-1", "on_hand": 30, "reserved": 0, "available": 30, "seq": 1}]
        assert queried["totals"]["on_hand"] == 38 and len(queried["rows"]) == 2
        assert snapshot["snapshot_seq"] == 2 and stats["applied_seq"] == 2
        assert [(event["seq"], event["type"]) for event in events] == [(1, "adjusted"), (2, "counted")]
        with Client("127.0.0.1", server.port) as client:
            client.hello(token="secret")
            client.reserve("order-1", [("SKU-1", "DC-1", 4)], ref="SO-1")
        looked_up = run_shell("--connect", address, "--token", "secret", "-c", "lookup order-1; watch --seconds 0.3")
        assert looked_up.returncode == 0, looked_up.stderr
        assert "held" in looked_up.stdout and "SO-1" in looked_up.stdout and "watched 0 events" in looked_up.stderr
        unauthorized = run_shell("--connect", address, "-c", "stats")
        assert unauthorized.returncode == 1 and "unauthorized" in unauthorized.stderr
    finally:
        assert server.terminate() == 0


def test_the_first_failing_command_stops_the_script_and_is_named(recorded):
    data = str(recorded.data_dir)
    finished = run_shell("--data", data, "-c", "info; log --no-such-flag; snapshots")
    assert finished.returncode == 2
    assert "command 2 of 3 failed" in finished.stderr and "log --no-such-flag" in finished.stderr
    assert not any(line.startswith("seq") for line in finished.stdout.splitlines())  # `snapshots` did not run
    from_stdin = run_shell("--data", data, stdin="# a comment\ninfo\nget SKU-1 DC-1\nsnapshots\n")
    assert from_stdin.returncode == 1 and "folder" in from_stdin.stdout  # `info` ran
    assert "--connect" in from_stdin.stderr and "command 2 of 3" in from_stdin.stderr
    assert not any(line.startswith("seq") for line in from_stdin.stdout.splitlines())  # `snapshots` did not
    assert run_shell("--data", data, stdin="info\n\n# done\n").returncode == 0
    unknown = run_shell("-c", "frobnicate")
    assert unknown.returncode == 2 and "unknown command" in unknown.stderr
    no_folder = run_shell("-c", "verify")
    assert no_folder.returncode == 1 and "--data DIR" in no_folder.stderr


def test_split_commands_keeps_quoted_separators_and_drops_comments():
    assert split_commands('info; log --ref "a;b"\n# note; not a command\nverify  ;;') == ['info', 'log --ref "a;b"', "verify"]
    assert split_commands("get 'x # y' z # not a comment start") == ["get 'x # y' z # not a comment start"]
    assert split_commands("") == []


def test_interactive_completion_and_lines(capsys):
    from engine.shell.commands import Session
    from engine.shell.interactive import InteractiveShell
    from engine.shell.registry import all_commands
    from engine.shell.render import Printer

    shell = InteractiveShell(Session(Printer(sys.stdout, sys.stderr, False)), all_commands())
    assert sorted(shell.completenames("re")) == ["reconcile", "replay"]
    assert shell.completedefault("--to", "replay --to", 7, 11) == ["--to-seq", "--to-time"]
    assert shell.onecmd("help verify") is False and shell.last_status == 0
    assert "full replay" in capsys.readouterr().out
    assert shell.onecmd("get") is False and shell.last_status == 2  # a bad line does not end the session
    assert shell.onecmd("exit") is True


def test_a_trimmed_log_is_replayed_and_verified_from_its_base_snapshot(tmp_path):
    data_dir = tmp_path / "data"
    # Retention 0: each snapshot trims every record it covers, so the log starts after it.
    server = conftest.ServerProcess(data_dir, "--log-retention-days", "0")
    try:
        with Client("127.0.0.1", server.port) as client:
            client.hello()
            client.adjust("receipt-1", "SKU-1", "DC-1", 20, "receipt")
            client.reserve("order-1", [("SKU-1", "DC-1", 5)])
            base_seq = client.snapshot()["seq"]
            client.commit("order-1")
            client.adjust("receipt-2", "SKU-1", "DC-1", 7, "receipt")
            seq_n = client.stats()["applied_seq"]
            figures_n = _figures(client.get("SKU-1", "DC-1"))
            client.reserve("order-2", [("SKU-1", "DC-1", 3)])
    finally:
        server.kill()  # no shutdown snapshot: the log keeps what came after the base
    data = str(data_dir)
    info = json_documents(run_shell("--data", data, "--json", "-c", "info").stdout)[0]
    assert info["first_seq"] == base_seq + 1 and info["snapshots"] == str(base_seq)
    verified = run_shell("--data", data, "-c", "verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "no full replay is possible" in verified.stderr
    history = json_documents(run_shell("--data", data, "--json", "-c", "history SKU-1 DC-1").stdout)[0]["rows"]
    assert history[0]["type"] == "(start)" and history[0]["reserved"] == 5 and history[-1]["reserved"] == 3
    too_early = run_shell("--data", data, "-c", f"replay --to-seq {base_seq - 1} --into {tmp_path / 'early'}")
    assert too_early.returncode == 1 and "cannot be rebuilt" in too_early.stderr
    into = tmp_path / "at-n"
    assert run_shell("--data", data, "-c", f"replay --to-seq {seq_n} --into {into}").returncode == 0
    copy_info = json_documents(run_shell("--data", str(into), "--json", "-c", "info").stdout)[0]
    assert (copy_info["first_seq"], copy_info["last_seq"], copy_info["snapshots"]) == (base_seq + 1, seq_n, f"{base_seq}, {seq_n}")
    restored = conftest.ServerProcess(into)
    try:
        with Client("127.0.0.1", restored.port) as client:
            client.hello()
            assert client.stats()["applied_seq"] == seq_n
            assert _figures(client.get("SKU-1", "DC-1")) == figures_n
    finally:
        assert restored.terminate() == 0


def test_verify_and_log_on_a_copy_with_a_corrupted_log_record(recorded, tmp_path):
    changed = tmp_path / "changed"
    shutil.copytree(recorded.data_dir, changed)
    _rewrite_first_log_entry(changed / "lmdb", lambda event: {**event, "delta": event["delta"] - 10})
    verified = run_shell("--data", str(changed), "-c", "verify")
    assert verified.returncode == 1, verified.stdout + verified.stderr
    assert any("SKU-1 @ DC-1" in line and "on_hand" in line for line in verified.stdout.splitlines())
    unreadable = tmp_path / "unreadable"
    shutil.copytree(recorded.data_dir, unreadable)
    _rewrite_first_log_entry(unreadable / "lmdb", lambda event: {**event, "type": "bogus"})
    logged = run_shell("--data", str(unreadable), "-c", "log")
    assert logged.returncode == 1 and "does not read back as valid" in logged.stderr and "Traceback" not in logged.stderr
    assert run_shell("--data", str(unreadable), "-c", "verify").returncode == 1


def _rewrite_first_log_entry(lmdb_path: Path, change) -> None:
    env = lmdb.open(str(lmdb_path), max_dbs=4, map_size=0, subdir=True)
    try:
        log = env.open_db(b"log", create=False)
        with env.begin(write=True, db=log) as txn:
            cursor = txn.cursor()
            assert cursor.first()
            events = msgpack.unpackb(cursor.value(), raw=False, strict_map_key=False)
            events = [change(event) for event in events] if isinstance(events, list) else change(events)
            txn.put(cursor.key(), msgpack.packb(events, use_bin_type=True))
    finally:
        env.close()

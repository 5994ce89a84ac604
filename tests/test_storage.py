"""The LMDB storage and the WAL's behaviour when the disk says no."""

from __future__ import annotations

import os

import msgpack
import pytest
import trio

import engine.snapshot_files
from engine.core import State, apply, apply_event
from engine.snapshot_files import SnapshotFileDamaged, SnapshotFiles, file_name, packed_pieces
from engine.storage import LmdbStorage, StorageError
from protocol import Adjust, Line, Reserve, ServerError, open_trio_client


def _event(seq: int, ts_ms: int = 1000) -> dict:
    return {"seq": seq, "ts_ms": ts_ms, "type": "adjusted", "key": f"k{seq}", "sku": "s", "loc": "l", "delta": 1, "reason": "receipt"}


@pytest.fixture
def storage(tmp_path):
    opened = LmdbStorage(str(tmp_path / "lmdb"), 64 * 1024**2)
    yield opened
    opened.close()


def test_append_and_read_back_in_order(storage):
    assert storage.last_seq == 0 and storage.first_seq() is None
    storage.append([_event(1), _event(2)])
    storage.append([_event(3)])
    assert storage.last_seq == 3 and storage.first_seq() == 1
    assert [event["seq"] for event in storage.read(1, 100)] == [1, 2, 3]
    assert [event["seq"] for event in storage.read(2, 1)] == [2]
    assert [event["seq"] for event in storage.read(1, 100, through_seq=2)] == [1, 2]
    assert storage.read(4, 100) == []


def test_append_refuses_a_gap_or_a_repeat(storage):
    storage.append([_event(1)])
    with pytest.raises(AssertionError):
        storage.append([_event(3)])
    with pytest.raises(AssertionError):
        storage.append([_event(1)])
    with pytest.raises(AssertionError):
        storage.append([{"seq": 2, "ts_ms": 1, "type": "no-such-type"}])
    assert storage.last_seq == 1


def test_last_seq_survives_reopen(tmp_path):
    path = str(tmp_path / "lmdb")
    first = LmdbStorage(path, 64 * 1024**2)
    first.append([_event(1), _event(2)])
    first.close()
    again = LmdbStorage(path, 64 * 1024**2)
    assert again.last_seq == 2
    again.close()


def test_snapshots_keep_the_newest(storage):
    storage.append([_event(seq) for seq in range(1, 6)])
    for seq in (2, 4, 5):
        storage.save_snapshot({"seq": seq, "marker": seq}, keep=2)
    assert storage.snapshot_seqs() == [4, 5]
    assert storage.latest_snapshot()["marker"] == 5


def test_trim_deletes_only_old_records_covered_by_a_snapshot(storage):
    storage.append([_event(seq, ts_ms=seq * 100) for seq in range(1, 11)])
    assert storage.trim(through_seq=6, before_ts_ms=450, limit=100) == 4  # seq 1..4 are older than 450
    assert storage.first_seq() == 5
    assert storage.trim(through_seq=6, before_ts_ms=10_000, limit=100) == 2  # never beyond seq 6
    assert storage.first_seq() == 7
    assert storage.trim(through_seq=10, before_ts_ms=10_000, limit=100) == 4
    assert storage.first_seq() is None
    assert storage.last_seq == 10


def test_a_full_map_is_a_storage_error_and_writes_nothing(tmp_path):
    small = LmdbStorage(str(tmp_path / "small"), 256 * 1024)
    try:
        events = [_event(seq) | {"reason": "x" * 100} for seq in range(1, 20_001)]
        with pytest.raises(StorageError, match="MapFull"):
            small.append(events)
        assert small.last_seq == 0 and small.read(1, 10) == []
    finally:
        small.close()


async def test_a_failed_commit_is_never_acknowledged(start_server, monkeypatch):
    server = await start_server()
    with trio.fail_after(10):
        async with open_trio_client(server.host, server.port) as client:
            before = await client.adjust("ok-1", "sku", "w", 5, "receipt")
            storage = server.engine.storage

            def disk_full(first_seq, last_seq, data):
                raise StorageError("write-ahead log commit failed: No space left on device")

            monkeypatch.setattr(storage, "append_entry", disk_full)
            with pytest.raises(ServerError) as failed:
                await client.adjust("lost-1", "sku", "w", 3, "receipt")
            assert failed.value.code == "internal"
            assert "could not be made durable" in failed.value.message
            # From now on every change is refused: memory is ahead of the disk.
            with pytest.raises(ServerError) as refused:
                await client.reserve("r", [("sku", "w", 1)])
            assert refused.value.code == "internal"
            assert "write-ahead log stopped" in refused.value.message
            # A read that would show the change that never became durable is refused too ...
            with pytest.raises(ServerError) as refused:
                await client.get("sku", "w")
            assert refused.value.code == "internal" and "could not be made durable" in refused.value.message
            # ... and one of durable state is answered.
            assert (await client.get("never-touched", "w"))["on_hand"] == 0
            assert server.engine.wal.durable_seq == before["seq"]


def test_read_only_storage_reads_what_a_writer_wrote_and_never_creates_one(tmp_path):
    path = str(tmp_path / "lmdb")
    with pytest.raises(FileNotFoundError):
        LmdbStorage(path, 0, read_only=True)
    writer = LmdbStorage(path, 64 * 1024**2)
    writer.append([_event(1), _event(2)])
    writer.save_snapshot({"seq": 2, "format": 3, "stocks": [], "reservations": [], "keys": []})
    writer.close()
    reader = LmdbStorage(path, 0, read_only=True)
    try:
        assert reader.last_seq == 2 and reader.first_seq() == 1
        assert [event["seq"] for event in reader.read(1, 10)] == [1, 2]
        assert reader.snapshot_at(2)["seq"] == 2 and reader.snapshot_at(1) is None
        assert [seq for seq, _ in reader.snapshot_sizes()] == [2] and reader.snapshot_sizes()[0][1] > 0
        assert reader.stats()["map_size_bytes"] == 64 * 1024**2  # the writer's map, not resized
    finally:
        reader.close()


def test_append_entries_copies_many_entries_in_order_and_refuses_a_gap(storage):
    storage.append_entries([[_event(1), _event(2)], [_event(3)]])
    assert storage.last_seq == 3
    assert [event["seq"] for event in storage.read(1, 10)] == [1, 2, 3]
    with pytest.raises(AssertionError):
        storage.append_entries([[_event(5)]])
    assert storage.last_seq == 3


def test_an_empty_storage_can_continue_after_a_seq(storage):
    storage.continue_after(10)
    storage.append([_event(11)])
    assert storage.first_seq() == 11 and storage.last_seq == 11
    with pytest.raises(AssertionError):
        storage.continue_after(20)


def _mapped_bytes(path: str) -> int:
    """Resident bytes of this process's mappings of the LMDB data file in `path` (smaps)."""
    data_file = os.path.realpath(os.path.join(path, "data.mdb"))
    mapped_kib, in_data_file, found = 0, False, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5 and ":" in fields[3]:  # a mapping's header line
                in_data_file = len(fields) >= 6 and fields[5] == data_file
                found = found or in_data_file
            elif in_data_file and fields[0] == "Rss:":
                mapped_kib += int(fields[1])
    assert found, f"{data_file} is not mapped"
    return mapped_kib * 1024


def _big_events(first_seq: int, count: int, size_bytes: int) -> list[dict]:
    return [{**_event(seq), "reason": "x" * size_bytes} for seq in range(first_seq, first_seq + count)]


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="reads Linux's /proc/self/smaps")
def test_the_map_pages_a_process_read_are_released(tmp_path):
    path = str(tmp_path / "lmdb")
    storage = LmdbStorage(path, 64 * 1024**2, map_release_after_bytes=1024**3)  # never on its own here
    try:
        for first_seq in range(1, 81):
            storage.append(_big_events(first_seq, 1, 100_000))
        assert len(storage.read(1, 100)) == 80  # reads every page through the map
        assert _mapped_bytes(path) >= 7 * 1024**2  # 80 entries of ~100 KB
        storage.release_map_pages()
        assert _mapped_bytes(path) < 1024**2
        assert [event["seq"] for event in storage.read(79, 10)] == [79, 80]  # the map reads on
    finally:
        storage.close()


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="reads Linux's /proc/self/smaps")
def test_commits_release_the_map_pages_every_so_many_bytes(tmp_path):
    path = str(tmp_path / "lmdb")
    storage = LmdbStorage(path, 64 * 1024**2, map_release_after_bytes=1024**2)
    try:
        for first_seq in range(1, 81):  # ~8 MB of log, one entry of ~100 KB per commit
            storage.append(_big_events(first_seq, 1, 100_000))
        assert storage.map_releases == 7
        # Every commit reads the B-tree's last pages, and the kernel maps in their neighbours,
        # the pages just written: what is mapped now is at most what was written since the last
        # release, and the pages around the few the commits read.
        assert _mapped_bytes(path) < 2 * 1024**2
        assert [event["seq"] for event in storage.read(1, 100)] == list(range(1, 81))
    finally:
        storage.close()


def test_a_damaged_snapshot_file_is_skipped_for_the_one_before_it(storage):
    storage.append([_event(seq) for seq in range(1, 6)])
    for seq in (3, 5):
        storage.save_snapshot({"seq": seq, "format": 3, "stocks": [], "reservations": [], "keys": []}, keep=2)
    newest = os.path.join(storage.path, "snapshots", file_name(5))
    with open(newest, "r+b") as file:
        file.seek(-3, os.SEEK_END)
        file.write(b"\xff\xff\xff")  # a flipped byte on disk: the checksum no longer matches
    assert storage.snapshot_seqs() == [3, 5]
    assert storage.latest_snapshot()["seq"] == 3
    head, _ = storage.latest_snapshot_sections()
    assert head == {"seq": 3, "format": 3}
    with pytest.raises(SnapshotFileDamaged):
        storage.snapshot_at(5)


def _state_with(stocks: int, reservations: int) -> State:
    state = State()
    seq = 0
    for number in range(stocks):
        seq += 1
        apply_event(state, {"seq": seq, "ts_ms": seq, "type": "adjusted", "key": f"k{number}", "sku": f"s{number}", "loc": "l", "delta": 5, "reason": "receipt"})
    for number in range(reservations):
        seq += 1
        lines = [{"sku": f"s{number % stocks}", "loc": "l", "qty": 1}]
        apply_event(state, {"seq": seq, "ts_ms": seq, "type": "reserved", "rid": f"r{number}", "lines": lines, "ttl_ms": 1000, "expires_at_ms": None, "ref": None})
    return state


@pytest.mark.parametrize("items_per_piece", [1, 3, 16, 8192])
def test_a_snapshot_packed_in_pieces_is_byte_for_byte_the_one_packed_whole(monkeypatch, items_per_piece):
    monkeypatch.setattr(engine.snapshot_files, "ITEMS_PER_PIECE", items_per_piece)
    state = _state_with(40, 70_000)  # arrays under 16 items, under 65,536 and over: each msgpack array header size
    whole = msgpack.packb(state.to_snapshot(), use_bin_type=True)
    assert b"".join(packed_pieces(state.to_snapshot_arrays())) == whole
    assert b"".join(packed_pieces(state.to_snapshot())) == whole
    assert b"".join(packed_pieces({"format": 3, "seq": 0, "stocks": [], "reservations": [], "keys": []})) == msgpack.packb(
        {"format": 3, "seq": 0, "stocks": [], "reservations": [], "keys": []}, use_bin_type=True)


def test_a_snapshot_written_in_pieces_reads_back_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(engine.snapshot_files, "WRITE_CHUNK_BYTES", 4096)  # many synced pieces
    state = _state_with(300, 2000)
    files = SnapshotFiles(str(tmp_path / "snapshots"))
    size_bytes = files.write(state.to_snapshot_arrays())
    assert size_bytes == os.path.getsize(tmp_path / "snapshots" / file_name(state.seq)) > 10 * 4096
    assert files.read(state.seq) == msgpack.unpackb(msgpack.packb(state.to_snapshot(), use_bin_type=True), raw=False, strict_map_key=False)
    assert State.from_snapshot(files.read(state.seq)).to_snapshot() == state.to_snapshot()
    assert os.listdir(tmp_path / "snapshots") == [file_name(state.seq)]  # no partial file left


def test_a_snapshot_file_read_a_record_at_a_time_holds_what_it_holds_whole(storage, monkeypatch):
    monkeypatch.setattr("engine.snapshot_files.READ_CHUNK_BYTES", 1000)  # many pieces, records across them
    state = State()
    for index in range(300):
        apply(state, Adjust(f"k{index}", f"SKU-{index // 3}", f"L{index % 3}", index + 1, "receipt"), 1_700_000_000_000 + index)
    apply(state, Reserve("r1", (Line("SKU-1", "L1", 2),)), 1_700_000_001_000)
    storage.append([_event(seq) for seq in range(1, state.seq + 1)])
    storage.save_snapshot(state.to_snapshot())
    whole = storage.latest_snapshot()
    head, sections = storage.latest_snapshot_sections()
    assert head == {"format": whole["format"], "seq": whole["seq"]}
    assert [(name, list(records)) for name, records in sections] == [(name, whole[name]) for name in ("stocks", "reservations", "keys")]
    assert State.from_snapshot_sections(*storage.latest_snapshot_sections()).to_snapshot() == state.to_snapshot()
    # A section left before its end is read to its end before the next one starts.
    _, sections = storage.latest_snapshot_sections()
    seen = [(name, next(iter(records))) for name, records in sections]
    assert seen == [(name, whole[name][0]) for name in ("stocks", "reservations", "keys")]
    assert storage.latest_snapshot_sections(through_seq=state.seq - 1) is None


def test_snapshots_stored_in_lmdb_by_earlier_versions_are_read_listed_and_pruned(storage):
    storage.append([_event(seq) for seq in range(1, 6)])
    old = {"seq": 2, "format": 3, "stocks": [], "reservations": [], "keys": []}
    with storage._env.begin(write=True, db=storage._snapshots) as txn:  # as earlier versions wrote it
        txn.put((2).to_bytes(8, "big"), msgpack.packb(old, use_bin_type=True))
    assert storage.snapshot_seqs() == [2] and storage.latest_snapshot() == old
    head, sections = storage.latest_snapshot_sections()
    assert head["seq"] == 2 and [(name, list(records)) for name, records in sections] == [("stocks", []), ("reservations", []), ("keys", [])]
    storage.save_snapshot({**old, "seq": 4}, keep=1)
    assert storage.snapshot_seqs() == [4] and storage.snapshot_at(2) is None


async def test_snapshots_built_on_the_loop_or_by_a_builder_process_hold_the_same_state(start_server):
    with trio.fail_after(30):
        for builder in ("loop", "process"):
            server = await start_server(snapshot_builder=builder)
            async with open_trio_client(server.host, server.port) as client:
                for number in range(50):
                    await client.adjust(f"{builder}-{number}", f"sku-{number % 7}", "w", 3, "receipt")
                await client.reserve(f"{builder}-r", [("sku-1", "w", 2)])
                seq = (await client.snapshot())["seq"]
            assert seq == server.engine.state.seq
            snapshot = server.engine.storage.snapshot_at(seq)
            assert snapshot == msgpack.unpackb(msgpack.packb(server.engine.state.to_snapshot(), use_bin_type=True), raw=False, strict_map_key=False)
            assert server.engine.snapshots.stats()["builds"] == 1
            await server.aclose()

"""`verify`: replay the retained log and compare it with every snapshot and with a restart.

1. Replay starts from the oldest start the log continues from: the empty state when the log is
   retained from seq 1 (a full replay), else the oldest snapshot the log continues.
2. At each later snapshot's seq the replayed state is compared with that snapshot.
3. At the end of the log the replayed state is compared with what a restart would recover
   (the latest snapshot plus the log after it), and its invariants are checked.
Stocks, reservations and keys (the idempotency memory) are compared field by field; every
difference is printed. Exit status 1 on any difference, on a snapshot that breaks an invariant,
or on a log that cannot be replayed.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from ..core import KeyRecord, Reservation, State, check_invariants
from ..core.state import SNAPSHOT_FORMAT, key_record_from_format_3
from .commands import FAILED, OK, Command, Session
from .data_folder import DataFolder, ReplayBase, ShellError

DIFFERENCES_SHOWN_MAX = 10_000  # every difference, up to a bound a terminal can still take


@dataclass(frozen=True)
class Contents:
    """A state's comparable contents, taken from a snapshot's data without trusting it."""

    seq: int
    stocks: dict[tuple[str, str], tuple[int, int, int]]  # (sku, loc) -> (on_hand, reserved, last_seq)
    reservations: dict[str, tuple]  # rid -> flat record
    keys: dict[str, bytes]  # key -> packed KeyRecord


def contents_of_snapshot(snapshot: dict[str, Any]) -> Contents:
    """The contents a snapshot holds, as stored (formats 3 and 4 read raw, format 3's key records
    repacked as now; older formats converted)."""
    if snapshot.get("format") not in (3, SNAPSHOT_FORMAT):
        return contents_of_state(State.from_snapshot(snapshot))
    keys = dict(snapshot["keys"])
    if snapshot["format"] == 3:
        keys = {key: _repacked_format_3(data) for key, data in keys.items()}
    return Contents(
        snapshot["seq"],
        {(sku, loc): (on_hand, reserved, last_seq) for sku, loc, on_hand, reserved, last_seq in snapshot["stocks"]},
        {record[0]: tuple(record) for record in snapshot["reservations"]},
        keys,
    )


def _repacked_format_3(data: Any) -> Any:
    try:
        return key_record_from_format_3(data)
    except Exception:  # a corrupted record: compared as stored  # noqa: BLE001
        return data


def contents_of_state(state: State) -> Contents:
    return contents_of_snapshot(state.to_snapshot())


_STOCK_FIELDS = ("on_hand", "reserved", "last_seq")


def differences(left_name: str, left: Contents, right_name: str, right: Contents) -> list[tuple[str, str, str, Any, Any]]:
    """Every difference between two contents, as `(what, name, field, left value, right value)`;
    a value of None means absent on that side."""
    found: list[tuple[str, str, str, Any, Any]] = []
    if left.seq != right.seq:
        found.append(("state", "-", "seq", left.seq, right.seq))
    kinds = (
        ("stock", left.stocks, right.stocks, _stock),
        ("reservation", left.reservations, right.reservations, _reservation),
        ("key", left.keys, right.keys, _key_record),
    )
    for what, mine_by_name, theirs_by_name, as_fields in kinds:
        for record_name in sorted(mine_by_name.keys() | theirs_by_name.keys()):
            mine, theirs = mine_by_name.get(record_name), theirs_by_name.get(record_name)
            if mine == theirs:
                continue
            name = f"{record_name[0]} @ {record_name[1]}" if what == "stock" else record_name
            if mine is None or theirs is None:
                found.append((what, name, "(present)", mine is not None, theirs is not None))
                continue
            found.extend((what, name, field_name, a, b) for field_name, a, b in _field_differences(as_fields(mine), as_fields(theirs)))
    return found


def _stock(figures: tuple) -> dict[str, Any]:
    return dict(zip(_STOCK_FIELDS, figures))


def _reservation(record: tuple) -> dict[str, Any]:
    try:
        return Reservation.from_record(record)._asdict()
    except (ValueError, TypeError, IndexError):
        return {"record": record}


def _key_record(data: bytes) -> dict[str, Any]:
    try:
        record = KeyRecord.unpack(data)._asdict()
        record["fingerprint"] = record["fingerprint"].hex()
        return record
    except Exception:  # a corrupted record: compare the bytes  # noqa: BLE001
        return {"packed": data.hex() if isinstance(data, bytes) else repr(data)}


def _field_differences(left: dict[str, Any], right: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    names = list(left) + [name for name in right if name not in left]  # in field order
    return [(name, left.get(name), right.get(name)) for name in names if left.get(name) != right.get(name)]


class Verification:
    """The comparisons of one `verify` run and what they found."""

    def __init__(self) -> None:
        self.compared: list[tuple[str, str, int]] = []  # (replayed, compared with, differences)
        self.rows: list[tuple[int, str, str, str, Any, Any]] = []  # (seq, what, name, field, replay, other)
        self.problems: list[str] = []

    def compare(self, seq: int, replayed: Contents, other_name: str, other: Contents, replay_name: str) -> None:
        found = differences("replay", replayed, other_name, other)
        self.compared.append((replay_name, other_name, len(found)))
        self.rows.extend((seq, what, name, field_name, a, b) for what, name, field_name, a, b in found)


def _arguments(parser: argparse.ArgumentParser) -> None:
    pass


def _run(session: Session, arguments: argparse.Namespace) -> int:
    verification = Verification()
    with session.data_folder() as folder:
        _verify(session, folder, verification)
    printer = session.printer
    printer.table(("replayed", "compared with", "differences"), verification.compared, title="comparisons")
    if not verification.compared:
        printer.line("no later snapshot to compare with: only the replay itself and its invariants were checked")
    if verification.rows:
        shown = verification.rows[:DIFFERENCES_SHOWN_MAX]
        printer.table(("seq", "what", "name", "field", "replay", "other"), shown, title="differences")
        if len(verification.rows) > len(shown):
            printer.note(f"({len(verification.rows) - len(shown)} more differences not shown)")
    for problem in verification.problems:
        printer.line(f"problem: {problem}")
    failed = bool(verification.rows or verification.problems)
    printer.line(
        f"verify: {'FAILED' if failed else 'ok'}: {len(verification.rows)} differences, {len(verification.problems)} other problems"
    )
    return FAILED if failed else OK


def _verify(session: Session, folder: DataFolder, verification: Verification) -> None:
    last_seq = folder.last_seq
    snapshot_seqs = folder.storage.snapshot_seqs()
    snapshots: dict[int, Contents] = {}
    for seq in snapshot_seqs:
        snapshot = folder.storage.snapshot_at(seq)
        if snapshot is None:
            continue
        try:
            State.from_snapshot(snapshot)  # its own checks: invariants, record shapes
        except (AssertionError, ValueError, KeyError, TypeError) as error:
            verification.problems.append(f"the snapshot at seq {seq} is not a valid state: {error}")
        try:
            snapshots[seq] = contents_of_snapshot(snapshot)
        except (AssertionError, ValueError, KeyError, TypeError) as error:
            verification.problems.append(f"the snapshot at seq {seq} cannot be read: {error}")
    bases = folder.replay_bases(last_seq)
    bases = [base for base in bases if base.snapshot_seq == 0 or base.snapshot_seq in snapshots]
    if not bases:
        verification.problems.append(f"nothing to replay from: the log starts at seq {folder.first_seq()} and no snapshot covers what came before")
        return
    base = bases[0]
    if base.snapshot_seq != 0:
        session.printer.note(
            f"the log is retained from seq {folder.first_seq()}: no full replay is possible; replaying from {base.description}"
        )
    replay_name = f"replay from {'seq 0' if base.snapshot_seq == 0 else f'snapshot {base.snapshot_seq}'}"
    state = _replay_state(session, folder, base, last_seq, snapshots, verification, replay_name)
    if state is None:
        return
    try:
        check_invariants(state)
    except AssertionError as error:
        verification.problems.append(f"the replayed state at seq {state.seq} breaks an invariant: {error}")
    latest = max(snapshots) if snapshots else None
    if latest is not None and latest != base.snapshot_seq:
        restart = _restart_state(folder, latest, verification)
        if restart is not None:
            verification.compare(last_seq, contents_of_state(state), f"restart (snapshot {latest} + log to {last_seq})",
                                 contents_of_state(restart), f"{replay_name} to {last_seq}")


def _replay_state(session: Session, folder: DataFolder, base: ReplayBase, last_seq: int, snapshots: dict[int, Contents],
                  verification: Verification, replay_name: str) -> State | None:
    try:
        state = folder.base_state(base)
    except (AssertionError, ValueError, ShellError) as error:
        verification.problems.append(f"cannot start from {base.description}: {error}")
        return None
    progress = session.progress("verify", last_seq - state.seq)

    def at_snapshots(event: dict, state_after: State) -> None:
        seq = event["seq"]
        if seq in snapshots:
            verification.compare(seq, contents_of_state(state_after), f"snapshot {seq}", snapshots[seq], f"{replay_name} to {seq}")

    try:
        folder.replay(state, last_seq, on_event=at_snapshots, on_progress=progress.advance)
    except (AssertionError, ShellError, KeyError, TypeError) as error:
        verification.problems.append(f"the log cannot be replayed past seq {state.seq}: {error}")
        return None
    finally:
        progress.finish()
    return state


def _restart_state(folder: DataFolder, latest: int, verification: Verification) -> State | None:
    """What a restart recovers: the latest snapshot, then the log after it."""
    try:
        state = folder.base_state(ReplayBase(latest))
        return folder.replay(state, folder.last_seq)
    except (AssertionError, ValueError, ShellError, KeyError, TypeError) as error:
        verification.problems.append(f"a restart from the snapshot at seq {latest} fails: {error}")
        return None


COMMANDS = [
    Command(
        "verify", "replay the retained log and compare it with every snapshot and with a restart", "offline", _arguments, _run,
        details=(
            "From the empty state when the log is retained from seq 1 (a full replay), else from the oldest snapshot\n"
            "the log continues. Compares stocks, reservations and keys at each snapshot's seq, and at the end against\n"
            "the latest snapshot plus the log after it (what a restart recovers). Prints every difference; exit status 1\n"
            "on any."
        ),
    ),
]

"""A field-rep app for tests/test_offline_client.py, run as a child process so it can be SIGKILLed.

    python tests/offline_app.py OUTBOX PORT --orders 200 --seed 5   # queue 200 reserves, drain, exit
    python tests/offline_app.py OUTBOX PORT                         # restart: drain what is queued, exit

Order `n` is `reserve` rid `order-n` of `qty` 1 to 3 (from the seed) of one of two SKU-locations.
Prints (flushed) `submitted N` once every order is queued, then one JSON line per outcome its
callback hears, and `drained` when nothing is pending. Exits 0 when drained, 1 after
`--deadline-seconds`.

`--record-delay-seconds D` sleeps before each outcome is recorded (a test-only patch of this
process's `OutboxStore.record_outcome`), so that a kill most likely lands after the server
applied a request and before its reply was recorded: the case a restart must answer with
`duplicate: true`.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from protocol import OfflineClient, Outcome, OutboxStore  # noqa: E402

STOCKS = (("sku-red", "van-1"), ("sku-blue", "van-1"))


def order_lines(orders: int, seed: int) -> list[tuple[str, str, int]]:
    """The one line of each order, the same for every run with the same seed."""
    chooser = random.Random(seed)
    return [(*chooser.choice(STOCKS), chooser.randint(1, 3)) for _ in range(orders)]


def _slow_down_records(delay_seconds: float) -> None:
    record_outcome = OutboxStore.record_outcome

    def delayed_record_outcome(self, *args, **kwargs):
        time.sleep(delay_seconds)
        return record_outcome(self, *args, **kwargs)

    OutboxStore.record_outcome = delayed_record_outcome


def _print_outcome(outcome: Outcome) -> None:
    print(json.dumps({"local_id": outcome.local_id, "rid": outcome.idempotency_id, "status": outcome.status, "duplicate": outcome.duplicate}), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("outbox")
    parser.add_argument("port", type=int)
    parser.add_argument("--orders", type=int, default=0, help="queue this many orders first (0: only drain)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--record-delay-seconds", type=float, default=0.0)
    parser.add_argument("--deadline-seconds", type=float, default=60.0)
    args = parser.parse_args()
    if args.record_delay_seconds > 0:
        _slow_down_records(args.record_delay_seconds)
    with OfflineClient(
        args.outbox, "127.0.0.1", args.port, client_name="offline-app", on_outcome=_print_outcome,
        reply_timeout_seconds=5.0, reconnect_delay_max_seconds=0.2,
    ) as client:
        for number, line in enumerate(order_lines(args.orders, args.seed)):
            client.reserve(f"order-{number}", [line], ref=f"SO-{number}")
        print(f"submitted {args.orders}", flush=True)
        if not client.wait_until_drained(args.deadline_seconds):
            print(f"not drained after {args.deadline_seconds} s: {client.pending_count()} pending, last error {client.last_error}", flush=True)
            return 1
    print("drained", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

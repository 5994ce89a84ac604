"""The pure core: state, events, and `apply`. No trio, no LMDB, no sockets, no clock.

Imports only `protocol`'s command types (plain data) — the commands a client sends are the
commands the core decides on, so they are defined once, next to their validation.
"""

from .decide import CORE_COMMANDS, Expire, Forget, Reply, apply
from .events import EVENT_TYPES, Event, apply_event, check_event
from .state import (
    COMMITTED,
    EXPIRED,
    HELD,
    RELEASED,
    RECORD_STATE,
    KeyRecord,
    Reservation,
    SnapshotArray,
    State,
    Stock,
    StockKey,
    check_invariants,
    count_held,
    held_by_stock,
)

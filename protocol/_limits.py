"""Named bounds of wire protocol v1 (see docs/PROTOCOL.md and ../shared/PROTOCOL.md).

Every size a peer controls has a limit here, so that what happens at the limit is designed:
a frame over `MAX_FRAME_BYTES` closes the connection, a field over its bound is `bad_request`.
"""

PROTOCOL_VERSION = 1
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7440

# The contract's default; the server may be configured lower or higher.
MAX_FRAME_BYTES = 1024 * 1024
FRAME_HEADER_BYTES = 4

# Strings are measured in UTF-8 bytes, as the contract says.
NAME_BYTES_MAX = 128  # sku, loc, rid, key
REF_BYTES_MAX = 256
REASON_BYTES_MAX = 128
CLIENT_NAME_BYTES_MAX = 128
TOKEN_BYTES_MAX = 1024

LINES_PER_RESERVATION_MAX = 100
# Lines of one batch `count` or `adjust` (`lines` instead of `sku`/`loc`). Bound by the reply: a
# batch reply lists every line with its figures, and must fit in the contract's default frame
# (1 MiB) whatever the names are. Its worst line is 341 bytes of msgpack (128-byte `sku` and
# `loc`, the field names, four integers of 9 bytes), and 3,000 x 341 = 1,023,000 bytes leaves
# room for the envelope (tests/test_batch.py packs that worst reply). It also bounds the work of
# one step of the event loop (a few ms per 1,000 lines) and one log record (~1 MB at worst).
# 1M SKU-locations are 334 batches.
LINES_PER_BATCH_MAX = 3_000

QTY_MAX = 2**31 - 1
# Adjustments and counts use the same magnitude bound as line quantities, so that on_hand
# stays far from int64 overflow for any realistic number of changes.
DELTA_MAX = QTY_MAX
ON_HAND_MAX = QTY_MAX
# A TTL of more than a year is almost certainly a unit mistake (seconds vs ms scale is fine).
TTL_MS_MAX = 366 * 24 * 3600 * 1000
REQUEST_ID_MAX = 2**64 - 1
SEQ_MAX = 2**63 - 1

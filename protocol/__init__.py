"""Wire protocol v1 of the inventory reservation engine.

Sans-IO core (`ServerProtocol`, `ClientProtocol`, typed commands, error codes) plus two pipelining
clients built on it: `Client` (blocking sockets) and `TrioClient` (trio); and `OfflineClient`, which
queues mutating requests in a durable SQLite outbox (`OutboxStore`) and sends them when it can.
The tools that connect to a server share their token and TLS options (`add_connect_arguments`).
"""

from ._commands import (
    MUTATING_COMMANDS,
    OPS,
    Adjust,
    AdjustBatch,
    Command,
    Commit,
    Count,
    CountBatch,
    Extend,
    Get,
    Hello,
    Line,
    Lookup,
    Ping,
    Query,
    Release,
    Reserve,
    Snapshot,
    Stats,
    StockLine,
    Transfer,
    Watch,
    parse_request,
    read_request_id,
)
from ._connection import (
    ClientProtocol,
    RequestReceived,
    RequestRejected,
    ServerEvent,
    ServerProtocol,
    pack,
)
from ._errors import (
    ERROR_CODES,
    ConnectionClosed,
    ProtocolViolation,
    RequestError,
    ServerError,
    error_reply,
)
from ._framing import FrameDecoder, FrameTooLarge, frame
from ._limits import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    LINES_PER_BATCH_MAX,
    LINES_PER_RESERVATION_MAX,
    MAX_FRAME_BYTES,
    NAME_BYTES_MAX,
    PROTOCOL_VERSION,
    QTY_MAX,
    REF_BYTES_MAX,
)
from . import _errors as codes
from . import _requests as requests
from ._tls import TlsOptions, TlsOptionsError, client_ssl_context
from ._connect_options import (
    TOKEN_ENVIRONMENT_VARIABLE,
    ConnectOptions,
    ConnectOptionsError,
    add_connect_arguments,
    connect_options,
    parse_address,
    tls_refusal,
)
from .client import Client
from .trio_client import TrioClient, open_trio_client
from ._outbox_requests import InvalidOutboxRequest
from .outbox_store import Outcome, OutboxFull, OutboxStore, UnknownEntry
from .offline_client import DrainerFailed, OfflineClient, OutboxInUse

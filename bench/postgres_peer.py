"""PostgreSQL as a peer: the same reservation semantics in SQL, over a minimal wire client.

The generator talks the PostgreSQL v3 protocol itself, on a trio stream (no driver, no thread per
connection): startup with trust authentication, every statement `Parse`d once per connection,
then per request `Bind`/`Execute`/`Sync` pipelined. Each `Sync` ends one implicit transaction,
committed with `synchronous_commit=on` (the WAL is flushed before the reply, group commit across
backends), and answers with one `ReadyForQuery`: replies are matched in order.

- single-line reserve: ONE statement; granted iff it returns a row (the `UPDATE` checks
  `on_hand - reserved >= qty`; `CHECK (reserved <= on_hand)` backs it up). A repeated rid fails
  the `INSERT` on the primary key, which rolls the whole statement back: nothing changes.
- multi-line reserve: `reserve_lines()` (PL/pgSQL), all or nothing: a short line raises
  (SQLSTATE P0001), which undoes the lines already held. Lines come sorted, so rows are locked
  in one order everywhere (no deadlocks).
- single-line release: ONE statement; release/commit of any reservation: `close_reservation()`.
- adjust: idempotent by key (`adjustments` table), ONE statement.
"""

from __future__ import annotations

import struct

import trio

from bench.workloads import ERROR, OK, REFUSED

SCHEMA = """
CREATE TABLE IF NOT EXISTS stock (
    sku text NOT NULL, loc text NOT NULL,
    on_hand bigint NOT NULL, reserved bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (sku, loc), CHECK (reserved <= on_hand), CHECK (reserved >= 0));
CREATE TABLE IF NOT EXISTS reservations (
    rid text PRIMARY KEY, state text NOT NULL,
    skus text[] NOT NULL, locs text[] NOT NULL, qtys bigint[] NOT NULL);
CREATE TABLE IF NOT EXISTS adjustments (key text PRIMARY KEY);

CREATE OR REPLACE FUNCTION reserve_lines(p_rid text, p_skus text[], p_locs text[], p_qtys bigint[]) RETURNS int AS $$
DECLARE i int;
BEGIN
  IF EXISTS (SELECT 1 FROM reservations WHERE rid = p_rid) THEN RETURN 2; END IF;
  FOR i IN 1 .. cardinality(p_skus) LOOP
    UPDATE stock SET reserved = reserved + p_qtys[i]
     WHERE sku = p_skus[i] AND loc = p_locs[i] AND on_hand - reserved >= p_qtys[i];
    IF NOT FOUND THEN
      RAISE EXCEPTION 'insufficient: % %', p_skus[i], p_locs[i] USING ERRCODE = 'P0001';
    END IF;
  END LOOP;
  INSERT INTO reservations (rid, state, skus, locs, qtys) VALUES (p_rid, 'held', p_skus, p_locs, p_qtys);
  RETURN 1;
END $$ LANGUAGE plpgsql;

CREATE OR REPLACE FUNCTION close_reservation(p_rid text, p_state text) RETURNS int AS $$
DECLARE r reservations%ROWTYPE; i int;
BEGIN
  SELECT * INTO r FROM reservations WHERE rid = p_rid FOR UPDATE;
  IF NOT FOUND THEN RETURN -1; END IF;
  IF r.state = p_state THEN RETURN 2; END IF;
  IF r.state <> 'held' THEN RETURN -2; END IF;
  FOR i IN 1 .. cardinality(r.skus) LOOP
    IF p_state = 'committed' THEN
      UPDATE stock SET reserved = reserved - r.qtys[i], on_hand = on_hand - r.qtys[i]
       WHERE sku = r.skus[i] AND loc = r.locs[i];
    ELSE
      UPDATE stock SET reserved = reserved - r.qtys[i] WHERE sku = r.skus[i] AND loc = r.locs[i];
    END IF;
  END LOOP;
  UPDATE reservations SET state = p_state WHERE rid = p_rid;
  RETURN 1;
END $$ LANGUAGE plpgsql;
"""

STATEMENTS = {
    b"reserve1": (
        "WITH s AS (UPDATE stock SET reserved = reserved + $3::bigint"
        " WHERE sku = $1 AND loc = $2 AND on_hand - reserved >= $3::bigint RETURNING 1)"
        " INSERT INTO reservations (rid, state, skus, locs, qtys)"
        " SELECT $4, 'held', ARRAY[$1::text], ARRAY[$2::text], ARRAY[$3::bigint] FROM s RETURNING rid"
    ),
    b"reserveN": "SELECT reserve_lines($1, $2::text[], $3::text[], $4::bigint[])",
    b"release1": (
        "WITH r AS (UPDATE reservations SET state = 'released' WHERE rid = $1 AND state = 'held'"
        " RETURNING skus[1] AS sku, locs[1] AS loc, qtys[1] AS qty)"
        " UPDATE stock SET reserved = stock.reserved - r.qty FROM r"
        " WHERE stock.sku = r.sku AND stock.loc = r.loc RETURNING 1"
    ),
    b"close": "SELECT close_reservation($1, $2)",
    b"adjust": (
        "WITH a AS (INSERT INTO adjustments (key) VALUES ($1) ON CONFLICT DO NOTHING RETURNING 1)"
        " INSERT INTO stock (sku, loc, on_hand, reserved) SELECT $2, $3, $4::bigint, 0 FROM a"
        " ON CONFLICT (sku, loc) DO UPDATE SET on_hand = stock.on_hand + excluded.on_hand RETURNING on_hand"
    ),
    b"get": "SELECT on_hand, reserved FROM stock WHERE sku = $1 AND loc = $2",
}

USER = "postgres"
DATABASE = "postgres"
PROTOCOL_VERSION = 196608  # 3.0
_INT32 = struct.Struct(">i")
_INT16 = struct.Struct(">h")
_EXECUTE_SYNC = b"E" + _INT32.pack(9) + b"\x00" + _INT32.pack(0) + b"S" + _INT32.pack(4)

# Reply kinds: how the rows (or error) of one request read.
_RESERVE_ROWS, _RESERVE_CALL, _RELEASE_ROWS, _CLOSE_CALL, _ADJUST, _ROWS = range(6)


def message(kind: bytes, body: bytes) -> bytes:
    return kind + _INT32.pack(len(body) + 4) + body


def startup_message(user: str = USER, database: str = DATABASE) -> bytes:
    body = _INT32.pack(PROTOCOL_VERSION) + b"user\x00" + user.encode() + b"\x00database\x00" + database.encode() + b"\x00\x00"
    return _INT32.pack(len(body) + 4) + body


def parse_message(name: bytes, query: str) -> bytes:
    return message(b"P", name + b"\x00" + query.encode() + b"\x00" + _INT16.pack(0))


def query_message(sql: str) -> bytes:
    return message(b"Q", sql.encode() + b"\x00")


def _bind_head(name: bytes, count: int) -> bytes:
    # portal "", statement name, 0 parameter format codes (all text), parameter count
    return b"\x00" + name + b"\x00" + _INT16.pack(0) + _INT16.pack(count)


def _array_literal(values) -> bytes:
    return b"{" + b",".join(b'"' + value + b'"' for value in values) + b"}"


def _error_fields(body: bytes) -> dict[str, str]:
    fields = {}
    for part in body.split(b"\x00"):
        if part:
            fields[chr(part[0])] = part[1:].decode(errors="replace")
    return fields


class PostgresError(Exception):
    pass


class PostgresDriver:
    """One backend connection. Replies are matched in order: one `ReadyForQuery` per request."""

    def __init__(self, keys: list[tuple[str, str]], shared: dict | None = None) -> None:
        shared = {} if shared is None else shared
        self.keys = keys
        if "postgres_keys" not in shared:
            shared["postgres_keys"] = [(sku.encode(), loc.encode()) for sku, loc in keys]
        self.key_params = shared["postgres_keys"]
        self.pending: list = []
        self.pending_head = 0
        self.buffer = bytearray()
        self.rows: list = []
        self.error: dict | None = None
        self.heads = {name: _bind_head(name, count) for name, count in
                      ((b"reserve1", 4), (b"reserveN", 4), (b"release1", 1), (b"close", 2), (b"adjust", 4), (b"get", 2))}

    async def connect(self, host: str, port: int, prepare: bool = True) -> trio.SocketStream:
        """Open, start up, and (unless `prepare` is false: before the schema exists) Parse every statement."""
        stream = await trio.open_tcp_stream(host, port)
        try:
            await stream.send_all(startup_message())
            await self._until_ready(stream)
            if prepare:
                await stream.send_all(b"".join(parse_message(name, sql) for name, sql in STATEMENTS.items()) + message(b"S", b""))
                await self._until_ready(stream)
        except BaseException:
            await stream.aclose()
            raise
        return stream

    async def _until_ready(self, stream: trio.SocketStream) -> None:
        """Read until ReadyForQuery (startup, Parse, simple query); raise on an ErrorResponse."""
        self.pending.append((None, _ROWS))
        while True:
            data = await stream.receive_some(1 << 16)
            if not data:
                raise ConnectionError("postgres closed the connection")
            for _, status, detail in self.feed(data):
                if status != OK:
                    raise PostgresError(detail)
                return

    async def execute(self, stream: trio.SocketStream, sql: str) -> None:
        await stream.send_all(query_message(sql))
        await self._until_ready(stream)

    # --- requests -------------------------------------------------------------------------

    def _bind(self, token: object, kind: int, name: bytes, params: tuple) -> bytes:
        self.pending.append((token, kind))
        body = b"".join([self.heads[name]] + [_INT32.pack(len(value)) + value for value in params] + [b"\x00\x00"])
        return b"B" + _INT32.pack(len(body) + 4) + body + _EXECUTE_SYNC

    def reserve(self, token: object, rid: str, lines: tuple, ttl_ms: int) -> bytes:
        if len(lines) == 1:
            index, qty = lines[0]
            sku, loc = self.key_params[index]
            return self._bind(token, _RESERVE_ROWS, b"reserve1", (sku, loc, b"%d" % qty, rid.encode()))
        params = self.key_params
        return self._bind(token, _RESERVE_CALL, b"reserveN", (
            rid.encode(),
            _array_literal(params[index][0] for index, _ in lines),
            _array_literal(params[index][1] for index, _ in lines),
            b"{" + b",".join(b"%d" % qty for _, qty in lines) + b"}",
        ))

    def release(self, token: object, rid: str, lines: tuple) -> bytes:
        if len(lines) == 1:
            return self._bind(token, _RELEASE_ROWS, b"release1", (rid.encode(),))
        return self._bind(token, _CLOSE_CALL, b"close", (rid.encode(), b"released"))

    def commit(self, token: object, rid: str, lines: tuple) -> bytes:
        return self._bind(token, _CLOSE_CALL, b"close", (rid.encode(), b"committed"))

    def adjust(self, token: object, key: str, index: int, delta: int) -> bytes:
        sku, loc = self.key_params[index]
        return self._bind(token, _ADJUST, b"adjust", (key.encode(), sku, loc, b"%d" % delta))

    def get(self, token: object, index: int) -> bytes:
        sku, loc = self.key_params[index]
        return self._bind(token, _ROWS, b"get", (sku, loc))

    # --- replies --------------------------------------------------------------------------

    def feed(self, data: bytes) -> list[tuple[object, int, object]]:
        buffer = self.buffer
        buffer += data
        size = len(buffer)
        offset = 0
        out = []
        unpack = _INT32.unpack_from
        while size - offset >= 5:
            kind = buffer[offset]
            (length,) = unpack(buffer, offset + 1)
            end = offset + 1 + length
            if end > size:
                break
            if kind == 68:  # 'D' DataRow
                self.rows.append(self._row(buffer, offset + 5, end))
            elif kind == 90:  # 'Z' ReadyForQuery: this request is done
                out.append(self._finish())
            elif kind == 69:  # 'E' ErrorResponse
                self.error = _error_fields(bytes(buffer[offset + 5 : end]))
            elif kind == 82:  # 'R' authentication request
                (code,) = unpack(buffer, offset + 5)
                if code != 0:
                    raise PostgresError(f"server asks for authentication method {code}; the bench needs trust")
            # '1' ParseComplete, '2' BindComplete, 'C' CommandComplete, 'S', 'K', 'N', 'n', 'T': nothing to do
            offset = end
        if offset:
            del buffer[:offset]
        return out

    @staticmethod
    def _row(buffer: bytearray, position: int, end: int) -> list:
        (count,) = _INT16.unpack_from(buffer, position)
        position += 2
        values = []
        for _ in range(count):
            (length,) = _INT32.unpack_from(buffer, position)
            position += 4
            if length < 0:
                values.append(None)
            else:
                values.append(bytes(buffer[position : position + length]))
                position += length
        return values

    def _finish(self) -> tuple[object, int, object]:
        token, kind = self.pending[self.pending_head]
        self.pending_head += 1
        if self.pending_head > 4096:
            del self.pending[: self.pending_head]
            self.pending_head = 0
        rows, error = self.rows, self.error
        self.rows = []
        self.error = None
        if error is not None:
            code = error.get("C", "?")
            if code == "P0001" and kind == _RESERVE_CALL:
                return token, REFUSED, code
            return token, ERROR, f"{code} {error.get('M', '')}"[:80]
        if kind == _RESERVE_ROWS:
            return token, (OK if rows else REFUSED), rows
        if kind == _RESERVE_CALL:
            return token, OK, rows
        if kind == _RELEASE_ROWS:
            return (token, OK, rows) if rows else (token, ERROR, "state")
        if kind == _CLOSE_CALL:
            value = int(rows[0][0]) if rows and rows[0][0] is not None else -9
            return (token, OK, value) if value in (1, 2) else (token, ERROR, f"state {value}")
        return token, OK, rows

    @staticmethod
    def stock(detail: list) -> tuple[int, int]:
        if not detail:
            return 0, 0
        return int(detail[0][0]), int(detail[0][1])

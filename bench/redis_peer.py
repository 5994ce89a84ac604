"""Redis as a peer: the same reservation semantics as Lua scripts, called with EVALSHA.

Each SKU-location is a hash `st:{sku}:{loc}` with `on_hand` and `reserved`; each reservation a
hash `rv:{rid}` with `state` and `lines` ("stock-key qty ..."); each adjust key a string
`ad:{key}`. The server runs with `--appendonly yes --appendfsync always`: like the engine, a
reply comes after the change is fsync'd (Redis fsyncs the AOF before replying, once per event
loop iteration: group commit).

- reserve: a repeated rid returns the original result (1); otherwise every line is checked
  (`on_hand - reserved >= qty`) before anything changes (no oversell, all or nothing).
- release / commit: 1 when done, 2 when already in that state (duplicate), -1 unknown rid,
  -2 other closed state.
- adjust: idempotent by key; returns the new on_hand.

The driver speaks RESP2 directly on a trio stream (no client library, no threads).
"""

from __future__ import annotations

import hashlib

import trio

from bench.workloads import ERROR, OK, REFUSED

RESERVE_LUA = """
local existing = redis.call('HGET', KEYS[1], 'state')
if existing then return 1 end
local n = #KEYS
for i = 2, n do
  local stock = redis.call('HMGET', KEYS[i], 'on_hand', 'reserved')
  if (tonumber(stock[1]) or 0) - (tonumber(stock[2]) or 0) < tonumber(ARGV[i - 1]) then return 0 end
end
local lines = {}
for i = 2, n do
  redis.call('HINCRBY', KEYS[i], 'reserved', ARGV[i - 1])
  lines[#lines + 1] = KEYS[i] .. ' ' .. ARGV[i - 1]
end
redis.call('HSET', KEYS[1], 'state', 'held', 'lines', table.concat(lines, ' '))
return 1
"""

CLOSE_LUA = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return -1 end
if state == ARGV[1] then return 2 end
if state ~= 'held' then return -2 end
local lines = redis.call('HGET', KEYS[1], 'lines')
local commit = ARGV[1] == 'committed'
for key, qty in string.gmatch(lines, '(%S+) (%S+)') do
  redis.call('HINCRBY', key, 'reserved', -tonumber(qty))
  if commit then redis.call('HINCRBY', key, 'on_hand', -tonumber(qty)) end
end
redis.call('HSET', KEYS[1], 'state', ARGV[1])
return 1
"""

ADJUST_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 then return tonumber(redis.call('HGET', KEYS[2], 'on_hand')) end
local on_hand = redis.call('HINCRBY', KEYS[2], 'on_hand', ARGV[1])
if on_hand < 0 then
  redis.call('HINCRBY', KEYS[2], 'on_hand', -tonumber(ARGV[1]))
  return redis.error_reply('invalid on_hand would go negative')
end
redis.call('HSETNX', KEYS[2], 'reserved', 0)
redis.call('SET', KEYS[1], '1')
return on_hand
"""

SCRIPTS = {"reserve": RESERVE_LUA, "close": CLOSE_LUA, "adjust": ADJUST_LUA}
SHA = {name: hashlib.sha1(body.encode()).hexdigest() for name, body in SCRIPTS.items()}


def command(*parts: bytes | str | int) -> bytes:
    encoded = [part if isinstance(part, bytes) else str(part).encode() for part in parts]
    return b"".join([b"*%d\r\n" % len(encoded)] + [b"$%d\r\n%s\r\n" % (len(part), part) for part in encoded])


class _Incomplete(Exception):
    pass


def _parse(buffer: bytearray, offset: int) -> tuple[object, int]:
    """One RESP2 value at `offset`: (value, next offset). Errors come back as `RedisError`."""
    end = buffer.find(b"\r\n", offset)
    if end < 0:
        raise _Incomplete
    kind = buffer[offset]
    if kind == 58:  # ':' integer
        return int(buffer[offset + 1 : end]), end + 2
    if kind == 36:  # '$' bulk string
        length = int(buffer[offset + 1 : end])
        if length < 0:
            return None, end + 2
        if len(buffer) < end + 2 + length + 2:
            raise _Incomplete
        return bytes(buffer[end + 2 : end + 2 + length]), end + 2 + length + 2
    if kind == 43:  # '+' simple string
        return bytes(buffer[offset + 1 : end]), end + 2
    if kind == 45:  # '-' error
        return RedisError(bytes(buffer[offset + 1 : end]).decode(errors="replace")), end + 2
    if kind == 42:  # '*' array
        count = int(buffer[offset + 1 : end])
        position = end + 2
        items = []
        for _ in range(max(count, 0)):
            item, position = _parse(buffer, position)
            items.append(item)
        return items, position
    raise ConnectionError(f"unexpected RESP byte {kind!r}")


class RedisError(Exception):
    pass


class RedisDriver:
    """One connection: requests encoded as RESP, replies matched in order (FIFO)."""

    def __init__(self, keys: list[tuple[str, str]], shared: dict | None = None) -> None:
        shared = {} if shared is None else shared
        self.keys = keys
        if "redis_keys" not in shared:
            shared["redis_keys"] = [f"st:{sku}:{loc}".encode() for sku, loc in keys]
        self.stock_keys = shared["redis_keys"]
        self.pending: list = []
        self.pending_head = 0
        self.buffer = bytearray()
        self.reserve_head = b"$40\r\n" + SHA["reserve"].encode() + b"\r\n"
        self.close_head = b"*5\r\n$7\r\nEVALSHA\r\n$40\r\n" + SHA["close"].encode() + b"\r\n$1\r\n1\r\n"
        self.single_line: dict[tuple, bytes] = {}

    async def connect(self, host: str, port: int) -> trio.SocketStream:
        return await trio.open_tcp_stream(host, port)

    def _push(self, token: object, kind: int, data: bytes) -> bytes:
        self.pending.append((token, kind))
        return data

    def reserve(self, token: object, rid: str, lines: tuple, ttl_ms: int) -> bytes:
        # EVALSHA sha numkeys rv:rid st:... qty...
        rid_key = b"rv:" + rid.encode()
        parts = [b"*%d\r\n$7\r\nEVALSHA\r\n" % (3 + 1 + 2 * len(lines)), self.reserve_head,
                 b"$%d\r\n%d\r\n" % (len(str(1 + len(lines))), 1 + len(lines)),
                 b"$%d\r\n%s\r\n" % (len(rid_key), rid_key)]
        for index, _ in lines:
            key = self.stock_keys[index]
            parts.append(b"$%d\r\n%s\r\n" % (len(key), key))
        for _, qty in lines:
            text = b"%d" % qty
            parts.append(b"$%d\r\n%s\r\n" % (len(text), text))
        return self._push(token, 0, b"".join(parts))

    def _close(self, token: object, rid: str, state: bytes) -> bytes:
        rid_key = b"rv:" + rid.encode()
        return self._push(token, 1, b"".join((self.close_head, b"$%d\r\n%s\r\n" % (len(rid_key), rid_key),
                                              b"$%d\r\n%s\r\n" % (len(state), state))))

    def release(self, token: object, rid: str, lines: tuple) -> bytes:
        return self._close(token, rid, b"released")

    def commit(self, token: object, rid: str, lines: tuple) -> bytes:
        return self._close(token, rid, b"committed")

    def adjust(self, token: object, key: str, index: int, delta: int) -> bytes:
        return self._push(token, 2, command("EVALSHA", SHA["adjust"], 2, f"ad:{key}", self.stock_keys[index], delta))

    def get(self, token: object, index: int) -> bytes:
        return self._push(token, 3, command("HMGET", self.stock_keys[index], "on_hand", "reserved"))

    def raw(self, token: object, *parts) -> bytes:
        return self._push(token, 3, command(*parts))

    def feed(self, data: bytes) -> list[tuple[object, int, object]]:
        buffer = self.buffer
        buffer += data
        offset = 0
        out = []
        pending = self.pending
        head = self.pending_head
        size = len(buffer)
        while offset < size:
            try:
                value, offset_next = _parse(buffer, offset)
            except _Incomplete:
                break
            offset = offset_next
            token, kind = pending[head]
            head += 1
            if isinstance(value, RedisError):
                out.append((token, ERROR, str(value)[:60]))
            elif kind == 0:
                out.append((token, OK if value == 1 else REFUSED, value))
            elif kind == 1:
                out.append((token, OK if value in (1, 2) else ERROR, value if value not in (-1, -2) else "state"))
            else:
                out.append((token, OK, value))
        if head > 4096:
            del pending[:head]
            head = 0
        self.pending_head = head
        if offset:
            del buffer[:offset]
        return out

    @staticmethod
    def stock(detail: list) -> tuple[int, int]:
        return int(detail[0] or 0), int(detail[1] or 0)

"""The Redis engine, laid out so Redis Cluster keeps each user, each message and each product
in one slot (the `{...}` hash tag), with one Lua script per slot for every multi-step change.

    <prefix>:q:{P:U}   zset   the user's inbox: message ids, all score 0, so id (time) order
    <prefix>:qm:{P:U}  hash   id -> msgpack [expiry_ms, attempts, size]
    <prefix>:bw:{P:U}  hash   "" -> broadcast watermark; broadcast id -> attempts | a | x
    <prefix>:m:{P:I}   hash   one unicast message: b body, t expiry_ms, n recipients,
                              k tracked, o open, u untracked, ":"uid -> state letter
    <prefix>:bc:{P}    zset   the product's broadcasts, scored by expiry_ms
    <prefix>:bb:{P}    hash   broadcast id -> body
    <prefix>:dl:{P}    list   dead letters, newest first: msgpack [uid, at_ms, body]
    <prefix>:k:{P:K}   string an idempotency answer

P, U and K are percent-escaped so the tag always spans the whole pair. A body is kept once
per message however many users it is for; it is deleted once every tracked recipient has
acked it or lost it (or with its key, a while after it expires). Redis 7.0 has no
per-field expiry, so entry expiries ride in the values, every read skips and deletes what
has expired, and each key's own TTL follows its longest-lived content. Expiries come from
the Redis server clock inside the scripts.

A batch costs one round trip per step, whatever its size: one pipeline of single-slot
scripts. Steps that span slots (the inbox, then the message's state) run one after the
other, in an order where a crash in between can only leave a body kept too long or a
state not updated, never a message lost. Every script gives the same result when replayed,
so the one resend of a call whose pooled connection turned out dead (Redis restarted)
does no harm. Other Redis errors, and a Redis that stays down, reach the caller.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from im.messages_store import (
    ACKED,
    DEAD_LETTERED,
    DEFAULT_TTL_S,
    EVICTED,
    EXPIRED,
    IDEMPOTENCY_TTL_S,
    MAX_PENDING_LIMIT,
    STORED,
    WRITTEN,
    AckRow,
    DeadLetter,
    Delivery,
    StoreResult,
    check_ack_rows,
    check_after,
    check_answer,
    check_count,
    check_id,
    check_message,
    check_name,
    check_product,
    check_ttl,
    check_uids,
    check_written,
    id_floor,
    pack,
    unpack,
)
from im.redis_pool import Op, Script, open_redis, run_pipelined, script
from saver import engines
from saver.engines import BROADCAST, MAX_DEAD_LETTERS_READ, OLDEST_SWEPT, UNICAST, SaverLimits

#: Dead-letter lists outlive their last entry this long.
DEAD_LETTER_KEEP_S = 7 * 86400
#: Seconds a call waits for a free pooled connection before failing.
POOL_TIMEOUT_S = 5.0
#: Seconds to connect to Redis, or to wait for one of its answers, before the call fails.
SOCKET_TIMEOUT_S = 5.0

_LETTERS = {
    b"s": STORED,
    b"w": WRITTEN,
    b"a": ACKED,
    b"x": DEAD_LETTERED,
    b"v": EVICTED,
    b"e": EXPIRED,
}

_PRELUDE = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function raise_ttl(key, ttl)
  if redis.call('PTTL', key) < ttl then redis.call('PEXPIRE', key, ttl) end
end
-- live: {{id, expiry_ms}, ...} in id order. The watermark passes done broadcasts older than
-- the cutoff id; marks it passed, and marks of expired broadcasts past the cutoff, go.
local function compact(bw, live, mark, cutoff, settle, now)
  local seen, latest = {}, 0
  for _, b in ipairs(live) do
    seen[b[1]] = true
    if b[2] > latest then latest = b[2] end
  end
  for _, b in ipairs(live) do
    if b[1] > mark then
      local st = redis.call('HGET', bw, b[1])
      if b[1] >= cutoff or (st ~= 'a' and st ~= 'x') then break end
      mark = b[1]
    end
  end
  for _, f in ipairs(redis.call('HKEYS', bw)) do
    if f ~= '' and (f <= mark or (f < cutoff and not seen[f])) then redis.call('HDEL', bw, f) end
  end
  if mark ~= '' then redis.call('HSET', bw, '', mark) end
  if redis.call('EXISTS', bw) == 1 then
    redis.call('PEXPIRE', bw, math.max(latest - now, settle) + 1000)
  end
end
"""

# KEYS: message. ARGV: ttl_ms, grace_ms, state_cap, body, uids... Returns the 1-based
# positions of the uids to put in their inboxes: new recipients, and known ones still
# waiting (a replay or a retried store); those that acked or lost it are left alone.
_MSG_ADD = """
local now = now_ms()
local key = KEYS[1]
local expiry = now + tonumber(ARGV[1])
local cap = tonumber(ARGV[3])
redis.call('HSET', key, 'b', ARGV[4])
if (tonumber(redis.call('HGET', key, 't')) or 0) < expiry then
  redis.call('HSET', key, 't', expiry)
end
local tracked = tonumber(redis.call('HGET', key, 'k')) or 0
local open = tonumber(redis.call('HGET', key, 'o')) or 0
local untracked = tonumber(redis.call('HGET', key, 'u')) or 0
local n = tonumber(redis.call('HGET', key, 'n')) or 0
local targets = {}
for i = 5, #ARGV do
  local field = ':' .. ARGV[i]
  local st = redis.call('HGET', key, field)
  if not st then
    n = n + 1
    if tracked < cap then
      redis.call('HSET', key, field, 's')
      tracked = tracked + 1
      open = open + 1
    else
      untracked = untracked + 1
    end
    targets[#targets + 1] = i - 4
  elseif st == 's' or st == 'w' then
    targets[#targets + 1] = i - 4
  end
end
redis.call('HSET', key, 'k', tracked, 'o', open, 'u', untracked, 'n', n)
if open <= 0 and untracked == 0 then
  redis.call('HDEL', key, 'b')
else
  raise_ttl(key, expiry - now + tonumber(ARGV[2]))
end
return targets
"""

# KEYS: inbox, meta. ARGV: id, ttl_ms, size, cap, swept. Returns added (0 or 1) when no entry
# expired or was evicted, else {added, expired count, evicted ids...}: a plain integer is
# the common answer and the cheapest to parse in a pipeline of thousands.
_INBOX_ADD = """
local now = now_ms()
local q, qm, id = KEYS[1], KEYS[2], ARGV[1]
local ttl = tonumber(ARGV[2])
local added = redis.call('ZADD', q, 'NX', 0, id)
if added == 1 then
  redis.call('HSET', qm, id, cmsgpack.pack({now + ttl, 0, tonumber(ARGV[3])}))
end
local expired = 0
for _, old in ipairs(redis.call('ZRANGE', q, 0, tonumber(ARGV[5]) - 1)) do
  local meta = redis.call('HGET', qm, old)
  if not meta or cmsgpack.unpack(meta)[1] <= now then
    redis.call('ZREM', q, old)
    redis.call('HDEL', qm, old)
    if meta then expired = expired + 1 end
  end
end
local out = {added, expired}
local excess = redis.call('ZCARD', q) - tonumber(ARGV[4])
if excess > 0 then
  local gone = redis.call('ZPOPMIN', q, excess)
  for i = 1, #gone, 2 do
    redis.call('HDEL', qm, gone[i])
    out[#out + 1] = gone[i]
  end
end
raise_ttl(q, ttl)
raise_ttl(qm, ttl)
if #out == 2 and expired == 0 then return added end
return out
"""

# KEYS: inbox, meta, marks. ARGV: limit, max_bytes, max_attempts, after, cutoff, settle_ms,
# then (id, expiry_ms, size) of each live broadcast in id order. Walks inbox and broadcasts
# merged in id order, counts an attempt on each message handed out and dead-letters those
# out of attempts. Returns {handed out, dead-lettered, expired count}; ids carry a kind
# prefix, u (unicast) or b (broadcast).
_PENDING = """
local now = now_ms()
local q, qm, bw = KEYS[1], KEYS[2], KEYS[3]
local limit, max_bytes = tonumber(ARGV[1]), tonumber(ARGV[2])
local max_attempts, after = tonumber(ARGV[3]), ARGV[4]
local live = {}
for i = 7, #ARGV, 3 do
  live[#live + 1] = {ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])}
end
local mark = redis.call('HGET', bw, '') or ''
local casts = {}
for _, b in ipairs(live) do
  if b[1] > mark and b[1] > after and b[2] > now then
    local st = redis.call('HGET', bw, b[1])
    if st ~= 'a' and st ~= 'x' then casts[#casts + 1] = {b[1], tonumber(st) or 0, b[3]} end
  end
end
local out, dead = {}, {}
local bytes, expired, full = 0, 0, false
local function offer(kind, id, attempts, size, expiry)
  if attempts >= max_attempts then
    dead[#dead + 1] = kind .. id
    if kind == 'u' then
      redis.call('ZREM', q, id)
      redis.call('HDEL', qm, id)
    else
      redis.call('HSET', bw, id, 'x')
    end
    return
  end
  if #out > 0 and bytes + size > max_bytes then
    full = true
    return
  end
  bytes = bytes + size
  out[#out + 1] = kind .. id
  if kind == 'u' then
    redis.call('HSET', qm, id, cmsgpack.pack({expiry, attempts + 1, size}))
  else
    redis.call('HSET', bw, id, attempts + 1)
  end
  if #out >= limit then full = true end
end
local ci = 1
local cursor = after == '' and '-' or '(' .. after
while not full do
  local ids = redis.call('ZRANGEBYLEX', q, cursor, '+', 'LIMIT', 0, 128)
  if #ids == 0 then break end
  for _, id in ipairs(ids) do
    while not full and ci <= #casts and casts[ci][1] < id do
      offer('b', casts[ci][1], casts[ci][2], casts[ci][3], 0)
      ci = ci + 1
    end
    if full then break end
    cursor = '(' .. id
    local meta = redis.call('HGET', qm, id)
    local m = meta and cmsgpack.unpack(meta)
    if not m or m[1] <= now then
      redis.call('ZREM', q, id)
      redis.call('HDEL', qm, id)
      if m then expired = expired + 1 end
    else
      offer('u', id, m[2], m[3], m[1])
      if full then break end
    end
  end
end
while not full and ci <= #casts do
  offer('b', casts[ci][1], casts[ci][2], casts[ci][3], 0)
  ci = ci + 1
end
compact(bw, live, mark, ARGV[5], tonumber(ARGV[6]), now)
return {out, dead, expired}
"""

# KEYS: inbox, meta. ARGV: ids. Returns how many were removed when that is all of them (the
# common, cheapest answer), else {removed ids, ids not in the inbox}.
_ACK = """
local removed, missing = {}, {}
for i = 1, #ARGV do
  if redis.call('ZREM', KEYS[1], ARGV[i]) == 1 then
    redis.call('HDEL', KEYS[2], ARGV[i])
    removed[#removed + 1] = ARGV[i]
  else
    missing[#missing + 1] = ARGV[i]
  end
end
if #missing == 0 then return #removed end
return {removed, missing}
"""

# KEYS: marks. ARGV: cutoff, settle_ms, n, n pairs (id, expiry_ms) of the live broadcasts in
# id order, then the live broadcast ids acked. Returns how many were newly marked acked.
_BROADCAST_ACK = """
local now = now_ms()
local bw = KEYS[1]
local n = tonumber(ARGV[3])
local live = {}
for i = 4, 3 + 2 * n, 2 do live[#live + 1] = {ARGV[i], tonumber(ARGV[i + 1])} end
local mark = redis.call('HGET', bw, '') or ''
local count = 0
for i = 4 + 2 * n, #ARGV do
  local id = ARGV[i]
  if id > mark and redis.call('HGET', bw, id) ~= 'a' then
    redis.call('HSET', bw, id, 'a')
    count = count + 1
  end
end
compact(bw, live, mark, ARGV[1], tonumber(ARGV[2]), now)
return count
"""

# KEYS: message. ARGV: uids written. Only stored -> written; nothing is created.
_MARK_WRITTEN = """
for i = 1, #ARGV do
  local field = ':' .. ARGV[i]
  if redis.call('HGET', KEYS[1], field) == 's' then redis.call('HSET', KEYS[1], field, 'w') end
end
return 0
"""

# KEYS: message. ARGV: grace_ms, state letter, uids whose entry left their inbox for good.
# Each stored/written recipient takes the new state once (a replay changes nothing). Once no
# tracked recipient waits for the message and none was stored untracked, the body goes and
# the states stay for the grace time at most.
_RELEASE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local open = tonumber(redis.call('HGET', KEYS[1], 'o')) or 0
for i = 3, #ARGV do
  local field = ':' .. ARGV[i]
  local st = redis.call('HGET', KEYS[1], field)
  if st == 's' or st == 'w' then
    redis.call('HSET', KEYS[1], field, ARGV[2])
    open = open - 1
  end
end
redis.call('HSET', KEYS[1], 'o', open)
if open <= 0 and (tonumber(redis.call('HGET', KEYS[1], 'u')) or 0) == 0 then
  redis.call('HDEL', KEYS[1], 'b')
  local grace = math.max(tonumber(ARGV[1]), 1)
  if redis.call('PTTL', KEYS[1]) > grace then redis.call('PEXPIRE', KEYS[1], grace) end
end
return open
"""

# KEYS: message. Returns false for an unknown message, else {recipients, uid, letter, ...},
# stored and written shown as e(xpired) once the message has expired.
_STATES = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local ended = (tonumber(redis.call('HGET', KEYS[1], 't')) or 0) <= now_ms()
local out = {tonumber(redis.call('HGET', KEYS[1], 'n')) or 0}
local cursor = '0'
repeat
  local page = redis.call('HSCAN', KEYS[1], cursor, 'MATCH', ':*', 'COUNT', 1000)
  cursor = page[1]
  for i = 1, #page[2], 2 do
    local st = page[2][i + 1]
    if ended and (st == 's' or st == 'w') then st = 'e' end
    out[#out + 1] = string.sub(page[2][i], 2)
    out[#out + 1] = st
  end
until cursor == '0'
return out
"""

# KEYS: broadcasts, bodies. ARGV: id, ttl_ms, body, cap. Returns {added, evicted ids...}.
_BROADCAST_ADD = """
local now = now_ms()
local bc, bb, id = KEYS[1], KEYS[2], ARGV[1]
for _, old in ipairs(redis.call('ZRANGEBYSCORE', bc, '-inf', now)) do
  redis.call('ZREM', bc, old)
  redis.call('HDEL', bb, old)
end
if redis.call('ZSCORE', bc, id) then return {0} end
redis.call('ZADD', bc, now + tonumber(ARGV[2]), id)
redis.call('HSET', bb, id, ARGV[3])
local out = {1}
local excess = redis.call('ZCARD', bc) - tonumber(ARGV[4])
if excess > 0 then
  local ids = redis.call('ZRANGE', bc, 0, -1)
  table.sort(ids)
  for i = 1, excess do
    redis.call('ZREM', bc, ids[i])
    redis.call('HDEL', bb, ids[i])
    out[#out + 1] = ids[i]
  end
end
local latest = tonumber(redis.call('ZRANGE', bc, -1, -1, 'WITHSCORES')[2])
redis.call('PEXPIRE', bc, latest - now + 1000)
redis.call('PEXPIRE', bb, latest - now + 1000)
return out
"""

# KEYS: broadcasts, bodies. Drops the expired ones; returns {id, expiry_ms, size, ...}.
_BROADCASTS_LIVE = """
local now = now_ms()
local bc, bb = KEYS[1], KEYS[2]
for _, old in ipairs(redis.call('ZRANGEBYSCORE', bc, '-inf', now)) do
  redis.call('ZREM', bc, old)
  redis.call('HDEL', bb, old)
end
local out = {}
local live = redis.call('ZRANGEBYSCORE', bc, '(' .. string.format('%d', now), '+inf', 'WITHSCORES')
for i = 1, #live, 2 do
  out[#out + 1] = live[i]
  out[#out + 1] = tonumber(live[i + 1])
  out[#out + 1] = redis.call('HSTRLEN', bb, live[i])
end
return out
"""


def _script(body: str) -> Script:
    return script(_PRELUDE + body)


MSG_ADD = _script(_MSG_ADD)
INBOX_ADD = _script(_INBOX_ADD)
PENDING = _script(_PENDING)
ACK = _script(_ACK)
BROADCAST_ACK = _script(_BROADCAST_ACK)
MARK_WRITTEN = _script(_MARK_WRITTEN)
RELEASE = _script(_RELEASE)
STATES = _script(_STATES)
BROADCAST_ADD = _script(_BROADCAST_ADD)
BROADCASTS_LIVE = _script(_BROADCASTS_LIVE)

#: One pipelined step: a script (or a plain command's name), its keys and its arguments.
#: A product's live broadcasts in id order: (id, expiry_ms, size).
_Live = list[tuple[str, int, int]]


def _escape(part: str) -> str:
    """Percent-escape what delimits a key, so distinct pairs never share a key and the hash
    tag always spans the whole pair."""
    for char, code in (("%", "%25"), (":", "%3A"), ("{", "%7B"), ("}", "%7D")):
        part = part.replace(char, code)
    return part


def _live(flat: list) -> _Live:
    rows = [(flat[i].decode(), int(flat[i + 1]), int(flat[i + 2])) for i in range(0, len(flat), 3)]
    return sorted(rows)


class RedisStore:
    """`MessageStore` on Redis (standalone, or Cluster-ready key layout). At most
    `max_connections` calls use Redis at once; the others wait up to POOL_TIMEOUT_S."""

    def __init__(
        self,
        url: str,
        *,
        limits: SaverLimits | None = None,
        prefix: str = "im",
        max_connections: int = 64,
    ) -> None:
        self.limits = limits or SaverLimits()
        self._redis = open_redis(url, max_connections=max_connections)
        self._prefix = prefix
        self._grace_ms = round(self.limits.state_grace_s * 1000)
        self._settle_ms = round(self.limits.broadcast_settle_s * 1000)

    def user_keys(self, product: str, uid: str) -> tuple[str, str, str]:
        """Inbox, entry meta and broadcast marks of one user."""
        tag = f"{{{_escape(product)}:{_escape(uid)}}}"
        p = self._prefix
        return f"{p}:q:{tag}", f"{p}:qm:{tag}", f"{p}:bw:{tag}"

    def message_key(self, product: str, msg_id: str) -> str:
        return f"{self._prefix}:m:{{{_escape(product)}:{msg_id}}}"

    def product_keys(self, product: str) -> tuple[str, str, str]:
        """Broadcast ids, broadcast bodies and dead letters of one product."""
        tag = f"{{{_escape(product)}}}"
        p = self._prefix
        return f"{p}:bc:{tag}", f"{p}:bb:{tag}", f"{p}:dl:{tag}"

    async def store(
        self, product: str, uids: Sequence[str], msg: dict, ttl_s: float = DEFAULT_TTL_S
    ) -> StoreResult:
        product = check_product(product)
        uids = check_uids(uids)
        msg_id, body = check_message(msg, self.limits.max_message_bytes)
        ttl_ms = check_ttl(ttl_s)
        if not uids:
            return StoreResult(0, 0)
        message = self.message_key(product, msg_id)
        limits = self.limits
        (targets,) = await self._run(
            [(MSG_ADD, [message], [ttl_ms, self._grace_ms, limits.state_cap, body, *uids])]
        )
        users = [uids[i - 1] for i in targets]
        added = await self._run(
            [
                (
                    INBOX_ADD,
                    self.user_keys(product, uid)[:2],
                    [msg_id, ttl_ms, len(body), limits.inbox_cap, OLDEST_SWEPT],
                )
                for uid in users
            ]
        )
        stored = expired = 0
        evicted: dict[str, list[str]] = defaultdict(list)
        for uid, answer in zip(users, added, strict=True):
            was_added, swept, *gone = [answer, 0] if isinstance(answer, int) else answer
            stored += was_added
            expired += swept
            for old in gone:
                evicted[old.decode()].append(uid)
        await self._run(
            [
                (RELEASE, [self.message_key(product, old)], [self._grace_ms, b"v", *holders])
                for old, holders in evicted.items()
            ]
        )
        count = sum(len(holders) for holders in evicted.values())
        engines.STORED.labels(UNICAST).inc(stored)
        engines.EVICTED.labels(UNICAST).inc(count)
        engines.EXPIRED.inc(expired)
        return StoreResult(stored, count)

    async def store_broadcast(
        self, product: str, msg: dict, ttl_s: float = DEFAULT_TTL_S
    ) -> StoreResult:
        product = check_product(product)
        msg_id, body = check_message(msg, self.limits.max_message_bytes)
        ttl_ms = check_ttl(ttl_s)
        casts, bodies, _ = self.product_keys(product)
        ((added, *evicted),) = await self._run(
            [(BROADCAST_ADD, [casts, bodies], [msg_id, ttl_ms, body, self.limits.broadcast_cap])]
        )
        engines.STORED.labels(BROADCAST).inc(added)
        engines.EVICTED.labels(BROADCAST).inc(len(evicted))
        return StoreResult(added, len(evicted))

    async def pending(
        self, product: str, uid: str, limit: int = MAX_PENDING_LIMIT, after: str = ""
    ) -> list[dict]:
        product = check_product(product)
        uid = check_name(uid, "uid")
        limit = check_count(limit, "limit", MAX_PENDING_LIMIT)
        after = check_after(after)
        casts, bodies, letters = self.product_keys(product)
        inbox, meta, marks = self.user_keys(product, uid)
        (live_flat,) = await self._run([(BROADCASTS_LIVE, [casts, bodies], [])])
        live = _live(live_flat)
        args: list[Any] = [
            limit,
            self.limits.max_pending_bytes,
            self.limits.max_attempts,
            after,
            self._cutoff(),
            self._settle_ms,
        ]
        for row in live:
            args.extend(row)
        ((handed, dead, expired),) = await self._run([(PENDING, [inbox, meta, marks], args)])
        handed = [tagged.decode() for tagged in handed]
        dead = [tagged.decode() for tagged in dead]
        # Bodies: unicast ones from each message, broadcasts in one read; the body of each
        # dead-lettered message is read before its release may delete it.
        ops: list[Op] = [
            ("HGET", [self.message_key(product, t[1:])], ["b"]) for t in handed if t[0] == "u"
        ]
        for tagged in dead:
            if tagged[0] == "u":
                key = self.message_key(product, tagged[1:])
                ops += [("HGET", [key], ["b"]), (RELEASE, [key], [self._grace_ms, b"x", uid])]
        cast_ids = [t[1:] for t in handed + dead if t[0] == "b"]
        if cast_ids:
            ops.append(("HMGET", [bodies], cast_ids))
        found = iter(await self._run(ops))
        unicast = {t: next(found) for t in handed if t[0] == "u"}
        dead_bodies = []
        for tagged in dead:
            if tagged[0] == "u":
                dead_bodies.append(next(found))
                next(found)
        cast_bodies = dict(zip(cast_ids, next(found), strict=True)) if cast_ids else {}
        out: list[bytes] = []
        orphans: list[str] = []
        for tagged in handed:
            body = unicast[tagged] if tagged[0] == "u" else cast_bodies[tagged[1:]]
            if body is not None:
                out.append(body)
            elif tagged[0] == "u":
                orphans.append(tagged[1:])
        dead_bodies += [cast_bodies[t[1:]] for t in dead if t[0] == "b"]
        await self._finish_pending(uid, letters, inbox, meta, dead_bodies, orphans)
        engines.EXPIRED.inc(expired)
        for kind, tagged in ((UNICAST, "u"), (BROADCAST, "b")):
            engines.DELIVERED.labels(kind).inc(sum(t[0] == tagged for t in handed))
            engines.DEAD_LETTERS.labels(kind).inc(sum(t[0] == tagged for t in dead))
        return [unpack(body) for body in out]

    async def _finish_pending(
        self,
        uid: str,
        letters: str,
        inbox: str,
        meta: str,
        dead_bodies: list[bytes | None],
        orphans: list[str],
    ) -> None:
        """Append the dead letters, and drop inbox entries whose body is gone."""
        at_ms = time.time_ns() // 1_000_000
        entries = [pack([uid, at_ms, body], "dead letter", 2**32) for body in dead_bodies if body]
        ops: list[Op] = []
        if entries:
            ops += [
                ("LPUSH", [letters], entries),
                ("LTRIM", [letters], [0, self.limits.dead_letter_cap - 1]),
                ("EXPIRE", [letters], [DEAD_LETTER_KEEP_S]),
            ]
        if orphans:
            ops += [("ZREM", [inbox], orphans), ("HDEL", [meta], orphans)]
        await self._run(ops)

    async def ack(self, product: str, uid: str, ids: Sequence[str]) -> int:
        return await self.ack_many([(product, uid, ids)])

    async def ack_many(self, rows: Sequence[AckRow]) -> int:
        acks = check_ack_rows(rows)
        if not acks:
            return 0
        products = list(dict.fromkeys(product for product, _ in acks))
        ops: list[Op] = [
            (ACK, self.user_keys(product, uid)[:2], ids) for (product, uid), ids in acks.items()
        ]
        ops += [(BROADCASTS_LIVE, self.product_keys(product)[:2], []) for product in products]
        results = await self._run(ops)
        lives = {
            product: _live(flat)
            for product, flat in zip(products, results[len(acks) :], strict=True)
        }
        released: dict[tuple[str, str], list[str]] = defaultdict(list)
        cutoff = self._cutoff()
        ops = []
        unicast = 0
        for (product, uid), answer in zip(acks, results[: len(acks)], strict=True):
            if isinstance(answer, int):
                removed, missing = acks[(product, uid)], []
            else:
                removed = [msg_id.decode() for msg_id in answer[0]]
                missing = answer[1]
            for msg_id in removed:
                released[(product, msg_id)].append(uid)
            unicast += len(removed)
            live = lives[product]
            live_ids = {row[0] for row in live}
            acked = [m.decode() for m in missing if m.decode() in live_ids]
            if acked:
                args: list[Any] = [cutoff, self._settle_ms, len(live)]
                for cast_id, expiry, _ in live:
                    args += [cast_id, expiry]
                ops.append((BROADCAST_ACK, [self.user_keys(product, uid)[2]], args + acked))
        ops += [
            (RELEASE, [self.message_key(product, msg_id)], [self._grace_ms, b"a", *uids])
            for (product, msg_id), uids in released.items()
        ]
        done = await self._run(ops)
        broadcast = sum(done[: len(ops) - len(released)])
        engines.ACKED.labels(UNICAST).inc(unicast)
        engines.ACKED.labels(BROADCAST).inc(broadcast)
        return unicast + broadcast

    async def mark_written(self, product: str, rows: Sequence[tuple[str, str]]) -> None:
        product = check_product(product)
        await self._run(
            [
                (MARK_WRITTEN, [self.message_key(product, msg_id)], uids)
                for msg_id, uids in check_written(rows).items()
            ]
        )

    async def delivery(self, product: str, msg_id: str) -> Delivery | None:
        key = self.message_key(check_product(product), check_id(msg_id))
        (flat,) = await self._run([(STATES, [key], [])])
        if flat is None:
            return None
        states = {flat[i].decode(): _LETTERS[flat[i + 1]] for i in range(1, len(flat), 2)}
        return Delivery(int(flat[0]), states)

    async def dead_letters(self, product: str, limit: int = 100) -> list[DeadLetter]:
        letters = self.product_keys(check_product(product))[2]
        limit = check_count(limit, "limit", MAX_DEAD_LETTERS_READ)
        entries = await self._redis.lrange(letters, 0, limit - 1)
        out = []
        for entry in entries:
            uid, at_ms, body = unpack(entry)
            out.append(DeadLetter(uid, unpack(body), at_ms))
        return out

    async def remember_idempotency(
        self, product: str, key: str, answer: dict, ttl_s: float = IDEMPOTENCY_TTL_S
    ) -> dict | None:
        product = check_product(product)
        key = check_name(key, "idempotency key", 256)
        packed = check_answer(answer)
        ttl_ms = check_ttl(ttl_s)
        held = await self._redis.set(
            self._idempotency_key(product, key), packed, px=ttl_ms, nx=True, get=True
        )
        if held is None:
            engines.IDEMPOTENCY.labels("first").inc()
            return None
        engines.IDEMPOTENCY.labels("repeat").inc()
        return unpack(held)

    async def recall_idempotency(self, product: str, key: str) -> dict | None:
        product = check_product(product)
        key = check_name(key, "idempotency key", 256)
        held = await self._redis.get(self._idempotency_key(product, key))
        return None if held is None else unpack(held)

    def _idempotency_key(self, product: str, key: str) -> str:
        return f"{self._prefix}:k:{{{_escape(product)}:{_escape(key)}}}"

    async def ping(self) -> None:
        await self._redis.ping()

    async def close(self) -> None:
        await self._redis.aclose()
        await self._redis.connection_pool.disconnect()

    def _cutoff(self) -> str:
        return id_floor(time.time_ns() // 1_000_000 - self._settle_ms)

    async def _run(self, ops: list[Op]) -> list:
        return await run_pipelined(self._redis, ops)

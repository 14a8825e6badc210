"""The Redis engine: one hash per user and one per chat room, laid out so Redis Cluster keeps
each user, and each room, in one slot.

A user's sessions live in `<prefix>:s:{<product>:<uid>}`, field conn -> msgpack
[expiry_ms, instance, device]; a room's member counts in `<prefix>:r:{<product>:<room>}`,
field instance -> msgpack [expiry_ms, count]. Redis 7.0 has no per-field expiry, so the
expiry rides in the value, reads filter on it and delete what has expired, and the key's
own TTL follows the longest lease so an abandoned user or room disappears whole. Expiries
are taken from the Redis server clock inside the scripts, so every writer and reader
agrees on them.

The index of big rooms is two sorted sets under one hash tag, `<prefix>:top:{<prefix>}:totals`
(member msgpack [product, room], score the room's total as its last writer counted it) and
`...:leases` (same members, score the expiry in ms); `top_rooms` reads the largest totals
from it and then the rooms' own hashes, so the counts it answers are fresh.

The node table is one hash, `<prefix>:nodes`, field instance -> msgpack [expiry_ms, rpc, ws,
tcp, idc, conns, isp, max_conns, conn_rate, max_conn_rate, draining], every value as text
(draining as 1 or 0); rows of older instances end after conns. The store's epoch is the key
`<prefix>:epoch`, a random token set only if missing and never expiring: a Redis that lost
its data has lost it too, and the next node renewal makes a new one.

Batches cost one round trip (put_rooms two: the index takes the totals the room hashes
answer): one pipeline of single-key commands, never a script over several users or rooms
(their keys sit in different cluster slots). A call whose pooled connection
turns out dead (Redis restarted) is sent once more on a new one; other Redis errors, and a
Redis that stays down, propagate to the caller.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import msgpack

from im.redis_pool import Script, open_redis, run_pipelined, script
from im.sessions import (
    Node,
    RoomCount,
    RoomLoad,
    Session,
    check_top_limit,
    checked_rooms,
    ranked,
)

# ARGV: ttl_ms, width, then groups of (field, width values); each value becomes the msgpack
# array [expiry_ms, values...]. The key's TTL is raised to the lease, never lowered.
_PUT = """
local t = redis.call('TIME')
local ttl = tonumber(ARGV[1])
local width = tonumber(ARGV[2])
local expiry = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + ttl
for i = 3, #ARGV, width + 1 do
  local value = {expiry}
  for j = 1, width do value[j + 1] = ARGV[i + j] end
  redis.call('HSET', KEYS[1], ARGV[i], cmsgpack.pack(value))
end
if redis.call('PTTL', KEYS[1]) < ttl then redis.call('PEXPIRE', KEYS[1], ttl) end
return 0
"""

# ARGV: ttl_ms, instance, count. A count of 0 deletes the instance's field; otherwise the field
# becomes [expiry_ms, count] (count a msgpack integer) and the key's TTL is raised as in _PUT.
# Returns the room's live total after the write, for the index of big rooms.
_PUT_COUNT = """
local ttl = tonumber(ARGV[1])
local count = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if count == 0 then
  redis.call('HDEL', KEYS[1], ARGV[2])
else
  redis.call('HSET', KEYS[1], ARGV[2], cmsgpack.pack({now + ttl, count}))
  if redis.call('PTTL', KEYS[1]) < ttl then redis.call('PEXPIRE', KEYS[1], ttl) end
end
local total = 0
for _, value in ipairs(redis.call('HVALS', KEYS[1])) do
  local entry = cmsgpack.unpack(value)
  if entry[1] > now then total = total + entry[2] end
end
return total
"""

# KEYS: the index's totals and leases (sorted sets). ARGV: ttl_ms, then pairs of (member,
# total). A total of 0 takes the room out; otherwise its total is set and its lease raised.
_INDEX = """
local ttl = tonumber(ARGV[1])
local t = redis.call('TIME')
local expiry = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + ttl
for i = 2, #ARGV, 2 do
  local total = tonumber(ARGV[i + 1])
  if total == 0 then
    redis.call('ZREM', KEYS[1], ARGV[i])
    redis.call('ZREM', KEYS[2], ARGV[i])
  else
    redis.call('ZADD', KEYS[1], total, ARGV[i])
    local lease = tonumber(redis.call('ZSCORE', KEYS[2], ARGV[i]) or 0)
    if lease < expiry then redis.call('ZADD', KEYS[2], expiry, ARGV[i]) end
  end
end
return 0
"""

# KEYS as in _INDEX. ARGV: how many rooms, most expired leases dropped first. Returns the
# members of the rooms with the largest totals, largest first.
_TOP = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
for _, member in ipairs(expired) do
  redis.call('ZREM', KEYS[1], member)
  redis.call('ZREM', KEYS[2], member)
end
return redis.call('ZREVRANGE', KEYS[1], 0, tonumber(ARGV[1]) - 1)
"""

# Returns the live fields as a flat [field, value, ...] list and deletes the expired ones.
_READ = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local all = redis.call('HGETALL', KEYS[1])
local live = {}
for i = 1, #all, 2 do
  if cmsgpack.unpack(all[i + 1])[1] > now then
    live[#live + 1] = all[i]
    live[#live + 1] = all[i + 1]
  else
    redis.call('HDEL', KEYS[1], all[i])
  end
end
return live
"""


# ARGV: a fresh random token, which becomes the epoch only if there is none yet.
_EPOCH = """
redis.call('SET', KEYS[1], ARGV[1], 'NX')
return redis.call('GET', KEYS[1])
"""


_PUT_SCRIPT = script(_PUT)
_PUT_COUNT_SCRIPT = script(_PUT_COUNT)
_READ_SCRIPT = script(_READ)
_INDEX_SCRIPT = script(_INDEX)
_TOP_SCRIPT = script(_TOP)
_EPOCH_SCRIPT = script(_EPOCH)

#: Candidates a top_rooms call reads per room asked for: an index total can be stale (an
#: instance died since it was written), so a few more are read fresh and ranked again.
_TOP_CANDIDATES = 2
#: Expired index entries one top_rooms call removes at most; the rest go on later calls.
_TOP_PRUNE = 1000


def _escape(part: str) -> str:
    """Percent-escape the characters that delimit a key, so distinct (product, uid) or
    (product, room) pairs never share a key and the hash tag always spans the whole pair."""
    return part.replace("%", "%25").replace(":", "%3A").replace("{", "%7B").replace("}", "%7D")


def _ttl_ms(ttl: float) -> int:
    if not 0 < ttl < math.inf:
        raise ValueError(f"ttl must be a positive finite number of seconds, got {ttl!r}")
    return max(1, round(ttl * 1000))


def _pairs(flat: list[bytes]) -> list[tuple[str, list]]:
    """Field name and decoded [expiry_ms, values...] of each live field of a read."""
    return [
        (flat[i].decode(), msgpack.unpackb(flat[i + 1], raw=False)) for i in range(0, len(flat), 2)
    ]


class RedisStore:
    """`SessionStore` on Redis (standalone, or Cluster-ready key layout)."""

    def __init__(self, url: str, *, prefix: str = "im") -> None:
        self._redis = open_redis(url)
        self._prefix = prefix
        self._nodes_key = f"{prefix}:nodes"
        self._epoch_key = f"{prefix}:epoch"
        # One hash tag, so the index's two sorted sets share a Cluster slot for one script.
        self._index_keys = (
            f"{prefix}:top:{{{prefix}}}:totals",
            f"{prefix}:top:{{{prefix}}}:leases",
        )

    def user_key(self, product: str, uid: str) -> str:
        return f"{self._prefix}:s:{{{_escape(product)}:{_escape(uid)}}}"

    def room_key(self, product: str, room: str) -> str:
        return f"{self._prefix}:r:{{{_escape(product)}:{_escape(room)}}}"

    async def put_sessions(self, sessions: Sequence[Session], ttl: float) -> None:
        ttl_ms = _ttl_ms(ttl)
        args: dict[str, list[str | int]] = defaultdict(lambda: [ttl_ms, 2])
        for s in sessions:
            args[self.user_key(s.product, s.uid)].extend((s.conn, s.instance, s.device))
        await self._eval_many([(_PUT_SCRIPT, key, key_args) for key, key_args in args.items()])

    async def remove_sessions(self, sessions: Sequence[Session]) -> None:
        conns: dict[str, list[str]] = defaultdict(list)
        for s in sessions:
            conns[self.user_key(s.product, s.uid)].append(s.conn)
        if not conns:
            return
        pipe = self._redis.pipeline(transaction=False)
        for key, names in conns.items():
            pipe.hdel(key, *names)
        await pipe.execute()

    async def lookup(self, product: str, uids: Sequence[str]) -> dict[str, list[Session]]:
        unique = list(dict.fromkeys(uids))
        reads = await self._eval_many(
            [(_READ_SCRIPT, self.user_key(product, uid), ()) for uid in unique]
        )
        found: dict[str, list[Session]] = {}
        for uid, flat in zip(unique, reads, strict=True):
            if flat:
                found[uid] = [
                    Session(product, uid, conn, instance, device)
                    for conn, (_, instance, device) in _pairs(flat)
                ]
        return found

    async def put_rooms(self, instance: str, rooms: Sequence[RoomCount], ttl: float) -> None:
        """Two round trips: the room hashes answer their totals, then the index takes them
        (one script on one key pair, so the layout stays Cluster-ready)."""
        ttl_ms = _ttl_ms(ttl)
        rows = checked_rooms(rooms)
        totals = await self._eval_many(
            [
                (_PUT_COUNT_SCRIPT, self.room_key(product, room), (ttl_ms, instance, count))
                for product, room, count in rows
            ]
        )
        if not rows:
            return
        args: list[Any] = [ttl_ms]
        for (product, room, _), total in zip(rows, totals, strict=True):
            args += (msgpack.packb([product, room]), total)
        await run_pipelined(self._redis, [(_INDEX_SCRIPT, self._index_keys, args)])

    async def room_instances(self, product: str, room: str) -> dict[str, int]:
        (flat,) = await self._eval_many([(_READ_SCRIPT, self.room_key(product, room), ())])
        return {instance: int(count) for instance, (_, count) in _pairs(flat)}

    async def top_rooms(self, limit: int) -> list[RoomLoad]:
        check_top_limit(limit)
        want = limit * _TOP_CANDIDATES
        (members,) = await run_pipelined(
            self._redis, [(_TOP_SCRIPT, self._index_keys, (want, _TOP_PRUNE))]
        )
        pairs = [msgpack.unpackb(member, raw=False) for member in members]
        reads = await self._eval_many(
            [(_READ_SCRIPT, self.room_key(product, room), ()) for product, room in pairs]
        )
        loads = (
            RoomLoad(product, room, {i: int(count) for i, (_, count) in _pairs(flat)})
            for (product, room), flat in zip(pairs, reads, strict=True)
        )
        return ranked(loads, limit)

    async def put_node(self, node: Node, ttl: float) -> str:
        wire = [int(value) if isinstance(value, bool) else value for value in node.to_wire()]
        args = [_ttl_ms(ttl), len(wire) - 1, *wire]
        _, epoch = await self._eval_many(
            [
                (_PUT_SCRIPT, self._nodes_key, args),
                (_EPOCH_SCRIPT, self._epoch_key, (os.urandom(8).hex(),)),
            ]
        )
        return epoch.decode()

    async def remove_node(self, instance: str) -> None:
        await self._redis.hdel(self._nodes_key, instance)

    async def nodes(self) -> list[Node]:
        (flat,) = await self._eval_many([(_READ_SCRIPT, self._nodes_key, ())])
        return [Node.from_wire([instance, *fields]) for instance, (_, *fields) in _pairs(flat)]

    async def close(self) -> None:
        await self._redis.aclose()

    async def _eval_many(self, calls: list[tuple[Script, str, Sequence[Any]]]) -> list:
        """Scripts of one key each, in one pipeline."""
        return await run_pipelined(self._redis, [(sc, (key,), args) for sc, key, args in calls])

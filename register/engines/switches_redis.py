"""The Redis switch store: one hash `<prefix>:switches` with fields `version` and `document`.

Both fields change in one Lua script, so no reader sees a new version with an old document.
A poll that finds its version unchanged reads one small field and transfers no document.
"""

from __future__ import annotations

import orjson

from im.redis_pool import open_redis

# ARGV: known version. False (nil) when unchanged; a store never written has version 0.
_GET = """
local version = tonumber(redis.call('HGET', KEYS[1], 'version')) or 0
if version == tonumber(ARGV[1]) then return false end
return {version, redis.call('HGET', KEYS[1], 'document') or '{}'}
"""

# ARGV: the document as JSON. Returns the new version.
_PUT = """
local version = redis.call('HINCRBY', KEYS[1], 'version', 1)
redis.call('HSET', KEYS[1], 'document', ARGV[1])
return version
"""


class RedisSwitchStore:
    """`im.switches.SwitchStore` on Redis; every register sharing the Redis sees one document.
    The scripts reload themselves after a Redis restart emptied the script cache."""

    def __init__(self, url: str, *, prefix: str = "im") -> None:
        self._redis = open_redis(url)
        self.key = f"{prefix}:switches"
        self._get = self._redis.register_script(_GET)
        self._put = self._redis.register_script(_PUT)

    async def get_switches(self, known_version: int = 0) -> tuple[int, dict] | None:
        found = await self._get(keys=[self.key], args=[int(known_version)])
        if found is None:
            return None
        version, document = found
        return int(version), orjson.loads(document)

    async def put_switches(self, document: dict) -> int:
        return int(await self._put(keys=[self.key], args=[orjson.dumps(document)]))

    async def close(self) -> None:
        await self._redis.aclose()

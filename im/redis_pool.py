"""Redis for every engine that keeps state there: one way to open a client, one way to run
pipelined scripts.

A blocking pool: a burst of concurrent calls waits a moment for a free connection instead
of failing (redis-py's default pool refuses the 101st concurrent call outright), and a
failed command is retried once on a fresh connection, which covers a Redis restart.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any, NamedTuple, cast

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError

MAX_CONNECTIONS = 64
POOL_TIMEOUT_S = 5.0
SOCKET_TIMEOUT_S = 5.0


def open_redis(url: str, *, max_connections: int = MAX_CONNECTIONS) -> aioredis.Redis:
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=POOL_TIMEOUT_S,
        socket_timeout=SOCKET_TIMEOUT_S,
        socket_connect_timeout=SOCKET_TIMEOUT_S,
        retry=Retry(NoBackoff(), 1),
    )
    return aioredis.Redis(connection_pool=pool)


class Script(NamedTuple):
    """A Lua script sent by its SHA1; the source is loaded when Redis does not know it."""

    source: str
    sha: str


def script(source: str) -> Script:
    return Script(source, hashlib.sha1(source.encode()).hexdigest())


#: One pipelined step: a script, or a plain command name, with its keys and arguments.
Op = tuple[Script | str, Sequence[str], Sequence[Any]]


async def run_pipelined(redis: aioredis.Redis, ops: Sequence[Op]) -> list:
    """Run the steps in one pipeline; after a restart emptied Redis's script cache, load the
    scripts and rerun the steps that missed them (they did nothing). Raises the first error."""
    if not ops:
        return []
    results = await _send(redis, ops)
    missing = [i for i, result in enumerate(results) if isinstance(result, NoScriptError)]
    if missing:
        for source in {cast(Script, ops[i][0]).source for i in missing}:
            await redis.script_load(source)
        retried = await _send(redis, [ops[i] for i in missing])
        for i, result in zip(missing, retried, strict=True):
            results[i] = result
    for result in results:
        if isinstance(result, Exception):
            raise result
    return results


async def _send(redis: aioredis.Redis, ops: Sequence[Op]) -> list:
    pipe = redis.pipeline(transaction=False)
    for step, keys, args in ops:
        if isinstance(step, Script):
            pipe.evalsha(step.sha, len(keys), *keys, *args)
        else:
            pipe.execute_command(step, *keys, *args)
    return await pipe.execute(raise_on_error=False)

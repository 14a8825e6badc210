"""One way to open a Redis client for every engine that keeps state in Redis.

A blocking pool: a burst of concurrent calls waits a moment for a free connection instead
of failing (redis-py's default pool refuses the 101st concurrent call outright), and a
failed command is retried once on a fresh connection, which covers a Redis restart.
"""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

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

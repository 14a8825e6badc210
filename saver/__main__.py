"""`python -m saver` / `im saver`: the message store over RPC."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from im.messages_store import MessageStore
from im.service import run
from saver.config import SaverConfig, from_args
from saver.engines import SaverLimits
from saver.server import SaverServer


def open_store(config: SaverConfig, limits: SaverLimits) -> MessageStore:
    if config.redis:
        from saver.engines.redis import RedisStore

        return RedisStore(
            config.redis,
            limits=limits,
            prefix=config.redis_prefix,
            max_connections=config.redis_connections,
        )
    from saver.engines.memory import MemoryStore

    return MemoryStore(limits)


def main(argv: Sequence[str] | None = None) -> None:
    config = from_args(argv)
    try:
        limits = config.limits()
    except ValueError as exc:
        sys.exit(f"im saver: {exc}")

    async def start() -> SaverServer:
        server = SaverServer(config, open_store(config, limits))
        await server.start()
        return server

    run(start)


if __name__ == "__main__":
    main()

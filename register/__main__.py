"""`python -m register` / `im register`: the session register over RPC."""

from __future__ import annotations

from collections.abc import Sequence

from im.service import run
from register.config import RegisterConfig, from_args
from register.server import RegisterServer


def open_stores(config: RegisterConfig):
    """The session store and the switches store, on the same engine."""
    if config.redis:
        from register.engines.redis import RedisStore
        from register.engines.switches_redis import RedisSwitchStore

        return RedisStore(config.redis), RedisSwitchStore(config.redis)
    from register.engines.memory import MemoryStore
    from register.engines.switches_memory import MemorySwitchStore

    return MemoryStore(), MemorySwitchStore()


def main(argv: Sequence[str] | None = None) -> None:
    config = from_args(argv)

    async def start() -> RegisterServer:
        server = RegisterServer(config, *open_stores(config))
        await server.start()
        return server

    run(start)


if __name__ == "__main__":
    main()

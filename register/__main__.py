"""`python -m register` / `im register`: the session register over RPC."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from im.service import run
from register.config import RegisterConfig, add_arguments, from_args
from register.server import RegisterServer


def open_store(config: RegisterConfig):
    if config.redis:
        from register.engines.redis import RedisStore

        return RedisStore(config.redis)
    from register.engines.memory import MemoryStore

    return MemoryStore()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="im register", description=__doc__)
    add_arguments(parser)
    config = from_args(parser.parse_args(argv))

    async def start() -> RegisterServer:
        server = RegisterServer(config, open_store(config))
        await server.start()
        return server

    run(start)


if __name__ == "__main__":
    main()

"""`python -m room` / `im room`: one gateway instance (run one per core)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from im.config import ConfigError, load_products
from im.register_client import RegisterClient
from im.service import run, setup_logging
from room.config import from_args
from room.server import RoomServer


def main(argv: Sequence[str] | None = None) -> None:
    config = from_args(argv)
    setup_logging()
    try:
        products = load_products(config.config)
    except ConfigError as exc:
        sys.exit(f"im room: {exc}")

    async def start() -> RoomServer:
        server = RoomServer(config, products, RegisterClient(config.register), owns_store=True)
        await server.start()
        return server

    run(start)


if __name__ == "__main__":
    main()

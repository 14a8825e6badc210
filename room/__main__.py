"""`python -m room` / `im room`: one gateway instance (run one per core)."""

from __future__ import annotations

import ssl
from collections.abc import Sequence

from im.config import products_or_exit
from im.register_client import RegisterClient
from im.service import run, setup_logging
from room.config import from_args
from room.server import RoomServer


def main(argv: Sequence[str] | None = None) -> None:
    config = from_args(argv)
    setup_logging()
    products = products_or_exit(config.config, "im room")

    async def start() -> RoomServer:
        try:
            server = RoomServer(config, products, RegisterClient(config.register), owns_store=True)
        except (OSError, ValueError, ssl.SSLError) as exc:  # a bad key or certificate file
            raise SystemExit(f"im room: {exc}") from None
        await server.start()
        return server

    run(start)


if __name__ == "__main__":
    main()

"""`python -m coordinator` / `im coordinator`: up frames and events to the business webhooks."""

from __future__ import annotations

from collections.abc import Sequence

from coordinator.config import from_args
from coordinator.server import CoordinatorServer
from im.config import products_or_exit
from im.service import run, setup_logging


def main(argv: Sequence[str] | None = None) -> None:
    config = from_args(argv)
    setup_logging()
    products = products_or_exit(config.config, "im coordinator")

    async def start() -> CoordinatorServer:
        server = CoordinatorServer(config, products)
        await server.start()
        return server

    run(start)


if __name__ == "__main__":
    main()

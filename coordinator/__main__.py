"""`python -m coordinator` / `im coordinator`: up frames and events to the business webhooks."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from coordinator.config import from_args
from coordinator.server import CoordinatorServer
from im.config import ConfigError, load_products
from im.service import run, setup_logging


def main(argv: Sequence[str] | None = None) -> None:
    config = from_args(argv)
    setup_logging()
    try:
        products = load_products(config.config)
    except ConfigError as exc:
        sys.exit(f"im coordinator: {exc}")

    async def start() -> CoordinatorServer:
        server = CoordinatorServer(config, products)
        await server.start()
        return server

    run(start)


if __name__ == "__main__":
    main()

"""`python -m center` / `im center`: the business HTTP API, over the register service."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from center.config import from_args
from center.server import CenterServer
from im.config import ConfigError, load_admin_key, load_products
from im.service import run, setup_logging


def main(argv: Sequence[str] | None = None) -> None:
    config = from_args(argv)
    setup_logging()
    try:
        products = load_products(config.config)
        admin_key = load_admin_key(config.config)
    except ConfigError as exc:
        sys.exit(f"im center: {exc}")

    async def start() -> CenterServer:
        # Imported here: a launcher running center in-process passes a store of its own.
        from im.register_client import RegisterClient

        store = RegisterClient(config.register, timeout=config.rpc_timeout)
        server = CenterServer(config, store, products, owns_store=True, admin_key=admin_key)
        await server.start()
        return server

    run(start)


if __name__ == "__main__":
    main()

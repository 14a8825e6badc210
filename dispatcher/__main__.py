"""`python -m dispatcher` / `im dispatcher`: the route API, over the register service."""

from __future__ import annotations

from collections.abc import Sequence

from dispatcher.config import from_args
from dispatcher.server import DispatcherServer
from im.register_client import RegisterClient
from im.service import run


def main(argv: Sequence[str] | None = None) -> None:
    config = from_args(argv)

    async def start() -> DispatcherServer:
        source = RegisterClient(config.register, timeout=config.rpc_timeout)
        server = DispatcherServer(config, source)
        await server.start()
        return server

    run(start)


if __name__ == "__main__":
    main()

"""Running one service process: logging, uvloop, and a clean stop on SIGINT or SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Awaitable, Callable
from typing import Protocol

import uvloop


class Service(Protocol):
    async def close(self) -> None: ...


def setup_logging() -> None:
    logging.basicConfig(
        level=os.environ.get("IM_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


async def serve_until_stopped(start: Callable[[], Awaitable[Service]]) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    service = await start()
    await stop.wait()
    logging.getLogger("im").info("stopping")
    await service.close()


def run(start: Callable[[], Awaitable[Service]]) -> None:
    setup_logging()
    uvloop.run(serve_until_stopped(start))

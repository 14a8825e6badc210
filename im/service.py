"""Running one service process: logging, uvloop, and a clean stop on SIGINT or SIGTERM."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
from collections.abc import Awaitable, Callable
from typing import Protocol

import uvloop


class Service(Protocol):
    async def close(self) -> None: ...


def http_url(bound: tuple[str, int] | None, what: str) -> str:
    """The base URL of an HTTP listener bound to (host, port); IPv6 hosts in brackets."""
    if bound is None:
        raise RuntimeError(f"{what} is not started")
    host, port = bound
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def setup_logging() -> None:
    logging.basicConfig(
        level=os.environ.get("IM_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


async def serve_until_stopped(start: Callable[[], Awaitable[Service]]) -> None:
    """SIGINT stops at once. SIGTERM drains a service that can (then stops), and stops the
    others at once; a second signal during a drain cuts it short."""
    stop, term = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGTERM, term.set)
    service = await start()
    # What exists once the service is up (modules, config, listeners) lives as long as the
    # process: frozen, it is no longer walked by the full collections, each of which holds
    # the loop for tens of milliseconds on an instance with thousands of connections.
    gc.freeze()
    finished = getattr(service, "finished", None)
    waits = [stop.wait(), term.wait()]
    if isinstance(finished, asyncio.Event):
        waits.append(finished.wait())
    await _first(waits)
    log = logging.getLogger("im")
    if term.is_set() and not stop.is_set() and hasattr(service, "drain"):
        log.info("draining")
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        await _first([service.drain(), stop.wait()])
    log.info("stopping")
    await service.close()


async def _first(waits: list[Awaitable[object]]) -> None:
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()


def run(start: Callable[[], Awaitable[Service]]) -> None:
    setup_logging()
    uvloop.run(serve_until_stopped(start))

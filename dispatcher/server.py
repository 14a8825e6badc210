"""The dispatcher as an object with a start and a close, so `im up` can run it in its own
loop."""

from __future__ import annotations

import logging

from aiohttp import web

from dispatcher.api import build_app
from dispatcher.config import DispatcherConfig
from dispatcher.nodes import NodeSource, NodeTable
from im.service import http_url

log = logging.getLogger("dispatcher")

#: How long close() lets requests in flight finish.
SHUTDOWN_GRACE_S = 2.0


class DispatcherServer:
    """The HTTP API over the node table of `source` (the register); close() closes the
    source too."""

    def __init__(self, config: DispatcherConfig, source: NodeSource) -> None:
        self.config = config
        self.table = NodeTable(source, max_age_s=config.node_cache_s, stale_s=config.stale_s)
        self._app = build_app(self.table, config)
        self._runner: web.AppRunner | None = None
        self._started = False
        self._bound: tuple[str, int] | None = None

    async def start(self) -> None:
        if self._started:
            raise RuntimeError("dispatcher is already started")
        self._started = True
        try:
            # No access log: one line per route request would cost more than the answer.
            self._runner = web.AppRunner(
                self._app, shutdown_timeout=SHUTDOWN_GRACE_S, access_log=None
            )
            await self._runner.setup()
            await web.TCPSite(self._runner, self.config.host, self.config.port).start()
            host, port = self._runner.addresses[0][:2]
            self._bound = (host, port)
        except BaseException:
            await self.close()
            raise
        log.info("dispatcher listening on %s, register %s", self.url, self.config.register)

    @property
    def url(self) -> str:
        return http_url(self._bound, "dispatcher")

    async def close(self) -> None:
        """Stops what start() started; safe to call twice or after a failed start."""
        if not self._started:
            return
        self._started = False
        self._bound = None
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        await self.table.close()
        log.info("dispatcher closed")

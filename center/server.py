"""Center as an object with a start and a close, so `im up` can run it in its own loop."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from aiohttp import web

from center.api import build_app
from center.config import CenterConfig
from center.push import PushRouter
from im.config import Product
from im.sessions import SessionStore

log = logging.getLogger("center")

#: How long close() lets requests in flight finish.
SHUTDOWN_GRACE_S = 5.0


class CenterServer:
    """The HTTP API over `store`, which close() closes too only if `owns_store`."""

    def __init__(
        self,
        config: CenterConfig,
        store: SessionStore,
        products: Mapping[str, Product],
        *,
        owns_store: bool = False,
    ) -> None:
        self.config = config
        self._store = store
        self._owns_store = owns_store
        self._router = PushRouter(store, rpc_timeout=config.rpc_timeout)
        self._app = build_app(self._router, products, max_body=config.max_body)
        self._runner: web.AppRunner | None = None
        self._bound: tuple[str, int] | None = None

    async def start(self) -> None:
        if self._runner is not None:
            raise RuntimeError("center is already started")
        # No per-request access log: at 1,000 pushes/s it costs ~100 us of CPU per push;
        # im_center_http_requests_total counts every call instead.
        runner = web.AppRunner(self._app, shutdown_timeout=SHUTDOWN_GRACE_S, access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, self.config.host, self.config.port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        host, port = runner.addresses[0][:2]
        self._bound = (host, port)
        log.info("center listening on %s", self.url)

    @property
    def url(self) -> str:
        if self._bound is None:
            raise RuntimeError("center is not started")
        host, port = self._bound
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    async def close(self) -> None:
        if self._runner is None:
            return
        runner, self._runner = self._runner, None
        await runner.cleanup()
        await self._router.close()
        if self._owns_store:
            await self._store.close()
        log.info("center closed")

"""Center as an object with a start and a close, so `im up` can run it in its own loop.

It serves the HTTP API, which publishes jobs on the bus, and runs `config.workers` fan-out
workers in the same loop. On the in-process bus (no `--brokers`) those workers are the
only ones that can read it; with Kafka, workers may also run as their own processes.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import cast

from aiohttp import web

from center.admin import add_admin_routes, business_key_checker
from center.api import Publisher, build_app
from center.config import GROUP, CenterConfig
from center.console import add_console_routes
from center.jobs import PUSH_PARTITIONS, PUSH_TOPIC
from center.push import Directory, RoomCaller
from center.storage import Storage
from center.worker import FanoutWorker
from im.bus import Bus, open_bus
from im.config import Product
from im.saver_client import SaverClient
from im.service import http_url
from im.sessions import SessionStore
from im.switches import SwitchStore
from im.switches_feed import SwitchesFeed

log = logging.getLogger("center")

#: How long close() lets requests in flight finish.
SHUTDOWN_GRACE_S = 5.0


class CenterServer:
    """The HTTP API and the in-process workers over `store` and a bus.

    The bus is `bus` when given (shared with workers started elsewhere in the process),
    else one opened from `config.brokers` and closed by close(). The switches come from
    `switch_store`, else from `store` when it serves them too (the register over RPC does),
    else there are none. close() closes the store too only if `owns_store`.
    """

    def __init__(
        self,
        config: CenterConfig,
        store: SessionStore,
        products: Mapping[str, Product],
        *,
        owns_store: bool = False,
        bus: Bus | None = None,
        switch_store: SwitchStore | None = None,
        admin_key: str | None = None,
    ) -> None:
        self.config = config
        self._store = store
        self._owns_store = owns_store
        self._owns_bus = bus is None
        self.bus = open_bus(config.brokers, idempotence=config.idempotence) if bus is None else bus
        if switch_store is None and hasattr(store, "get_switches"):
            switch_store = cast(SwitchStore, store)  # the register over RPC serves both
        self.switches = SwitchesFeed(switch_store)
        self.workers = [
            FanoutWorker(
                self.bus,
                store,
                name=f"w{i}",
                group=GROUP,
                switches_source=self.switches,
                rpc_timeout=config.rpc_timeout,
            )
            for i in range(config.workers)
        ]
        publisher = Publisher(self.bus, self.switches)
        self._saver = None
        if config.saver:
            self._saver = SaverClient(config.saver, timeout=config.rpc_timeout)
        storage = Storage(self._saver) if self._saver is not None else None
        directory = Directory(store)
        self._caller = RoomCaller(directory, rpc_timeout=config.rpc_timeout, retries=1)
        self._app = build_app(
            directory, publisher, products, storage, self._caller, max_body=config.max_body
        )
        if admin_key is not None and switch_store is not None:
            add_admin_routes(self._app, switch_store, admin_key, business_key_checker(products))
        else:
            log.warning("admin API off: no admin_key in the config (switches cannot be changed)")
        add_console_routes(self._app, store, switch_store, publisher, products, admin_key)
        self._runner: web.AppRunner | None = None
        self._started = False
        self._bound: tuple[str, int] | None = None

    @property
    def app(self) -> web.Application:
        """The aiohttp application, for routes added before start() (the admin API)."""
        return self._app

    async def start(self) -> None:
        if self._started:
            raise RuntimeError("center is already started")
        self._started = True
        try:
            await self._start()
        except BaseException:
            await self.close()
            raise
        log.info(
            "center listening on %s, %d worker(s) in process, bus %s",
            self.url,
            len(self.workers),
            self.config.brokers or "in-process",
        )

    async def _start(self) -> None:
        if self._owns_bus:
            await self.bus.start()
        await self.bus.ensure_topic(PUSH_TOPIC, PUSH_PARTITIONS)
        await self.switches.start()
        for worker in self.workers:
            await worker.start()
        # No per-request access log: at 1,000 pushes/s it costs ~100 us of CPU per push;
        # im_center_http_requests_total counts every call instead.
        self._runner = web.AppRunner(self._app, shutdown_timeout=SHUTDOWN_GRACE_S, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.config.host, self.config.port).start()
        host, port = self._runner.addresses[0][:2]
        self._bound = (host, port)

    @property
    def url(self) -> str:
        return http_url(self._bound, "center")

    async def close(self) -> None:
        """Stops what start() started; safe to call twice or after a failed start."""
        if not self._started:
            return
        self._started = False
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        for worker in self.workers:
            await worker.close()
        await self.switches.close()
        if self._owns_bus:
            await self.bus.close()
        await self._caller.close()
        if self._saver is not None:
            await self._saver.close()
        if self._owns_store:
            await self._store.close()
        log.info("center closed")

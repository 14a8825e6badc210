"""`python -m center.worker_main`: one fan-out worker as its own process, on Kafka.

Run as many as the load needs, each with its own `--name` (the name `room_pin` switches
use) and the same `--group`; Kafka spreads the partitions of `im.push` among them and
hands a dead worker's partitions to the others.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from aiohttp import web

from center.config import WorkerConfig, worker_from_args
from center.worker import FanoutWorker
from im.bus.kafka import KafkaBus
from im.metrics import CONTENT_TYPE_LATEST, exposition
from im.service import run
from im.switches_feed import SwitchesFeed

log = logging.getLogger("center.worker")


class WorkerService:
    """The worker, the switches it follows, and its /metrics and /healthz."""

    def __init__(self, config: WorkerConfig) -> None:
        # Imported here, as center does: the store is the register service over RPC.
        from im.register_client import RegisterClient

        self.config = config
        self.store = RegisterClient(config.register, timeout=config.rpc_timeout)
        self.bus = KafkaBus(
            config.brokers,
            session_timeout=config.session_timeout_s,
            heartbeat_interval=config.session_timeout_s / 10,
        )
        self.switches = SwitchesFeed(self.store)
        self.worker = FanoutWorker(
            self.bus,
            self.store,
            name=config.name,
            group=config.group,
            switches_source=self.switches,
            rpc_timeout=config.rpc_timeout,
        )
        self._http: web.AppRunner | None = None
        self.metrics_port = 0

    async def start(self) -> None:
        try:
            await self.bus.start()
            await self.switches.start()
            await self.worker.start()
            app = web.Application()
            app.router.add_get("/metrics", _metrics)
            app.router.add_get("/healthz", _healthz)
            self._http = web.AppRunner(app, access_log=None)
            await self._http.setup()
            await web.TCPSite(self._http, self.config.host, self.config.metrics_port).start()
        except BaseException:
            await self.close()
            raise
        self.metrics_port = self._http.addresses[0][1]
        log.info(
            "worker %s: brokers %s, group %s, register %s, metrics http://%s:%d/metrics",
            self.config.name,
            self.config.brokers,
            self.config.group,
            self.config.register,
            self.config.host,
            self.metrics_port,
        )

    async def close(self) -> None:
        if self._http is not None:
            await self._http.cleanup()
            self._http = None
        await self.worker.close()
        await self.switches.close()
        await self.bus.close()
        await self.store.close()


async def _metrics(request: web.Request) -> web.Response:
    return web.Response(body=exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def main(argv: Sequence[str] | None = None) -> None:
    config = worker_from_args(argv)

    async def start() -> WorkerService:
        service = WorkerService(config)
        await service.start()
        return service

    run(start)


if __name__ == "__main__":
    main()

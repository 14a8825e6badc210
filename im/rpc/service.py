"""A storage engine served over the internal RPC, with /metrics and /healthz over HTTP.

The register and the saver are both this: an engine behind an RPC server, bad values
answered `bad_request`, and a small HTTP side for operators.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from im.lograte import Throttled
from im.metrics import CONTENT_TYPE_LATEST, exposition
from im.rpc.client import RpcClient
from im.rpc.server import Handler, RpcServer
from im.rpc.wire import TOO_LARGE, UNAVAILABLE, UNENCODABLE, RpcError

log = logging.getLogger("im.rpc")
#: A store outage is logged at most this often per method, not once per call.
OUTAGE_LOG_S = 5.0


def refusing_bad_values(handler: Handler) -> Handler:
    """Params of the wrong shape, or values the engine refuses, are the caller's fault; a
    store that cannot be reached (its Redis restarting or loading) is `unavailable`, which
    callers retry, and is logged once in a while rather than with a traceback per call."""

    outages = Throttled(log, interval=OUTAGE_LOG_S)

    async def call(params: Any) -> Any:
        try:
            return await handler(params)
        except (ValueError, TypeError) as exc:
            raise RpcError("bad_request", str(exc)) from None
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            outages.warning("store", "store unavailable: %s: %s", type(exc).__name__, exc)
            raise RpcError(UNAVAILABLE, f"store unavailable: {exc}") from None

    return call


class EngineService:
    """Subclasses pass their handlers and close their engines after `close()`."""

    def __init__(
        self,
        name: str,
        handlers: Mapping[str, Handler],
        *,
        engine: str,
        health: Callable[[], Awaitable[Any]],
        address: tuple[str, int, int],
    ) -> None:
        self.name = name
        self.address = address  # host, RPC port, HTTP port
        self.engine = engine
        self._health = health
        self.rpc = RpcServer(
            {method: refusing_bad_values(fn) for method, fn in handlers.items()}, name=name
        )
        self._http: web.AppRunner | None = None

    async def start(self) -> None:
        host, port, metrics_port = self.address
        await self.rpc.start(host, port)
        app = web.Application()
        app.router.add_get("/metrics", _metrics)
        app.router.add_get("/healthz", self._healthz)
        self._http = web.AppRunner(app, access_log=None)
        await self._http.setup()
        await web.TCPSite(self._http, host, metrics_port).start()
        log.info(
            "%s: rpc %s, metrics http://%s:%d/metrics, engine %s",
            self.name,
            self.rpc.address,
            host,
            self.metrics_port,
            self.engine,
        )

    @property
    def metrics_port(self) -> int:
        """The bound HTTP port (the configured one may be 0)."""
        if self._http is None:
            raise RuntimeError(f"{self.name} is not started")
        return self._http.addresses[0][1]

    async def close(self) -> None:
        await self.rpc.close()
        if self._http is not None:
            await self._http.cleanup()

    async def _healthz(self, request: web.Request) -> web.Response:
        try:
            await self._health()
        except Exception as exc:  # the engine's own error type varies (redis, ...)
            return web.json_response(
                {"error": {"code": "unavailable", "message": f"store: {exc}"}}, status=503
            )
        return web.json_response({"status": "ok", "engine": self.engine})


async def _metrics(request: web.Request) -> web.Response:
    return web.Response(body=exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})


#: Answers that mean the params were bad (or could not even be sent): ValueError, as the
#: engines themselves raise, so a caller cannot tell an RPC client from a local engine.
CALLERS_FAULT = frozenset({"bad_request", UNENCODABLE, TOO_LARGE})


class EngineClient:
    """The calling side of an EngineService; subclasses add the engine's methods."""

    def __init__(self, address: str, *, name: str, timeout: float = 2.0) -> None:
        self.address = address
        self._rpc = RpcClient(address, timeout=timeout, name=name)

    async def _call(self, method: str, params: Any = None) -> Any:
        try:
            return await self._rpc.call(method, params)
        except RpcError as err:
            if err.code in CALLERS_FAULT:
                raise ValueError(err.message) from None
            raise

    async def close(self) -> None:
        await self._rpc.close()

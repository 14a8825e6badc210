"""The saver service: one MessageStore engine served over the internal RPC.

Methods and their params (msgpack arrays), each answering what the engine returns:

    saver.store            [product, uids, msg, ttl_s]      -> [stored, evicted]
    saver.store_broadcast  [product, msg, ttl_s]            -> [stored, evicted]
    saver.pending          [product, uid, limit, after]     -> [msg, ...]
    saver.ack              [[product, uid, [id, ...]], ...] -> changed count
    saver.written          [product, [[uid, id], ...]]      -> nil
    saver.delivery         [product, id]                    -> [recipients, {uid: state}] | nil
    saver.dead_letters     [product, limit]                 -> [[uid, msg, at_ms], ...]
    saver.idempotency      [product, key, answer, ttl_s]    -> first answer | nil
    saver.ping             nil                              -> nil, once the engine answers

Bad params, and the engine's ValueError, answer `bad_request`.
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web

from im.messages_store import MessageStore
from im.metrics import CONTENT_TYPE_LATEST, exposition
from im.rpc import Handler, RpcError, RpcServer
from saver.config import SaverConfig

log = logging.getLogger("im.saver")


def _refusing_bad_values(handler: Handler) -> Handler:
    """Params of the wrong shape, or values the engine refuses, are the caller's fault."""

    async def call(params: Any) -> Any:
        try:
            return await handler(params)
        except (ValueError, TypeError) as exc:
            raise RpcError("bad_request", str(exc)) from None

    return call


class SaverServer:
    def __init__(self, config: SaverConfig, store: MessageStore) -> None:
        self.config = config
        self.store = store
        handlers = {
            "saver.store": self._store,
            "saver.store_broadcast": self._store_broadcast,
            "saver.pending": self._pending,
            "saver.ack": self._ack,
            "saver.written": self._written,
            "saver.delivery": self._delivery,
            "saver.dead_letters": self._dead_letters,
            "saver.idempotency": self._idempotency,
            "saver.ping": self._ping,
        }
        self.rpc = RpcServer(
            {name: _refusing_bad_values(fn) for name, fn in handlers.items()}, name="saver"
        )
        self._http: web.AppRunner | None = None

    async def start(self) -> None:
        await self.rpc.start(self.config.host, self.config.port)
        app = web.Application()
        app.router.add_get("/metrics", _metrics)
        app.router.add_get("/healthz", self._healthz)
        self._http = web.AppRunner(app, access_log=None)
        await self._http.setup()
        site = web.TCPSite(self._http, self.config.host, self.config.metrics_port)
        await site.start()
        log.info(
            "saver: rpc %s, metrics http://%s:%d/metrics, engine %s",
            self.rpc.address,
            self.config.host,
            self.config.metrics_port,
            type(self.store).__name__,
        )

    @property
    def metrics_port(self) -> int:
        """The bound HTTP port (the configured one may be 0)."""
        if self._http is None:
            raise RuntimeError("saver server is not started")
        return self._http.addresses[0][1]

    async def close(self) -> None:
        await self.rpc.close()
        if self._http is not None:
            await self._http.cleanup()
        await self.store.close()

    async def _store(self, params: Any) -> list[int]:
        product, uids, msg, ttl_s = params
        return list(await self.store.store(product, uids, msg, ttl_s))

    async def _store_broadcast(self, params: Any) -> list[int]:
        product, msg, ttl_s = params
        return list(await self.store.store_broadcast(product, msg, ttl_s))

    async def _pending(self, params: Any) -> list[dict]:
        product, uid, limit, after = params
        return await self.store.pending(product, uid, limit=limit, after=after)

    async def _ack(self, params: Any) -> int:
        return await self.store.ack_many(params)

    async def _written(self, params: Any) -> None:
        product, rows = params
        await self.store.mark_written(product, rows)

    async def _delivery(self, params: Any) -> list | None:
        product, msg_id = params
        found = await self.store.delivery(product, msg_id)
        return None if found is None else [found.recipients, found.states]

    async def _dead_letters(self, params: Any) -> list[list]:
        product, limit = params
        return [
            [letter.uid, letter.msg, letter.at_ms]
            for letter in await self.store.dead_letters(product, limit)
        ]

    async def _idempotency(self, params: Any) -> dict | None:
        product, key, answer, ttl_s = params
        return await self.store.remember_idempotency(product, key, answer, ttl_s)

    async def _ping(self, params: Any) -> None:
        await self.store.ping()

    async def _healthz(self, request: web.Request) -> web.Response:
        try:
            await self.store.ping()
        except Exception as exc:  # the engine's own error type varies (redis, ...)
            return web.json_response(
                {"error": {"code": "unavailable", "message": f"store: {exc}"}}, status=503
            )
        return web.json_response({"status": "ok", "engine": type(self.store).__name__})


async def _metrics(request: web.Request) -> web.Response:
    return web.Response(body=exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})

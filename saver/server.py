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
    saver.recall           [product, key]                   -> answer held | nil
    saver.ping             nil                              -> nil, once the engine answers

Bad params, and the engine's ValueError, answer `bad_request`.
"""

from __future__ import annotations

import logging
from typing import Any

from im.messages_store import MessageStore
from im.rpc.service import EngineService
from saver.config import SaverConfig

log = logging.getLogger("im.saver")


class SaverServer(EngineService):
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
            "saver.recall": self._recall,
            "saver.ping": self._ping,
        }
        super().__init__(
            "saver",
            handlers,
            engine=type(store).__name__,
            health=self.store.ping,
            address=(config.host, config.port, config.metrics_port),
        )

    async def close(self) -> None:
        await super().close()
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

    async def _recall(self, params: Any) -> dict | None:
        product, key = params
        return await self.store.recall_idempotency(product, key)

    async def _ping(self, params: Any) -> None:
        await self.store.ping()

"""The saver service's MessageStore, reached over the internal RPC.

Center and the room instances hold one of these; the saver process holds the engine.
Each method is one RPC whatever the batch size, so callers batch and this stays thin.
"""

from __future__ import annotations

from collections.abc import Sequence

from im.messages_store import (
    DEFAULT_TTL_S,
    IDEMPOTENCY_TTL_S,
    MAX_PENDING_LIMIT,
    AckRow,
    DeadLetter,
    Delivery,
    StoreResult,
)
from im.rpc.service import EngineClient

NAME = "saver"


class SaverClient(EngineClient):
    def __init__(self, address: str, *, timeout: float = 2.0) -> None:
        super().__init__(address, name=NAME, timeout=timeout)

    async def store(
        self, product: str, uids: Sequence[str], msg: dict, ttl_s: float = DEFAULT_TTL_S
    ) -> StoreResult:
        stored, evicted = await self._call("saver.store", [product, uids, msg, ttl_s])
        return StoreResult(stored, evicted)

    async def store_broadcast(
        self, product: str, msg: dict, ttl_s: float = DEFAULT_TTL_S
    ) -> StoreResult:
        stored, evicted = await self._call("saver.store_broadcast", [product, msg, ttl_s])
        return StoreResult(stored, evicted)

    async def pending(
        self, product: str, uid: str, limit: int = MAX_PENDING_LIMIT, after: str = ""
    ) -> list[dict]:
        return await self._call("saver.pending", [product, uid, limit, after])

    async def ack(self, product: str, uid: str, ids: Sequence[str]) -> int:
        return await self.ack_many([(product, uid, ids)])

    async def ack_many(self, rows: Sequence[AckRow]) -> int:
        if not rows:
            return 0
        return await self._call("saver.ack", rows)

    async def mark_written(self, product: str, rows: Sequence[tuple[str, str]]) -> None:
        if rows:
            await self._call("saver.written", [product, rows])

    async def delivery(self, product: str, msg_id: str) -> Delivery | None:
        found = await self._call("saver.delivery", [product, msg_id])
        return None if found is None else Delivery(found[0], found[1])

    async def dead_letters(self, product: str, limit: int = 100) -> list[DeadLetter]:
        rows = await self._call("saver.dead_letters", [product, limit])
        return [DeadLetter(uid, msg, at_ms) for uid, msg, at_ms in rows]

    async def remember_idempotency(
        self, product: str, key: str, answer: dict, ttl_s: float = IDEMPOTENCY_TTL_S
    ) -> dict | None:
        return await self._call("saver.idempotency", [product, key, answer, ttl_s])

    async def recall_idempotency(self, product: str, key: str) -> dict | None:
        return await self._call("saver.recall", [product, key])

    async def ping(self) -> None:
        """Raise RpcError unless the saver and its engine answer."""
        await self._call("saver.ping")

"""Center's side of the saver: QoS 1 messages stored before the answer, delivery states,
and idempotency keys.

Every saver failure becomes an ApiError here, so the handlers read as the flow they are:
a saver that does not answer is a 503 (nothing was accepted), a value the saver refuses is
the caller's 400.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from prometheus_client import Counter

from center.errors import INVALID_FIELD, UNAVAILABLE, ApiError
from im.messages_store import Delivery, MessageStore, StoreResult
from im.rpc import RpcError

log = logging.getLogger("center.storage")

#: Longest Idempotency-Key header accepted; the saver's own limit leaves room for a prefix.
MAX_IDEMPOTENCY_KEY = 200
CONFLICT = "idempotency_conflict"

IDEMPOTENT = Counter(
    "im_center_idempotent_requests_total",
    "Requests with an Idempotency-Key: first, replayed (the first answer returned), "
    "resumed (an unfinished first attempt completed with its message id), conflict",
    ["result"],
)

T = TypeVar("T")


def saver_unavailable() -> ApiError:
    return ApiError(
        503,
        UNAVAILABLE,
        "the message saver is unavailable; nothing was stored; retry later",
        {"Retry-After": "1"},
    )


async def _saver(call: Awaitable[T]) -> T:
    try:
        return await call
    except ValueError as exc:  # the saver refused the value (too large, say)
        raise ApiError(400, INVALID_FIELD, f"the message cannot be stored: {exc}") from None
    except (RpcError, OSError, TimeoutError) as exc:
        log.warning("saver call failed: %s: %s", type(exc).__name__, exc)
        raise saver_unavailable() from None


def check_idempotency_key(value: str | None) -> str | None:
    if value is None:
        return None
    key = value.strip()
    # ASCII only: HTTP leaves other header bytes undefined (obs-text), so keys would not
    # round-trip between clients.
    if not 0 < len(key) <= MAX_IDEMPOTENCY_KEY or not (key.isascii() and key.isprintable()):
        raise ApiError(
            400,
            INVALID_FIELD,
            f"header 'Idempotency-Key' must be 1 to {MAX_IDEMPOTENCY_KEY} printable ASCII "
            "characters",
        )
    return key


def fingerprint(route: str, body: bytes) -> str:
    """What makes two requests the same one: the route and the exact body."""
    return hashlib.sha256(route.encode() + b"\0" + body).hexdigest()[:32]


class Storage:
    """QoS 1 storage and idempotency over a MessageStore (the saver over RPC)."""

    def __init__(self, store: MessageStore) -> None:
        self.store = store

    async def store_users(
        self, product: str, uids: tuple[str, ...], push: dict[str, Any], ttl_s: float
    ) -> StoreResult:
        return await _saver(self.store.store(product, list(uids), push, ttl_s))

    async def store_broadcast(
        self, product: str, push: dict[str, Any], ttl_s: float
    ) -> StoreResult:
        return await _saver(self.store.store_broadcast(product, push, ttl_s))

    async def delivery(self, product: str, msg_id: str) -> Delivery | None:
        return await _saver(self.store.delivery(product, msg_id))

    async def once(
        self,
        product: str,
        key: str,
        print_: str,
        new_id: str,
        work: Callable[[str], Awaitable[dict[str, Any]]],
    ) -> tuple[dict[str, Any], bool]:
        """The answer of the request under `key`, and whether it was replayed.

        The first request reserves its message id under the key, does `work(id)` and keeps
        the answer for 24 h; a repeat gets that answer back untouched. A repeat that finds
        only the reservation (the first attempt failed half-way or is still running) does
        the work again with the reserved id: storing an id twice adds nothing and the
        clients drop a repeated id, so nothing is delivered twice to the application."""
        answered = await _saver(self.store.recall_idempotency(product, "a:" + key))
        if answered is not None:
            self._same_request(answered, print_)
            IDEMPOTENT.labels("replayed").inc()
            return answered["answer"], True
        reserved = await _saver(
            self.store.remember_idempotency(product, "r:" + key, {"id": new_id, "fp": print_})
        )
        if reserved is not None:
            self._same_request(reserved, print_)
            new_id = reserved["id"]
        answer = await work(new_id)
        first = await _saver(
            self.store.remember_idempotency(product, "a:" + key, {"answer": answer, "fp": print_})
        )
        IDEMPOTENT.labels("first" if reserved is None else "resumed").inc()
        if first is not None:  # a concurrent repeat finished first: one answer for all
            return first["answer"], True
        return answer, False

    @staticmethod
    def _same_request(held: dict[str, Any], print_: str) -> None:
        if held.get("fp") != print_:
            IDEMPOTENT.labels("conflict").inc()
            raise ApiError(
                422,
                CONFLICT,
                "this Idempotency-Key was used for a different request in the last 24 h; "
                "use a new key for a new request",
            )

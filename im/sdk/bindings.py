"""The SDK's side of several products on one connection: which products are bound, which
bind frames wait for their answer, and the futures of the callers waiting on them.

Pure bookkeeping (no I/O): the client sends the frames and feeds the answers in.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

#: Products one client binds besides its first (the server's own limit is 8).
MAX_BINDS = 8


class BindRefused(ValueError):
    """The server refused a bind (bad token, already bound, too many products)."""

    def __init__(self, product: str, code: int, reason: str) -> None:
        super().__init__(f"bind of {product!r} refused ({code}): {reason}")
        self.product = product
        self.code = code
        self.reason = reason


class Bindings:
    __slots__ = ("frames", "_sent", "_waiting")

    def __init__(self) -> None:
        self.frames: dict[str, dict[str, Any]] = {}  # product -> bind frame, sent after auth
        self._sent: deque[str] = deque()  # binds on this connection awaiting an answer
        self._waiting: dict[str, list[asyncio.Future[None]]] = {}

    def want(self, product: str, token: str, uid: str | None) -> asyncio.Future[None]:
        if product not in self.frames and len(self.frames) >= MAX_BINDS:
            raise ValueError(f"at most {MAX_BINDS} bound products per client")
        frame = {"op": "bind", "product": product, "token": token}
        if uid is not None:
            frame["uid"] = uid
        self.frames[product] = frame
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(product, []).append(waiter)
        return waiter

    def sent(self, product: str) -> None:
        self._sent.append(product)

    def forget(self, product: str) -> None:
        self.frames.pop(product, None)

    def bound(self, product: str) -> None:
        if product in self._sent:
            self._sent.remove(product)
        for waiter in self._waiting.pop(product, ()):
            if not waiter.done():
                waiter.set_result(None)

    def refused(self, code: int, reason: str) -> None:
        """The oldest bind in flight was refused: it is forgotten, its callers hear why."""
        if not self._sent:
            return
        product = self._sent.popleft()
        self.frames.pop(product, None)
        for waiter in self._waiting.pop(product, ()):
            if not waiter.done():
                waiter.set_exception(BindRefused(product, code, reason))

    def connection_lost(self) -> None:
        """Answers to binds of the lost connection will not come; they are sent again."""
        self._sent.clear()

    def fail(self, exc: Exception) -> None:
        waiting, self._waiting = self._waiting, {}
        for waiters in waiting.values():
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_exception(exc)

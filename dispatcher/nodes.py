"""The register's node table as the dispatcher sees it: fetched at most once per period
whatever the request rate, shared by every request waiting for it, and served a while longer
when the register cannot be reached."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Protocol

from prometheus_client import Counter, Gauge

from im.rpc import RpcError
from im.sessions import Node

log = logging.getLogger("dispatcher.nodes")

NODES = Gauge("im_dispatcher_nodes", "Room instances in the dispatcher's node table")
REGISTER_ERRORS = Counter(
    "im_dispatcher_register_errors_total", "Node table reads from the register that failed"
)


class NodeSource(Protocol):
    """Where the table comes from: the register over RPC (`RegisterClient`)."""

    async def nodes(self) -> list[Node]: ...

    async def close(self) -> None: ...


class RegisterUnavailable(Exception):
    """No node table young enough to serve: the register failed for longer than stale_s."""


class NodeTable:
    def __init__(
        self,
        source: NodeSource,
        *,
        max_age_s: float,
        stale_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._source = source
        self._max_age_s = max_age_s
        self._stale_s = stale_s
        self._clock = clock
        self._nodes: list[Node] | None = None
        self._fetched_at = 0.0  # when the table held now was asked for
        self._tried_at = -max_age_s  # when the register was last asked, whatever came of it
        self._pending: asyncio.Future[None] | None = None

    async def get(self) -> list[Node]:
        """The live instances; RegisterUnavailable when there is no table to serve."""
        now = self._clock()
        if self._pending is None:
            if now - self._tried_at < self._max_age_s:
                return self._cached(now)
            self._tried_at = now
            self._pending = asyncio.ensure_future(self._fetch(now))
        # Shielded: a request that goes away must not cancel the read others wait for.
        await asyncio.shield(self._pending)
        return self._cached(self._clock())

    def _cached(self, now: float) -> list[Node]:
        if self._nodes is None or now - self._fetched_at > self._stale_s:
            raise RegisterUnavailable("the register is unavailable and no node table is known")
        return self._nodes

    async def _fetch(self, started: float) -> None:
        """Keeps the old table when the register fails; get() decides if it is too old."""
        try:
            nodes = await self._source.nodes()
        except (RpcError, OSError, ValueError) as exc:
            REGISTER_ERRORS.inc()
            log.warning("reading the node table failed: %s: %s", type(exc).__name__, exc)
            return
        finally:
            self._pending = None
        self._nodes, self._fetched_at = nodes, started
        NODES.set(len(nodes))

    async def close(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.cancel()
        await self._source.close()

"""What a push is routed through: the register's reads and the room instances' RPC.

Both halves of center use this. The API reads the register to answer (sessions online,
room members) and to know the switches in force; the fan-out workers read it to route
(sessions in batches, the room -> instances index, the node table) and call the rooms.

A room RPC either answers, or finds its instance gone from the node table (its lease
expired: nobody is left there to receive), or fails in a way worth retrying (cannot
connect, no answer in time, overloaded). Those are retried with a doubling backoff; after
the last try the caller hears `Unreachable` and decides (a worker leaves the job
uncommitted so the bus redelivers it).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Sequence
from typing import Any

from prometheus_client import Counter

from im.rpc import RpcClient, RpcError, RpcTimeout, RpcUnavailable
from im.rpc.wire import OVERLOADED
from im.sessions import Session, SessionStore

log = logging.getLogger("center.push")

LOOKUP_BATCH = 1000
#: How long the node table (instance -> RPC address) is reused before asking again.
NODE_CACHE_S = 1.0
#: An instance missing from the table (or failing) refreshes it early, at most this often,
#: so a room that just started is reachable at once and one that left is seen as gone.
NODE_MISS_REFRESH_S = 0.1
#: A failing instance is logged at most once per interval, not once per push.
WARN_INTERVAL_S = 5.0
#: Retries of a room RPC that failed in a way worth retrying, and the first pause.
RPC_RETRIES = 4
RPC_BACKOFF_S = 0.1
#: The throttle subject of register failures (instance names are the others).
REGISTER = "\0register"

RPC_FAILURES = Counter(
    "im_worker_rpc_failures_total",
    "Room RPC attempts that failed, by method and reason (retried ones included)",
    ["method", "reason"],
)


class WarnThrottle:
    """Lets a warning about one subject through at most once per interval."""

    __slots__ = ("_interval", "_last")

    def __init__(self, interval: float = WARN_INTERVAL_S) -> None:
        self._interval = interval
        self._last: dict[str, float] = {}

    def ready(self, subject: str) -> bool:
        now = time.monotonic()
        if now - self._last.get(subject, -float("inf")) < self._interval:
            return False
        self._last[subject] = now
        return True

    def forget_old(self) -> None:
        """Drop subjects quiet for a whole interval, so the table stays small."""
        cutoff = time.monotonic() - self._interval
        for subject in [s for s, at in self._last.items() if at < cutoff]:
            del self._last[subject]


class RegisterUnavailable(Exception):
    """The session register did not answer; nothing can be routed now."""


class Unreachable(Exception):
    """A live room instance did not answer, retries included."""


def group_by_instance(found: Iterable[Sequence[Session]]) -> dict[str, list[str]]:
    """instance -> connection ids, from the sessions of every uid."""
    groups: dict[str, list[str]] = {}
    for sessions in found:
        for session in sessions:
            groups.setdefault(session.instance, []).append(session.conn)
    return groups


class Directory:
    """The register's reads: batched session lookups, room index, cached node table."""

    def __init__(self, store: SessionStore, *, lookup_batch: int = LOOKUP_BATCH) -> None:
        self._store = store
        self._lookup_batch = lookup_batch
        self._addresses: dict[str, str] = {}
        self._nodes_at = -float("inf")
        self._nodes_lock = asyncio.Lock()
        self.warnings = WarnThrottle()

    async def lookup(self, product: str, uids: Sequence[str]) -> dict[str, list[Session]]:
        """Live sessions of `uids`, asked in batches of `lookup_batch`, all at once."""
        step = self._lookup_batch
        found = await asyncio.gather(
            *(self._read(self._store.lookup(product, uids[i : i + step]), "lookup")
              for i in range(0, len(uids), step))
        )  # fmt: skip
        merged: dict[str, list[Session]] = {}
        for part in found:
            merged.update(part)
        return merged

    async def online(self, product: str, uids: Sequence[str]) -> int:
        found = await self.lookup(product, uids)
        return sum(len(sessions) for sessions in found.values())

    async def room_instances(self, product: str, room: str) -> dict[str, int]:
        return await self._read(self._store.room_instances(product, room), "room index")

    async def addresses(self, max_age: float = NODE_CACHE_S) -> dict[str, str]:
        """instance -> RPC address of every live instance, at most `max_age` seconds old.
        A new dict whenever it was refreshed, so holders can tell."""
        if time.monotonic() - self._nodes_at < max_age:
            return self._addresses
        async with self._nodes_lock:
            if time.monotonic() - self._nodes_at < max_age:  # another task just refreshed it
                return self._addresses
            nodes = await self._read(self._store.nodes(), "node table")
            self._addresses = {node.instance: node.rpc for node in nodes}
            self._nodes_at = time.monotonic()
            self.warnings.forget_old()
        return self._addresses

    @property
    def table(self) -> dict[str, str]:
        """The node table as last read, without asking the register."""
        return self._addresses

    async def address(self, instance: str) -> str | None:
        """The RPC address of `instance`, or None when it is not live (its lease is gone)."""
        found = (await self.addresses()).get(instance)
        if found is None:
            found = (await self.addresses(NODE_MISS_REFRESH_S)).get(instance)
        return found

    async def _read(self, call: Any, what: str) -> Any:
        try:
            return await call
        except Exception as exc:
            if self.warnings.ready(REGISTER):
                log.warning("register %s failed: %s: %s", what, type(exc).__name__, exc)
            raise RegisterUnavailable(f"{what}: {exc}") from exc


def _retry_reason(exc: RpcError) -> str | None:
    """The metric reason of a failure worth retrying; None when the room answered."""
    if isinstance(exc, RpcTimeout):
        return "rpc_timeout"
    if isinstance(exc, RpcUnavailable):
        return "rpc_unavailable"
    if exc.code == OVERLOADED:
        return "overloaded"
    return None


class RoomCaller:
    """RPCs to room instances by name; one RpcClient per address, kept until it leaves."""

    def __init__(
        self,
        directory: Directory,
        *,
        rpc_timeout: float = 2.0,
        retries: int = RPC_RETRIES,
        backoff: float = RPC_BACKOFF_S,
    ) -> None:
        self._directory = directory
        self._rpc_timeout = rpc_timeout
        self._retries = retries
        self._backoff = backoff
        self._clients: dict[str, RpcClient] = {}
        self._table: dict[str, str] = {}

    async def call(
        self, instance: str, method: str, params: Any, *, extra_timeout: float = 0.0
    ) -> Any | None:
        """The room's answer, or None when there is no answer to wait for: the instance is
        gone, or it refused the call (counted and logged). Unreachable after the retries;
        RegisterUnavailable when the node table cannot be read."""
        for attempt in range(self._retries + 1):
            if attempt:
                await asyncio.sleep(self._backoff * 2 ** (attempt - 1))
            address = await self._directory.address(instance)
            if address is None:
                self._failed(instance, method, "gone", "not in the node table")
                return None
            try:
                client = await self._client(address)
            except ValueError as exc:
                self._failed(instance, method, "bad_address", str(exc))
                return None
            try:
                return await client.call(method, params, timeout=self._rpc_timeout + extra_timeout)
            except RpcError as exc:
                reason = _retry_reason(exc)
                self._failed(instance, method, reason or "rpc_error", f"{address}: {exc}")
                if reason is None:
                    return None
        raise Unreachable(f"{instance}: {method} failed {self._retries + 1} times")

    async def close(self) -> None:
        clients = list(self._clients.values())
        self._clients.clear()
        await asyncio.gather(*(client.close() for client in clients))

    async def _client(self, address: str) -> RpcClient:
        table = self._directory.table
        if table is not self._table:
            self._table = table
            await self._drop_departed(set(table.values()))
        client = self._clients.get(address)
        if client is None:
            client = RpcClient(address, timeout=self._rpc_timeout, name="center-room")
            self._clients[address] = client
        return client

    async def _drop_departed(self, live: set[str]) -> None:
        """Close clients of addresses no longer in the node table, so they do not pile up."""
        gone = [self._clients.pop(a) for a in list(self._clients) if a not in live]
        await asyncio.gather(*(client.close() for client in gone), return_exceptions=True)

    def _failed(self, instance: str, method: str, reason: str, detail: str) -> None:
        RPC_FAILURES.labels(method, reason).inc()
        if self._directory.warnings.ready(instance):
            log.warning("%s to room instance %r failed (%s): %s", method, instance, reason, detail)

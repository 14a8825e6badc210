"""Routing a push: uids -> sessions (register) -> one RPC per room instance.

Lookups go to the register in batches; the sessions found are grouped by the instance
that holds them, and each instance gets a single `push` RPC carrying all of its
connections, all instances at once. An instance that is gone or fails costs only its own
sessions: they are counted as not written and the push goes on. Only a register that
cannot answer fails the whole call, because then nothing can be routed at all.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from prometheus_client import Counter, Histogram

from im.rpc import RpcClient, RpcError, RpcTimeout, RpcUnavailable
from im.sessions import Session, SessionStore

log = logging.getLogger("center.push")

LOOKUP_BATCH = 1000
#: How long the node table (instance -> RPC address) is reused before asking again.
NODE_CACHE_S = 1.0
#: A session on an instance missing from the table refreshes it early, at most this often,
#: so a room that just started is reachable at once without a lookup per push.
NODE_MISS_REFRESH_S = 0.1
#: A failing instance is logged at most once per interval, not once per push.
WARN_INTERVAL_S = 5.0
#: The throttle subject of register failures (instance names are the others).
REGISTER = "\0register"

PUSH_SECONDS = Histogram("im_center_push_seconds", "Time to route one push to the rooms")
SESSIONS_WRITTEN = Counter(
    "im_center_sessions_written_total", "Sessions a push was written to, as the rooms report"
)
ROUTE_FAILURES = Counter(
    "im_center_route_failures_total",
    "Sessions a push could not be written to, by reason",
    ["reason"],
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
    """The session register did not answer; no push can be routed."""


def group_by_instance(found: Iterable[Sequence[Session]]) -> dict[str, list[str]]:
    """instance -> connection ids, from the sessions of every uid."""
    groups: dict[str, list[str]] = {}
    for sessions in found:
        for session in sessions:
            groups.setdefault(session.instance, []).append(session.conn)
    return groups


def _failure_reason(exc: RpcError) -> str:
    if isinstance(exc, RpcTimeout):
        return "rpc_timeout"
    if isinstance(exc, RpcUnavailable):
        return "rpc_unavailable"
    return "rpc_error"


class PushRouter:
    """Sends pushes to the rooms; one RpcClient per room address, kept until it leaves."""

    def __init__(
        self,
        store: SessionStore,
        *,
        rpc_timeout: float = 2.0,
        lookup_batch: int = LOOKUP_BATCH,
    ) -> None:
        self._store = store
        self._rpc_timeout = rpc_timeout
        self._lookup_batch = lookup_batch
        self._addresses: dict[str, str] = {}
        self._nodes_at = -float("inf")
        self._nodes_lock = asyncio.Lock()
        self._clients: dict[str, RpcClient] = {}
        self._warnings = WarnThrottle()

    async def sessions(self, product: str, uid: str) -> list[Session]:
        found = await self._lookup(product, [uid])
        return found.get(uid, [])

    async def push(self, product: str, uids: Sequence[str], msg: Mapping[str, Any]) -> int:
        """Write `msg` to every live session of `uids`; the number of sessions written."""
        with PUSH_SECONDS.time():
            step = self._lookup_batch
            batches = [uids[i : i + step] for i in range(0, len(uids), step)]
            results = await asyncio.gather(*(self._lookup(product, batch) for batch in batches))
            groups = group_by_instance(s for found in results for s in found.values())
            if not groups:
                return 0
            addresses = await self._node_addresses(NODE_CACHE_S)
            if not groups.keys() <= addresses.keys():
                addresses = await self._node_addresses(NODE_MISS_REFRESH_S)
            written = await asyncio.gather(
                *(
                    self._push_instance(instance, addresses.get(instance), conns, msg)
                    for instance, conns in groups.items()
                )
            )
        total = sum(written)
        SESSIONS_WRITTEN.inc(total)
        return total

    async def close(self) -> None:
        clients = list(self._clients.values())
        self._clients.clear()
        await asyncio.gather(*(client.close() for client in clients))

    async def _lookup(self, product: str, uids: Sequence[str]) -> dict[str, list[Session]]:
        try:
            return await self._store.lookup(product, uids)
        except Exception as exc:
            if self._warnings.ready(REGISTER):
                log.warning("register lookup failed: %s: %s", type(exc).__name__, exc)
            raise RegisterUnavailable(str(exc)) from exc

    async def _node_addresses(self, max_age: float) -> dict[str, str]:
        if time.monotonic() - self._nodes_at < max_age:
            return self._addresses
        async with self._nodes_lock:
            if time.monotonic() - self._nodes_at < max_age:  # another push just refreshed it
                return self._addresses
            try:
                nodes = await self._store.nodes()
            except Exception as exc:
                if self._warnings.ready(REGISTER):
                    log.warning("register node table failed: %s: %s", type(exc).__name__, exc)
                raise RegisterUnavailable(str(exc)) from exc
            self._addresses = {node.instance: node.rpc for node in nodes}
            self._nodes_at = time.monotonic()
            await self._drop_departed()
        return self._addresses

    async def _drop_departed(self) -> None:
        """Close clients of addresses no longer in the node table, so they do not pile up."""
        live = set(self._addresses.values())
        gone = [address for address in self._clients if address not in live]
        closing = [self._clients.pop(address).close() for address in gone]
        await asyncio.gather(*closing, return_exceptions=True)
        self._warnings.forget_old()

    def _client(self, address: str) -> RpcClient:
        client = self._clients.get(address)
        if client is None:
            client = RpcClient(address, timeout=self._rpc_timeout, name="center-room")
            self._clients[address] = client
        return client

    async def _push_instance(
        self, instance: str, address: str | None, conns: list[str], msg: Mapping[str, Any]
    ) -> int:
        if address is None:
            self._failed(instance, "unknown_instance", len(conns), "not in the node table")
            return 0
        try:
            client = self._client(address)
        except ValueError as exc:
            self._failed(instance, "bad_address", len(conns), str(exc))
            return 0
        params = {"items": [{"conns": conns, "msg": msg}]}
        try:
            reply = await client.call("push", params)
        except RpcError as exc:
            self._failed(instance, _failure_reason(exc), len(conns), f"{address}: {exc}")
            return 0
        written = reply.get("written") if isinstance(reply, dict) else None
        if type(written) is not int or not 0 <= written <= len(conns):
            self._failed(instance, "bad_reply", len(conns), f"{address} answered {reply!r:.200}")
            return 0
        missing = reply.get("missing")
        if isinstance(missing, list) and missing:
            ROUTE_FAILURES.labels("missing").inc(len(missing))
        return written

    def _failed(self, instance: str, reason: str, sessions: int, detail: str) -> None:
        ROUTE_FAILURES.labels(reason).inc(sessions)
        if self._warnings.ready(instance):
            log.warning(
                "push to room instance %r failed (%s, %d sessions not written): %s",
                instance,
                reason,
                sessions,
                detail,
            )

"""The embedded engine: sessions and nodes in process memory, leases on the monotonic clock."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

from im.sessions import Node, Session

# Users examined by the amortised sweep per stored session, and at least per call: each put
# pays for sweeping more users than it can add, so expired users never pile up.
_SWEEP_PER_SESSION = 2
_SWEEP_MIN = 64

_UserKey = tuple[str, str]


def _check_ttl(ttl: float) -> None:
    if not 0 < ttl < math.inf:
        raise ValueError(f"ttl must be a positive finite number of seconds, got {ttl!r}")


class MemoryStore:
    """Per-user dict of conn -> (session, expiry); expired entries are invisible at once
    and dropped lazily on lookup or by a sweep that each put advances a little."""

    def __init__(self) -> None:
        self._users: dict[_UserKey, dict[str, tuple[Session, float]]] = {}
        self._nodes: dict[str, tuple[Node, float]] = {}
        self._sweep_pending: list[_UserKey] = []
        self._entries = 0

    def __len__(self) -> int:
        """Session entries held, including expired ones not swept yet (bounds memory)."""
        return self._entries

    async def put_sessions(self, sessions: Sequence[Session], ttl: float) -> None:
        _check_ttl(ttl)
        now = time.monotonic()
        expiry = now + ttl
        for session in sessions:
            conns = self._users.setdefault((session.product, session.uid), {})
            if session.conn not in conns:
                self._entries += 1
            conns[session.conn] = (session, expiry)
        self._sweep(max(_SWEEP_MIN, _SWEEP_PER_SESSION * len(sessions)), now)

    async def remove_sessions(self, sessions: Sequence[Session]) -> None:
        for session in sessions:
            key = (session.product, session.uid)
            conns = self._users.get(key)
            if conns is not None and conns.pop(session.conn, None) is not None:
                self._entries -= 1
                if not conns:
                    del self._users[key]

    async def lookup(self, product: str, uids: Sequence[str]) -> dict[str, list[Session]]:
        now = time.monotonic()
        found: dict[str, list[Session]] = {}
        for uid in uids:
            key = (product, uid)
            conns = self._users.get(key)
            if conns is None:
                continue
            self._drop_expired(key, conns, now)
            if conns:
                found[uid] = [session for session, _ in conns.values()]
        return found

    async def put_node(self, node: Node, ttl: float) -> None:
        _check_ttl(ttl)
        self._nodes[node.instance] = (node, time.monotonic() + ttl)

    async def remove_node(self, instance: str) -> None:
        self._nodes.pop(instance, None)

    async def nodes(self) -> list[Node]:
        now = time.monotonic()
        expired = [instance for instance, (_, expiry) in self._nodes.items() if expiry <= now]
        for instance in expired:
            del self._nodes[instance]
        return [node for node, _ in self._nodes.values()]

    async def close(self) -> None:
        self._users.clear()
        self._nodes.clear()
        self._sweep_pending.clear()
        self._entries = 0

    def _drop_expired(
        self, key: _UserKey, conns: dict[str, tuple[Session, float]], now: float
    ) -> None:
        expired = [conn for conn, (_, expiry) in conns.items() if expiry <= now]
        for conn in expired:
            del conns[conn]
        self._entries -= len(expired)
        if not conns:
            del self._users[key]

    def _sweep(self, budget: int, now: float) -> None:
        """Examine up to `budget` users of a snapshot, taking a new snapshot when it runs out;
        the snapshot lets the sweep walk the dict while puts and removes change it."""
        pending = self._sweep_pending
        if not pending:
            pending.extend(self._users)
        while budget and pending:
            key = pending.pop()
            budget -= 1
            conns = self._users.get(key)
            if conns is not None:
                self._drop_expired(key, conns, now)

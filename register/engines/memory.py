"""The embedded engine: sessions, rooms and nodes in process memory, leases on the monotonic
clock."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from im.sessions import Node, RoomCount, RoomLoad, Session, check_top_limit, checked_rooms, ranked

# Keys (users, rooms) examined by the amortised sweep per row stored, and at least per call:
# each put pays for sweeping more keys than it can add, so expired keys never pile up.
_SWEEP_PER_SESSION = 2
_SWEEP_MIN = 64

_UserKey = tuple[str, str]
_RoomKey = tuple[str, str]
_K = TypeVar("_K")
_V = TypeVar("_V", bound=dict[str, Any])


def _check_ttl(ttl: float) -> None:
    if not 0 < ttl < math.inf:
        raise ValueError(f"ttl must be a positive finite number of seconds, got {ttl!r}")


class MemoryStore:
    """Per-user dict of conn -> (session, expiry) and per-room dict of instance -> (count,
    expiry); expired entries are invisible at once and dropped lazily on lookup or by a
    sweep that each put advances a little."""

    def __init__(self) -> None:
        self._users: dict[_UserKey, dict[str, tuple[Session, float]]] = {}
        self._rooms: dict[_RoomKey, dict[str, tuple[int, float]]] = {}
        self._nodes: dict[str, tuple[Node, float]] = {}
        self._sweep_pending: list[_UserKey] = []
        self._room_sweep_pending: list[_RoomKey] = []
        self._entries = 0
        # Data lives exactly as long as this object, and so does its epoch.
        self._epoch = os.urandom(8).hex()

    def __len__(self) -> int:
        """Session entries held, including expired ones not swept yet (bounds memory)."""
        return self._entries

    @property
    def room_entries(self) -> int:
        """(room, instance) entries held, including expired ones not swept yet."""
        return sum(len(instances) for instances in self._rooms.values())

    async def put_sessions(self, sessions: Sequence[Session], ttl: float) -> None:
        _check_ttl(ttl)
        now = time.monotonic()
        expiry = now + ttl
        for session in sessions:
            conns = self._users.setdefault((session.product, session.uid), {})
            if session.conn not in conns:
                self._entries += 1
            conns[session.conn] = (session, expiry)
        budget = max(_SWEEP_MIN, _SWEEP_PER_SESSION * len(sessions))
        _sweep(self._users, self._sweep_pending, self._drop_expired, budget, now)

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
            self._drop_expired(self._users, key, conns, now)
            if conns:
                found[uid] = [session for session, _ in conns.values()]
        return found

    async def put_rooms(self, instance: str, rooms: Sequence[RoomCount], ttl: float) -> None:
        _check_ttl(ttl)
        rows = checked_rooms(rooms)
        now = time.monotonic()
        expiry = now + ttl
        for product, room, count in rows:
            key = (product, room)
            if count:
                self._rooms.setdefault(key, {})[instance] = (count, expiry)
                continue
            instances = self._rooms.get(key)
            if instances is not None:
                instances.pop(instance, None)
                if not instances:
                    del self._rooms[key]
        budget = max(_SWEEP_MIN, _SWEEP_PER_SESSION * len(rows))
        _sweep(self._rooms, self._room_sweep_pending, _drop_expired_room, budget, now)

    async def room_instances(self, product: str, room: str) -> dict[str, int]:
        key = (product, room)
        instances = self._rooms.get(key)
        if instances is None:
            return {}
        _drop_expired_room(self._rooms, key, instances, time.monotonic())
        return {instance: count for instance, (count, _) in instances.items()}

    async def top_rooms(self, limit: int) -> list[RoomLoad]:
        check_top_limit(limit)
        now = time.monotonic()
        loads = (
            RoomLoad(product, room, live)
            for (product, room), instances in self._rooms.items()
            if (live := {i: count for i, (count, expiry) in instances.items() if expiry > now})
        )
        return ranked(loads, limit)

    async def put_node(self, node: Node, ttl: float) -> str:
        _check_ttl(ttl)
        self._nodes[node.instance] = (node, time.monotonic() + ttl)
        return self._epoch

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
        self._rooms.clear()
        self._nodes.clear()
        self._sweep_pending.clear()
        self._room_sweep_pending.clear()
        self._entries = 0

    def _drop_expired(
        self,
        users: dict[_UserKey, dict[str, tuple[Session, float]]],
        key: _UserKey,
        conns: dict[str, tuple[Session, float]],
        now: float,
    ) -> None:
        expired = [conn for conn, (_, expiry) in conns.items() if expiry <= now]
        for conn in expired:
            del conns[conn]
        self._entries -= len(expired)
        if not conns:
            del users[key]


def _drop_expired_room(
    rooms: dict[_RoomKey, dict[str, tuple[int, float]]],
    key: _RoomKey,
    instances: dict[str, tuple[int, float]],
    now: float,
) -> None:
    expired = [instance for instance, (_, expiry) in instances.items() if expiry <= now]
    for instance in expired:
        del instances[instance]
    if not instances:
        del rooms[key]


def _sweep(
    table: dict[_K, _V],
    pending: list[_K],
    drop_expired: Callable[[dict[_K, _V], _K, _V, float], None],
    budget: int,
    now: float,
) -> None:
    """Examine up to `budget` keys of a snapshot of `table`, taking a new snapshot when it
    runs out; the snapshot lets the sweep walk the dict while puts and removes change it."""
    if not pending:
        pending.extend(table)
    while budget and pending:
        key = pending.pop()
        budget -= 1
        entries = table.get(key)
        if entries is not None:
            drop_expired(table, key, entries, now)

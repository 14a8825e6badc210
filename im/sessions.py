"""The register's data model and the interface every session store implements.

Room instances write sessions, their chat-room member counts and their node lease here;
center reads them to route pushes. The register service holds one engine (memory or
Redis) and serves this same interface over RPC (`im.register_client.RegisterClient`), so
callers never know which.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Session:
    """One authenticated connection of a user, on one room instance."""

    product: str
    uid: str
    conn: str
    instance: str
    device: str = ""

    def to_wire(self) -> list[str]:
        return [self.product, self.uid, self.conn, self.instance, self.device]

    @classmethod
    def from_wire(cls, fields: Sequence[str]) -> Session:
        product, uid, conn, instance, device = fields
        return cls(product, uid, conn, instance, device)


@dataclass(frozen=True, slots=True)
class Node:
    """A live room instance: where clients connect, where center sends its RPCs, and the load
    the dispatcher balances on."""

    instance: str
    rpc: str  # host:port of the instance's internal RPC listener
    ws: str = ""  # ws://host:port/ws, wss:// with TLS
    tcp: str = ""  # host:port; tcps://host:port when the listener is TLS
    idc: str = "default"
    conns: int = 0
    isp: str = ""  # network (carrier) tag; "" = any
    max_conns: int = 0  # 0 = no limit
    conn_rate: float = 0.0  # connections accepted per second over the last renewal interval
    max_conn_rate: float = 0.0  # 0 = no limit
    draining: bool = False  # stopped accepting: send no new clients here

    def __post_init__(self) -> None:
        for name in ("instance", "rpc", "ws", "tcp", "idc", "isp"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"node {name} must be a string, got {getattr(self, name)!r}")
        for name in ("conns", "max_conns", "conn_rate", "max_conn_rate"):
            value = getattr(self, name)
            if not 0 <= value < math.inf:
                raise ValueError(f"node {name} must be a finite number >= 0, got {value!r}")

    def to_wire(self) -> list:
        return [
            self.instance,
            self.rpc,
            self.ws,
            self.tcp,
            self.idc,
            self.conns,
            self.isp,
            self.max_conns,
            self.conn_rate,
            self.max_conn_rate,
            self.draining,
        ]

    @classmethod
    def from_wire(cls, fields: Sequence) -> Node:
        """Also reads the 6-field rows of older instances, and ignores fields after the 11th
        (newer ones); numbers may arrive as decimal text, which is how Redis keeps them.
        ValueError on anything else."""
        if not isinstance(fields, list | tuple):
            raise ValueError(f"a node row is a list, got {type(fields).__name__}")
        if len(fields) != 6 and len(fields) < 11:
            raise ValueError(f"a node row has 6 or at least 11 fields, got {len(fields)}")
        instance, rpc, ws, tcp, idc, conns = fields[:6]
        if len(fields) == 6:
            return cls(instance, rpc, ws, tcp, idc, int(conns))
        isp, max_conns, conn_rate, max_conn_rate, draining = fields[6:11]
        return cls(
            instance,
            rpc,
            ws,
            tcp,
            idc,
            int(conns),
            isp,
            int(max_conns),
            float(conn_rate),
            float(max_conn_rate),
            _flag(draining),
        )


def _flag(value: object) -> bool:
    """A wire boolean: true/false, or 1/0 as number or text (Redis keeps no booleans)."""
    if value in (True, False, "1", "0"):
        return value in (True, "1")
    raise ValueError(f"node draining must be a boolean, got {value!r}")


class NodeRenewal:
    """What an instance remembers between renewals of its node lease (sans-I/O): its accept
    count and clock at the last renewal, for `Node.conn_rate`, and the store's epoch, to
    notice a store that lost its data."""

    __slots__ = ("epoch", "_accepted", "_at")

    def __init__(self, accepted: int, now: float) -> None:
        self.epoch = ""
        self._accepted = accepted
        self._at = now

    def conn_rate(self, accepted: int, now: float) -> float:
        """Connections accepted per second since the previous call (or creation)."""
        elapsed = now - self._at
        if elapsed <= 0:
            return 0.0
        rate = (accepted - self._accepted) / elapsed
        self._accepted, self._at = accepted, now
        return rate

    def lost_data(self, epoch: str) -> bool:
        """Remember the epoch a `put_node` returned; True when it replaces a different one,
        i.e. the store lost what this instance had put there. An empty epoch (a register
        that predates epochs) is never news."""
        previous = self.epoch
        if epoch:
            self.epoch = epoch
        return bool(previous) and bool(epoch) and epoch != previous


#: (product, room, members on one instance): one row of `SessionStore.put_rooms`.
RoomCount = tuple[str, str, int]


def checked_rooms(rooms: Sequence[RoomCount]) -> list[RoomCount]:
    """The rows of a put_rooms call, or ValueError naming the first bad one; engines check
    the whole batch before writing any of it, so a refused call changes nothing."""
    checked: list[RoomCount] = []
    for row in rooms:
        try:
            product, room, count = row
        except (TypeError, ValueError):
            raise ValueError(f"room rows are (product, room, count), got {row!r}") from None
        if not isinstance(product, str) or not isinstance(room, str):
            raise ValueError(f"product and room must be strings, got {row!r}")
        if not isinstance(count, int) or isinstance(count, bool) or not 0 <= count < 2**53:
            raise ValueError(f"member count must be an integer from 0 to 2**53-1, got {row!r}")
        checked.append((product, room, count))
    return checked


#: Most rooms one `top_rooms` call answers: the console shows the biggest, not a catalogue.
MAX_TOP_ROOMS = 100


@dataclass(frozen=True, slots=True)
class RoomLoad:
    """One chat room's members per live instance, for the operators' list of big rooms."""

    product: str
    room: str
    instances: Mapping[str, int]

    @property
    def members(self) -> int:
        return sum(self.instances.values())

    def to_wire(self) -> list:
        return [self.product, self.room, dict(self.instances)]

    @classmethod
    def from_wire(cls, fields: Sequence) -> RoomLoad:
        product, room, instances = fields
        return cls(product, room, {str(k): int(v) for k, v in instances.items()})


def check_top_limit(limit: object) -> int:
    """The `limit` of a top_rooms call, or ValueError: a bounded answer is the point."""
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= MAX_TOP_ROOMS:
        raise ValueError(f"limit must be an integer from 1 to {MAX_TOP_ROOMS}, got {limit!r}")
    return limit


def ranked(rooms: Iterable[RoomLoad], limit: int) -> list[RoomLoad]:
    """The `limit` rooms with the most members, most first, ties by product and room."""
    live = (r for r in rooms if r.members > 0)
    return heapq.nsmallest(limit, live, key=lambda r: (-r.members, r.product, r.room))


class SessionStore(Protocol):
    """Sessions per (product, uid), room member counts per (product, room) and instance,
    and the node table, each entry with a lease.

    Leases are renewed in batches by the room instances; an entry not renewed within its
    ttl disappears, so a crashed instance's sessions and room counts expire without anyone
    cleaning up.
    """

    async def put_sessions(self, sessions: Sequence[Session], ttl: float) -> None:
        """Add or renew sessions; each lives `ttl` seconds unless renewed."""

    async def remove_sessions(self, sessions: Sequence[Session]) -> None:
        """Remove exactly these connections (by product, uid and conn)."""

    async def lookup(self, product: str, uids: Sequence[str]) -> dict[str, list[Session]]:
        """Live sessions of each uid; uids without one are left out of the answer."""

    async def put_rooms(self, instance: str, rooms: Sequence[RoomCount], ttl: float) -> None:
        """Set or renew `instance`'s member count in each (product, room) for `ttl` seconds;
        a count of 0 takes the instance out of that room at once. ValueError on a bad row
        (see `checked_rooms`) or ttl, before anything is written."""

    async def room_instances(self, product: str, room: str) -> dict[str, int]:
        """Member count per instance whose entry in the room is live; {} for an unknown room.
        The room's total is the sum: each instance counts only its own members."""

    async def top_rooms(self, limit: int) -> list[RoomLoad]:
        """The `limit` (1 to MAX_TOP_ROOMS, else ValueError) rooms with the most members
        across live instances, most first, each with its count per instance. Counts are
        read fresh; the Redis engine picks the rooms by the totals their writers last saw,
        so a room whose instance died may rank by its old total until its next write."""

    async def put_node(self, node: Node, ttl: float) -> str:
        """Add or renew a room instance's lease, and return the store's epoch: a random token
        that stays the same while the store keeps its data and changes when it lost it (a
        register restarted empty, a flushed Redis). A writer that sees it change puts
        everything it holds again at once instead of waiting for its next renewal."""

    async def remove_node(self, instance: str) -> None:
        """Drop a room instance from the node table (clean shutdown)."""

    async def nodes(self) -> list[Node]:
        """Room instances whose lease is live."""

    async def close(self) -> None:
        """Release connections; the store is unusable afterwards."""

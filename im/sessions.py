"""The register's data model and the interface every session store implements.

Room instances write sessions, their chat-room member counts and their node lease here;
center reads them to route pushes. The register service holds one engine (memory or
Redis) and serves this same interface over RPC (`im.register_client.RegisterClient`), so
callers never know which.
"""

from __future__ import annotations

from collections.abc import Sequence
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
    """A live room instance: where clients connect and where center sends its RPCs."""

    instance: str
    rpc: str  # host:port of the instance's internal RPC listener
    ws: str = ""  # ws://host:port/ws
    tcp: str = ""  # host:port
    idc: str = "default"
    conns: int = 0

    def to_wire(self) -> list:
        return [self.instance, self.rpc, self.ws, self.tcp, self.idc, self.conns]

    @classmethod
    def from_wire(cls, fields: Sequence) -> Node:
        instance, rpc, ws, tcp, idc, conns = fields
        return cls(instance, rpc, ws, tcp, idc, int(conns))


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

    async def put_node(self, node: Node, ttl: float) -> None:
        """Add or renew a room instance's lease."""

    async def remove_node(self, instance: str) -> None:
        """Drop a room instance from the node table (clean shutdown)."""

    async def nodes(self) -> list[Node]:
        """Room instances whose lease is live."""

    async def close(self) -> None:
        """Release connections; the store is unusable afterwards."""

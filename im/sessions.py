"""The register's data model and the interface every session store implements.

Room instances write sessions and their node lease here; center reads them to route
pushes. The register service holds one engine (memory or Redis) and serves this same
interface over RPC (`im.register_client.RegisterClient`), so callers never know which.
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


class SessionStore(Protocol):
    """Sessions per (product, uid) and the node table, each entry with a lease.

    Leases are renewed in batches by the room instances; an entry not renewed within its
    ttl disappears, so a crashed instance's sessions expire without anyone cleaning up.
    """

    async def put_sessions(self, sessions: Sequence[Session], ttl: float) -> None:
        """Add or renew sessions; each lives `ttl` seconds unless renewed."""

    async def remove_sessions(self, sessions: Sequence[Session]) -> None:
        """Remove exactly these connections (by product, uid and conn)."""

    async def lookup(self, product: str, uids: Sequence[str]) -> dict[str, list[Session]]:
        """Live sessions of each uid; uids without one are left out of the answer."""

    async def put_node(self, node: Node, ttl: float) -> None:
        """Add or renew a room instance's lease."""

    async def remove_node(self, instance: str) -> None:
        """Drop a room instance from the node table (clean shutdown)."""

    async def nodes(self) -> list[Node]:
        """Room instances whose lease is live."""

    async def close(self) -> None:
        """Release connections; the store is unusable afterwards."""

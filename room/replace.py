"""One connection per (product, uid, device): a new login replaces the old one, here or on
another room instance.

After a batch of logins is in the register, the logins that named a device look their
user up; any other session of the same device is closed with 4011 REPLACED, on this
instance directly and elsewhere through that instance's `kick` RPC. Logins without a
device (browsers, tests) never replace anything.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from im.protocol.errors import ErrorCode
from im.rpc import RpcClient, RpcError
from im.sessions import Session

if TYPE_CHECKING:
    from room.connection import Connection
    from room.gateway import Gateway

log = logging.getLogger("im.room.replace")

REPLACED_REASON = "the same user and device logged in on another connection"
#: RPC clients to other instances kept at once; the oldest is closed past this.
MAX_PEERS = 64


class Replacer:
    __slots__ = ("_gateway", "_peers", "replaced")

    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway
        self._peers: dict[str, RpcClient] = {}
        self.replaced = 0

    async def logged_in(self, conns: Sequence[Connection]) -> None:
        """Close the other sessions of each (product, uid, device) that just logged in."""
        by_product: dict[str, list[Connection]] = {}
        for conn in conns:
            if conn.device:
                by_product.setdefault(conn.product, []).append(conn)
        gateway = self._gateway
        remote: dict[str, list[str]] = {}
        for product, logins in by_product.items():
            try:
                found = await gateway.store.lookup(product, [c.uid for c in logins])
            except (TimeoutError, RpcError, OSError) as exc:
                log.warning("replacing older logins: register lookup failed: %s", exc)
                return
            for conn in logins:
                for session in found.get(conn.uid, ()):
                    if session.device == conn.device and session.conn != conn.conn_id:
                        self._replace(session, remote)
        for instance, conn_ids in remote.items():
            await self._kick_remote(instance, conn_ids)

    def _replace(self, session: Session, remote: dict[str, list[str]]) -> None:
        if session.instance == self._gateway.instance:
            self.replaced += self._gateway.kick([session.conn], REPLACED_REASON, ErrorCode.REPLACED)
        else:
            remote.setdefault(session.instance, []).append(session.conn)

    async def _kick_remote(self, instance: str, conn_ids: list[str]) -> None:
        client = await self._peer(instance)
        if client is None:
            return  # gone from the node table: its sessions are gone with it
        params = {"conns": conn_ids, "reason": REPLACED_REASON, "code": int(ErrorCode.REPLACED)}
        try:
            reply = await client.call("kick", params)
        except (TimeoutError, RpcError, OSError) as exc:
            log.warning("replacing %d older logins on %s failed: %s", len(conn_ids), instance, exc)
            return
        self.replaced += int(reply.get("closed", 0)) if isinstance(reply, dict) else 0

    async def _peer(self, instance: str) -> RpcClient | None:
        client = self._peers.get(instance)
        if client is not None:
            return client
        try:
            nodes = await self._gateway.store.nodes()
        except (TimeoutError, RpcError, OSError):
            return None
        address = next((n.rpc for n in nodes if n.instance == instance and n.rpc), None)
        if address is None:
            return None
        if len(self._peers) >= MAX_PEERS:
            oldest = next(iter(self._peers))
            await self._peers.pop(oldest).close()
        client = self._peers[instance] = RpcClient(address, timeout=2.0, name="room")
        return client

    async def close(self) -> None:
        for client in self._peers.values():
            await client.close()
        self._peers.clear()

"""Several products on one connection: `bind` and `unbind`.

Several apps of one vendor on a phone can share one long connection: after `auth` for its
first product, the connection may `bind` more products, each with its own token (and uid,
the connection's by default). Each binding is a session of its own in the register, under
the same connection id, so pushes of any bound product reach this connection; while a
connection carries more than one product, its pushes say whose they are (`"product"`).
Chat rooms stay with the first product.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from im.auth import AuthFailure, verify_token
from im.protocol.errors import ErrorCode, ProtocolError
from im.sessions import Session
from room.connection import ONLINE, Connection

if TYPE_CHECKING:
    from room.gateway import Gateway

log = logging.getLogger("im.room.bind")

#: Products one connection may carry besides its first.
MAX_BINDS = 8


def refused(reason: str) -> ProtocolError:
    return ProtocolError(ErrorCode.BIND_REFUSED, reason)


class Bindings:
    __slots__ = ("_gateway",)

    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway

    def sessions(self, conn: Connection) -> list[Session]:
        """The register sessions of the connection's bound products (not its first)."""
        if not conn.binds:
            return []
        instance = self._gateway.instance
        return [
            Session(product, uid, conn.conn_id, instance, conn.device)
            for product, uid in conn.binds.items()
        ]

    def bind(self, conn: Connection, message: dict[str, Any]) -> None:
        product = message["product"]
        uid = message.get("uid", conn.uid)
        if product == conn.product or (conn.binds and product in conn.binds):
            raise refused(f"bind: product {product!r} is already on this connection")
        if conn.binds and len(conn.binds) >= MAX_BINDS:
            raise refused(f"bind: at most {MAX_BINDS} more products per connection")
        try:
            verify_token(self._gateway.products, product, uid, message["token"])
        except AuthFailure as failure:
            self._gateway.stats.auth_failed += 1
            raise refused(f"bind: {failure}") from None
        self._gateway.spawn(self._bind(conn, product, uid))

    async def _bind(self, conn: Connection, product: str, uid: str) -> None:
        gateway = self._gateway
        session = Session(product, uid, conn.conn_id, gateway.instance, conn.device)
        stored = await gateway.store_call(
            gateway.store.put_sessions([session], gateway.config.session_ttl_s), "bind"
        )
        if conn.state != ONLINE:
            if stored:  # closed meanwhile: do not leave the session behind
                await gateway.store_call(gateway.store.remove_sessions([session]), "unbind")
            return
        if not stored:
            gateway.protocol_error(conn, refused("bind: the session register is unavailable"))
            return
        if conn.binds is None:
            conn.binds = {}
        conn.binds[product] = uid
        conn.send_now(gateway.encode_for(conn.kind, {"op": "bound", "product": product}))
        gateway.qos.online(conn, product, uid)

    def unbind(self, conn: Connection, product: str, reason: str = "") -> bool:
        """Drop one bound product (the client asked, or the business kicked it)."""
        if not conn.binds or product not in conn.binds:
            return False
        gateway = self._gateway
        uid = conn.binds.pop(product)
        if not conn.binds:
            conn.binds = None
        session = Session(product, uid, conn.conn_id, gateway.instance, conn.device)
        gateway.spawn(gateway.store_call(gateway.store.remove_sessions([session]), "unbind"))
        answer = {"op": "unbound", "product": product}
        if reason:
            answer["reason"] = reason
        conn.send_now(gateway.encode_for(conn.kind, answer))
        return True

"""The register service: one SessionStore engine served over the internal RPC."""

from __future__ import annotations

import logging
from typing import Any

from im.rpc import RpcError
from im.rpc.service import EngineService
from im.sessions import Node, Session, SessionStore, check_top_limit
from im.switches import SwitchError, SwitchStore, parse_switches
from register.config import RegisterConfig
from register.engines.switches_memory import MemorySwitchStore

log = logging.getLogger("im.register")


def _sessions(rows: Any) -> list[Session]:
    try:
        return [Session.from_wire(row) for row in rows]
    except (TypeError, ValueError):
        raise RpcError(
            "bad_request", "sessions must be [product, uid, conn, instance, device]"
        ) from None


class RegisterServer(EngineService):
    def __init__(
        self, config: RegisterConfig, store: SessionStore, switches: SwitchStore | None = None
    ) -> None:
        self.config = config
        self.store = store
        self.switches = switches if switches is not None else MemorySwitchStore()
        handlers = {
            "sessions.put": self._put,
            "sessions.remove": self._remove,
            "sessions.lookup": self._lookup,
            "rooms.put": self._put_rooms,
            "rooms.instances": self._room_instances,
            "rooms.top": self._top_rooms,
            "nodes.put": self._put_node,
            "nodes.remove": self._remove_node,
            "nodes.list": self._nodes,
            "switches.get": self._get_switches,
            "switches.put": self._put_switches,
        }
        super().__init__(
            "register",
            handlers,
            engine=type(store).__name__,
            health=self.store.nodes,
            address=(config.host, config.port, config.metrics_port),
        )

    async def close(self) -> None:
        await super().close()
        await self.store.close()
        await self.switches.close()

    async def _get_switches(self, params: Any) -> list | None:
        found = await self.switches.get_switches(int(params or 0))
        return None if found is None else list(found)

    async def _put_switches(self, params: Any) -> int:
        if not isinstance(params, dict):
            raise RpcError("bad_request", "switches.put takes the document (a map)")
        # Validated here too: whatever path a document takes, the store holds only good ones.
        try:
            parse_switches(params)
        except SwitchError as err:
            raise RpcError("bad_request", str(err)) from None
        return await self.switches.put_switches(params)

    async def _put(self, params: Any) -> None:
        rows, ttl = params
        await self.store.put_sessions(_sessions(rows), float(ttl))

    async def _remove(self, params: Any) -> None:
        await self.store.remove_sessions(_sessions(params))

    async def _lookup(self, params: Any) -> dict[str, list[list[str]]]:
        product, uids = params
        found = await self.store.lookup(product, uids)
        return {uid: [s.to_wire() for s in rows] for uid, rows in found.items()}

    async def _put_rooms(self, params: Any) -> None:
        instance, rows, ttl = params
        await self.store.put_rooms(str(instance), rows, float(ttl))

    async def _room_instances(self, params: Any) -> dict[str, int]:
        product, room = params
        return await self.store.room_instances(product, room)

    async def _top_rooms(self, params: Any) -> list[list]:
        rooms = await self.store.top_rooms(check_top_limit(params))
        return [load.to_wire() for load in rooms]

    async def _put_node(self, params: Any) -> str:
        fields, ttl = params
        return await self.store.put_node(Node.from_wire(fields), float(ttl))

    async def _remove_node(self, params: Any) -> None:
        await self.store.remove_node(str(params))

    async def _nodes(self, params: Any) -> list[list]:
        return [node.to_wire() for node in await self.store.nodes()]

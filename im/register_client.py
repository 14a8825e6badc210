"""The register service's SessionStore, reached over the internal RPC.

Room instances and center hold one of these; the register process holds the engine.
Each method is one RPC whatever the batch size, so callers batch and this stays thin.
"""

from __future__ import annotations

from collections.abc import Sequence

from im.rpc.service import EngineClient
from im.sessions import Node, RoomCount, RoomLoad, Session, check_top_limit

NAME = "register"


class RegisterClient(EngineClient):
    def __init__(self, address: str, *, timeout: float = 2.0) -> None:
        super().__init__(address, name=NAME, timeout=timeout)

    async def put_sessions(self, sessions: Sequence[Session], ttl: float) -> None:
        if sessions:
            await self._call("sessions.put", [[s.to_wire() for s in sessions], ttl])

    async def remove_sessions(self, sessions: Sequence[Session]) -> None:
        if sessions:
            await self._call("sessions.remove", [s.to_wire() for s in sessions])

    async def lookup(self, product: str, uids: Sequence[str]) -> dict[str, list[Session]]:
        if not uids:
            return {}
        found = await self._call("sessions.lookup", [product, list(uids)])
        return {uid: [Session.from_wire(s) for s in rows] for uid, rows in found.items()}

    async def put_rooms(self, instance: str, rooms: Sequence[RoomCount], ttl: float) -> None:
        if rooms:
            await self._call("rooms.put", [instance, list(rooms), ttl])

    async def room_instances(self, product: str, room: str) -> dict[str, int]:
        return await self._call("rooms.instances", [product, room])

    async def top_rooms(self, limit: int) -> list[RoomLoad]:
        rows = await self._call("rooms.top", check_top_limit(limit))
        return [RoomLoad.from_wire(row) for row in rows]

    async def put_node(self, node: Node, ttl: float) -> str:
        # A register older than epochs answers None: "" never looks like lost data.
        return await self._call("nodes.put", [node.to_wire(), ttl]) or ""

    async def remove_node(self, instance: str) -> None:
        await self._call("nodes.remove", instance)

    async def nodes(self) -> list[Node]:
        return [Node.from_wire(n) for n in await self._call("nodes.list")]

    async def get_switches(self, known_version: int = 0) -> tuple[int, dict] | None:
        found = await self._call("switches.get", known_version)
        return None if found is None else (int(found[0]), found[1])

    async def put_switches(self, document: dict) -> int:
        return int(await self._call("switches.put", document))

"""Chat rooms, room pushes and broadcasts on one room instance.

Membership is local to the instance; the register holds, per room, how many members each
instance has (`put_rooms`), which center's workers use to send a room push only to the
instances that hold members. Big-room rules (room.bigroom) decide per message, before
any member is touched.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import orjson

from im.protocol.errors import ErrorCode, ProtocolError
from im.protocol.messages import PRIORITY_INDEX, validate_server
from im.rpc import RpcError
from room.bigroom import Decision, RoomPolicy
from room.connection import ONLINE, Connection
from room.fanout import RoomGroup
from room.idc_budget import IdcBudget

if TYPE_CHECKING:
    from room.gateway import Gateway

log = logging.getLogger("im.room")

MAX_LABELLED_DROPS = 1000  # distinct (room, type, reason) series before folding into "_other"
BROADCAST_SLICES_PER_S = 20
MAX_BATCH_BYTES = 512 * 1024  # half of what the SDK accepts, leaving room for encoding
MAX_PACED_BROADCASTS = 16

_DROP_REASONS = {
    Decision.DROP_BUDGET: "room_budget",
    Decision.DROP_TYPE_SHARE: "type_share",
    Decision.DROP_COMMON: "common_msg",
    Decision.DROP_IDC: "idc_budget",
}


class ChatRooms:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.groups: dict[tuple[str, str], RoomGroup] = {}
        self.idc = IdcBudget(gateway.config.idc)
        self.instances_in_idc = 1
        self.drops: Counter[tuple[str, str, str]] = Counter()  # (room, type, reason)
        self.delivered = 0  # messages handed to members (one per member per message)
        self.writes = 0  # shared writes
        self._dirty: set[RoomGroup] = set()  # frames waiting for the room tick
        self._index_dirty: dict[tuple[str, str], RoomGroup] = {}  # counts to tell the register
        self._flush_handle: asyncio.TimerHandle | None = None
        self._urgent = False
        self._paced = 0
        self._loop = asyncio.get_running_loop()

    # -- membership --------------------------------------------------------------------

    def join(self, conn: Connection, room: str) -> None:
        limit = self.gateway.config.max_rooms_per_conn
        joined = conn.rooms
        if joined is None:
            joined = conn.rooms = set()
        key = (conn.product, room)
        group = self.groups.get(key)
        if group is None or group not in joined:
            if len(joined) >= limit:
                raise ProtocolError(
                    ErrorCode.BAD_FIELD, f"join: at most {limit} rooms per connection"
                )
            if group is None:
                group = self.groups[key] = RoomGroup(conn.product, room, RoomPolicy(room))
            group.members[conn] = None
            joined.add(group)
            self._index_dirty[key] = group
        conn.send_now(
            self.gateway.encode_for(
                conn.kind, {"op": "joined", "room": room, "members": group.known_members}
            )
        )

    def leave(self, conn: Connection, room: str) -> None:
        group = self.groups.get((conn.product, room))
        if group is not None and conn.rooms and group in conn.rooms:
            self._remove(conn, group)
        conn.send_now(self.gateway.encode_for(conn.kind, {"op": "left", "room": room}))

    def leave_all(self, conn: Connection) -> None:
        for group in list(conn.rooms or ()):
            self._remove(conn, group)

    def _remove(self, conn: Connection, group: RoomGroup) -> None:
        group.members.pop(conn, None)
        if conn.rooms:
            conn.rooms.discard(group)
        self._index_dirty[(group.product, group.name)] = group
        if not group.members and not group.pending:
            self.groups.pop((group.product, group.name), None)

    @property
    def has_index_updates(self) -> bool:
        return bool(self._index_dirty)

    def index_updates(self, everything: bool = False) -> list[tuple[str, str, int]]:
        """(product, room, local members) for the register: changed ones, or all."""
        if everything:
            groups = list(self.groups.values())
            gone = [g for k, g in self._index_dirty.items() if k not in self.groups]
            groups.extend(gone)
        else:
            groups = list(self._index_dirty.values())
        self._index_dirty = {}
        return [(g.product, g.name, len(g.members)) for g in groups]

    # -- room push ---------------------------------------------------------------------

    async def rpc_room_push(self, params: Any) -> dict[str, int]:
        """One message (`msg`, `shard`) or several in order (`items`) for one room."""
        product, room = _room_params(params)
        items = params.get("items")
        if items is None:
            items = [{"msg": params.get("msg"), "shard": params.get("shard")}]
        elif not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            raise RpcError("bad_request", "items must be a list of {'msg', 'shard'}")
        checked = [(_push(item.get("msg")), _shard(item.get("shard"))) for item in items]
        group = self.groups.get((product, room))
        if group is None or not group.members:
            return {"written": 0, "dropped": 0}
        total = params.get("members_total")
        if isinstance(total, int) and total >= 0:
            group.members_total = total
        written = dropped = 0
        for message, shard in checked:
            if self._room_message(group, message, shard):
                written += len(group.members)
            else:
                dropped += len(group.members)
        return {"written": written, "dropped": dropped}

    def _room_message(self, group: RoomGroup, message: dict, shard: tuple[int, int] | None) -> bool:
        """Apply the big-room rules to one message; False when they dropped it."""
        switches = self.gateway.switches
        now = self._loop.time()
        decision = group.policy.decide(message, group.known_members, switches, now)
        if decision is Decision.DELIVER and not group.policy.idc_allows(
            message["pri"], len(group.members), self.idc, switches, self.instances_in_idc, now
        ):
            decision = Decision.DROP_IDC
        reason = _DROP_REASONS.get(decision)
        if reason is not None:
            self._count_drop(group.name, message["type"], reason)
            return False
        urgent = False
        if decision is Decision.DELIVER:
            group.add(message, shard)
            urgent = message["pri"] == "high"
        self._mark(group, urgent)
        return True

    def _count_drop(self, room: str, type_: str, reason: str) -> None:
        key = (room, type_, reason)
        if key not in self.drops and len(self.drops) >= MAX_LABELLED_DROPS:
            key = ("_other", "_other", reason)
        self.drops[key] += 1

    def _mark(self, group: RoomGroup, urgent: bool = False) -> None:
        """Frames wait for the room tick; a high-priority one (a gift) flushes at the end of
        this loop iteration, taking whatever else waits along in the same write."""
        self._dirty.add(group)
        if urgent:
            if not self._urgent:
                self._urgent = True
                self._loop.call_soon(self.flush)
        elif self._flush_handle is None:
            self._flush_handle = self._loop.call_later(
                self.gateway.config.room_flush_ms / 1000, self.flush
            )

    def flush(self) -> None:
        """The room tick: each room's frames go out as one shared write per member."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        self._urgent = False
        dirty, self._dirty = self._dirty, set()
        now = self._loop.time()
        switches = self.gateway.switches
        for group in dirty:
            policy = group.policy
            members = len(group.members)
            for merged in policy.tick(now, switches):
                self._add_if_idc_allows(group, merged, members, now)
            for batch in _split_batch(policy.take_batch() or ()):
                self._add_if_idc_allows(
                    group, {"op": "batch", "msgs": batch}, members * len(batch), now
                )
            pending = group.take()
            if policy.has_pending():
                self._mark(group)  # merged likes still to come this second
            if not pending:
                continue
            messages = sum(len(m["msgs"]) if m.get("op") == "batch" else 1 for m, _ in pending)
            for_member, _ = group.blobs(pending, self.gateway.encode_for)
            queue_frame = self.gateway.queue_frame
            for conn in list(group.members):
                chosen = for_member(conn)
                if chosen is None or conn.state != ONLINE:
                    continue
                priority, data = chosen
                if conn.paused or conn.queue:
                    queue_frame(conn, priority, data)
                else:
                    conn.transport.write(data)  # type: ignore[union-attr]
                    self.writes += 1
                self.delivered += messages

    def _add_if_idc_allows(
        self, group: RoomGroup, message: dict, deliveries: int, now: float
    ) -> None:
        """Merged likes and batches leave the instance too: they count against the IDC."""
        if group.policy.idc_allows(
            "low", deliveries, self.idc, self.gateway.switches, self.instances_in_idc, now
        ):
            group.add(message, None)
        else:
            self._count_drop(group.name, message.get("type", "batch"), "idc_budget")

    # -- broadcast ---------------------------------------------------------------------

    async def rpc_broadcast(self, params: Any) -> dict[str, int]:
        if not isinstance(params, dict) or not isinstance(params.get("product"), str):
            raise RpcError("bad_request", "broadcast needs {'product', 'msg', 'spread_s'}")
        message = _push(params.get("msg"))
        spread = params.get("spread_s") or 0
        if not isinstance(spread, int | float) or not 0 <= spread <= 3600:
            raise RpcError("bad_request", "spread_s must be between 0 and 3600")
        product = params["product"]
        conns = [
            c
            for c in self.gateway.conns.values()
            if c.product == product or (c.binds and product in c.binds)
        ]
        priority = PRIORITY_INDEX[message["pri"]]
        encoded: dict[tuple[str, bool], bytes] = {}

        def send(chunk: list[Connection]) -> None:
            for conn in chunk:
                if conn.state != ONLINE:
                    continue
                data = self.gateway.frame_for(conn, message, product, encoded)
                self.gateway.queue_frame(conn, priority, data)

        if spread <= 0 or len(conns) <= 1:
            send(conns)
            return {"written": len(conns)}
        if self._paced >= MAX_PACED_BROADCASTS:
            raise RpcError("overloaded", f"{MAX_PACED_BROADCASTS} paced broadcasts under way")
        # Evenly over the window, so every client's follow-up call to the business does
        # not land in the same second.
        self._paced += 1
        for delay, start, end in paced_slices(len(conns), spread):
            self._loop.call_later(delay, send, conns[start:end])
        self._loop.call_later(spread, self._paced_done)
        return {"written": len(conns)}

    def _paced_done(self) -> None:
        self._paced -= 1


def paced_slices(total: int, spread: float) -> list[tuple[float, int, int]]:
    """(delay, start, end) of each slice of a broadcast to `total` members paced over
    `spread` seconds: evenly spaced, sizes differing by one at most, so the whole window
    carries an even share."""
    slices = max(1, min(total, math.ceil(spread * BROADCAST_SLICES_PER_S)))
    return [
        (k * spread / slices, k * total // slices, (k + 1) * total // slices) for k in range(slices)
    ]


def _split_batch(msgs: Sequence[Mapping]) -> list[list[Mapping]]:
    """Batch frames of at most MAX_BATCH_BYTES (clients accept 1 MiB), in order."""
    batches: list[list[Mapping]] = []
    current: list[Mapping] = []
    size = 0
    for message in msgs:
        length = len(orjson.dumps(message))
        if current and size + length > MAX_BATCH_BYTES:
            batches.append(current)
            current, size = [], 0
        current.append(message)
        size += length
    if current:
        batches.append(current)
    return batches


def _push(message: Any) -> dict:
    try:
        if not isinstance(message, dict) or validate_server(message) != "push":
            raise RpcError("bad_request", "msg must be a push map")
    except ProtocolError as err:
        raise RpcError("bad_request", err.reason) from None
    return message


def _shard(shard: Any) -> tuple[int, int] | None:
    if shard is None:
        return None
    if not (
        isinstance(shard, list)
        and len(shard) == 2
        and all(type(x) is int for x in shard)
        and 0 <= shard[0] < shard[1]
    ):
        raise RpcError("bad_request", "shard must be [index, count] with index < count")
    return shard[0], shard[1]


def _room_params(params: Any) -> tuple[str, str]:
    if not isinstance(params, dict):
        raise RpcError("bad_request", "room_push needs a map")
    product, room = params.get("product"), params.get("room")
    if not isinstance(product, str) or not isinstance(room, str):
        raise RpcError("bad_request", "room_push needs 'product' and 'room' strings")
    return product, room

"""Chat rooms, room pushes and broadcasts on one room instance.

Membership is local to the instance; the register holds, per room, how many members each
instance has (`put_rooms`), which center's workers use to send a room push only to the
instances that hold members. Big-room rules (room.bigroom) decide per message, before
any member is touched.

A room's messages go out in flush passes (room.fanout): one shared write per member for
everything it is owed. Normal and low messages wait for the room tick; a high-priority one
starts a pass at once, or joins the pass under way, which then serves it to the members not
yet visited and passes again over the others. A pass writes SLICE_MEMBERS members per
event-loop iteration, so a room of thousands never holds the loop for long: RPCs (the next
room push among them) are answered between slices, and passes with a high-priority message
go first.
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
from room.fanout import AGAIN_DUE, AGAIN_NONE, AGAIN_URGENT, FlushPass, RoomGroup
from room.idc_budget import IdcBudget

if TYPE_CHECKING:
    from room.gateway import Gateway

log = logging.getLogger("im.room")

MAX_LABELLED_DROPS = 1000  # distinct (room, type, reason) series before folding into "_other"
BROADCAST_SLICES_PER_S = 20
MAX_BATCH_BYTES = 512 * 1024  # half of what the SDK accepts, leaving room for encoding
MAX_PACED_BROADCASTS = 16
#: Members a flush pass writes per event-loop iteration (each write costs ~9 us, mostly the
#: kernel's): under a millisecond, then RPCs and the other rooms get their turn. The next
#: room push waits for the slice under way: 256 members kept it ~11 ms on a busy box, 64 ~4.
SLICE_MEMBERS = 64
#: Messages a room holds for members not yet served; past it a push is dropped (`backlog`).
MAX_ROOM_LOG = 4096
BACKLOG_WARN_EVERY_S = 10.0

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
        # Rooms with messages waiting for the tick, and when it is due for each; in order.
        self._dirty: dict[RoomGroup, float] = {}
        self._index_dirty: dict[tuple[str, str], RoomGroup] = {}  # counts to tell the register
        self._flush_handle: asyncio.TimerHandle | None = None
        # Passes under way, oldest first; those carrying a high-priority message go first.
        self._urgent: dict[RoomGroup, FlushPass] = {}
        self._passes: dict[RoomGroup, FlushPass] = {}
        self._slice_handle: asyncio.Handle | None = None
        self._backlog_warned = -BACKLOG_WARN_EVERY_S
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
            group.join(conn)
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
        if not group.members:
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
        if decision is Decision.DELIVER:
            if len(group.log) >= MAX_ROOM_LOG:
                self._count_drop(group.name, message["type"], "backlog")
                now = self._loop.time()
                if now - self._backlog_warned >= BACKLOG_WARN_EVERY_S:
                    self._backlog_warned = now
                    log.warning("room %s holds %d messages not yet written: dropping pushes",
                                group.name, MAX_ROOM_LOG)  # fmt: skip
                return False
            group.add(message, shard)
            if message["pri"] == "high":
                self._pass(group, urgent=True)
                return True
        self._mark(group)
        return True

    def _count_drop(self, room: str, type_: str, reason: str) -> None:
        key = (room, type_, reason)
        if key not in self.drops and len(self.drops) >= MAX_LABELLED_DROPS:
            key = ("_other", "_other", reason)
        self.drops[key] += 1

    def _mark(self, group: RoomGroup) -> None:
        """The group's messages wait for the room tick: at most room_flush_ms from the first
        of them, unless a pass (for a high-priority message) takes them along before."""
        if group not in self._dirty:
            self._dirty[group] = self._loop.time() + self.gateway.config.room_flush_ms / 1000
            if self._flush_handle is None:
                self._flush_handle = self._loop.call_at(self._dirty[group], self._tick)

    def _tick(self) -> None:
        """Passes for the rooms whose tick is due; the timer then waits for the next one."""
        now = self._loop.time()
        dirty = self._dirty
        while dirty:
            group, due = next(iter(dirty.items()))
            if due > now:
                break
            del dirty[group]
            self._pass(group, urgent=False)
        first = next(iter(dirty.values()), None)
        self._flush_handle = None if first is None else self._loop.call_at(first, self._tick)

    def _pass(self, group: RoomGroup, urgent: bool) -> None:
        """A pass over the group's members now; when one is under way, it serves the new
        messages to the members it has not visited yet and another follows for the rest."""
        running = self._urgent.get(group) or self._passes.get(group)
        if running is not None:
            running.again = max(running.again, AGAIN_URGENT if urgent else AGAIN_DUE)
            if urgent and group in self._passes:
                self._urgent[group] = self._passes.pop(group)
            return
        self._dirty.pop(group, None)
        self._take_policy(group)
        if not group.log:
            return
        (self._urgent if urgent else self._passes)[group] = FlushPass(group)
        if self._slice_handle is None:
            # A turn of the loop first: the answer to the RPC that brought the message goes
            # out before the pass starts writing.
            self._slice_handle = self._loop.call_soon(self._next_turn)

    def _next_turn(self) -> None:
        self._slice_handle = self._loop.call_soon(self._slice)

    def _take_policy(self, group: RoomGroup) -> None:
        """Merged likes due and the low pushes held for a batch frame join the pass."""
        policy = group.policy
        now = self._loop.time()
        members = len(group.members)
        for merged in policy.tick(now, self.gateway.switches):
            self._add_if_idc_allows(group, merged, members, now)
        for batch in _split_batch(policy.take_batch() or ()):
            self._add_if_idc_allows(
                group, {"op": "batch", "msgs": batch}, members * len(batch), now
            )
        if policy.has_pending():
            self._mark(group)  # merged likes still to come this second

    def _slice(self) -> None:
        """Up to SLICE_MEMBERS members of the passes under way, then yield the loop."""
        self._slice_handle = None
        budget = SLICE_MEMBERS
        while budget > 0:
            passes = self._urgent or self._passes
            if not passes:
                return
            group, flush = next(iter(passes.items()))
            before = flush.cursor
            self._write(group, flush.take(budget))
            budget -= flush.cursor - before
            if flush.done:
                del passes[group]
                if flush.finish():
                    if flush.again == AGAIN_NONE:
                        self._mark(group)
                    else:
                        self._pass(group, urgent=flush.again == AGAIN_URGENT)
        if self._slice_handle is None and (self._urgent or self._passes):
            self._slice_handle = self._loop.call_soon(self._slice)

    def _write(self, group: RoomGroup, owed: list[tuple[Connection, int]]) -> None:
        """One shared write per member of what it is owed (bounded queue if it is slow)."""
        encode = self.gateway.encode_for
        queue_frame = self.gateway.queue_frame
        for conn, mark in owed:
            if conn.state != ONLINE:
                continue
            found = group.blob(conn, mark, encode)
            if found is None:
                continue
            priority, data, messages = found
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

"""Chat rooms on one instance: who is in them, and one shared write per member per tick.

A room push is not queued per member. Frames for a room wait in the room's own list until
its flush tick; then each frame is encoded once per wire kind, the tick's frames are
joined into one bytes object, and that same object is written to every member. At 100
messages/s and a 25 ms tick a member costs one write per tick instead of one per message.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from im.protocol.messages import PRIORITY_INDEX

if TYPE_CHECKING:
    from room.connection import Connection

Encoder = Callable[[str, dict], bytes]


def shard_of(uid: str, shards: int) -> int:
    """The virtual sub-room of a uid; center computes the same for a message's sender."""
    return zlib.crc32(uid.encode()) % shards


class RoomGroup:
    """The members of one (product, room) on this instance."""

    __slots__ = ("product", "name", "members", "pending", "members_total", "policy")

    def __init__(self, product: str, name: str, policy: Any = None) -> None:
        self.product = product
        self.name = name
        self.members: dict[Connection, None] = {}  # insertion-ordered set
        self.pending: list[tuple[dict, tuple[int, int] | None]] = []
        self.members_total = 0  # across instances, as center last told us
        self.policy = policy

    @property
    def known_members(self) -> int:
        return max(len(self.members), self.members_total)

    def add(self, message: dict, shard: tuple[int, int] | None) -> None:
        self.pending.append((message, shard))

    def take(self) -> list[tuple[dict, tuple[int, int] | None]]:
        pending, self.pending = self.pending, []
        return pending

    def blobs(
        self, pending: list[tuple[dict, tuple[int, int] | None]], encode: Encoder
    ) -> tuple[Callable[[Connection], tuple[int, bytes] | None], int]:
        """A function giving each member its (priority, bytes) for this tick, and how many
        distinct messages are in the tick. Bytes are built once per (wire kind, shard)."""
        cache: dict[tuple, tuple[int, bytes] | None] = {}
        # Each distinct shard count among the tick's messages splits members differently;
        # a member's key is its wire kind and its shard under each of those counts.
        counts = sorted({shard[1] for _, shard in pending if shard is not None})

        def build(kind: str, indexes: tuple[int, ...]) -> tuple[int, bytes] | None:
            where = dict(zip(counts, indexes, strict=True))
            chosen = [m for m, shard in pending if shard is None or where[shard[1]] == shard[0]]
            if not chosen:
                return None
            priority = min(_priority(m) for m in chosen)
            return priority, b"".join(encode(kind, m) for m in chosen)

        def for_member(conn: Connection) -> tuple[int, bytes] | None:
            indexes = tuple(shard_of(conn.uid, n) for n in counts)
            key = (conn.kind, indexes)
            found = cache.get(key, False)
            if found is False:
                found = cache[key] = build(conn.kind, indexes)
            return found

        return for_member, len(pending)


def _priority(message: dict) -> int:
    if message.get("op") == "batch":
        return PRIORITY_INDEX["low"]
    return PRIORITY_INDEX.get(message.get("pri", "normal"), 1)

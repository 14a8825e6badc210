"""Chat rooms on one instance: who is in them, and one shared write per member per pass.

A room push is not queued per member. The room keeps its recent messages in one log, and
each member a mark: how far into the log it has been served. A flush pass (room.chatrooms)
visits the members and writes each one, in a single write, everything past its mark; the
bytes are built once per (wire kind, virtual sub-rooms, mark) and shared by every member
with the same key. Messages that arrive while a pass is under way thus reach the members
not yet visited in the same write, and the log is trimmed once every member passed them.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from im.protocol.messages import PRIORITY_INDEX

if TYPE_CHECKING:
    from room.connection import Connection

Encoder = Callable[[str, dict], bytes]
#: What a member is written: (priority, bytes, messages in them).
Blob = tuple[int, bytes, int]
Shard = tuple[int, int] | None
#: Whether a room wants another pass once the one under way ends: no; yes, at normal
#: priority (its tick came meanwhile); yes, ahead of the others (a high message came).
AGAIN_NONE, AGAIN_DUE, AGAIN_URGENT = 0, 1, 2


def shard_of(uid: str, shards: int) -> int:
    """The virtual sub-room of a uid; center computes the same for a message's sender."""
    return zlib.crc32(uid.encode()) % shards


class RoomGroup:
    """The members of one (product, room) on this instance, and its messages in flight."""

    __slots__ = (
        "product",
        "name",
        "members",
        "log",
        "base",
        "members_total",
        "policy",
        "_counts",
        "_encoded",
        "_blobs",
    )

    def __init__(self, product: str, name: str, policy: Any = None) -> None:
        self.product = product
        self.name = name
        #: member -> its mark, the sequence number of the first message it was not given.
        self.members: dict[Connection, int] = {}
        self.log: list[tuple[dict, Shard]] = []  # message `base + i` is log[i]
        self.base = 0
        self.members_total = 0  # across instances, as center last told us
        self.policy = policy
        self._counts: tuple[int, ...] = ()  # the distinct shard counts in the log
        self._encoded: dict[tuple[str, int], bytes] = {}  # (kind, seq) -> one frame
        self._blobs: dict[tuple, Blob | None] = {}  # for the current head

    @property
    def known_members(self) -> int:
        return max(len(self.members), self.members_total)

    @property
    def head(self) -> int:
        """The sequence number the next message gets."""
        return self.base + len(self.log)

    def join(self, conn: Connection) -> None:
        """A newcomer is served what arrives from now on."""
        self.members.setdefault(conn, self.head)

    def add(self, message: dict, shard: Shard) -> None:
        self.log.append((message, shard))
        if shard is not None and shard[1] not in self._counts:
            self._counts = tuple(sorted({*self._counts, shard[1]}))
        self._blobs = {}

    def trim(self, to: int) -> None:
        """Forget the messages before `to`: every member's mark is at least there."""
        drop = min(to, self.head) - self.base
        if drop <= 0:
            return
        del self.log[:drop]
        self.base += drop
        self._counts = tuple(sorted({s[1] for _, s in self.log if s is not None}))
        self._encoded = {}
        self._blobs = {}

    def blob(self, conn: Connection, mark: int, encode: Encoder) -> Blob | None:
        """What `conn` is owed from `mark` to the head; None when none of it is for it."""
        indexes = tuple(shard_of(conn.uid, n) for n in self._counts) if self._counts else ()
        key = (conn.kind, indexes, mark)
        found = self._blobs.get(key, False)
        if found is False:
            found = self._blobs[key] = self._build(conn.kind, indexes, mark, encode)
        return found

    def _build(
        self, kind: str, indexes: tuple[int, ...], mark: int, encode: Encoder
    ) -> Blob | None:
        where = dict(zip(self._counts, indexes, strict=True))
        parts: list[bytes] = []
        priority = PRIORITY_INDEX["low"]
        messages = 0
        for seq in range(max(mark, self.base), self.head):
            message, shard = self.log[seq - self.base]
            if shard is not None and where[shard[1]] != shard[0]:
                continue
            data = self._encoded.get((kind, seq))
            if data is None:
                data = self._encoded[kind, seq] = encode(kind, message)
            parts.append(data)
            priority = min(priority, _priority(message))
            messages += len(message["msgs"]) if message.get("op") == "batch" else 1
        if not parts:
            return None
        return priority, b"".join(parts), messages


def _priority(message: dict) -> int:
    if message.get("op") == "batch":
        return PRIORITY_INDEX["low"]
    return PRIORITY_INDEX.get(message.get("pri", "normal"), 1)


class FlushPass:
    """One visit of a room's members by the flush, a slice of them at a time."""

    __slots__ = ("group", "members", "cursor", "start", "again")

    def __init__(self, group: RoomGroup) -> None:
        self.group = group
        self.members = list(group.members)
        self.cursor = 0
        self.start = group.head
        self.again = AGAIN_NONE

    @property
    def done(self) -> bool:
        return self.cursor >= len(self.members)

    def take(self, limit: int) -> list[tuple[Connection, int]]:
        """Up to `limit` more members visited: those still in the room and owed messages,
        each with its mark before the visit; their marks move to the head."""
        group = self.group
        marks = group.members
        head = group.head
        if not self.cursor:
            self.start = head  # what arrived before the first slice goes out in this pass
        end = min(self.cursor + limit, len(self.members))
        owed = []
        for conn in self.members[self.cursor : end]:
            mark = marks.get(conn)
            if mark is not None and mark < head:
                marks[conn] = head
                owed.append((conn, mark))
        self.cursor = end
        return owed

    def finish(self) -> bool:
        """Forget what every member now has; True when some are owed what came later."""
        self.group.trim(self.start)
        return bool(self.group.log)

"""The in-process bus: the embedded default, with the same delivery contract as Kafka.

Each topic has a fixed number of partitions; a key picks its partition by CRC-32, so one
key's records stay in order. Each consumer group keeps committed offsets per partition,
and its members split the partitions round-robin whenever one joins or leaves; a member
resumes a newly assigned partition at the group's committed offset, so uncommitted
records are delivered again. A partition drops records once every group that reads the
topic has committed past them, and refuses publishes (BusFull) beyond `retention`
records, so memory stays bounded and nothing acknowledged is lost silently.
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Sequence

from im.bus import (
    BusError,
    BusFull,
    Record,
    check_consumer,
    check_fetch,
    check_publish,
    check_topic,
)

__all__ = ["DEFAULT_PARTITIONS", "DEFAULT_RETENTION", "MemoryBus", "MemoryConsumer"]

DEFAULT_PARTITIONS = 8
DEFAULT_RETENTION = 100_000

#: (topic, partition)
TopicPartition = tuple[str, int]


def partition_for(key: str, partitions: int) -> int:
    return zlib.crc32(key.encode()) % partitions


class _Log:
    """One partition's retained records; `start` is the offset of the first one."""

    __slots__ = ("records", "start")

    def __init__(self) -> None:
        self.records: list[Record] = []
        self.start = 0

    @property
    def end(self) -> int:
        return self.start + len(self.records)

    def read(self, position: int, limit: int) -> list[Record]:
        first = max(position - self.start, 0)
        return self.records[first : first + limit]

    def trim(self, offset: int) -> None:
        drop = offset - self.start
        if drop > 0:
            del self.records[:drop]
            self.start = offset


class _Group:
    __slots__ = ("committed", "members", "owners")

    def __init__(self) -> None:
        self.committed: dict[TopicPartition, int] = {}
        self.members: list[MemoryConsumer] = []
        self.owners: dict[TopicPartition, MemoryConsumer] = {}


class _Topic:
    __slots__ = ("groups", "logs")

    def __init__(self, partitions: int) -> None:
        self.logs = [_Log() for _ in range(partitions)]
        self.groups: list[_Group] = []


class MemoryBus:
    """Topics, groups and offsets of one process; topics not ensured are created on first
    use with `partitions` partitions, as a Kafka broker with auto-creation does."""

    def __init__(
        self, *, partitions: int = DEFAULT_PARTITIONS, retention: int = DEFAULT_RETENTION
    ) -> None:
        if partitions < 1 or retention < 1:
            raise ValueError(
                f"partitions and retention must be positive, got {partitions!r}, {retention!r}"
            )
        self._partitions = partitions
        self._retention = retention
        self._topics: dict[str, _Topic] = {}
        self._groups: dict[str, _Group] = {}
        self._closed = False

    async def start(self) -> None:
        self._check_open()

    async def publish(self, topic: str, key: str, value: bytes) -> None:
        check_publish(topic, key, value)
        self._check_open()
        entry = self._topic(topic)
        partition = partition_for(key, len(entry.logs))
        log = entry.logs[partition]
        if len(log.records) >= self._retention:
            raise BusFull(
                f"topic {topic!r} partition {partition} holds {self._retention} records "
                "not yet committed by every consumer group"
            )
        log.records.append(Record(topic, partition, log.end, key, value))
        for group in entry.groups:
            owner = group.owners.get((topic, partition))
            if owner is not None:
                owner.wake.set()

    async def ensure_topic(self, topic: str, partitions: int) -> None:
        check_topic(topic, partitions)
        self._check_open()
        if topic not in self._topics:
            self._topics[topic] = _Topic(partitions)

    def consumer(self, topics: Sequence[str], group: str) -> MemoryConsumer:
        return MemoryConsumer(self, check_consumer(topics, group), group)

    async def close(self) -> None:
        self._closed = True

    # Group bookkeeping, called by MemoryConsumer.

    def join(self, member: MemoryConsumer) -> None:
        self._check_open()
        group = self._groups.setdefault(member.group, _Group())
        for name in member.topics:
            entry = self._topic(name)
            if group not in entry.groups:
                entry.groups.append(group)
        group.members.append(member)
        self._rebalance(group)

    def leave(self, member: MemoryConsumer) -> None:
        group = self._groups[member.group]
        group.members.remove(member)
        self._rebalance(group)

    def partition_log(self, tp: TopicPartition) -> _Log:
        return self._topics[tp[0]].logs[tp[1]]

    def commit_offsets(self, group_name: str, offsets: dict[TopicPartition, int]) -> None:
        group = self._groups[group_name]
        group.committed.update(offsets)
        for topic, partition in offsets:
            entry = self._topics[topic]
            log = entry.logs[partition]
            log.trim(min(g.committed.get((topic, partition), log.start) for g in entry.groups))

    def _topic(self, name: str) -> _Topic:
        entry = self._topics.get(name)
        if entry is None:
            entry = self._topics[name] = _Topic(self._partitions)
        return entry

    def _rebalance(self, group: _Group) -> None:
        """Deal every subscribed partition to the members in turn (Kafka's round-robin)."""
        owners: dict[TopicPartition, MemoryConsumer] = {}
        turn = 0
        for name in sorted({name for member in group.members for name in member.topics}):
            subscribers = [member for member in group.members if name in member.topics]
            for partition in range(len(self._topics[name].logs)):
                owners[(name, partition)] = subscribers[turn % len(subscribers)]
                turn += 1
        group.owners = owners
        for member in group.members:
            member.assign(
                {
                    tp: max(group.committed.get(tp, 0), self.partition_log(tp).start)
                    for tp, owner in owners.items()
                    if owner is member
                }
            )

    def _check_open(self) -> None:
        if self._closed:
            raise BusError("the bus is closed")


class MemoryConsumer:
    """One member of a group on a MemoryBus."""

    __slots__ = ("_bus", "_next", "_positions", "_state", "group", "topics", "wake")

    def __init__(self, bus: MemoryBus, topics: list[str], group: str) -> None:
        self._bus = bus
        self.topics = topics
        self.group = group
        self._positions: dict[TopicPartition, int] = {}
        self._next = 0  # first partition to read on the next fetch, rotated for fairness
        self._state = "new"
        self.wake = asyncio.Event()

    async def start(self) -> None:
        if self._state != "new":
            raise BusError(f"consumer already {self._state}")
        self._bus.join(self)
        self._state = "started"

    def assign(self, resume: dict[TopicPartition, int]) -> None:
        """Take a new share of partitions: keep the place in those already held, resume the
        others where the group committed."""
        self._positions = {tp: self._positions.get(tp, offset) for tp, offset in resume.items()}
        self.wake.set()

    async def fetch(self, max_records: int = 500, timeout: float = 0.5) -> list[Record]:
        check_fetch(max_records, timeout)
        self._check_started()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._state == "started":
            records = self._take(max_records)
            if records:
                return records
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            self.wake.clear()
            try:
                async with asyncio.timeout(remaining):
                    await self.wake.wait()
            except TimeoutError:
                break
        return []

    async def commit(self, records: Sequence[Record]) -> None:
        self._check_started()
        offsets: dict[TopicPartition, int] = {}
        for record in records:
            tp = (record.topic, record.partition)
            if tp in self._positions:
                offsets[tp] = max(offsets.get(tp, 0), record.offset + 1)
        if offsets:
            self._bus.commit_offsets(self.group, offsets)

    async def close(self) -> None:
        if self._state == "started":
            self._bus.leave(self)
        self._state = "closed"
        self._positions = {}
        self.wake.set()

    def _take(self, limit: int) -> list[Record]:
        order = list(self._positions)
        if not order:
            return []
        out: list[Record] = []
        for step in range(len(order)):
            tp = order[(self._next + step) % len(order)]
            records = self._bus.partition_log(tp).read(self._positions[tp], limit - len(out))
            if records:
                out.extend(records)
                self._positions[tp] = records[-1].offset + 1
                if len(out) >= limit:
                    break
        self._next = (self._next + 1) % len(order)
        return out

    def _check_started(self) -> None:
        if self._state != "started":
            raise BusError(f"consumer is {self._state}, not started")

"""The bus between center and the fan-out workers, and the interface every engine implements.

Center publishes jobs keyed by user, room or product; a key always lands on the same
partition, so one key's records are consumed in publish order. Workers of one consumer
group share the partitions and commit a record only once its work is done: whatever a
closed or crashed consumer fetched without committing goes again to the group's next
owner of that partition (at-least-once; consumers recognise repeats by message id).

Two engines: `im.bus.memory.MemoryBus` (in-process, the embedded default) and
`im.bus.kafka.KafkaBus` (any Kafka-wire broker).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

__all__ = [
    "Bus",
    "BusError",
    "BusFull",
    "BusUnavailable",
    "Consumer",
    "Record",
    "open_bus",
]


class BusError(Exception):
    """The bus refused an operation; the message says why."""


class BusUnavailable(BusError):
    """The broker could not be reached in time; the operation may succeed if retried."""


class BusFull(BusError):
    """A partition holds its maximum of records not yet committed by every group, so a
    publish is refused rather than dropping something already acknowledged."""


@dataclass(frozen=True, slots=True)
class Record:
    """One published record as a consumer sees it."""

    topic: str
    partition: int
    offset: int
    key: str
    value: bytes


class Consumer(Protocol):
    """One member of a consumer group; the group's partitions are shared among its members."""

    async def start(self) -> None:
        """Join the group; returns once this member holds its share of the partitions."""
        ...

    async def fetch(self, max_records: int = 500, timeout: float = 0.5) -> list[Record]:
        """The next records of the partitions this member holds; [] when none came in time."""
        ...

    async def commit(self, records: Sequence[Record]) -> None:
        """Mark records done: per partition, the group resumes after the highest one given.

        Records of partitions this member no longer holds (the group rebalanced) are not
        committed; their new owner receives them again.
        """
        ...

    async def close(self) -> None:
        """Leave the group; uncommitted records go to the remaining or next members."""
        ...


class Bus(Protocol):
    async def start(self) -> None: ...

    async def publish(self, topic: str, key: str, value: bytes) -> None:
        """Returns once the record is durable (Kafka: acknowledged by all in-sync replicas).

        Raises BusUnavailable when the broker cannot be reached in time, BusFull when the
        partition has no room, BusError for anything else the bus refuses.
        """
        ...

    async def ensure_topic(self, topic: str, partitions: int) -> None:
        """Create the topic when missing; an existing topic is left as it is."""
        ...

    def consumer(self, topics: Sequence[str], group: str) -> Consumer: ...

    async def close(self) -> None: ...


def check_publish(topic: str, key: str, value: bytes) -> None:
    """Refuse a malformed record the same way in every engine."""
    check_topic(topic)
    if not isinstance(key, str):
        raise TypeError(f"record key must be str, got {type(key).__name__}")
    if not isinstance(value, bytes):
        raise TypeError(f"record value must be bytes, got {type(value).__name__}")


def check_topic(topic: str, partitions: int = 1) -> None:
    if not isinstance(topic, str) or not topic:
        raise ValueError(f"topic must be a non-empty string, got {topic!r}")
    if not isinstance(partitions, int) or isinstance(partitions, bool) or partitions < 1:
        raise ValueError(f"a topic needs at least one partition, got {partitions!r}")


def check_consumer(topics: Sequence[str], group: str) -> list[str]:
    """The topics as a list, after refusing an empty subscription or group name."""
    if isinstance(topics, str):
        raise TypeError("topics must be a sequence of topic names, not one string")
    names = list(topics)
    if not names:
        raise ValueError("a consumer needs at least one topic")
    for name in names:
        check_topic(name)
    if not isinstance(group, str) or not group:
        raise ValueError(f"group must be a non-empty string, got {group!r}")
    return names


def check_fetch(max_records: int, timeout: float) -> None:
    if not isinstance(max_records, int) or max_records < 1:
        raise ValueError(f"max_records must be a positive integer, got {max_records!r}")
    if not timeout >= 0:
        raise ValueError(f"timeout must be >= 0 seconds, got {timeout!r}")


def open_bus(brokers: str | None, *, idempotence: bool = False) -> Bus:
    """The in-process engine when no brokers are given, else Kafka at `brokers`
    ("host:port[,host:port...]"); `idempotence` needs a broker that grants producer ids."""
    if brokers is None:
        from im.bus.memory import MemoryBus

        return MemoryBus()
    from im.bus.kafka import KafkaBus

    return KafkaBus(brokers, idempotence=idempotence)

"""One contract for both bus engines: the in-process one and Kafka against a real Tansu broker."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import pytest

from im.bus import Bus, BusError, BusFull, BusUnavailable, Consumer, Record, open_bus
from im.bus.kafka import KafkaBus
from im.bus.memory import MemoryBus
from tests.fixtures.kafka_broker import KafkaBroker, broker_binary, free_port

#: Short group timing so that joins and rebalances on the test broker take about a second.
FAST_GROUPS = {
    "request_timeout": 5.0,
    "session_timeout": 1.0,
    "heartbeat_interval": 0.1,
    "rebalance_timeout": 1.0,
}
PARTITIONS = 4

MakeConsumer = Callable[[str, str], Awaitable[Consumer]]


@pytest.fixture(params=["memory", "kafka"])
async def bus(request: pytest.FixtureRequest) -> AsyncIterator[Bus]:
    if request.param == "memory":
        engine: Bus = MemoryBus()
    else:
        engine = KafkaBus(request.getfixturevalue("kafka_broker").brokers, **FAST_GROUPS)
    await engine.start()
    yield engine
    await engine.close()


@pytest.fixture
async def topic(bus: Bus) -> str:
    name = f"jobs-{uuid.uuid4().hex[:8]}"
    await bus.ensure_topic(name, PARTITIONS)
    return name


@pytest.fixture
async def consumer(bus: Bus) -> AsyncIterator[MakeConsumer]:
    """Makes started consumers, closing them at the end; a group is named after the test's
    topic too, so no two tests share a group on the session's broker."""
    made: list[Consumer] = []

    async def make(topic: str, group: str) -> Consumer:
        member = bus.consumer([topic], f"{group}-{topic}")
        made.append(member)
        await member.start()
        return member

    yield make
    for member in made:
        await member.close()


async def drain(member: Consumer, count: int, within: float = 10.0) -> list[Record]:
    """Fetch until `count` records came or `within` seconds passed."""
    records: list[Record] = []
    deadline = time.monotonic() + within
    while len(records) < count and time.monotonic() < deadline:
        records += await member.fetch(timeout=0.2)
    return records


async def publish_all(bus: Bus, topic: str, items: Sequence[tuple[str, bytes]]) -> None:
    for key, value in items:
        await bus.publish(topic, key, value)


def values(records: Sequence[Record]) -> list[bytes]:
    return [record.value for record in records]


async def test_round_trip(bus: Bus, topic: str, consumer: MakeConsumer) -> None:
    await bus.publish(topic, "u1", b"\x00hello")
    member = await consumer(topic, "g")
    [record] = await drain(member, 1)
    assert (record.topic, record.key, record.value) == (topic, "u1", b"\x00hello")
    assert 0 <= record.partition < PARTITIONS
    assert record.offset == 0


async def test_order_kept_per_key(bus: Bus, topic: str, consumer: MakeConsumer) -> None:
    items = [(f"room{i % 5}", f"{i % 5}:{i // 5}".encode()) for i in range(60)]
    await publish_all(bus, topic, items)
    records = await drain(await consumer(topic, "g"), 60)
    assert len(records) == 60
    for key in {key for key, _ in items}:
        mine = [record for record in records if record.key == key]
        assert values(mine) == [value for k, value in items if k == key]
        assert len({record.partition for record in mine}) == 1
        offsets = [record.offset for record in mine]
        assert offsets == sorted(offsets)


async def test_group_members_split_partitions(bus: Bus, topic: str, consumer: MakeConsumer) -> None:
    # One after the other: Tansu 0.6 settles simultaneous first joins only after retries.
    first = await consumer(topic, "workers")
    second = await consumer(topic, "workers")
    items = [(f"user{i}", f"v{i}".encode()) for i in range(60)]
    await publish_all(bus, topic, items)
    got: dict[Consumer, list[Record]] = {first: [], second: []}

    async def share(member: Consumer) -> None:
        deadline = time.monotonic() + 10
        while sum(map(len, got.values())) < len(items) and time.monotonic() < deadline:
            got[member] += await member.fetch(timeout=0.2)

    await asyncio.gather(share(first), share(second))
    got_first, got_second = got[first], got[second]
    assert got_first and got_second
    assert not {r.partition for r in got_first} & {r.partition for r in got_second}
    assert sorted(values(got_first + got_second)) == sorted(value for _, value in items)


async def test_uncommitted_records_go_to_the_next_member(
    bus: Bus, topic: str, consumer: MakeConsumer
) -> None:
    await publish_all(bus, topic, [("one-key", f"v{i}".encode()) for i in range(10)])
    first = await consumer(topic, "workers")
    records = await drain(first, 10)
    assert values(records) == [f"v{i}".encode() for i in range(10)]
    await first.commit(records[:4])
    await first.close()

    second = await consumer(topic, "workers")
    assert values(await drain(second, 6)) == [f"v{i}".encode() for i in range(4, 10)]
    assert await second.fetch(timeout=0.3) == []


async def test_a_commit_after_a_rebalance_leaves_moved_records_to_their_new_owner(
    bus: Bus, topic: str, consumer: MakeConsumer
) -> None:
    items = [(f"user{i}", f"v{i}".encode()) for i in range(40)]
    await publish_all(bus, topic, items)
    first = await consumer(topic, "workers")
    fetched = await drain(first, 40)
    assert len(fetched) == 40
    second = await consumer(topic, "workers")
    await first.commit(fetched)  # too late for the partitions that moved: no error, no commit
    got = await drain(second, 1)
    while batch := await second.fetch(timeout=0.5):
        got += batch
    moved = {record.partition for record in got}
    assert 0 < len(moved) < PARTITIONS
    assert sorted(values(got)) == sorted(values(r for r in fetched if r.partition in moved))


async def test_committed_records_stay_done_after_restart(
    bus: Bus, topic: str, consumer: MakeConsumer
) -> None:
    await publish_all(bus, topic, [(f"user{i}", b"old") for i in range(20)])
    first = await consumer(topic, "workers")
    records = await drain(first, 20)
    assert len(records) == 20
    await first.commit(records)
    await first.close()

    restarted = await consumer(topic, "workers")
    assert await restarted.fetch(timeout=0.5) == []
    await bus.publish(topic, "user1", b"new")
    assert values(await drain(restarted, 1)) == [b"new"]


async def test_every_group_sees_every_record(bus: Bus, topic: str, consumer: MakeConsumer) -> None:
    items = [(f"user{i}", f"v{i}".encode()) for i in range(30)]
    await publish_all(bus, topic, items)
    one, two = await asyncio.gather(consumer(topic, "audit"), consumer(topic, "workers"))
    got_one, got_two = await asyncio.gather(drain(one, 30), drain(two, 30))
    assert sorted(values(got_one)) == sorted(values(got_two)) == sorted(v for _, v in items)


async def test_fetch_times_out_empty(bus: Bus, topic: str, consumer: MakeConsumer) -> None:
    member = await consumer(topic, "g")
    started = time.monotonic()
    assert await member.fetch(timeout=0.3) == []
    assert 0.25 <= time.monotonic() - started < 3


async def test_fetch_wakes_for_a_new_record(bus: Bus, topic: str, consumer: MakeConsumer) -> None:
    member = await consumer(topic, "g")
    assert await member.fetch(timeout=0.2) == []
    waiting = asyncio.create_task(member.fetch(timeout=5))
    await asyncio.sleep(0.1)
    started = time.monotonic()
    await bus.publish(topic, "u", b"late")
    assert values(await waiting) == [b"late"]
    assert time.monotonic() - started < 2


async def test_ensure_topic_is_idempotent(bus: Bus, topic: str, consumer: MakeConsumer) -> None:
    await bus.ensure_topic(topic, PARTITIONS)
    await bus.ensure_topic(topic, PARTITIONS * 2)  # an existing topic keeps its partitions
    await publish_all(bus, topic, [(f"user{i}", b"x") for i in range(40)])
    records = await drain(await consumer(topic, "g"), 40)
    assert len(records) == 40
    assert 1 < len({record.partition for record in records}) <= PARTITIONS


async def test_bad_input_is_refused(bus: Bus, topic: str) -> None:
    with pytest.raises(TypeError, match="value must be bytes"):
        await bus.publish(topic, "u", "text")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least one partition"):
        await bus.ensure_topic("other", 0)
    with pytest.raises(ValueError, match="at least one topic"):
        bus.consumer([], "g")
    member = bus.consumer([topic], "g")
    with pytest.raises(BusError, match="not started"):
        await member.fetch()


def test_open_bus_picks_the_engine() -> None:
    assert isinstance(open_bus(None), MemoryBus)
    kafka = open_bus("127.0.0.1:9092")
    assert isinstance(kafka, KafkaBus)
    assert kafka.brokers == "127.0.0.1:9092"


async def test_memory_partition_is_bounded_until_committed() -> None:
    bus = MemoryBus(partitions=1, retention=3)
    member = bus.consumer(["t"], "g")
    await member.start()
    for i in range(3):
        await bus.publish("t", "k", b"%d" % i)
    with pytest.raises(BusFull, match="partition 0 holds 3 records"):
        await bus.publish("t", "k", b"3")
    await member.commit(await member.fetch())
    await bus.publish("t", "k", b"3")
    assert values(await member.fetch()) == [b"3"]


async def test_kafka_unreachable_broker_is_unavailable() -> None:
    bus = KafkaBus(f"127.0.0.1:{free_port()}", request_timeout=2)
    with pytest.raises(BusUnavailable, match="unavailable"):
        await bus.start()


async def test_kafka_idempotence_is_a_clear_setting(kafka_broker: KafkaBroker) -> None:
    bus = KafkaBus(kafka_broker.brokers, idempotence=True, request_timeout=5)
    try:
        await bus.start()
    except BusError as exc:  # brokers without producer ids (Tansu 0.6) refuse it
        assert "idempotence off" in str(exc)
    else:
        await bus.ensure_topic("idempotent", 1)
        await bus.publish("idempotent", "k", b"v")
    finally:
        await bus.close()


async def test_kafka_publish_survives_a_broker_restart(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    broker = KafkaBroker(broker_binary(), tmp_path_factory.mktemp("restarted"))
    broker.start()
    bus = KafkaBus(broker.brokers, request_timeout=1)
    try:
        await bus.start()
        await bus.ensure_topic("jobs", 2)
        await bus.publish("jobs", "k", b"before")
        broker.stop()
        with pytest.raises(BusUnavailable):
            await bus.publish("jobs", "k", b"while down")
        with pytest.raises(BusUnavailable):
            await bus.ensure_topic("jobs", 2)
        broker.start()
        await bus.ensure_topic("jobs", 2)
        await bus.publish("jobs", "k", b"after")
    finally:
        await bus.close()
        broker.stop()

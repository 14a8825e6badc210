"""The fan-out worker over both bus engines (in-process, and Kafka on a real Tansu broker),
with room instances as real RPC servers and the register's memory engine."""

from __future__ import annotations

import asyncio
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgpack
import pytest
from prometheus_client import REGISTRY

from center.api import Publisher
from center.jobs import (
    PUSH_TOPIC,
    Job,
    JobError,
    broadcast_job,
    decode_job,
    encode_job,
    job_key,
    job_topic,
    pin_topic,
    room_job,
    shard_of,
    users_job,
)
from center.worker import FanoutWorker, Ledger, _Item, committable, push_calls
from im.bus import Bus, Record
from im.bus.kafka import KafkaBus
from im.bus.memory import MemoryBus
from im.ids import id_time_ms, new_id
from im.rpc import RpcError, RpcServer
from im.sessions import Node, Session
from im.switches import Switches, parse_switches
from register.engines.memory import MemoryStore
from tests.fixtures.kafka_broker import KafkaBroker, broker_binary
from tests.fixtures.room_calls import room_push_entries
from tests.fixtures.system import eventually

TTL = 60.0
#: Short group timing so that joins and rebalances on the test broker take about a second.
FAST_GROUPS = {
    "request_timeout": 5.0,
    "session_timeout": 1.0,
    "heartbeat_interval": 0.1,
    "rebalance_timeout": 1.0,
}
#: Long enough for a Kafka group join after a consumer was reopened.
WAIT = 15.0


class Room:
    """A room instance's RPC side: records what reached it, can fail or be stopped."""

    def __init__(self, instance: str) -> None:
        self.instance = instance
        self.pushes: list[dict[str, Any]] = []  # push items, as received
        self.push_calls = 0
        self.room_pushes: list[dict[str, Any]] = []
        self.room_push_calls = 0
        self.broadcasts: list[dict[str, Any]] = []
        self.lose_next = 0  # answers to drop: the caller times out, nothing is delivered
        self.port = 0
        handlers = {"push": self._push, "room_push": self._room_push, "broadcast": self._broadcast}
        self.server = RpcServer(handlers, name=f"test-{instance}")

    async def start(self, store: MemoryStore | None = None) -> None:
        _, self.port = await self.server.start("127.0.0.1", self.port)
        if store is not None:
            await store.put_node(Node(self.instance, rpc=self.server.address), TTL)

    async def stop(self) -> None:
        await self.server.close()

    def ids(self) -> list[str]:
        """Message ids received, in order, whatever the RPC."""
        items = [item["msg"] for item in self.pushes]
        items += [call["msg"] for call in self.room_pushes + self.broadcasts]
        return [msg["id"] for msg in items]

    async def _lost(self) -> bool:
        if self.lose_next <= 0:
            return False
        self.lose_next -= 1
        await asyncio.sleep(1.0)
        return True

    async def _push(self, params: dict[str, Any]) -> dict[str, Any]:
        if await self._lost():
            raise RpcError("internal", "lost")
        self.push_calls += 1
        self.pushes.extend(params["items"])
        return {"written": sum(len(item["conns"]) for item in params["items"]), "missing": []}

    async def _room_push(self, params: dict[str, Any]) -> dict[str, Any]:
        self.room_push_calls += 1
        entries = room_push_entries(params)
        self.room_pushes.extend(entries)
        return {"written": len(entries), "dropped": 0}

    async def _broadcast(self, params: dict[str, Any]) -> dict[str, Any]:
        self.broadcasts.append(params)
        return {"written": 1}


def _msg(**extra: Any) -> dict[str, Any]:
    message_id = new_id()
    return {"op": "push", "id": message_id, "type": "chat", "pri": "normal", "qos": 0,
            "ts": id_time_ms(message_id), "body": extra or None}  # fmt: skip


def _metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _session(uid: str, conn: str, instance: str) -> Session:
    return Session("demo", uid, conn, instance)


@pytest.fixture(params=["memory", "kafka"])
async def bus(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Bus]:
    """A bus of its own per test: on Kafka a fresh broker, so no test sees another's records."""
    broker = None
    if request.param == "memory":
        engine: Bus = MemoryBus()
    else:
        broker = KafkaBroker(broker_binary(), tmp_path_factory.mktemp("worker-kafka"))
        broker.start()
        engine = KafkaBus(broker.brokers, **FAST_GROUPS)
    await engine.start()
    yield engine
    await engine.close()
    if broker is not None:
        broker.stop()


@pytest.fixture
async def store() -> AsyncIterator[MemoryStore]:
    engine = MemoryStore()
    yield engine
    await engine.close()


@pytest.fixture
async def rooms(store: MemoryStore) -> AsyncIterator[dict[str, Room]]:
    made = {name: Room(name) for name in ("room-a", "room-b", "room-c")}
    for room in made.values():
        await room.start(store)
    yield made
    for room in made.values():
        await room.stop()


MakeWorker = Callable[..., Awaitable[FanoutWorker]]


@pytest.fixture
async def make_worker(bus: Bus, store: MemoryStore) -> AsyncIterator[MakeWorker]:
    """Started workers with quick retries; all closed (without grace) at the end."""
    made: list[FanoutWorker] = []

    async def make(**options: Any) -> FanoutWorker:
        settings = {"rpc_timeout": 0.5, "backoff": 0.05, "restart_pause": 0.1, **options}
        worker = FanoutWorker(bus, store, **settings)
        made.append(worker)
        await worker.start()
        return worker

    yield make
    for worker in made:
        await worker.close(grace=0)


async def _publish(bus: Bus, *jobs: Job, switches: Switches | None = None) -> None:
    publisher = Publisher(bus, lambda: switches)
    for job in jobs:
        await publisher.publish(job)


async def test_users_jobs_reach_each_instance_once_in_order(bus, store, rooms, make_worker) -> None:
    await store.put_sessions(
        [
            _session("u1", "a1", "room-a"),
            _session("u1", "b9", "room-b"),
            _session("u2", "a2", "room-a"),
            _session("u3", "b3", "room-b"),
        ],
        TTL,
    )
    jobs = [
        users_job("demo", ["u1"], _msg()),
        users_job("demo", ["u2"], _msg()),
        users_job("demo", ["u3"], _msg()),
        users_job("demo", ["u1", "u2", "u3", "ghost"], _msg()),
        users_job("demo", ["ghost"], _msg()),
        users_job("demo", ["u2"], _msg(n=2)),
        users_job("other", ["u1"], _msg()),  # another product: nobody
    ]
    await _publish(bus, *jobs)
    done = _metric("im_worker_jobs_total", job="users", result="done")
    await make_worker()
    await eventually(
        lambda: _metric("im_worker_jobs_total", job="users", result="done") >= done + len(jobs),
        timeout=WAIT,
    )
    ids = [job.id for job in jobs]
    room_a, room_b = rooms["room-a"], rooms["room-b"]
    assert sorted(room_a.ids()) == sorted([ids[0], ids[1], ids[3], ids[5]])
    assert sorted(room_b.ids()) == sorted([ids[0], ids[2], ids[3]])
    assert room_a.ids().index(ids[1]) < room_a.ids().index(ids[5])  # u2's order is kept
    conns = {(room.instance, item["msg"]["id"]): item["conns"] for room in rooms.values()
             for item in room.pushes}  # fmt: skip
    assert conns == {
        ("room-a", ids[0]): ["a1"],
        ("room-a", ids[1]): ["a2"],
        ("room-a", ids[3]): ["a1", "a2"],
        ("room-a", ids[5]): ["a2"],
        ("room-b", ids[0]): ["b9"],
        ("room-b", ids[2]): ["b3"],
        ("room-b", ids[3]): ["b9", "b3"],
    }
    assert rooms["room-c"].ids() == []
    if isinstance(bus, MemoryBus):  # one batch: one RPC per instance carrying every item
        assert (room_a.push_calls, room_b.push_calls) == (1, 1)
    assert next(i["msg"] for i in room_a.pushes if i["msg"]["id"] == ids[5]) == jobs[5].msg


async def test_room_jobs_reach_the_rooms_instances_with_the_senders_shard(
    bus, store, rooms, make_worker
) -> None:
    await store.put_rooms("room-a", [("demo", "r1", 3), ("demo", "r2", 1)], TTL)
    await store.put_rooms("room-b", [("demo", "r1", 2)], TTL)
    switches = parse_switches({"shard_size": 2})
    audience = room_job("demo", "r1", _msg(), sender="fan-1")
    host = room_job("demo", "r1", _msg())
    other = room_job("demo", "r2", _msg())
    empty = room_job("demo", "nobody-here", _msg())
    await _publish(bus, audience, host, other, empty)
    done = _metric("im_worker_jobs_total", job="room", result="done")
    await make_worker(switches_source=lambda: switches)
    await eventually(
        lambda: _metric("im_worker_jobs_total", job="room", result="done") >= done + 4,
        timeout=WAIT,
    )
    room_a, room_b = rooms["room-a"], rooms["room-b"]
    assert sorted(room_a.ids()) == sorted([audience.id, host.id, other.id])
    assert [i for i in room_a.ids() if i != other.id] == [audience.id, host.id]  # r1's order
    assert room_b.ids() == [audience.id, host.id]
    assert rooms["room-c"].ids() == []
    first = room_b.room_pushes[0]
    assert (first["product"], first["room"], first["members_total"]) == ("demo", "r1", 5)
    assert first["shard"] == [zlib.crc32(b"fan-1") % 3, 3]
    assert first["msg"] == {**audience.msg, "room": "r1"} and audience.msg["room"] == "r1"
    assert room_b.room_pushes[1]["shard"] is None  # no sender: every shard


async def test_a_hot_rooms_jobs_share_room_push_calls_in_order(
    bus, store, rooms, make_worker
) -> None:
    await store.put_rooms("room-a", [("demo", "hot", 100)], TTL)
    jobs = [room_job("demo", "hot", _msg(n=n)) for n in range(50)]
    await _publish(bus, *jobs)
    done = _metric("im_worker_jobs_total", job="room", result="done")
    await make_worker()
    await eventually(
        lambda: _metric("im_worker_jobs_total", job="room", result="done") >= done + 50,
        timeout=WAIT,
    )
    room = rooms["room-a"]
    assert room.ids() == [job.id for job in jobs]
    assert room.room_push_calls < 50  # one call per fetched batch, not per message


async def test_broadcast_reaches_every_live_instance_once(bus, store, rooms, make_worker) -> None:
    job = broadcast_job("demo", _msg(text="hello"), 0.5)
    await _publish(bus, job)
    await make_worker()
    await eventually(lambda: all(room.broadcasts for room in rooms.values()), timeout=WAIT)
    await asyncio.sleep(0.2)
    for room in rooms.values():
        assert room.broadcasts == [{"product": "demo", "msg": job.msg, "spread_s": 0.5}]


async def test_a_killed_worker_restarted_resumes_without_resending(
    bus, store, rooms, make_worker
) -> None:
    """Killed mid-batch while room-b is down: the records are delivered again, and the
    instances the worker already served (room-a) are recognised by id and skipped."""
    await store.put_sessions([_session("u", "a1", "room-a"), _session("u", "b1", "room-b")], TTL)
    room_a, room_b = rooms["room-a"], rooms["room-b"]
    await room_b.stop()
    jobs = [users_job("demo", ["u"], _msg(i=i)) for i in range(10)]
    await _publish(bus, *jobs)
    worker = await make_worker(retries=100)
    await eventually(lambda: room_a.pushes, timeout=WAIT)
    await asyncio.sleep(0.2)
    served_before_kill = room_a.ids()
    await worker.close(grace=0)  # the batch in hand is neither finished nor committed
    await room_b.start()
    await worker.start()
    ids = [job.id for job in jobs]
    await eventually(lambda: room_b.ids() == ids, timeout=WAIT)
    await eventually(
        lambda: room_a.ids()[len(served_before_kill) :] == ids[len(served_before_kill) :]
    )
    duplicates = len(room_a.ids()) - len(set(room_a.ids()))
    assert duplicates == 0 and room_a.ids() == ids and served_before_kill


async def test_a_crashed_worker_replaced_sends_its_batch_again_and_loses_nothing(
    bus, store, rooms, make_worker
) -> None:
    """A new worker does not know what the dead one served: the batch it had in hand
    reaches room-a a second time (counted), and everything reaches every instance."""
    await store.put_sessions([_session("u", "a1", "room-a"), _session("u", "b1", "room-b")], TTL)
    room_a, room_b = rooms["room-a"], rooms["room-b"]
    await room_b.stop()
    jobs = [users_job("demo", ["u"], _msg(i=i)) for i in range(10)]
    await _publish(bus, *jobs)
    dead = await make_worker(retries=100)
    await eventually(lambda: room_a.pushes, timeout=WAIT)
    await asyncio.sleep(0.2)
    in_hand = room_a.ids()
    await dead.close(grace=0)
    await room_b.start()
    await make_worker(name="w1")
    ids = [job.id for job in jobs]
    await eventually(lambda: room_b.ids() == ids, timeout=WAIT)
    await eventually(lambda: len(room_a.ids()) == len(ids) + len(in_hand))
    duplicates = len(room_a.ids()) - len(set(room_a.ids()))
    assert duplicates == len(in_hand) > 0
    assert room_a.ids() == in_hand + ids  # the dead worker's batch, then everything in order


async def test_a_failing_instance_delays_the_commit_until_the_retry_succeeds(
    bus, store, rooms, make_worker
) -> None:
    await store.put_sessions([_session("u", "b1", "room-b")], TTL)
    room_b = rooms["room-b"]
    room_b.lose_next = 1
    failures = _metric("im_worker_rpc_failures_total", method="push", reason="rpc_timeout")
    job = users_job("demo", ["u"], _msg())
    await _publish(bus, job)
    worker = await make_worker(rpc_timeout=0.3)
    await eventually(lambda: room_b.ids() == [job.id], timeout=WAIT)
    assert _metric("im_worker_rpc_failures_total", method="push", reason="rpc_timeout") == (
        failures + 1
    )
    await worker.close()  # graceful: the batch was committed
    await make_worker(name="w1")
    after = users_job("demo", ["u"], _msg())  # same key, same partition: comes after it
    await _publish(bus, after)
    await eventually(lambda: len(room_b.ids()) == 2, timeout=WAIT)
    assert room_b.ids() == [job.id, after.id]


async def test_an_instance_down_past_the_retries_gets_the_record_again_when_back(
    bus, store, rooms, make_worker
) -> None:
    await store.put_sessions([_session("u", "a1", "room-a"), _session("u", "b1", "room-b")], TTL)
    room_a, room_b = rooms["room-a"], rooms["room-b"]
    await room_b.stop()
    jobs = [users_job("demo", ["u"], _msg(i=i)) for i in range(3)]
    unfinished = _metric("im_worker_jobs_total", job="users", result="unfinished")
    await _publish(bus, *jobs)
    await make_worker(retries=1)
    await eventually(
        lambda: _metric("im_worker_jobs_total", job="users", result="unfinished") > unfinished,
        timeout=WAIT,
    )
    await room_b.start()
    ids = [job.id for job in jobs]
    await eventually(lambda: room_b.ids() == ids, timeout=WAIT)
    assert room_a.ids() == ids  # served once, before and after the consumer was reopened


async def test_a_pinned_room_goes_through_the_named_worker_only(
    bus, store, rooms, make_worker
) -> None:
    await store.put_rooms("room-a", [("demo", "hot", 5), ("demo", "cold", 5)], TTL)
    switches = parse_switches({"room_pin": {"hot": "w1"}})
    w0 = await make_worker(name="w0")
    hot = [room_job("demo", "hot", _msg(i=i)) for i in range(3)]
    cold = [room_job("demo", "cold", _msg(i=i)) for i in range(3)]
    await _publish(bus, *hot, *cold, switches=switches)
    room_a = rooms["room-a"]
    await eventually(lambda: len(room_a.ids()) == 3, timeout=WAIT)
    await asyncio.sleep(0.5)
    assert room_a.ids() == [job.id for job in cold]  # nobody reads im.pin.w1 yet
    w1 = await make_worker(name="w1")
    await eventually(lambda: len(room_a.ids()) == 6, timeout=WAIT)
    assert room_a.ids()[3:] == [job.id for job in hot]
    assert all(w1.ledger.finished(job.id) and not w0.ledger.finished(job.id) for job in hot)
    assert not any(w1.ledger.finished(job.id) for job in cold)


async def test_memory_records_that_are_not_jobs_are_skipped_and_repeats_not_resent(
    store, rooms
) -> None:
    bus = MemoryBus()
    await bus.start()
    await store.put_sessions([_session("u", "a1", "room-a")], TTL)
    worker = FanoutWorker(bus, store, rpc_timeout=0.5)
    await worker.start()
    try:
        invalid = _metric("im_worker_jobs_total", job="invalid", result="invalid")
        duplicate = _metric("im_worker_jobs_total", job="users", result="duplicate")
        job = users_job("demo", ["u"], _msg())
        await bus.publish(PUSH_TOPIC, "x", b"\xc1 not msgpack")
        await bus.publish(PUSH_TOPIC, "x", msgpack.packb({"job": "users", "product": "demo"}))
        await _publish(bus, job, job)  # a producer retry: the same id twice
        await eventually(lambda: rooms["room-a"].ids() == [job.id])
        await _publish(bus, job)  # later, in another batch
        await eventually(
            lambda: (
                _metric("im_worker_jobs_total", job="users", result="duplicate") == duplicate + 2
            )
        )
        assert _metric("im_worker_jobs_total", job="invalid", result="invalid") == invalid + 2
        assert rooms["room-a"].ids() == [job.id]
        assert _metric("im_worker_lag_records", worker="w0") == 0
    finally:
        await worker.close()
        await bus.close()


# -- pure parts ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "job",
    [
        users_job("demo", ["u1", "u2"], _msg()),
        room_job("demo", "r1", _msg(), sender="fan"),
        room_job("demo", "r1", _msg()),
        broadcast_job("demo", _msg(), 2),
    ],
)
def test_jobs_round_trip(job: Job) -> None:
    assert decode_job(encode_job(job)) == job


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (b"\xc1", "msgpack"),
        (msgpack.packb([1]), "map"),
        (msgpack.packb({"job": "mail"}), "kind"),
        (msgpack.packb({"job": "users", "msg": _msg(), "uids": ["u"]}), "'product'"),
        (msgpack.packb({"job": "users", "product": "p", "uids": ["u"]}), "'msg'"),
        (msgpack.packb({"job": "users", "product": "p", "msg": {"op": "pong"}}), "'msg'"),
        (msgpack.packb({"job": "users", "product": "p", "msg": {**_msg(), "pri": 1}}), "pri"),
        (msgpack.packb({"job": "users", "product": "p", "msg": _msg(), "uids": []}), "'uids'"),
        (msgpack.packb({"job": "users", "product": "p", "msg": _msg(), "uids": [""]}), "'uids'"),
        (msgpack.packb({"job": "room", "product": "p", "msg": _msg()}), "'room'"),
        (msgpack.packb({"job": "room", "product": "p", "msg": _msg(), "room": "r" * 129}),
         "'room'"),
        (msgpack.packb({"job": "room", "product": "p", "msg": _msg(), "room": "r", "from": 1}),
         "'from'"),
        (msgpack.packb({"job": "broadcast", "product": "p", "msg": _msg(), "spread_s": -1}),
         "'spread_s'"),
    ],
)  # fmt: skip
def test_bad_records_are_refused_saying_why(value: bytes, problem: str) -> None:
    with pytest.raises(JobError, match=problem):
        decode_job(value)


def test_keys_keep_one_users_one_rooms_one_products_jobs_together() -> None:
    one = users_job("demo", ["u1"], _msg())
    many = users_job("demo", ["u1", "u2"], _msg())
    assert job_key(one) == "u1" and job_key(many) == many.id
    assert job_key(room_job("demo", "r1", _msg(), sender="fan")) == "r1"
    assert job_key(broadcast_job("demo", _msg(), 0)) == "demo"


def test_pinned_rooms_go_to_their_workers_topic() -> None:
    pins = {"hot": "w1", "odd": "not a topic/name"}
    assert job_topic(room_job("demo", "hot", _msg()), pins) == "im.pin.w1" == pin_topic("w1")
    assert job_topic(room_job("demo", "cold", _msg()), pins) == PUSH_TOPIC
    assert job_topic(room_job("demo", "odd", _msg()), pins) == PUSH_TOPIC
    assert job_topic(users_job("demo", ["hot"], _msg()), pins) == PUSH_TOPIC
    with pytest.raises(ValueError, match="worker name"):
        pin_topic("a/b")
    with pytest.raises(ValueError, match="worker name"):
        FanoutWorker(MemoryBus(), MemoryStore(), name="")


def test_shards() -> None:
    assert shard_of(None, 10_000, 100) is None
    assert shard_of("fan", 10_000, 0) is None
    assert shard_of("fan", 10_000, 100) == [zlib.crc32(b"fan") % 100, 100]
    assert shard_of("fan", 101, 100)[1] == 2
    assert shard_of("fan", 0, 100) == [0, 1]


def _record(partition: int, offset: int) -> Record:
    return Record(PUSH_TOPIC, partition, offset, "k", b"")


def test_commits_stop_at_the_first_unfinished_record_of_each_partition() -> None:
    records = [_record(0, 0), _record(1, 0), _record(0, 1), _record(1, 1), _record(0, 2)]
    finished = [True, False, False, True, True]
    assert committable(records, finished) == [_record(0, 0)]
    assert committable(records, [True] * 5) == records


def test_ledger_is_bounded_and_remembers_partial_work() -> None:
    ledger = Ledger(completed=3, partial=2)
    for message_id in "abcd":
        ledger.finish(message_id)
    assert len(ledger) == 3 and not ledger.finished("a") and ledger.finished("d")
    ledger.serve("x", "room-a")
    ledger.serve("x", "room-b")
    ledger.serve("y", "room-a")
    ledger.serve("z", "room-a")
    assert ledger.served("x") == frozenset()  # forgotten: the oldest of three partial ids
    assert ledger.served("z") == {"room-a"}
    ledger.finish("z")
    assert ledger.served("z") == frozenset() and ledger.finished("z")


def test_push_calls_are_cut_by_size_in_order() -> None:
    job = users_job("demo", ["u"], _msg())
    items = [_Item(i, job, ["c"], size) for i, size in enumerate([60, 30, 20, 90, 200, 10])]
    calls = push_calls(items, budget=100)
    assert [[item.index for item in call] for call in calls] == [[0, 1], [2], [3], [4], [5]]


async def test_worker_main_needs_brokers_and_a_topic_safe_name() -> None:
    from center.config import worker_from_args

    with pytest.raises(SystemExit):
        worker_from_args([], environ={})
    with pytest.raises(SystemExit):
        worker_from_args(["--brokers", "127.0.0.1:9092", "--name", "w/1"], environ={})
    config = worker_from_args(["--brokers", "k:9092", "--name", "w3"], environ={})
    assert (config.brokers, config.name, config.group) == ("k:9092", "w3", "im-fanout")


async def test_worker_main_runs_a_worker_on_kafka(
    store, rooms, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The separate-process worker: register over RPC, Kafka, /metrics."""
    import aiohttp

    from center.config import WorkerConfig
    from center.worker_main import WorkerService
    from register.config import RegisterConfig
    from register.server import RegisterServer

    broker = KafkaBroker(broker_binary(), tmp_path_factory.mktemp("worker-main"))
    broker.start()
    register = RegisterServer(RegisterConfig(port=0, metrics_port=0), store)
    await register.start()
    bus = KafkaBus(broker.brokers, **FAST_GROUPS)
    await bus.start()
    service = WorkerService(
        WorkerConfig(brokers=broker.brokers, register=register.rpc.address, metrics_port=0)
    )
    try:
        await service.start()
        await store.put_sessions([_session("u", "c1", "room-c")], TTL)
        job = users_job("demo", ["u"], _msg())
        await _publish(bus, job)
        started = time.monotonic()
        await eventually(lambda: rooms["room-c"].ids() == [job.id], timeout=WAIT)
        assert time.monotonic() - started < WAIT
        async with aiohttp.ClientSession() as client:
            url = f"http://127.0.0.1:{service.metrics_port}/metrics"
            async with client.get(url) as response:
                assert "im_worker_jobs_total" in await response.text()
    finally:
        await service.close()
        await bus.close()
        await register.close()
        broker.stop()

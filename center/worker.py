"""The fan-out worker: jobs from the bus to the room instances, committed once delivered.

Each worker consumes `im.push` in the group shared by all workers, and its own
`im.pin.<name>` (rooms the switches pin to it) in a group of its own. It fetches up to
`batch` records at a time and handles them together:

- users jobs: the uids of the whole batch are looked up in the register in batches; the
  connections are grouped per room instance, and each instance gets one `push` RPC whose
  items are the batch's messages for it, in record order;
- room jobs: one `room_push` RPC to each instance the register's room index lists, with
  the virtual sub-room of the sender when the switches ask for shards; one room's jobs go
  one after the other, so they keep their order;
- broadcast jobs: one `broadcast` RPC to every live instance.

A record is committed only when every RPC for it was answered, or its instance is gone
from the node table. An RPC that cannot connect, times out or finds the room overloaded
is retried with backoff (`center.push.RoomCaller`); the batch's unfinished records are then
retried in place for up to 15 s (a room restarting, the register's Redis coming back).
When they still fail, the batch's records are committed up to the first unfinished one of
each partition, the consumer is closed and, after a pause, opened again, so the bus
delivers the rest once more.

A redelivered record is recognised by its message id: the worker remembers the last
100,000 ids it finished (those are skipped and counted as `duplicate`) and, for ids it has
not finished, the instances already done (those are not called again). This memory is the
worker's own: after a worker process dies, or its partitions move to another worker,
the messages of the batch it had in hand reach their rooms a second time, with the same
id (the SDK drops repeated at-least-once ids).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any

import msgpack
from prometheus_client import Counter, Gauge

from center.jobs import (
    PIN_PARTITIONS,
    PUSH_PARTITIONS,
    PUSH_TOPIC,
    ROOM,
    USERS,
    Job,
    JobError,
    decode_job,
    pin_topic,
    shard_of,
)
from center.push import (
    NODE_MISS_REFRESH_S,
    RPC_BACKOFF_S,
    RPC_RETRIES,
    Directory,
    RegisterUnavailable,
    RoomCaller,
    Unreachable,
    WarnThrottle,
    group_by_instance,
)
from im.bus import Bus, BusError, Consumer, Record
from im.sessions import SessionStore
from im.switches import Switches

log = logging.getLogger("center.worker")

BATCH = 500
FETCH_TIMEOUT_S = 0.5
#: Pause before a consumer is opened again after a batch it could not finish.
RESTART_PAUSE_S = 1.0
#: How long a batch's unfinished records are retried before the consumer is reopened, and
#: the first and the longest pause between tries.
RETRY_IN_PLACE_S = 15.0
RETRY_PAUSE_S = 0.25
MAX_RETRY_PAUSE_S = 2.0
#: How long close() lets the batch in hand finish before cancelling it.
CLOSE_GRACE_S = 5.0
COMPLETED_IDS = 100_000
#: Unfinished message ids whose done instances are remembered; at most a few batches.
PARTIAL_IDS = 10_000
#: A `push` RPC's items are cut into calls of about this many bytes, well under a frame.
PUSH_CALL_BYTES = 4 * 1024 * 1024

JOBS = Counter(
    "im_worker_jobs_total",
    "Jobs handled, by kind and result: done, duplicate (a redelivered id already done), "
    "unfinished (left for redelivery), invalid (not a job; skipped)",
    ["job", "result"],
)
LAG = Gauge(
    "im_worker_lag_records",
    "Records the worker fetched and has not committed yet",
    ["worker"],
)
WRITTEN = Counter(
    "im_worker_written_total", "Connections a push was queued on, as the rooms report", ["job"]
)

SwitchesSource = Callable[[], Switches | None]


class Ledger:
    """The message ids this worker finished (bounded, oldest forgotten first) and, for ids
    not finished yet, the instances already served."""

    __slots__ = ("_completed", "_partial", "_max_completed", "_max_partial")

    def __init__(self, completed: int = COMPLETED_IDS, partial: int = PARTIAL_IDS) -> None:
        self._completed: dict[str, None] = {}
        self._partial: dict[str, set[str]] = {}
        self._max_completed = completed
        self._max_partial = partial

    def __len__(self) -> int:
        return len(self._completed)

    def finished(self, message_id: str) -> bool:
        return message_id in self._completed

    def served(self, message_id: str) -> frozenset[str] | set[str]:
        return self._partial.get(message_id, frozenset())

    def serve(self, message_id: str, instance: str) -> None:
        served = self._partial.get(message_id)
        if served is None:
            if len(self._partial) >= self._max_partial:
                del self._partial[next(iter(self._partial))]
            served = self._partial[message_id] = set()
        served.add(instance)

    def finish(self, message_id: str) -> None:
        self._partial.pop(message_id, None)
        if len(self._completed) >= self._max_completed:
            del self._completed[next(iter(self._completed))]
        self._completed[message_id] = None


def committable(records: Sequence[Record], finished: Sequence[bool]) -> list[Record]:
    """Per partition, the records before the first unfinished one: committing any later
    offset would also commit that one."""
    blocked: set[tuple[str, int]] = set()
    ready = []
    for record, done in zip(records, finished, strict=True):
        where = (record.topic, record.partition)
        if where in blocked:
            continue
        if done:
            ready.append(record)
        else:
            blocked.add(where)
    return ready


class _Item:
    """One message for the connections of one instance, inside a `push` RPC."""

    __slots__ = ("index", "job", "conns", "size")

    def __init__(self, index: int, job: Job, conns: list[str], size: int) -> None:
        self.index = index
        self.job = job
        self.conns = conns
        self.size = size


def push_calls(items: list[_Item], budget: int = PUSH_CALL_BYTES) -> list[list[_Item]]:
    """Items cut into consecutive calls of about `budget` bytes each, order kept."""
    calls: list[list[_Item]] = [[]]
    size = 0
    for item in items:
        if calls[-1] and size + item.size > budget:
            calls.append([])
            size = 0
        calls[-1].append(item)
        size += item.size
    return calls


class FanoutWorker:
    """Consumes jobs and pushes them to the room instances; see the module docstring.

    `switches_source` returns the switches in force (for virtual sub-rooms), or None.
    close() is graceful: the batch in hand may finish and commit within `grace` seconds;
    `close(grace=0)` drops it uncommitted, as a crash would. A closed worker can be
    started again and still knows the ids it finished.
    """

    def __init__(
        self,
        bus: Bus,
        store: SessionStore,
        *,
        name: str = "w0",
        group: str = "im-fanout",
        switches_source: SwitchesSource | None = None,
        rpc_timeout: float = 2.0,
        batch: int = BATCH,
        retries: int = RPC_RETRIES,
        backoff: float = RPC_BACKOFF_S,
        restart_pause: float = RESTART_PAUSE_S,
        retry_in_place: float = RETRY_IN_PLACE_S,
    ) -> None:
        self.pin_topic = pin_topic(name)  # refuses a name that cannot be a topic
        self.name = name
        self._bus = bus
        self._group = group
        self._switches = switches_source or _no_switches
        self._directory = Directory(store)
        self._caller = RoomCaller(
            self._directory, rpc_timeout=rpc_timeout, retries=retries, backoff=backoff
        )
        self._batch = batch
        self._restart_pause = restart_pause
        self._retry_in_place = retry_in_place
        self.ledger = Ledger()
        self._tasks: list[asyncio.Task[None]] = []
        self._handling: set[asyncio.Task[Any] | None] = set()
        self._stopping = False
        self._in_hand: dict[str, int] = {}
        self._lag = LAG.labels(name)
        self._warnings = WarnThrottle()

    async def start(self) -> None:
        if self._tasks:
            raise RuntimeError(f"worker {self.name} is already started")
        await self._bus.ensure_topic(PUSH_TOPIC, PUSH_PARTITIONS)
        await self._bus.ensure_topic(self.pin_topic, PIN_PARTITIONS)
        self._stopping = False
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._consume([PUSH_TOPIC], self._group)),
            loop.create_task(self._consume([self.pin_topic], f"im-pin-{self.name}")),
        ]
        log.info("worker %s consuming %s (group %s) and %s", self.name, PUSH_TOPIC,
                 self._group, self.pin_topic)  # fmt: skip

    async def close(self, grace: float = CLOSE_GRACE_S) -> None:
        self._stopping = True
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            if task not in self._handling:  # waiting for records: nothing to finish
                task.cancel()
        busy = [task for task in tasks if not task.done()]
        if busy:
            _, late = await asyncio.wait(busy, timeout=grace) if grace > 0 else ((), busy)
            for task in late:
                task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._caller.close()

    async def _consume(self, topics: list[str], group: str) -> None:
        """One consumer at a time, opened again after a batch it could not finish."""
        while not self._stopping:
            consumer = self._bus.consumer(topics, group)
            try:
                await consumer.start()
                await self._drain(consumer, topics[0])
            except BusError as exc:
                if self._warnings.ready(topics[0]):
                    log.warning("worker %s: bus failed on %s; reopening: %s", self.name,
                                topics[0], exc)  # fmt: skip
            except Exception:
                log.exception("worker %s: consuming %s failed; reopening", self.name, topics[0])
            finally:
                self._set_in_hand(topics[0], 0)
                await _close_quietly(consumer)
            if not self._stopping:
                await asyncio.sleep(self._restart_pause)

    async def _drain(self, consumer: Consumer, topic: str) -> None:
        """Batches until one cannot be finished (then return) or the worker stops."""
        while not self._stopping:
            records = await consumer.fetch(self._batch, FETCH_TIMEOUT_S)
            if not records:
                continue
            self._set_in_hand(topic, len(records))
            task = asyncio.current_task()
            self._handling.add(task)
            try:
                finished = await self._finish(records)
                ready = committable(records, finished)
                if ready:
                    await consumer.commit(ready)
            finally:
                self._handling.discard(task)
            self._set_in_hand(topic, 0)
            if len(ready) < len(records):
                log.warning(
                    "worker %s: %d of %d records of %s unfinished; reopening the consumer so "
                    "they are delivered again",
                    self.name,
                    len(records) - len(ready),
                    len(records),
                    topic,
                )
                return

    async def _finish(self, records: Sequence[Record]) -> list[bool]:
        """Handle a batch, then retry what is unfinished in place for a while: a room
        instance restarting or the register's Redis coming back takes seconds, while
        reopening the consumer costs a group rejoin (15-20 s on some brokers) during which
        nothing at all is delivered."""
        finished = await self._handle(records)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._retry_in_place
        pause = RETRY_PAUSE_S
        while not all(finished) and not self._stopping and loop.time() + pause < deadline:
            await asyncio.sleep(pause)
            pause = min(pause * 2, MAX_RETRY_PAUSE_S)
            todo = [i for i, done in enumerate(finished) if not done]
            again = await self._handle([records[i] for i in todo])
            for i, done in zip(todo, again, strict=True):
                finished[i] = done
        return finished

    def _set_in_hand(self, topic: str, count: int) -> None:
        self._in_hand[topic] = count
        self._lag.set(sum(self._in_hand.values()))

    async def _handle(self, records: Sequence[Record]) -> list[bool]:
        """Which records are finished: delivered, known duplicates, or not jobs at all."""
        finished = [False] * len(records)
        jobs: list[Job | None] = [None] * len(records)
        first: dict[str, int] = {}
        users: list[tuple[int, Job]] = []
        series: dict[tuple[str, str, str], list[tuple[int, Job]]] = {}
        for i, record in enumerate(records):
            try:
                job = decode_job(record.value)
            except JobError as exc:
                JOBS.labels("invalid", "invalid").inc()
                finished[i] = True
                if self._warnings.ready("invalid"):
                    log.warning("worker %s: skipping %s/%d@%d: %s", self.name, record.topic,
                                record.partition, record.offset, exc)  # fmt: skip
                continue
            jobs[i] = job
            if self.ledger.finished(job.id):
                JOBS.labels(job.kind, "duplicate").inc()
                finished[i] = True
            elif first.setdefault(job.id, i) != i:
                continue  # the same id twice in one batch: it shares the first one's fate
            elif job.kind == USERS:
                users.append((i, job))
            else:
                series.setdefault((job.kind, job.product, job.room), []).append((i, job))
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(self._series(jobs_)) for jobs_ in series.values()]
            if users:
                tasks.append(group.create_task(self._users(users)))
        done = set().union(*(task.result() for task in tasks))
        for i, job in enumerate(jobs):
            if job is None or finished[i]:
                continue
            lead = first[job.id]
            if lead not in done:
                if lead == i:
                    JOBS.labels(job.kind, "unfinished").inc()
                continue
            finished[i] = True
            if lead == i:
                self.ledger.finish(job.id)
                JOBS.labels(job.kind, "done").inc()
            else:
                JOBS.labels(job.kind, "duplicate").inc()
        return finished

    async def _series(self, jobs: list[tuple[int, Job]]) -> set[int]:
        """One room's (or one product's broadcast) jobs in order, up to the first unfinished."""
        if jobs[0][1].kind == ROOM:
            return await self._room(jobs)
        done = set()
        for i, job in jobs:
            if not await self._broadcast(job):
                break
            done.add(i)
        return done

    async def _room(self, jobs: list[tuple[int, Job]]) -> set[int]:
        """A room's jobs of one fetch: one lookup, and to each instance the messages in order
        in as few `room_push` calls as fit, so a hot room is not one round trip per message."""
        product, room = jobs[0][1].product, jobs[0][1].room
        try:
            counts = await self._directory.room_instances(product, room)
        except RegisterUnavailable:
            return set()
        total = sum(counts.values())
        switches = self._switches()
        shard_size = switches.shard_size if switches else 0
        entries = [
            _Item(i, job, [], len(msgpack.packb(job.msg))) for i, job in jobs
        ]  # conns unused: the room knows its members

        async def serve(instance: str) -> bool:
            todo = [e for e in entries if instance not in self.ledger.served(e.job.id)]
            for call in push_calls(todo):
                params = {
                    "product": product,
                    "room": room,
                    "members_total": total,
                    "items": [
                        {"msg": e.job.msg, "shard": _shard(e.job, total, shard_size)} for e in call
                    ],
                }
                if not await self._call(instance, "room_push", params, ROOM, [e.job for e in call]):
                    return False
            return True

        results = await asyncio.gather(*(serve(x) for x, n in counts.items() if n > 0))
        return {i for i, _ in jobs} if all(results) else set()

    async def _broadcast(self, job: Job) -> bool:
        try:
            table = await self._directory.addresses(NODE_MISS_REFRESH_S)
        except RegisterUnavailable:
            return False
        params = {"product": job.product, "msg": job.msg, "spread_s": job.spread_s}
        return await self._each(job, list(table), "broadcast", params, extra_timeout=job.spread_s)

    async def _each(
        self,
        job: Job,
        instances: list[str],
        method: str,
        params: dict[str, Any],
        extra_timeout: float = 0.0,
    ) -> bool:
        served = self.ledger.served(job.id)
        results = await asyncio.gather(
            *(
                self._call(instance, method, params, job.kind, [job], extra_timeout)
                for instance in instances
                if instance not in served
            )
        )
        return all(results)

    async def _users(self, items: list[tuple[int, Job]]) -> set[int]:
        by_product: dict[str, list[tuple[int, Job]]] = {}
        for i, job in items:
            by_product.setdefault(job.product, []).append((i, job))
        found = await asyncio.gather(
            *(self._users_of(product, jobs) for product, jobs in by_product.items())
        )
        return set().union(*found)

    async def _users_of(self, product: str, items: list[tuple[int, Job]]) -> set[int]:
        uids = list(dict.fromkeys(uid for _, job in items for uid in job.uids))
        try:
            sessions = await self._directory.lookup(product, uids)
        except RegisterUnavailable:
            return set()
        plan: dict[str, list[_Item]] = {}
        left: dict[int, int] = {}
        for i, job in items:
            served = self.ledger.served(job.id)
            found = (sessions[uid] for uid in dict.fromkeys(job.uids) if uid in sessions)
            size = len(msgpack.packb(job.msg))
            for instance, conns in group_by_instance(found).items():
                if instance in served:
                    continue
                item = _Item(i, job, conns, size + sum(len(conn) + 2 for conn in conns))
                plan.setdefault(instance, []).append(item)
                left[i] = left.get(i, 0) + 1
        results = await asyncio.gather(
            *(self._push_instance(instance, its) for instance, its in plan.items())
        )
        for served_items in results:
            for item in served_items:
                left[item.index] -= 1
        return {i for i, _ in items if not left.get(i)}

    async def _push_instance(self, instance: str, items: list[_Item]) -> list[_Item]:
        """The items served; calls go one after the other so their order holds."""
        served: list[_Item] = []
        for call in push_calls(items):
            params = {
                "items": [
                    {"conns": item.conns, "msg": item.job.msg, "product": item.job.product}
                    for item in call
                ]
            }
            if not await self._call(instance, "push", params, USERS, [item.job for item in call]):
                break
            served.extend(call)
        return served

    async def _call(
        self,
        instance: str,
        method: str,
        params: dict[str, Any],
        kind: str,
        jobs: list[Job],
        extra_timeout: float = 0.0,
    ) -> bool:
        """True once the instance answered (or is gone); its jobs are then served there."""
        try:
            reply = await self._caller.call(instance, method, params, extra_timeout=extra_timeout)
        except (Unreachable, RegisterUnavailable):
            return False
        for job in jobs:
            self.ledger.serve(job.id, instance)
        written = reply.get("written") if isinstance(reply, dict) else None
        if type(written) is int and written > 0:
            WRITTEN.labels(kind).inc(written)
        return True


def _shard(job: Job, members_total: int, shard_size: int) -> list[int] | None:
    """Audience chat stays in its sender's sub-room; high priority reaches every one."""
    if job.msg.get("pri") == "high":
        return None
    return shard_of(job.sender, members_total, shard_size)


def _no_switches() -> Switches | None:
    return None


async def _close_quietly(consumer: Consumer) -> None:
    try:
        await consumer.close()
    except Exception as exc:
        log.warning("closing a consumer failed: %s: %s", type(exc).__name__, exc)

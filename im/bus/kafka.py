"""The Kafka engine, over aiokafka: any broker that speaks the Kafka protocol.

Publishes wait for acks from all in-sync replicas. Consumers never auto-commit: a worker
commits explicit offsets after its work is done, and a rebalance hands uncommitted records
to the partition's next owner. Broker trouble surfaces as BusUnavailable within about
`request_timeout` seconds; aiokafka reconnects by itself once the broker is back.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import (
    CommitFailedError,
    ConsumerStoppedError,
    IllegalStateError,
    KafkaConnectionError,
    KafkaError,
    KafkaTimeoutError,
    TopicAlreadyExistsError,
    for_code,
)
from aiokafka.structs import OffsetAndMetadata

from im.bus import (
    BusError,
    BusUnavailable,
    Record,
    check_consumer,
    check_fetch,
    check_publish,
    check_topic,
)

__all__ = ["KafkaBus", "KafkaBusConsumer"]

FETCH_MAX_WAIT_MS = 10

log = logging.getLogger("im.bus")


def _bus_error(exc: KafkaError, doing: str, brokers: str) -> BusError:
    """BusUnavailable for what a retry may cure (broker down, timeouts), BusError else."""
    if exc.retriable or isinstance(exc, KafkaTimeoutError | KafkaConnectionError):
        return BusUnavailable(f"{doing}: Kafka at {brokers} unavailable: {exc!r}")
    return BusError(f"{doing}: Kafka at {brokers} refused: {exc!r}")


async def _stop_quietly(stopping: Coroutine[Any, Any, None], timeout: float) -> None:
    """Run an aiokafka stop without letting a dead broker hang or fail a shutdown."""
    try:
        async with asyncio.timeout(timeout):
            await stopping
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
        # aiokafka re-raises the cancellation of its own fetch task when the broker is gone
        log.info("Kafka client stopped while the broker was unreachable")
    except (KafkaError, TimeoutError) as exc:
        log.info("Kafka client stopped without a clean goodbye: %r", exc)


class KafkaBus:
    """A producer and an admin client on `brokers` ("host:port[,host:port...]"); each
    consumer has its own connection and group membership.

    `idempotence` asks the broker for a producer id, so a retried send is not stored twice;
    brokers without that support (Tansu 0.6) make `start` fail with BusError.
    The timeouts are in seconds; Kafka's group timing applies to every consumer made here.
    """

    def __init__(
        self,
        brokers: str,
        *,
        client_id: str = "im",
        idempotence: bool = False,
        request_timeout: float = 10.0,
        session_timeout: float = 10.0,
        heartbeat_interval: float = 1.0,
        rebalance_timeout: float | None = None,
    ) -> None:
        if not brokers:
            raise ValueError("brokers must name at least one host:port")
        if not 0 < heartbeat_interval < session_timeout:
            raise ValueError("heartbeat_interval must be positive and below session_timeout")
        self.brokers = brokers
        self._client_id = client_id
        self._idempotence = idempotence
        self._request_timeout = request_timeout
        self._group_timing = (
            session_timeout,
            heartbeat_interval,
            session_timeout if rebalance_timeout is None else rebalance_timeout,
        )
        self._producer: AIOKafkaProducer | None = None
        self._admin: AIOKafkaAdminClient | None = None
        self._closed = False

    async def start(self) -> None:
        if self._closed or self._producer is not None:
            raise BusError("KafkaBus.start called twice or after close")
        timeout_ms = int(self._request_timeout * 1000)
        producer = AIOKafkaProducer(
            bootstrap_servers=self.brokers,
            client_id=self._client_id,
            acks="all",
            enable_idempotence=self._idempotence,
            request_timeout_ms=timeout_ms,
        )
        admin = AIOKafkaAdminClient(
            bootstrap_servers=self.brokers,
            client_id=self._client_id,
            request_timeout_ms=timeout_ms,
        )
        try:
            async with asyncio.timeout(self._request_timeout):
                await producer.start()
                await admin.start()
        except (KafkaError, TimeoutError) as exc:
            await _stop_quietly(producer.stop(), self._request_timeout)
            await _stop_quietly(admin.close(), self._request_timeout)
            if isinstance(exc, TimeoutError):
                raise BusUnavailable(f"connecting: Kafka at {self.brokers} timed out") from exc
            error = _bus_error(exc, "connecting", self.brokers)
            if self._idempotence and not isinstance(error, BusUnavailable):
                error = BusError(
                    f"Kafka at {self.brokers} refused an idempotent producer ({exc!r}); "
                    "turn idempotence off for this broker"
                )
            raise error from exc
        self._producer, self._admin = producer, admin

    async def publish(self, topic: str, key: str, value: bytes) -> None:
        check_publish(topic, key, value)
        producer = self._started()[0]
        try:
            await producer.send_and_wait(topic, value, key=key.encode())
        except KafkaError as exc:
            raise _bus_error(exc, f"publishing to {topic!r}", self.brokers) from exc

    async def ensure_topic(self, topic: str, partitions: int) -> None:
        check_topic(topic, partitions)
        admin = self._started()[1]
        try:
            async with asyncio.timeout(self._request_timeout * 2):
                response = await admin.create_topics([NewTopic(topic, partitions, 1)])
        except TopicAlreadyExistsError:
            return
        except TimeoutError as exc:
            raise BusUnavailable(
                f"creating topic {topic!r}: Kafka at {self.brokers} did not answer in time"
            ) from exc
        except KafkaError as exc:
            raise _bus_error(exc, f"creating topic {topic!r}", self.brokers) from exc
        for _name, code, message in response.topic_errors:
            error = for_code(code)
            if code and error is not TopicAlreadyExistsError:
                raise _bus_error(error(message), f"creating topic {topic!r}", self.brokers)

    def consumer(self, topics: Sequence[str], group: str) -> KafkaBusConsumer:
        names = check_consumer(topics, group)
        if self._closed:
            raise BusError("the bus is closed")
        session, heartbeat, rebalance = self._group_timing
        return KafkaBusConsumer(
            AIOKafkaConsumer(
                *names,
                bootstrap_servers=self.brokers,
                client_id=self._client_id,
                group_id=group,
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                request_timeout_ms=int(self._request_timeout * 1000),
                session_timeout_ms=int(session * 1000),
                heartbeat_interval_ms=int(heartbeat * 1000),
                rebalance_timeout_ms=int(rebalance * 1000),
                # An idle fetch waits on the broker at most this long: it is the floor of
                # a message's latency from publish to worker (aiokafka's default is 500 ms).
                fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
            ),
            self.brokers,
            # a member that left without expiring yet can hold a join back for its session
            join_timeout=session + 2 * rebalance + self._request_timeout,
            request_timeout=self._request_timeout,
        )

    async def close(self) -> None:
        self._closed = True
        producer, admin = self._producer, self._admin
        self._producer = self._admin = None
        if producer is not None:
            await _stop_quietly(producer.stop(), self._request_timeout)
        if admin is not None:
            await _stop_quietly(admin.close(), self._request_timeout)

    def _started(self) -> tuple[AIOKafkaProducer, AIOKafkaAdminClient]:
        if self._producer is None or self._admin is None:
            raise BusError("the bus is closed" if self._closed else "the bus is not started")
        return self._producer, self._admin


class KafkaBusConsumer:
    """One group member; see `im.bus.Consumer` for the contract."""

    __slots__ = ("_brokers", "_consumer", "_join_timeout", "_request_timeout", "_state")

    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        brokers: str,
        *,
        join_timeout: float,
        request_timeout: float,
    ) -> None:
        self._consumer = consumer
        self._brokers = brokers
        self._join_timeout = join_timeout
        self._request_timeout = request_timeout
        self._state = "new"

    async def start(self) -> None:
        if self._state != "new":
            raise BusError(f"consumer already {self._state}")
        self._state = "starting"
        try:
            async with asyncio.timeout(self._join_timeout):
                await self._consumer.start()
        except (KafkaError, TimeoutError) as exc:
            await self.close()
            if isinstance(exc, TimeoutError):
                raise BusUnavailable(
                    f"joining the group: Kafka at {self._brokers} gave no partitions "
                    f"within {self._join_timeout:g} s"
                ) from exc
            raise _bus_error(exc, "joining the group", self._brokers) from exc
        self._state = "started"

    async def fetch(self, max_records: int = 500, timeout: float = 0.5) -> list[Record]:
        check_fetch(max_records, timeout)
        self._check_started()
        try:
            batches = await self._consumer.getmany(
                timeout_ms=int(timeout * 1000), max_records=max_records
            )
        except ConsumerStoppedError:
            return []
        except KafkaError as exc:
            raise _bus_error(exc, "fetching", self._brokers) from exc
        return [
            Record(
                item.topic,
                item.partition,
                item.offset,
                "" if item.key is None else item.key.decode(errors="replace"),
                item.value or b"",
            )
            for batch in batches.values()
            for item in batch
        ]

    async def commit(self, records: Sequence[Record]) -> None:
        self._check_started()
        held = self._consumer.assignment()
        offsets: dict[TopicPartition, int] = {}
        for record in records:
            tp = TopicPartition(record.topic, record.partition)
            if tp in held:
                offsets[tp] = max(offsets.get(tp, 0), record.offset + 1)
        if not offsets:
            return
        try:
            async with asyncio.timeout(self._request_timeout):
                await self._consumer.commit(
                    {tp: OffsetAndMetadata(offset, "") for tp, offset in offsets.items()}
                )
        except (CommitFailedError, IllegalStateError) as exc:
            log.info("commit skipped, the group rebalanced; records go to the new owner: %s", exc)
        except TimeoutError as exc:
            raise BusUnavailable(
                f"committing: Kafka at {self._brokers} did not answer within "
                f"{self._request_timeout:g} s"
            ) from exc
        except KafkaError as exc:
            raise _bus_error(exc, "committing", self._brokers) from exc

    async def close(self) -> None:
        """Leave the group; with the broker down, give up after `request_timeout` (the
        group then drops this member when its session expires)."""
        running = self._state in ("starting", "started")
        self._state = "closed"
        if running:
            await _stop_quietly(self._consumer.stop(), self._request_timeout)

    def _check_started(self) -> None:
        if self._state != "started":
            raise BusError(f"consumer is {self._state}, not started")

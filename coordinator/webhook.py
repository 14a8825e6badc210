"""The poster: one lane per product with a webhook, each posting one batch at a time.

A lane waits until its oldest item has waited `batch_ms` or a full batch is queued, POSTs
the batch, and retries it on 5xx, 408, 429, timeouts and connection errors with growing,
jittered pauses. A batch that exhausts its attempts, or that the business refuses with
another 4xx, is dead-lettered (counted and logged) and the lane moves on: a dead webhook
costs its own product's backlog, never another product's and never an endless loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import time
from collections.abc import Mapping

import aiohttp

from coordinator import metrics
from coordinator.batching import Batch, ProductQueue
from coordinator.config import CoordinatorConfig
from coordinator.retry import Verdict, backoff_s, retry_after_s, verdict
from im.config import Product
from im.ids import new_id
from im.lograte import Throttled

log = logging.getLogger("im.coordinator")

SIGNATURE_HEADER = "X-IM-Signature"
BATCH_HEADER = "X-IM-Batch"  # the same on every attempt of a batch: lets the business dedupe
USER_AGENT = "im-coordinator/1"


def signature(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class Lane:
    """One product's queue, its wake-up signal and the task that drains it."""

    __slots__ = ("product", "url", "queue", "wake", "task", "depth", "inflight")

    def __init__(self, product: Product, url: str, config: CoordinatorConfig) -> None:
        self.product = product
        self.url = url
        self.queue = ProductQueue(
            config.queue_cap, config.queue_bytes, config.batch_max, config.batch_bytes
        )
        self.wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.depth = metrics.QUEUE_DEPTH.labels(product.name)
        self.inflight = 0  # items of the batch being posted


class Poster:
    def __init__(self, config: CoordinatorConfig, products: Mapping[str, Product]) -> None:
        self.config = config
        self.lanes = {
            name: Lane(product, product.webhook, config)
            for name, product in products.items()
            if product.webhook
        }
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=config.timeout_s),
            headers={"User-Agent": USER_AGENT},
        )
        self._closing = False
        self._warn = Throttled(log)
        self._loop = asyncio.get_running_loop()

    def offer(self, product: str, kind: int, item: bytes) -> bool:
        """Queue one encoded item; False when the product's backlog is full."""
        lane = self.lanes[product]
        queue = lane.queue
        if not queue.offer(kind, item, self._loop.time()):
            self._warn.warning(
                f"full:{product}",
                "product %s: webhook backlog full (%d items, %d bytes), refusing",
                product,
                len(queue),
                queue.size,
            )
            return False
        lane.depth.set(len(queue))
        if len(queue) == 1 or queue.batch_ready:
            lane.wake.set()
        return True

    def start(self) -> None:
        for lane in self.lanes.values():
            lane.task = self._loop.create_task(self._drain(lane), name=f"webhook {lane.url}")

    def check(self) -> None:
        """RuntimeError if a lane's task died: its product's backlog would only grow."""
        for name, lane in self.lanes.items():
            if lane.task is None or lane.task.done():
                raise RuntimeError(f"the webhook lane of product {name} is not running")

    async def close(self) -> None:
        """Post what is queued for up to close_grace_s, then drop the rest and stop.

        The RPC server is closed first, so nothing is offered from here on."""
        self._closing = True
        tasks = [lane.task for lane in self.lanes.values() if lane.task is not None]
        for lane in self.lanes.values():
            lane.wake.set()
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=self.config.close_grace_s)
            for task in late:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for name, lane in self.lanes.items():
            dropped = lane.queue.clear() + lane.inflight
            lane.depth.set(0)
            if dropped:
                metrics.DROPPED_ON_STOP.labels(name).inc(dropped)
                log.warning("product %s: %d queued items dropped at stop", name, dropped)
        await self._session.close()

    async def _drain(self, lane: Lane) -> None:
        queue = lane.queue
        window = self.config.batch_ms / 1000
        while True:
            due = queue.due(window)
            if due is None:
                if self._closing:
                    return
                lane.wake.clear()
                await lane.wake.wait()
                continue
            wait = due - self._loop.time()
            if wait > 0 and not queue.batch_ready and not self._closing:
                lane.wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await lane.wake.wait()
                continue
            batch = queue.take()
            lane.depth.set(len(queue))
            lane.inflight = len(batch)
            await self._deliver(lane, batch)
            lane.inflight = 0

    async def _deliver(self, lane: Lane, batch: Batch) -> None:
        """POST one batch until it is taken, refused for good, or out of attempts."""
        config = self.config
        product = lane.product
        name = product.name
        body = batch.body(name)
        headers = {"Content-Type": "application/json", BATCH_HEADER: new_id()}
        if product.webhook_secret:
            headers[SIGNATURE_HEADER] = signature(product.webhook_secret, body)
        latency = metrics.LATENCY.labels(name)
        for attempt in range(1, config.attempts + 1):
            started = time.perf_counter()
            status, reason, retry_after = await self._post(lane, body, headers)
            latency.observe(time.perf_counter() - started)
            outcome = Verdict.RETRY if status is None else verdict(status)
            if outcome is Verdict.DONE:
                metrics.POSTED.labels(name).inc()
                metrics.POSTED_ITEMS.labels(name).inc(len(batch))
                return
            metrics.FAILED.labels(name, reason).inc()
            if outcome is Verdict.GIVE_UP or attempt == config.attempts:
                self._dead_letter(name, batch, attempt, reason)
                return
            metrics.RETRIED.labels(name).inc()
            pause = backoff_s(attempt, config.backoff_s, config.backoff_max_s)
            if retry_after is not None:
                pause = max(pause, retry_after)
            await asyncio.sleep(pause)

    async def _post(
        self, lane: Lane, body: bytes, headers: dict[str, str]
    ) -> tuple[int | None, str, float | None]:
        """One attempt: (status or None, failure reason for the metric, Retry-After)."""
        try:
            async with self._session.post(
                lane.url, data=body, headers=headers, allow_redirects=False
            ) as response:
                cap = self.config.backoff_max_s
                return (
                    response.status,
                    str(response.status),
                    retry_after_s(response.headers.get("Retry-After"), cap),
                )
        except TimeoutError:
            return None, "timeout", None
        except aiohttp.ClientError as exc:
            log.debug("product %s: webhook POST failed: %s", lane.product.name, exc)
            return None, "connection", None

    def _dead_letter(self, name: str, batch: Batch, attempts: int, reason: str) -> None:
        metrics.DEAD_LETTERS.labels(name).inc()
        metrics.DEAD_LETTER_ITEMS.labels(name).inc(len(batch))
        self._warn.warning(
            f"dead:{name}",
            "product %s: batch of %d messages and %d events dead-lettered after %d attempt(s), "
            "last failure %s",
            name,
            len(batch.messages),
            len(batch.events),
            attempts,
            reason,
        )

"""What the operations console shows live: the node table, each room instance's numbers
scraped from its /metrics, and the biggest rooms from the register's index.

One snapshot serves every console open at once: it is rebuilt at most once per `max_age`,
by one task at a time, so ten operators watching cost the rooms no more than one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from prometheus_client import Counter

from center.console.samples import MAX_EXPOSITION, Sample, parse_sample, rates
from center.errors import UNAVAILABLE, ApiError
from center.push import WarnThrottle
from im.sessions import Node, SessionStore

log = logging.getLogger("center.console")

#: Instances scraped per snapshot, at most; the rest are listed from the node table alone.
MAX_SCRAPED = 200
#: Scrapes in flight at once.
SCRAPE_CONCURRENCY = 16
SCRAPE_TIMEOUT_S = 1.0
MAX_AGE_S = 0.5
TOP_ROOMS = 10

SCRAPES = Counter(
    "im_center_console_scrapes_total",
    "Room instance /metrics scrapes made for the console, by result: ok, failed",
    ["result"],
)


def metrics_url(node: Node) -> str | None:
    """The /metrics URL on an instance's WebSocket port, which serves it over plain HTTP(S)."""
    if not node.ws:
        return None
    parts = urlsplit(node.ws)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme)
    if scheme is None or not parts.netloc:
        return None
    return f"{scheme}://{parts.netloc}/metrics"


class Overview:
    """Builds and caches the console's snapshot; close() releases the HTTP client."""

    def __init__(
        self,
        store: SessionStore,
        *,
        top: int = TOP_ROOMS,
        max_age: float = MAX_AGE_S,
        scrape_timeout: float = SCRAPE_TIMEOUT_S,
    ) -> None:
        self._store = store
        self._top = top
        self._max_age = max_age
        self._timeout = aiohttp.ClientTimeout(total=scrape_timeout)
        self._http: aiohttp.ClientSession | None = None
        self._lock = asyncio.Lock()
        self._snapshot: dict[str, Any] | None = None
        self._built = -float("inf")
        self._samples: dict[str, tuple[float, Sample]] = {}  # instance -> last scrape
        self._warnings = WarnThrottle()

    async def snapshot(self) -> dict[str, Any]:
        async with self._lock:
            if self._snapshot is None or time.monotonic() - self._built >= self._max_age:
                self._snapshot = await self._build()
                self._built = time.monotonic()
            return self._snapshot

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def _build(self) -> dict[str, Any]:
        try:
            nodes = sorted(await self._store.nodes(), key=lambda n: n.instance)
        except Exception as exc:  # RPC or Redis errors: the register is what is missing
            raise ApiError(
                503,
                UNAVAILABLE,
                f"the session register is unavailable: {exc}",
                {"Retry-After": "1"},
            ) from None
        errors: list[str] = []
        self._warnings.forget_old()
        scraped = nodes[:MAX_SCRAPED]
        slots = asyncio.Semaphore(SCRAPE_CONCURRENCY)
        found = list(await asyncio.gather(*(self._scrape(node, slots) for node in scraped)))
        if len(nodes) > MAX_SCRAPED:
            errors.append(f"{len(nodes)} instances: only the first {MAX_SCRAPED} are scraped")
            found += [(None, "not scraped")] * (len(nodes) - MAX_SCRAPED)
        now = time.monotonic()
        samples: dict[str, tuple[float, Sample]] = {}
        instances = []
        for node, (sample, error) in zip(nodes, found, strict=True):
            row = _node_row(node)
            if sample is not None:
                previous = self._samples.get(node.instance)
                samples[node.instance] = (now, sample)
                row.update(_sample_row(sample))
                if previous is not None:
                    row.update(rates(now, sample, *previous))
            row["error"] = error
            instances.append(row)
        self._samples = samples  # instances gone from the table are forgotten
        rooms = await self._rooms(errors)
        return {
            "at": int(time.time() * 1000),
            "instances": instances,
            "rooms": rooms,
            "errors": errors,
        }

    async def _scrape(self, node: Node, slots: asyncio.Semaphore) -> tuple[Sample | None, str]:
        url = metrics_url(node)
        if url is None:
            return None, "no WebSocket address to scrape"
        if self._http is None:
            self._http = aiohttp.ClientSession(timeout=self._timeout)
        try:
            async with slots, self._http.get(url) as response:
                if response.status != 200:
                    raise ValueError(f"HTTP {response.status}")
                body = await _read_bounded(response)
            sample = parse_sample(body.decode("utf-8", "replace"), node.instance)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            SCRAPES.labels("failed").inc()
            problem = f"scraping {url} failed: {type(exc).__name__}: {exc}"
            if self._warnings.ready(node.instance):
                log.warning("%s", problem)
            return None, problem
        SCRAPES.labels("ok").inc()
        return sample, ""

    async def _rooms(self, errors: list[str]) -> list[dict[str, Any]]:
        try:
            loads = await self._store.top_rooms(self._top)
        except Exception as exc:  # an older register without the call, or one that is down
            errors.append(f"biggest rooms: {type(exc).__name__}: {exc}")
            return []
        return [
            {
                "product": load.product,
                "room": load.room,
                "members": load.members,
                "instances": dict(load.instances),
            }
            for load in loads
        ]


async def _read_bounded(response: aiohttp.ClientResponse) -> bytes:
    body = bytearray()
    async for chunk in response.content.iter_any():
        body += chunk
        if len(body) > MAX_EXPOSITION:
            raise ValueError(f"exposition is larger than {MAX_EXPOSITION} bytes")
    return bytes(body)


def _node_row(node: Node) -> dict[str, Any]:
    return {
        "instance": node.instance,
        "idc": node.idc,
        "isp": node.isp,
        "ws": node.ws,
        "tcp": node.tcp,
        "conns": node.conns,
        "max_conns": node.max_conns,
        "conn_rate": node.conn_rate,
        "draining": node.draining,
        "msgs_per_s": None,  # known from the second scrape on
        "drops_per_s": {},
    }


def _sample_row(sample: Sample) -> dict[str, Any]:
    return {
        "connections": sample.connections.get("online", 0),  # authenticated ones
        "by_state": sample.connections,
        "delivered": sample.delivered,
        "drops": sample.drops,
        "rooms": sample.rooms,
        "queued": sample.queued,
    }

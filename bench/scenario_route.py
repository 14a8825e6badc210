"""Gateway addresses from the dispatcher (GET /v1/route), for the load tester.

`parse_route` is pure. `Router` serves one worker process over one keep-alive pool; on the
first connect, the clients of one batch share an answer, so that a storm of logins need not
also be a storm of route requests. `discover` is the parent's one synchronous look, which
tells it the instances to measure.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from urllib.parse import urlencode

import aiohttp

from bench.clients import Target

ROUTE_TIMEOUT_S = 5.0
ROUTE_CONNECTIONS = 64  # keep-alive connections to the dispatcher per worker
MAX_ANSWER = 64 * 1024
PROBE_UID = "flood-probe"


class RouteError(Exception):
    """No usable answer; `retry_after_ms` is set when the dispatcher said to wait."""

    def __init__(self, reason: str, retry_after_ms: int | None = None) -> None:
        super().__init__(reason)
        self.retry_after_ms = retry_after_ms


def route_url(base: str, product: str, uid: str, transport: str, retry: Sequence[str] = ()) -> str:
    query = [("product", product), ("uid", uid), ("transport", transport)]
    query += [("retry", address) for address in retry]
    return f"{base.rstrip('/')}/v1/route?{urlencode(query)}"


def parse_route(status: int, body: bytes, transport: str) -> list[Target]:
    """The addresses of a route answer, in order; RouteError for anything else."""
    try:
        document = json.loads(body)
    except ValueError:
        raise RouteError(f"dispatcher answered HTTP {status} without JSON") from None
    if status != 200 or not isinstance(document, dict):
        error = document.get("error") if isinstance(document, dict) else None
        code = error.get("code") if isinstance(error, dict) else None
        raise RouteError(f"dispatcher answered HTTP {status} {code or ''}".rstrip())
    addresses = document.get("addresses")
    if not isinstance(addresses, list) or not all(isinstance(a, str) for a in addresses):
        raise RouteError("dispatcher answer without an address list")
    if not addresses:
        wait = document.get("retry_after_ms")
        raise RouteError("dispatcher has no instance free", wait if isinstance(wait, int) else 0)
    try:
        return [Target.parse(address, transport) for address in addresses]
    except ValueError as exc:
        raise RouteError(str(exc)) from None


class Router:
    """Route requests of one worker's clients."""

    __slots__ = ("url", "product", "transport", "batch", "requests", "_session", "_key", "_first")

    def __init__(self, url: str, product: str, transport: str, batch: int) -> None:
        self.url = url
        self.product = product
        self.transport = transport
        self.batch = batch
        self.requests = 0
        self._session: aiohttp.ClientSession | None = None
        self._key = -1
        self._first: asyncio.Task[list[Target]] | None = None

    async def route(self, uid: str, retry: Sequence[Target] = ()) -> list[Target]:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=ROUTE_CONNECTIONS),
                timeout=aiohttp.ClientTimeout(total=ROUTE_TIMEOUT_S),
            )
        url = route_url(self.url, self.product, uid, self.transport, [str(t) for t in retry])
        self.requests += 1
        try:
            async with self._session.get(url) as response:
                body = await response.content.read(MAX_ANSWER)
                return parse_route(response.status, body, self.transport)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise RouteError(f"dispatcher unreachable: {type(exc).__name__}") from None

    async def first(self, index: int, uid_of: Callable[[int], str]) -> Target:
        """Where client `index` connects first: one answer per batch of consecutive
        clients (clients are launched in index order), asked for the batch's first uid."""
        key = index // self.batch
        if key != self._key or self._first is None:
            self._key = key
            self._first = asyncio.get_running_loop().create_task(self.route(uid_of(index)))
        # Shielded: a client given up on must not cancel its batch-mates' answer.
        return (await asyncio.shield(self._first))[0]

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


def discover(url: str, product: str, transport: str) -> tuple[Target, ...]:
    """The instances the dispatcher lists now (for a probe uid), before any client starts."""
    request = urllib.request.Request(route_url(url, product, PROBE_UID, transport))
    try:
        with urllib.request.urlopen(request, timeout=ROUTE_TIMEOUT_S) as response:
            status, body = response.status, response.read(MAX_ANSWER)
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read(MAX_ANSWER)
    except OSError as exc:
        raise RouteError(f"dispatcher {url} unreachable: {exc}") from None
    return tuple(parse_route(status, body, transport))

"""RPC client: one lazily opened, pipelined TCP connection per client."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, cast

from prometheus_client import Counter, Histogram

from im.protocol.errors import ProtocolError
from im.rpc import wire
from im.rpc.wire import Outbox, ResponseDecoder, RpcError, RpcTimeout, RpcUnavailable

log = logging.getLogger("im.rpc")

MIN_BACKOFF = 0.05
MAX_BACKOFF = 2.0

LATENCY = Histogram(
    "im_rpc_client_latency_seconds",
    "RPC call latency as the caller sees it, failures included",
    ["name", "method"],
    buckets=(
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
        0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ),
)  # fmt: skip
ERRORS = Counter(
    "im_rpc_client_errors_total", "RPC calls that failed, by error code", ["name", "method", "code"]
)


def parse_address(address: str) -> tuple[str, int]:
    """'host:port' or '[v6]:port' -> (host, port); ValueError on anything else."""
    host, sep, port = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"rpc address must be host:port, got {address!r}")
    return host, int(port)


class RpcClient:
    """Calls one server. Requests are pipelined on a single connection and matched by id.

    At most `max_inflight` calls wait at once; one more fails `overloaded` at once instead
    of queueing. A lost connection fails its pending calls with RpcUnavailable; the next call
    reconnects. After a failed connect, calls fail fast until a backoff (50 ms doubling to
    2 s) has passed. `connect_timeout` bounds the connect, `timeout` the wait for the answer.
    """

    def __init__(
        self,
        address: str,
        *,
        timeout: float = 2.0,
        max_inflight: int = 10000,
        connect_timeout: float = 1.0,
        name: str = "rpc",
    ) -> None:
        self.address = address
        self._host, self._port = parse_address(address)
        self.timeout = timeout
        self.max_inflight = max_inflight
        self.connect_timeout = connect_timeout
        self.name = name
        self._conn: _ClientConnection | None = None
        self._connecting: asyncio.Task[_ClientConnection] | None = None
        self._inflight = 0
        self._next_id = 0
        self._backoff = MIN_BACKOFF
        self._retry_at = 0.0
        self._closed = False
        self._latency: dict[str, Histogram] = {}

    async def call(self, method: str, params: Any = None, *, timeout: float | None = None) -> Any:
        """Send one request and wait for its answer; every failure is an RpcError."""
        start = time.perf_counter()
        try:
            return await self._call(method, params, self.timeout if timeout is None else timeout)
        except RpcError as exc:
            ERRORS.labels(self.name, method, exc.code).inc()
            raise
        finally:
            latency = self._latency.get(method)
            if latency is None:
                latency = self._latency[method] = LATENCY.labels(self.name, method)
            latency.observe(time.perf_counter() - start)

    async def close(self) -> None:
        """Fail pending calls with RpcUnavailable and drop the connection.

        A connect already under way finishes on its own and is dropped at once.
        """
        self._closed = True
        if self._conn is not None:
            self._conn.fail_pending("client closed")
            self._conn.abort()
            self._conn = None

    async def _call(self, method: str, params: Any, timeout: float) -> Any:
        if self._closed:
            raise RpcUnavailable(f"client for {self.address} is closed")
        if self._inflight >= self.max_inflight:
            raise RpcError(wire.OVERLOADED, f"{self.max_inflight} calls in flight")
        self._next_id = req_id = (self._next_id + 1) & wire.MAX_ID
        data = wire.encode_request(req_id, method, params)
        self._inflight += 1
        try:
            conn = self._conn or await self._connect()
            if conn.lost:
                raise RpcUnavailable(f"connection to {self.address} lost")
            answer = asyncio.get_running_loop().create_future()
            conn.pending[req_id] = answer
            try:
                conn.send(data)
                async with asyncio.timeout(timeout):
                    return await answer
            except TimeoutError:
                raise RpcTimeout(f"{method} on {self.address}: no answer in {timeout}s") from None
            finally:
                conn.pending.pop(req_id, None)
        finally:
            self._inflight -= 1

    async def _connect(self) -> _ClientConnection:
        if self._connecting is None:
            loop = asyncio.get_running_loop()
            wait = self._retry_at - loop.time()
            if wait > 0:
                raise RpcUnavailable(f"{self.address} unreachable, next attempt in {wait:.3f}s")
            self._connecting = loop.create_task(self._open())
        return await asyncio.shield(self._connecting)

    async def _open(self) -> _ClientConnection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: _ClientConnection(self), self._host, self._port
                )
        except (OSError, TimeoutError) as exc:
            reason = str(exc) or type(exc).__name__
            self._retry_at = loop.time() + self._backoff
            log.warning(
                "%s: cannot connect to %s (%s), retrying in %.2fs",
                self.name,
                self.address,
                reason,
                self._backoff,
            )
            self._backoff = min(self._backoff * 2, MAX_BACKOFF)
            raise RpcUnavailable(f"cannot connect to {self.address}: {reason}") from None
        finally:
            self._connecting = None
        if self._closed:
            conn.abort()
            raise RpcUnavailable(f"client for {self.address} is closed")
        self._backoff = MIN_BACKOFF
        self._conn = conn
        log.debug("%s: connected to %s", self.name, self.address)
        return conn

    def _lost(self, conn: _ClientConnection, exc: Exception | None) -> None:
        if self._conn is conn:
            self._conn = None
        if not self._closed:
            log.warning("%s: connection to %s lost: %s", self.name, self.address, exc)


class _ClientConnection(asyncio.Protocol):
    """The socket side of RpcClient: resolves pending futures as answers arrive."""

    __slots__ = ("_client", "_transport", "_decoder", "_outbox", "pending", "lost")

    def __init__(self, client: RpcClient) -> None:
        self._client = client
        self._transport: asyncio.Transport | None = None
        self._decoder = ResponseDecoder()
        self._outbox = Outbox()
        self.pending: dict[int, asyncio.Future[Any]] = {}
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            responses = self._decoder.feed(data)
        except ProtocolError as exc:
            log.warning(
                "%s: closing connection to %s: %s",
                self._client.name,
                self._client.address,
                exc.reason,
            )
            self.abort()
            return
        pending = self.pending
        for response in responses:
            answer = pending.pop(response.id, None)
            if answer is None or answer.done():
                continue  # its caller timed out or went away
            if response.error is None:
                answer.set_result(response.result)
            else:
                answer.set_exception(wire.error_from_wire(*response.error))

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._transport = None
        self._client._lost(self, exc)
        self.fail_pending("connection lost before the answer")

    def send(self, data: bytes) -> None:
        if self._outbox.push(data):
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        data = self._outbox.take()
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    def fail_pending(self, reason: str) -> None:
        pending = self.pending
        self.pending = {}
        message = f"{self._client.address}: {reason}"
        for answer in pending.values():
            if not answer.done():
                answer.set_exception(RpcUnavailable(message))

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

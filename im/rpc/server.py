"""RPC server: one asyncio.Protocol per connection, one task per request."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, cast

from prometheus_client import Counter, Gauge

from im.protocol.errors import ProtocolError
from im.rpc import wire
from im.rpc.wire import Outbox, Request, RequestDecoder, RpcError

log = logging.getLogger("im.rpc")

Handler = Callable[[Any], Awaitable[Any]]

#: How long close() lets running handlers finish before cancelling them.
CLOSE_GRACE = 1.0
#: Requests for methods the server does not have share one label, so a peer sending random
#: names cannot grow the metric without bound.
UNKNOWN_METHOD_LABEL = "_unknown"

REQUESTS = Counter("im_rpc_server_requests_total", "RPC requests received", ["name", "method"])
INFLIGHT = Gauge("im_rpc_server_inflight", "RPC handlers running", ["name"])


class RpcServer:
    """Serves `handlers` by method name; each handler takes the params and returns the result.

    A handler raising RpcError answers with its code; any other exception answers `internal`
    and is logged. Each connection may have `max_inflight_per_conn` handlers running; further
    requests are answered `overloaded` at once, so the caller sees the backpressure.
    """

    def __init__(
        self,
        handlers: Mapping[str, Handler],
        *,
        name: str = "rpc",
        max_inflight_per_conn: int = 4096,
        max_frame: int = wire.MAX_FRAME,
    ) -> None:
        self._handlers = dict(handlers)
        self.name = name
        self.max_inflight_per_conn = max_inflight_per_conn
        self.max_frame = max_frame
        self._server: asyncio.Server | None = None
        self._address: tuple[str, int] | None = None
        self._conns: set[_ServerConnection] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._inflight = INFLIGHT.labels(name)
        self._counters = {
            method: REQUESTS.labels(name, method)
            for method in [*self._handlers, UNKNOWN_METHOD_LABEL]
        }

    async def start(self, host: str, port: int) -> tuple[str, int]:
        """Listen on host:port (port 0 picks a free one) and return the bound address."""
        if self._server is not None:
            raise RuntimeError(f"rpc server {self.name} is already started")
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _ServerConnection(self), host, port)
        bound = self._server.sockets[0].getsockname()
        self._address = (bound[0], bound[1])
        log.info("%s: rpc listening on %s", self.name, self.address)
        return self._address

    @property
    def address(self) -> str:
        if self._address is None:
            raise RuntimeError(f"rpc server {self.name} is not started")
        host, port = self._address
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    async def close(self) -> None:
        """Stop listening, drop every connection, give running handlers CLOSE_GRACE to end."""
        if self._server is None:
            return
        self._server.close()
        for conn in list(self._conns):
            conn.abort()
        if self._tasks:
            _, late = await asyncio.wait(self._tasks, timeout=CLOSE_GRACE)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None
        log.info("%s: rpc server closed", self.name)

    def _dispatch(self, conn: _ServerConnection, request: Request) -> None:
        handler = self._handlers.get(request.method)
        if handler is None:
            self._counters[UNKNOWN_METHOD_LABEL].inc()
            conn.send(
                wire.encode_error(request.id, wire.UNKNOWN_METHOD, f"no method {request.method!r}")
            )
            return
        self._counters[request.method].inc()
        if conn.inflight >= self.max_inflight_per_conn:
            if not conn.overloaded:
                conn.overloaded = True
                log.warning(
                    "%s: %s has %d requests in flight, answering overloaded",
                    self.name,
                    conn.peer,
                    conn.inflight,
                )
            conn.send(
                wire.encode_error(
                    request.id,
                    wire.OVERLOADED,
                    f"{self.max_inflight_per_conn} requests in flight on this connection",
                )
            )
            return
        conn.inflight += 1
        self._inflight.inc()
        task = asyncio.get_running_loop().create_task(self._run(conn, handler, request))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, conn: _ServerConnection, handler: Handler, request: Request) -> None:
        try:
            try:
                result = await handler(request.params)
            except RpcError as exc:
                data = wire.encode_error(request.id, exc.code, exc.message)
            except Exception as exc:
                log.exception("%s: handler for %s failed", self.name, request.method)
                data = wire.encode_error(request.id, wire.INTERNAL, f"{type(exc).__name__}: {exc}")
            else:
                data = self._encode_result(request, result)
            conn.send(data)
        finally:
            conn.inflight -= 1
            if conn.inflight < self.max_inflight_per_conn:
                conn.overloaded = False
            self._inflight.dec()

    def _encode_result(self, request: Request, result: Any) -> bytes:
        try:
            return wire.encode_response(request.id, result, self.max_frame)
        except RpcError as exc:
            log.error("%s: result of %s cannot be sent: %s", self.name, request.method, exc)
            return wire.encode_error(request.id, exc.code, exc.message)

    def _opened(self, conn: _ServerConnection) -> None:
        self._conns.add(conn)
        log.debug("%s: rpc connection from %s", self.name, conn.peer)

    def _closed(self, conn: _ServerConnection, exc: Exception | None) -> None:
        self._conns.discard(conn)
        log.debug("%s: rpc connection from %s closed: %s", self.name, conn.peer, exc)


class _ServerConnection(asyncio.Protocol):
    """One peer. Reading pauses while the socket's write buffer is full, which bounds the
    answers a peer that does not read can make us hold."""

    __slots__ = ("_server", "_transport", "_decoder", "_outbox", "inflight", "overloaded", "peer")

    def __init__(self, server: RpcServer) -> None:
        self._server = server
        self._transport: asyncio.Transport | None = None
        self._decoder = RequestDecoder(server.max_frame)
        self._outbox = Outbox()
        self.inflight = 0
        self.overloaded = False
        self.peer = "?"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        if peer:
            self.peer = f"{peer[0]}:{peer[1]}"
        self._server._opened(self)

    def data_received(self, data: bytes) -> None:
        try:
            requests = self._decoder.feed(data)
        except ProtocolError as exc:
            log.warning(
                "%s: closing rpc connection from %s: %s", self._server.name, self.peer, exc.reason
            )
            self.abort()
            return
        for request in requests:
            self._server._dispatch(self, request)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._server._closed(self, exc)

    def pause_writing(self) -> None:
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        if self._transport is not None:
            self._transport.resume_reading()

    def send(self, data: bytes) -> None:
        if self._transport is not None and self._outbox.push(data):
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        data = self._outbox.take()
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

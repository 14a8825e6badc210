"""The application-facing client: one background task keeps a session alive.

That task connects to the addresses in order, authenticates, joins the chat rooms the
application is in, then reads; it also sends the heartbeat pings and the batched acks, so
the application only iterates and (with auto-ack off) acks. Delivery to the application is
at most once per QoS 1 id within a window of recent ids, however often the server
redelivers after a reconnect; the pushes of a batch frame are delivered one by one, each as
if it had come alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import random
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from ssl import SSLContext, create_default_context
from typing import Any, TypeVar

from prometheus_client import Counter

from im.protocol.codec import Encoding
from im.protocol.errors import FATAL_CODES, ErrorCode, ProtocolError
from im.protocol.messages import MAX_ACK_IDS, validate_client, validate_server
from im.protocol.secure import KEY_SIZE
from im.sdk.bindings import Bindings
from im.sdk.dispatch import DispatchError, route
from im.sdk.transport import Address, Transport, TransportClosed, open_transport

log = logging.getLogger("im.sdk")

ACK_DELAY = 0.01  # seconds an ack may wait for company before its frame goes out
ACK_BATCH = 100  # ids that make a frame go out at once
MAX_PENDING_ACKS = 10_000  # acks kept while offline; older ones are redelivered, then re-acked
DEDUP_SIZE = 10_000
MAX_PINGS = 64  # unanswered pings remembered for matching pongs
HB_MISSES = 3  # heartbeat intervals of server silence that mean a dead connection
CLOSE_FLUSH_TIMEOUT = 1.0
MAX_ID = 64
MAX_ROOMS = 1000  # rooms kept for re-joining; the server has its own, lower, per-connection cap
ROOM_TIMEOUT = 5.0  # default wait for `joined` / `left`
PING = {"op": "ping"}

CONNECTING, ONLINE, OFFLINE, CLOSED = "connecting", "online", "offline", "closed"

#: The server ended the session for good: reconnecting would be refused again, or would
#: kick the newer connection of the same uid and device.
TERMINAL_CODES = frozenset({ErrorCode.AUTH_FAILED, ErrorCode.REPLACED, ErrorCode.KICKED})
#: Dispatcher failures in a row, while connecting the first time, before connect() gives up.
FIRST_ROUTE_TRIES = 3

CONNECTS = Counter("im_sdk_connects_total", "SDK connection attempts", ["result"])
PUSHES = Counter("im_sdk_pushes_total", "Pushes the SDK queued for the application")
DROPPED = Counter("im_sdk_dropped_total", "QoS 0 pushes dropped on a full SDK queue")
DUPLICATES = Counter("im_sdk_duplicates_total", "QoS 1 redeliveries the SDK filtered out")

TokenSource = str | Callable[[], str | Awaitable[str]]
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class Message:
    """A push delivered to the application; `raw` is the whole map as the server sent it,
    `room` the chat room it was sent to (None for pushes to the user)."""

    id: str
    type: str
    pri: str
    qos: int
    ts: int
    body: Any = field(compare=False)
    raw: dict[str, Any] = field(compare=False, repr=False)
    room: str | None = None
    product: str | None = None  # set when the connection carries several products (bind)


class ServerError(Exception):
    """The server ended the session for good; the client stopped (connect() restarts it)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"{code} {reason}")
        self.code = code
        self.reason = reason


class AuthError(ServerError):
    """Authentication refused. Not retried: a new connect() asks the token source again."""


class ClientClosed(Exception):
    """recv() on a client that close() ended."""


class JoinRefused(ValueError):
    """The server answered a join with an error (too many rooms, say); the room is forgotten."""

    def __init__(self, room: str, code: int, reason: str) -> None:
        super().__init__(f"join {room!r} refused: {code} {reason}")
        self.room = room
        self.code = code
        self.reason = reason


def server_error(code: int, reason: str) -> ServerError:
    return (AuthError if code == ErrorCode.AUTH_FAILED else ServerError)(code, reason)


class MoveHint(Exception):
    """The server asked us to reconnect elsewhere (`reconnect`: the instance is draining)."""

    def __init__(self, after_ms: int, reason: str) -> None:
        super().__init__(f"server asked to reconnect in {after_ms} ms: {reason}")
        self.after_s = after_ms / 1000


class Backoff:
    """Exponential backoff with full jitter: attempt n waits U(lo, min(hi, lo * 2**(n+1)))."""

    __slots__ = ("lo", "hi", "_random")

    def __init__(self, lo: float, hi: float, rng: random.Random | None = None) -> None:
        if not 0 < lo <= hi:
            raise ValueError("need 0 < backoff_min <= backoff_max")
        self.lo = lo
        self.hi = hi
        self._random = rng or random.Random()

    def delay(self, attempt: int) -> float:
        cap = min(self.hi, self.lo * 2 ** min(attempt + 1, 32))
        return self._random.uniform(self.lo, cap)


QUEUED, HANDED, ACKED = range(3)


class RecentIds:
    """Bounded LRU of QoS 1 ids taken in, with how far each got towards the application."""

    __slots__ = ("_ids", "_size")

    def __init__(self, size: int = DEDUP_SIZE) -> None:
        self._ids: OrderedDict[str, int] = OrderedDict()
        self._size = size

    def get(self, msg_id: str) -> int | None:
        state = self._ids.get(msg_id)
        if state is not None:
            self._ids.move_to_end(msg_id)
        return state

    def put(self, msg_id: str, state: int) -> None:
        self._ids[msg_id] = state
        self._ids.move_to_end(msg_id)
        if len(self._ids) > self._size:
            self._ids.popitem(last=False)

    def mark_acked(self, msg_id: str) -> None:
        if msg_id in self._ids:
            self._ids[msg_id] = ACKED


class Inbox:
    """Bounded queue from the connection loop to the application; ends with an exception."""

    __slots__ = ("_items", "_size", "_ready", "_end")

    def __init__(self, size: int) -> None:
        self._items: deque[Message] = deque()
        self._size = size
        self._ready = asyncio.Event()
        self._end: Exception | None = None

    def __len__(self) -> int:
        return len(self._items)

    def offer(self, message: Message) -> bool:
        if len(self._items) >= self._size:
            return False
        self._items.append(message)
        self._ready.set()
        return True

    def end(self, exc: Exception, *, discard: bool) -> None:
        """Raise `exc` to readers once the queue is empty (at once with `discard`)."""
        self._end = exc
        if discard:
            self._items.clear()
        self._ready.set()

    def reopen(self) -> None:
        self._end = None

    async def get(self, timeout: float | None) -> Message:
        if self._items:
            return self._items.popleft()
        async with asyncio.timeout(timeout):
            while not self._items:
                if self._end is not None:
                    raise self._end.with_traceback(None)
                self._ready.clear()
                await self._ready.wait()
        return self._items.popleft()


async def read(transport: Transport) -> dict[str, Any]:
    """transport.recv(), with a close code that ends the session turned into ServerError."""
    try:
        return await transport.recv()
    except TransportClosed as exc:
        if exc.code in TERMINAL_CODES:
            raise server_error(exc.code, exc.reason) from None
        raise


def _server_key(key: bytes | str | None) -> bytes | None:
    if isinstance(key, str):
        try:
            key = bytes.fromhex(key)
        except ValueError:
            raise ValueError("server_key must be 32 bytes or 64 hex digits") from None
    if key is not None and len(key) != KEY_SIZE:
        raise ValueError(f"server_key must be {KEY_SIZE} bytes, got {len(key)}")
    return key


def server_op(message: dict[str, Any]) -> str | None:
    """The op of a valid server map; None (logged) for ones this client ignores."""
    try:
        return validate_server(message)
    except ProtocolError as exc:
        if exc.code == ErrorCode.UNKNOWN_OP:
            log.debug("ignoring server op %r", message.get("op"))
        else:
            log.warning("dropping invalid server frame: %s", exc.reason)
        return None


class Client:
    """Keeps a session with the gateway and hands its pushes to the application."""

    __slots__ = (
        "_addresses",
        "_encoding",
        "_auth",
        "_token",
        "_static",
        "_dispatcher",
        "_route_query",
        "_ssl",
        "_server_key",
        "_auto_ack",
        "_reconnect",
        "_backoff",
        "_connect_timeout",
        "_inbox",
        "_seen",
        "_acks",
        "_ack_due",
        "_pings",
        "_timer",
        "_last_recv",
        "_last_send",
        "_transport",
        "_conn_id",
        "_rooms",
        "_joining",
        "_leaving",
        "_sent_joins",
        "_bindings",
        "_task",
        "_loop",
        "_state",
        "dropped",
    )

    def __init__(
        self,
        addresses: Sequence[str] = (),
        *,
        product: str,
        uid: str,
        token: TokenSource,
        device: str = "",
        encoding: str = "msgpack",
        auto_ack: bool = True,
        reconnect: bool = True,
        backoff_min: float = 0.2,
        backoff_max: float = 10.0,
        connect_timeout: float = 5.0,
        queue_size: int = 10000,
        dispatcher: str | None = None,
        transport: str = "ws",
        idc: str = "",
        ssl: SSLContext | str | os.PathLike[str] | None = None,
        server_key: bytes | str | None = None,
    ) -> None:
        """`ssl`: the context, or a CA file, for tcps:// and wss:// addresses (default: the
        system's CAs). `server_key`: the gateway's channel public key (32 bytes or 64 hex
        digits): the encrypted channel on every address, msgpack only."""
        if isinstance(addresses, str):
            raise TypeError("addresses must be a sequence of addresses, not one string")
        self._addresses = [Address.parse(a) for a in addresses]
        self._static = list(self._addresses)  # the fallback when the dispatcher fails
        if not self._addresses and dispatcher is None:
            raise ValueError("at least one address (or a dispatcher URL) is needed")
        if transport not in ("ws", "tcp"):
            raise ValueError(f"transport must be 'ws' or 'tcp', not {transport!r}")
        self._dispatcher = dispatcher
        self._route_query = {"transport": transport, "idc": idc}
        try:
            self._encoding = Encoding(encoding)
        except ValueError:
            raise ValueError(f"encoding must be 'msgpack' or 'json', not {encoding!r}") from None
        if self._encoding is not Encoding.MSGPACK and (
            any(a.scheme in ("tcp", "tcps") for a in self._addresses) or transport == "tcp"
        ):
            raise ValueError("TCP addresses carry msgpack only; use ws:// for json")
        if ssl is not None and not isinstance(ssl, SSLContext):
            ssl = create_default_context(cafile=ssl)  # a missing file fails here, not later
        self._ssl = ssl
        self._server_key = _server_key(server_key)
        if self._server_key is not None and self._encoding is not Encoding.MSGPACK:
            raise ValueError("the encrypted channel carries msgpack only")
        if connect_timeout <= 0 or queue_size < 1:
            raise ValueError("connect_timeout and queue_size must be positive")
        self._auth = {"op": "auth", "product": product, "uid": uid, "device": device}
        self._checked_auth("-" if callable(token) else token)
        self._token = token
        self._auto_ack = auto_ack
        self._reconnect = reconnect
        self._backoff = Backoff(backoff_min, backoff_max)
        self._connect_timeout = connect_timeout
        self._inbox = Inbox(queue_size)
        self._seen = RecentIds()
        self._acks: list[str] = []
        self._ack_due = 0.0
        self._pings: deque[asyncio.Future[None] | None] = deque()
        self._timer: asyncio.Timeout | None = None
        self._last_recv = 0.0
        self._last_send = 0.0
        self._transport: Transport | None = None
        self._conn_id: str | None = None
        self._rooms: dict[str, None] = {}  # joined (or joining) rooms, in join order
        self._joining: dict[str, list[asyncio.Future[int]]] = {}
        self._leaving: dict[str, list[asyncio.Future[None]]] = {}
        self._sent_joins: deque[str] = deque()  # joins on this connection awaiting an answer
        self._bindings = Bindings()
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._state = OFFLINE
        self.dropped = 0

    @property
    def conn_id(self) -> str | None:
        return self._conn_id

    @property
    def connected(self) -> bool:
        return self._state == ONLINE

    @property
    def state(self) -> str:
        return self._state

    @property
    def rooms(self) -> list[str]:
        """Rooms joined (or being joined), re-joined after every reconnect."""
        return list(self._rooms)

    async def connect(self) -> None:
        """Return once authenticated; AuthError on refusal, else the last connect error
        after every address was tried once. Later losses are reconnected in the background.
        """
        if self._state == CLOSED:
            raise RuntimeError("client is closed")
        if self._task is not None:
            raise RuntimeError("client is already connected")
        self._loop = asyncio.get_running_loop()
        self._inbox.reopen()
        first: asyncio.Future[None] = self._loop.create_future()
        self._task = asyncio.create_task(self._run(first), name="im-sdk-connection")
        try:
            await first
        except asyncio.CancelledError:
            self._task.cancel()
            raise

    def __aiter__(self) -> Client:
        return self

    async def __anext__(self) -> Message:
        try:
            return await self.recv()
        except ClientClosed:
            raise StopAsyncIteration from None

    async def recv(self, timeout: float | None = None) -> Message:
        """Next push. Raises TimeoutError, ClientClosed after close(), or, once the pushes
        before it are taken, what stopped the client: a ServerError (AuthError, ...), or
        with reconnect off the error that ended the connection.
        """
        message = await self._inbox.get(timeout)
        if message.qos == 1:
            if self._auto_ack:
                self._seen.put(message.id, ACKED)
                self._queue_acks((message.id,))
            else:
                self._seen.put(message.id, HANDED)
        return message

    async def ack(self, *ids: str) -> None:
        """Ack QoS 1 ids now if online; offline, they go out right after the next auth."""
        for msg_id in ids:
            if not isinstance(msg_id, str) or not 0 < len(msg_id) <= MAX_ID:
                raise ValueError(f"ack ids are non-empty strings of at most {MAX_ID} characters")
        for msg_id in ids:
            self._seen.mark_acked(msg_id)
        self._queue_acks(ids)
        with contextlib.suppress(OSError):
            await self._flush_acks()

    async def ping(self) -> float:
        """Round-trip time to the server in seconds; ConnectionError when not online."""
        transport = self._transport
        if transport is None or self._loop is None:
            raise ConnectionError("not connected")
        waiter: asyncio.Future[None] = self._loop.create_future()
        start = time.perf_counter()  # finer than loop.time(), which is in ms on uvloop
        try:
            await self._send_ping(transport, waiter)
        except BaseException:
            waiter.cancel()
            raise
        await waiter
        return time.perf_counter() - start

    async def join(self, room: str, *, timeout: float | None = ROOM_TIMEOUT) -> int:
        """Join a chat room and return its member count on the server's instance. Offline,
        the join goes out after the next auth; after every reconnect the client joins its
        rooms again by itself. Raises JoinRefused (the room is forgotten), TimeoutError
        (likewise), ValueError for a bad name, ConnectionError when connect() has not run
        or the client stopped, ClientClosed after close().
        """
        self._check_room("join", room)
        if self._task is None:
            raise ConnectionError("not connected: call connect() first")
        if room not in self._rooms and len(self._rooms) >= MAX_ROOMS:
            raise ValueError(f"at most {MAX_ROOMS} rooms per client")
        waiter: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._rooms[room] = None
        self._joining.setdefault(room, []).append(waiter)
        transport = self._transport
        if transport is not None:
            with contextlib.suppress(OSError):  # lost: the reconnect joins again
                await self._send_join(transport, room)
        try:
            return await _wait(waiter, timeout)
        except TimeoutError:
            self._drop_waiter(self._joining, room, waiter)
            self._rooms.pop(room, None)
            raise

    async def bind(
        self,
        product: str,
        token: str,
        *,
        uid: str | None = None,
        timeout: float | None = ROOM_TIMEOUT,
    ) -> None:
        """Carry one more product on this connection, with its own token (and uid, this
        client's by default); bound again after every reconnect. Its pushes come through
        this client with `Message.product` set. Raises BindRefused, TimeoutError,
        ConnectionError when connect() has not run."""
        if self._task is None:
            raise ConnectionError("not connected: call connect() first")
        waiter = self._bindings.want(product, token, uid)
        transport = self._transport
        if transport is not None:
            with contextlib.suppress(OSError):  # lost: the reconnect binds again
                await self._send_bind(transport, product)
        try:
            await _wait(waiter, timeout)
        except TimeoutError:
            self._bindings.forget(product)
            raise

    async def unbind(self, product: str) -> None:
        """Stop carrying a bound product (it is not bound again after a reconnect)."""
        self._bindings.forget(product)
        transport = self._transport
        if transport is not None:
            with contextlib.suppress(OSError):
                await transport.send({"op": "unbind", "product": product})

    async def _send_bind(self, transport: Transport, product: str) -> None:
        frame = self._bindings.frames.get(product)
        if frame is not None:
            self._bindings.sent(product)
            await transport.send(frame)
            self._last_send = asyncio.get_running_loop().time()

    async def leave(self, room: str, *, timeout: float | None = ROOM_TIMEOUT) -> None:
        """Leave a chat room; once this returns, the server sends no more pushes for it.
        Offline, leaving just means not joining it again. A join of it still waiting for a
        connection fails with ConnectionError."""
        self._check_room("leave", room)
        self._rooms.pop(room, None)
        if room not in self._sent_joins:
            for early in self._joining.pop(room, ()):
                _settle(early, exc=ConnectionError(f"left room {room!r} before it was joined"))
        transport = self._transport
        if transport is None:
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._leaving.setdefault(room, []).append(waiter)
        try:
            await transport.send({"op": "leave", "room": room})
            self._last_send = asyncio.get_running_loop().time()
        except OSError:
            return  # the connection, and the membership with it, is gone
        try:
            await _wait(waiter, timeout)
        except TimeoutError:
            self._drop_waiter(self._leaving, room, waiter)
            raise

    async def close(self) -> None:
        """Flush pending acks (briefly), stop the connection task and end the iterator."""
        if self._state == CLOSED:
            return
        self._state = CLOSED
        if self._acks and self._transport is not None:
            with contextlib.suppress(OSError, TimeoutError):
                async with asyncio.timeout(CLOSE_FLUSH_TIMEOUT):
                    await self._flush_acks()
        task = self._task
        if task is not None:
            task.cancel()
            await asyncio.wait([task])
        self._inbox.end(ClientClosed("client closed"), discard=True)

    # -- the connection task -------------------------------------------------------------

    async def _run(self, first: asyncio.Future[None]) -> None:
        failures = 0  # attempts failed since the last successful auth
        index = 0
        avoid: list[str] = []  # addresses that failed or asked us to leave, for the dispatcher
        try:
            while True:
                if self._dispatcher is not None and index == 0:
                    try:
                        await self._route(avoid)
                    except DispatchError as exc:
                        failures += 1
                        log.warning("dispatcher %s failed: %s", self._dispatcher, exc)
                        if not self._static:
                            if not first.done() and failures >= FIRST_ROUTE_TRIES:
                                raise
                            await asyncio.sleep(self._backoff.delay(failures))
                            continue
                        self._addresses = list(self._static)
                    avoid = []
                address = self._addresses[index]
                self._set_state(CONNECTING)
                try:
                    transport, hb = await self._open(address)
                except ServerError:
                    CONNECTS.labels("refused").inc()
                    raise
                except Exception as exc:
                    CONNECTS.labels("failed").inc()
                    log.warning("connecting to %s failed: %r", address.url, exc)
                    failures += 1
                    avoid.append(address.url)
                    index = (index + 1) % len(self._addresses)
                    if not first.done():
                        if failures >= len(self._addresses):
                            raise
                        continue
                    if not self._reconnect:
                        raise
                    self._set_state(OFFLINE)
                    await asyncio.sleep(self._backoff.delay(failures))
                    continue
                CONNECTS.labels("ok").inc()
                failures = 0
                if not first.done():
                    first.set_result(None)
                pause = self._backoff.delay(0)
                try:
                    await self._session(transport, hb)
                except MoveHint as hint:
                    log.info("leaving %s: %s", address.url, hint)
                    avoid.append(address.url)
                    # With a dispatcher, ask it again (this address excluded); else the next.
                    moved = 0 if self._dispatcher is not None else index + 1
                    index = moved % len(self._addresses)
                    pause = hint.after_s
                except (OSError, TimeoutError, ProtocolError) as exc:
                    log.info("connection to %s lost: %s", address.url, exc)
                    if isinstance(exc, TransportClosed) and exc.code == ErrorCode.SERVER_SHUTDOWN:
                        index = (index + 1) % len(self._addresses)
                    if not self._reconnect:
                        raise
                finally:
                    self._go_offline()
                    await transport.close()
                await asyncio.sleep(pause)
        except asyncio.CancelledError:
            if not first.done():
                first.set_exception(ClientClosed("client closed while connecting"))
            self._fail_joins(ClientClosed("client closed"))
            raise
        except Exception as exc:
            if first.done():
                self._inbox.end(exc, discard=False)
            else:
                first.set_exception(exc)
            self._fail_joins(exc)
        finally:
            self._task = None
            self._set_state(OFFLINE)

    async def _route(self, avoid: list[str]) -> None:
        """Addresses from the dispatcher; while every instance is saturated, wait as told."""
        assert self._dispatcher is not None
        while True:
            found = await route(
                self._dispatcher,
                self._auth["product"],
                self._auth["uid"],
                retry=avoid,
                **self._route_query,
            )
            if found.addresses:
                self._addresses = [Address.parse(a) for a in found.addresses]
                return
            wait_ms = found.retry_after_ms or 1000
            log.info("every gateway is busy; asking the dispatcher again in %d ms", wait_ms)
            await asyncio.sleep(wait_ms / 1000)

    async def _open(self, address: Address) -> tuple[Transport, float]:
        """Connect and authenticate within connect_timeout; returns the heartbeat interval."""
        async with asyncio.timeout(self._connect_timeout):
            auth = await self._fresh_auth()
            transport = await open_transport(
                address, self._encoding, ssl=self._ssl, server_key=self._server_key
            )
            try:
                await transport.send(auth)
                reply = await self._auth_reply(transport)
            except BaseException:
                await transport.close()
                raise
        self._transport = transport
        self._conn_id = reply["conn"]
        self._set_state(ONLINE)
        log.info("connected to %s as %s", address.url, self._conn_id)
        return transport, float(reply["hb"])

    async def _fresh_auth(self) -> dict[str, Any]:
        token = self._token
        if callable(token):
            token = token()
            if inspect.isawaitable(token):
                token = await token
        return self._checked_auth(token)

    def _checked_auth(self, token: Any) -> dict[str, Any]:
        auth = {**self._auth, "token": token}
        try:
            validate_client(auth)
        except ProtocolError as exc:
            raise ValueError(exc.reason) from None
        return auth

    @staticmethod
    async def _auth_reply(transport: Transport) -> dict[str, Any]:
        while True:
            message = await read(transport)
            op = server_op(message)
            if op == "auth_ok":
                return message
            if op == "error":
                code, reason = message["code"], message["reason"]
                if code in TERMINAL_CODES:
                    raise server_error(code, reason)
                raise TransportClosed(code, reason)

    async def _session(self, transport: Transport, hb: float) -> None:
        """Read until the connection dies; between frames, send due pings and acks."""
        loop = asyncio.get_running_loop()
        dead_after = HB_MISSES * hb
        self._last_recv = self._last_send = loop.time()
        if self._acks:
            self._ack_due = self._last_recv
        for room in list(self._rooms):
            await self._send_join(transport, room)
        for product in list(self._bindings.frames):
            await self._send_bind(transport, product)
        while True:
            now = loop.time()
            if now - self._last_recv >= dead_after:
                raise TimeoutError(f"no frame from the server for {dead_after:g} s")
            if self._acks and now >= self._ack_due:
                await self._flush_acks()
            if now - self._last_send >= hb:
                await self._send_ping(transport, None)
            deadline = min(self._last_recv + dead_after, self._last_send + hb)
            if self._acks:
                deadline = min(deadline, self._ack_due)
            try:
                async with asyncio.timeout_at(deadline) as timer:
                    self._timer = timer
                    message = await read(transport)
            except TimeoutError:
                continue
            finally:
                self._timer = None
            self._last_recv = loop.time()
            self._handle(message)

    def _handle(self, message: dict[str, Any]) -> None:
        op = server_op(message)
        if op == "push":
            self._on_push(message)
        elif op == "batch":
            for push in message["msgs"]:
                self._on_push(push)
        elif op == "joined":
            room = message["room"]
            with contextlib.suppress(ValueError):
                self._sent_joins.remove(room)
            for waiter in self._joining.pop(room, ()):
                _settle(waiter, message["members"])
        elif op == "left":
            for waiter in self._leaving.pop(message["room"], ()):
                _settle(waiter, None)
        elif op == "pong":
            if self._pings:
                waiter = self._pings.popleft()
                if waiter is not None and not waiter.done():
                    waiter.set_result(None)
        elif op == "bound":
            self._bindings.bound(message["product"])
        elif op == "unbound":
            self._bindings.forget(message["product"])
            log.info("product %s unbound: %s", message["product"], message.get("reason", ""))
        elif op == "reconnect":
            raise MoveHint(message["after_ms"], message["reason"])
        elif op == "error":
            code, reason = message["code"], message["reason"]
            if code in TERMINAL_CODES:
                raise server_error(code, reason)
            if code in FATAL_CODES:
                raise TransportClosed(code, reason)
            if code == ErrorCode.BIND_REFUSED and reason.startswith("bind:"):
                self._bindings.refused(code, reason)
                return
            if reason.startswith("join:") and self._sent_joins:
                self._join_refused(self._sent_joins.popleft(), code, reason)
                return
            log.warning("server error %d: %s", code, reason)

    def _on_push(self, raw: dict[str, Any]) -> None:
        msg_id, qos = raw["id"], raw["qos"]
        if qos == 1:
            state = self._seen.get(msg_id)
            if state is not None:
                DUPLICATES.inc()
                if state == ACKED:
                    self._queue_acks((msg_id,))
                return
        message = Message(
            msg_id,
            raw["type"],
            raw["pri"],
            qos,
            raw["ts"],
            raw.get("body"),
            raw,
            raw.get("room"),
            raw.get("product"),
        )
        if not self._inbox.offer(message):
            if qos == 0:
                self.dropped += 1
                DROPPED.inc()
            else:
                log.debug("queue full: QoS 1 push %s left unacked for redelivery", msg_id)
            return
        PUSHES.inc()
        if qos == 1:
            self._seen.put(msg_id, QUEUED)

    def _queue_acks(self, ids: Iterable[str]) -> None:
        acks = self._acks
        was_empty = not acks
        acks.extend(ids)
        if len(acks) > MAX_PENDING_ACKS:
            del acks[: len(acks) - MAX_PENDING_ACKS]
        now = asyncio.get_running_loop().time()
        if len(acks) >= ACK_BATCH:
            due = now
        elif was_empty:
            due = now + ACK_DELAY
        else:
            return
        self._ack_due = due if was_empty else min(self._ack_due, due)
        timer = self._timer
        if timer is not None and (timer.when() or 0.0) > due:
            timer.reschedule(due)

    async def _flush_acks(self) -> None:
        transport = self._transport
        if transport is None or not self._acks:
            return
        ids, self._acks = self._acks, []
        sent = 0
        try:
            while sent < len(ids):
                await transport.send({"op": "ack", "ids": ids[sent : sent + MAX_ACK_IDS]})
                sent += MAX_ACK_IDS
                self._last_send = asyncio.get_running_loop().time()
        except BaseException:
            self._queue_acks(ids[sent:])
            raise

    async def _send_ping(self, transport: Transport, waiter: asyncio.Future[None] | None) -> None:
        pings = self._pings
        if len(pings) >= MAX_PINGS:
            oldest = pings.popleft()
            if oldest is not None and not oldest.done():
                oldest.set_exception(TimeoutError("no pong from the server"))
        pings.append(waiter)
        self._last_send = asyncio.get_running_loop().time()
        await transport.send(PING)

    async def _send_join(self, transport: Transport, room: str) -> None:
        """Send a join unless one for the room is already awaiting its answer."""
        if room in self._sent_joins:
            return
        self._sent_joins.append(room)
        self._last_send = asyncio.get_running_loop().time()
        await transport.send({"op": "join", "room": room})

    def _join_refused(self, room: str, code: int, reason: str) -> None:
        """The server answers joins in order, so an error naming `join:` is the oldest one's."""
        log.warning("join %r refused: %d %s", room, code, reason)
        self._rooms.pop(room, None)
        for waiter in self._joining.pop(room, ()):
            _settle(waiter, exc=JoinRefused(room, code, reason))

    def _fail_joins(self, exc: Exception) -> None:
        joining, self._joining = self._joining, {}
        for waiters in joining.values():
            for waiter in waiters:
                _settle(waiter, exc=ConnectionError(f"client stopped: {exc}"))
        self._bindings.fail(ConnectionError(f"client stopped: {exc}"))

    def _check_room(self, op: str, room: str) -> None:
        if self._state == CLOSED:
            raise ClientClosed("client closed")
        try:
            validate_client({"op": op, "room": room})
        except ProtocolError as exc:
            raise ValueError(exc.reason) from None

    @staticmethod
    def _drop_waiter(table: dict[str, list[_T]], room: str, waiter: _T) -> None:
        waiters = table.get(room)
        if waiters is not None and waiter in waiters:
            waiters.remove(waiter)
            if not waiters:
                del table[room]

    def _go_offline(self) -> None:
        self._transport = None
        self._conn_id = None
        self._set_state(OFFLINE)
        self._sent_joins.clear()
        self._bindings.connection_lost()
        leaving, self._leaving = self._leaving, {}
        for waiters in leaving.values():  # the membership ended with the connection
            for left in waiters:
                _settle(left, None)
        while self._pings:
            waiter = self._pings.popleft()
            if waiter is not None and not waiter.done():
                waiter.set_exception(ConnectionError("connection lost"))

    def _set_state(self, state: str) -> None:
        if self._state != CLOSED:
            self._state = state


def _settle(waiter: asyncio.Future[Any], result: Any = None, exc: Exception | None = None) -> None:
    if not waiter.done():
        if exc is None:
            waiter.set_result(result)
        else:
            waiter.set_exception(exc)


async def _wait(waiter: asyncio.Future[_T], timeout: float | None) -> _T:
    """Await a reply future; TimeoutError after `timeout` seconds (None waits for ever)."""
    async with asyncio.timeout(timeout):
        return await waiter

"""The logic of one room instance: auth, heartbeats, the flush tick, pushes, sessions.

Connections (room.connection) call into the gateway with decoded maps; the gateway never
touches sockets except through a connection's queue and flush.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping
from typing import Any

import orjson

from im.auth import AuthFailure, verify_token
from im.config import Product
from im.messages_store import MessageStore
from im.metrics import CONTENT_TYPE_LATEST, exposition
from im.protocol import websocket as ws
from im.protocol.codec import Encoding, encode
from im.protocol.errors import ErrorCode, ProtocolError
from im.protocol.framing import frame
from im.protocol.messages import PRIORITY_INDEX, validate_client, validate_server
from im.protocol.secure import ServerHandshake
from im.protocol.ws_handshake import http_response
from im.rpc import RpcError
from im.sessions import Node, NodeRenewal, Session, SessionStore
from im.switches import Switches
from im.switches_feed import SwitchesFeed
from room.at_least_once import AtLeastOnce
from room.bindings import Bindings
from room.chatrooms import ChatRooms
from room.config import RoomConfig
from room.connection import (
    AUTH_WAIT,
    AUTHING,
    CLOSED,
    HELLO_WAIT,
    ONLINE,
    OPENING,
    TCP,
    WS_JSON,
    WS_MSGPACK,
    Connection,
)
from room.deadlines import DeadlineWheel
from room.drain import Drain
from room.limits import Limits, LimitSettings
from room.queues import Outcome
from room.replace import Replacer
from room.stats import RoomStats
from room.upstream import Upstream

log = logging.getLogger("im.room")

_ENCODERS = {
    TCP: lambda m: frame(encode(m, Encoding.MSGPACK)),
    WS_MSGPACK: lambda m: ws.binary_frame(encode(m, Encoding.MSGPACK)),
    WS_JSON: lambda m: ws.text_frame(encode(m, Encoding.JSON)),
}
#: Bounds of the kick and drain RPCs.
MAX_KICK = 10_000
MAX_REASON = 200
MAX_DRAIN_S = 3600.0
_STATE_NAMES = {
    OPENING: "handshake",
    HELLO_WAIT: "handshake",
    AUTH_WAIT: "auth_wait",
    AUTHING: "authing",
    ONLINE: "online",
}


class Gateway:
    def __init__(
        self,
        config: RoomConfig,
        products: Mapping[str, Product],
        store: SessionStore,
        instance: str | None = None,
        saver: MessageStore | None = None,
    ) -> None:
        self.config = config
        self.products = products
        self.store = store
        self.instance = instance or f"r{config.index}-{os.urandom(3).hex()}"
        self.stats = RoomStats()
        self.conns: dict[str, Connection] = {}  # online, by connection id
        self.all: set[Connection] = set()
        self.wheel = DeadlineWheel(1.0)
        self.node = Node(self.instance, rpc="")
        self.accepting = True
        self._dirty: list[Connection] = []
        self._flush_handle: asyncio.Handle | None = None
        self._seq = 0
        self._to_register: list[Connection] = []
        self._to_remove: list[Session] = []
        self._register_task: asyncio.Task | None = None
        self._loop = asyncio.get_running_loop()
        self.limits = Limits(LimitSettings.from_config(config), self._loop.time)
        self.secure: ServerHandshake | None = None  # the encrypted channel, when keyed
        self._pong = {kind: enc({"op": "pong"}) for kind, enc in _ENCODERS.items()}
        self.switches_feed = SwitchesFeed(store, interval=config.switches_poll_s)
        self.rooms = ChatRooms(self)
        self.qos = AtLeastOnce(self, saver)
        self.replacer = Replacer(self)
        self.bindings = Bindings(self)
        self.upstream = Upstream(config, self.encode_for)
        self._background: set[asyncio.Task] = set()
        self.drain = Drain(self)
        self._node_renewal = NodeRenewal(0, self._loop.time())
        self._resyncs: set[asyncio.Task] = set()  # the register refill running, one at a time

    # -- framing -----------------------------------------------------------------------

    @staticmethod
    def encode_for(kind: str, message: dict) -> bytes:
        return _ENCODERS[kind](message)

    # -- connection lifecycle ----------------------------------------------------------

    def opened(self, conn: Connection) -> None:
        self.stats.accepted += 1
        if not self.accepting:
            conn.close(ErrorCode.SERVER_SHUTDOWN, "instance is shutting down")
            return
        refusal = self.limits.opened(conn, conn.peer_host())
        if refusal is not None:
            self.close(conn, *refusal)
            return
        self.all.add(conn)
        config = self.config
        wait = config.handshake_timeout_s if conn.state == OPENING else config.auth_timeout_s
        conn.deadline = self._loop.time() + wait
        self.wheel.add(conn)

    def closed(self, conn: Connection) -> None:
        self.limits.closed(conn)
        self.upstream.offline(conn)
        self.all.discard(conn)
        self.wheel.discard(conn)
        if conn.rooms:
            self.rooms.leave_all(conn)
            self._schedule_register()
        if conn.conn_id and self.conns.get(conn.conn_id) is conn:
            del self.conns[conn.conn_id]
            self._to_remove.append(self._session(conn))
            self._to_remove.extend(self.bindings.sessions(conn))
            self._schedule_register()

    def touch(self, conn: Connection) -> None:
        if conn.state == ONLINE:
            conn.deadline = self._loop.time() + conn.hb * self.config.missed_heartbeats

    def protocol_error(self, conn: Connection, err: ProtocolError) -> None:
        if err.fatal:
            self.close(conn, err.code, err.reason)
        elif conn.state != OPENING:
            conn.send_now(self.encode_for(conn.kind, err.to_map()))

    def close(self, conn: Connection, code: ErrorCode, reason: str) -> None:
        if conn.state == CLOSED:
            return
        self.stats.closes[int(code)] += 1
        log.debug("closing %s (%s): %d %s", conn.conn_id or "-", conn.uid or "-", code, reason)
        conn.close(code, reason)
        self.closed(conn)  # forget it now: the socket may take a while to go

    def sweep(self) -> None:
        """Close connections past their handshake or auth deadline, silent for too many
        heartbeats, or past a deadline of room.limits."""
        for conn in self.wheel.expire(self._loop.time()):
            if conn.state == ONLINE:
                self.close(conn, ErrorCode.HEARTBEAT_TIMEOUT, "no heartbeat")
            elif conn.state == OPENING:
                self.limits.counts["handshake_timeout"] += 1
                self.close(conn, ErrorCode.SLOW_SENDER, "no complete request within the deadline")
            else:
                self.close(conn, ErrorCode.AUTH_TIMEOUT, "no authentication within the deadline")
        for conn, code, reason in self.limits.expired():
            self.close(conn, code, reason)  # type: ignore[arg-type]

    # -- inbound -----------------------------------------------------------------------

    def handle(self, conn: Connection, message: dict[str, Any]) -> None:
        self.stats.frames_in += 1
        try:
            op = validate_client(message)
        except ProtocolError as err:
            self.protocol_error(conn, err)
            return
        if op == "ping":
            self.touch(conn)
            conn.send_now(self._pong[conn.kind])
        elif conn.state == ONLINE:
            conn.deadline = self._loop.time() + conn.hb * self.config.missed_heartbeats
            if op == "ack":
                self.stats.acks += len(message["ids"])
                self.qos.ack(conn, message["ids"])
            elif op == "join":
                try:
                    self.rooms.join(conn, message["room"])
                except ProtocolError as err:
                    self.protocol_error(conn, err)
                    return
                self._schedule_register()
            elif op == "leave":
                self.rooms.leave(conn, message["room"])
                self._schedule_register()
            elif op == "up":
                self.upstream.up(conn, message)
            elif op == "bind":
                try:
                    self.bindings.bind(conn, message)
                except ProtocolError as err:
                    self.protocol_error(conn, err)
            elif op == "unbind":
                if not self.bindings.unbind(conn, message["product"]):
                    reason = f"unbind: product {message['product']!r} is not bound here"
                    self.protocol_error(conn, ProtocolError(ErrorCode.BIND_REFUSED, reason))
            else:  # auth
                self.protocol_error(
                    conn, ProtocolError(ErrorCode.ALREADY_AUTHENTICATED, "already authenticated")
                )
        elif op == "auth":
            if conn.state == AUTH_WAIT:
                self._authenticate(conn, message)
            else:
                self.protocol_error(
                    conn, ProtocolError(ErrorCode.ALREADY_AUTHENTICATED, "auth already sent")
                )
        else:
            self.protocol_error(
                conn, ProtocolError(ErrorCode.NOT_AUTHENTICATED, f"{op} before auth")
            )

    def _authenticate(self, conn: Connection, message: dict[str, Any]) -> None:
        try:
            verify_token(self.products, message["product"], message["uid"], message["token"])
        except AuthFailure as failure:
            self.stats.auth_failed += 1
            self.close(conn, ErrorCode.AUTH_FAILED, str(failure))
            return
        self._seq += 1
        conn.conn_id = f"{self.instance}.{self._seq:x}"
        conn.product = message["product"]
        conn.uid = message["uid"]
        conn.device = message.get("device", "")
        conn.hb = self.config.clamp_heartbeat(message.get("hb"))
        conn.state = AUTHING
        self._to_register.append(conn)
        self._schedule_register()

    def _session(self, conn: Connection) -> Session:
        return Session(conn.product, conn.uid, conn.conn_id, self.instance, conn.device)

    # -- register batching -------------------------------------------------------------

    def _schedule_register(self) -> None:
        if self._register_task is None or self._register_task.done():
            self._register_task = self._loop.create_task(self._register_batches())

    async def _register_batches(self) -> None:
        """One task drains every pending registration and removal, in batches."""
        batch_size = self.config.register_batch
        while self._to_register or self._to_remove or self.rooms.has_index_updates:
            if self.rooms.has_index_updates and not self._to_register:
                updates = self.rooms.index_updates()
                await self.store_call(
                    self.store.put_rooms(self.instance, updates, self.config.session_ttl_s),
                    "rooms",
                )
                continue
            if self._to_remove:
                batch, self._to_remove = (
                    self._to_remove[:batch_size],
                    self._to_remove[batch_size:],
                )
                await self.store_call(self.store.remove_sessions(batch), "remove")
                continue
            conns, self._to_register = (
                self._to_register[:batch_size],
                self._to_register[batch_size:],
            )
            live = [c for c in conns if c.state == AUTHING]
            for conn in live:
                self.conns[conn.conn_id] = conn
            # A failed put is retried by the next renewal, which re-sends every session:
            # a register outage must not cost clients their connections.
            await self.store_call(
                self.store.put_sessions(
                    [self._session(c) for c in live], self.config.session_ttl_s
                ),
                "put",
            )
            now = self._loop.time()
            for conn in live:
                if conn.state != AUTHING:
                    continue
                conn.state = ONLINE
                conn.deadline = now + conn.hb * self.config.missed_heartbeats
                self.wheel.discard(conn)  # the heartbeat deadline may be sooner than auth's
                self.wheel.add(conn)
                self.stats.auth_ok += 1
                conn.send_now(
                    self.encode_for(
                        conn.kind, {"op": "auth_ok", "conn": conn.conn_id, "hb": conn.hb}
                    )
                )
                self.qos.online(conn)
                self.upstream.online(conn)
            if any(c.device and c.state == ONLINE for c in live):
                await self.replacer.logged_in([c for c in live if c.state == ONLINE])

    def spawn(self, coro: Any) -> None:
        """Run a background step (a bind, an unbind) and keep it until it is done."""
        task = self._loop.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def store_call(self, call: Any, what: str) -> bool:
        try:
            await call
            return True
        except (TimeoutError, RpcError, OSError) as exc:
            self.stats.register_errors += 1
            log.warning("register %s failed: %s", what, exc)
            return False

    async def renew(self) -> None:
        """Re-send every session and the node lease; also refills a register that lost them."""
        conns = list(self.conns.values())
        size = self.config.register_batch
        for i in range(0, len(conns), size):
            # Sessions are built one batch at a time: 10,000 at once would be a memory spike.
            batch = []
            for conn in conns[i : i + size]:
                if conn.state == ONLINE:
                    batch.append(self._session(conn))
                    batch.extend(self.bindings.sessions(conn))
            await self.store_call(
                self.store.put_sessions(batch, self.config.session_ttl_s), "renew"
            )
        rooms = self.rooms.index_updates(everything=True)
        for i in range(0, len(rooms), size):
            await self.store_call(
                self.store.put_rooms(self.instance, rooms[i : i + size], self.config.session_ttl_s),
                "rooms",
            )

    async def renew_node(self) -> None:
        """Renew the lease with the load the dispatcher balances on; its answer also tells
        whether the register lost its data since the last renewal."""
        node = Node(
            self.instance,
            rpc=self.node.rpc,
            ws=self.node.ws,
            tcp=self.node.tcp,
            idc=self.config.idc,
            conns=len(self.conns),
            isp=self.config.isp,
            max_conns=self.config.max_conns,
            conn_rate=self._node_renewal.conn_rate(self.stats.accepted, self._loop.time()),
            max_conn_rate=self.config.max_conn_rate,
            draining=not self.accepting,
        )
        await self.store_call(self._put_node(node), "node")

    async def _put_node(self, node: Node) -> None:
        epoch = await self.store.put_node(node, self.config.node_ttl_s)
        previous = self._node_renewal.epoch
        if not self._node_renewal.lost_data(epoch):
            return
        # Waiting for the next session renewal would leave lookups incomplete for up to
        # session_ttl_s / 3: refill the register now.
        self.stats.register_resyncs += 1
        log.warning(
            "register lost its data (epoch %s -> %s); re-sending %d sessions",
            previous,
            epoch,
            len(self.conns),
        )
        if all(task.done() for task in self._resyncs):
            task = self._loop.create_task(self._resync())
            self._resyncs.add(task)
            task.add_done_callback(self._resyncs.discard)

    async def _resync(self) -> None:
        """Re-send everything; again if the register lost its data once more meanwhile."""
        epoch = ""
        while epoch != self._node_renewal.epoch:
            epoch = self._node_renewal.epoch
            await self.renew()

    @property
    def switches(self) -> Switches:
        return self.switches_feed.current

    @property
    def switches_version(self) -> int:
        return self.switches_feed.version

    async def refresh_idc(self) -> None:
        try:
            nodes = await self.store.nodes()
        except (TimeoutError, RpcError, OSError):
            return
        self.rooms.instances_in_idc = max(1, sum(1 for n in nodes if n.idc == self.config.idc))

    # -- outbound ----------------------------------------------------------------------

    def mark_dirty(self, conn: Connection) -> None:
        conn.dirty = True
        self._dirty.append(conn)
        if self._flush_handle is None:
            delay = self.config.flush_interval_ms / 1000
            if delay:
                self._flush_handle = self._loop.call_later(delay, self._flush)
            else:
                self._flush_handle = self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_handle = None
        dirty, self._dirty = self._dirty, []
        for conn in dirty:
            if conn.dirty:
                conn.flush()

    def frame_for(
        self, conn: Connection, message: dict[str, Any], product: str, cache: dict
    ) -> bytes:
        """The push's bytes for this connection, encoded once per wire kind; a connection
        carrying several products (room.bindings) is told whose push it is."""
        tagged = conn.binds is not None
        key = (conn.kind, tagged)
        data = cache.get(key)
        if data is None:
            shown = {**message, "product": product or conn.product} if tagged else message
            data = cache[key] = self.encode_for(conn.kind, shown)
        return data

    def deliver(
        self, conn_ids: list[str], message: dict[str, Any], product: str = ""
    ) -> tuple[int, list[str]]:
        """Queue one push of `product` (the connection's first one if not named) for
        connections of this instance."""
        priority = PRIORITY_INDEX[message["pri"]]
        qos1 = message["qos"] == 1
        encoded: dict[tuple[str, bool], bytes] = {}
        written = 0
        missing: list[str] = []
        for conn_id in conn_ids:
            conn = self.conns.get(conn_id)
            if conn is None or conn.state != ONLINE:
                missing.append(conn_id)
                continue
            data = self.frame_for(conn, message, product, encoded)
            first = not product or product == conn.product
            if conn.held is not None and first:  # its pending messages are still loading
                self.qos.hold(conn, priority, data, message["id"])
                written += 1
                continue
            if qos1:
                conn.qos1 = True
            if self.queue_frame(conn, priority, data):
                written += 1
                if qos1 and first:
                    self.qos.written(conn, message["id"])
                elif qos1 and conn.binds and product in conn.binds:
                    self.qos.written(conn, message["id"], product, conn.binds[product])
        self.stats.pushes += written
        return written, missing

    def queue_frame(self, conn: Connection, priority: int, data: bytes) -> bool:
        """Queue bytes on a connection under its bounds; False when they were dropped."""
        outcome = conn.enqueue(priority, data)
        if outcome is Outcome.QUEUED:
            return True
        if outcome is Outcome.QUEUED_DROPPED_OLDER:
            self.stats.drops["queue_full_evicted"] += 1
            self.qos.dropped(conn)
            return True
        if outcome is Outcome.DROPPED:
            self.stats.drops["queue_full"] += 1
            self.qos.dropped(conn)
        else:
            self.stats.drops["slow_consumer"] += 1
            self.close(conn, ErrorCode.SLOW_CONSUMER, "high-priority queue overflowed")
        return False

    async def rpc_push(self, params: Any) -> dict[str, Any]:
        """RPC `push`: {"items": [{"conns": [...], "msg": {...}, "product": p}]} -> written,
        missing."""
        if not isinstance(params, dict) or not isinstance(params.get("items"), list):
            raise RpcError("bad_request", "push needs {'items': [...]}")
        written = 0
        missing: list[str] = []
        for item in params["items"]:
            if not isinstance(item, dict) or not isinstance(item.get("conns"), list):
                raise RpcError("bad_request", "each item needs 'conns' and 'msg'")
            message = item.get("msg")
            try:
                if not isinstance(message, dict) or validate_server(message) != "push":
                    raise RpcError("bad_request", "msg must be a push map")
            except ProtocolError as err:
                raise RpcError("bad_request", err.reason) from None
            product = item.get("product", "")
            if not isinstance(product, str):
                raise RpcError("bad_request", "item 'product' must be a string")
            n, lost = self.deliver(item["conns"], message, product)
            written += n
            missing.extend(lost)
        return {"written": written, "missing": missing}

    def kick(
        self,
        conn_ids: list[str],
        reason: str,
        code: ErrorCode = ErrorCode.KICKED,
        product: str = "",
    ) -> int:
        """Close these connections of this instance with `code` and `reason`; how many. A
        product only bound to a connection (room.bindings) is unbound instead, so the other
        apps sharing the connection keep it."""
        closed = 0
        for conn_id in conn_ids:
            conn = self.conns.get(conn_id)
            if conn is None:
                continue
            if product and product != conn.product:
                closed += self.bindings.unbind(conn, product, reason)
            else:
                self.close(conn, code, reason)
                closed += 1
        return closed

    async def rpc_kick(self, params: Any) -> dict[str, int]:
        """RPC `kick`: {"conns": [...], "reason": str, "code": 4016|4011} -> closed."""
        if not isinstance(params, dict) or not isinstance(params.get("conns"), list):
            raise RpcError("bad_request", "kick needs {'conns': [...], 'reason': ...}")
        conns, reason = params["conns"], params.get("reason", "kicked")
        code = params.get("code", int(ErrorCode.KICKED))
        if not all(isinstance(c, str) for c in conns) or len(conns) > MAX_KICK:
            raise RpcError("bad_request", f"conns must be at most {MAX_KICK} strings")
        if not isinstance(reason, str) or len(reason) > MAX_REASON:
            raise RpcError("bad_request", f"reason must be a string of at most {MAX_REASON}")
        if code not in (ErrorCode.KICKED, ErrorCode.REPLACED):
            raise RpcError("bad_request", "code must be 4016 (kicked) or 4011 (replaced)")
        product = params.get("product", "")
        if not isinstance(product, str):
            raise RpcError("bad_request", "product must be a string")
        return {"closed": self.kick(conns, reason, ErrorCode(code), product)}

    async def rpc_drain(self, params: Any) -> dict[str, Any]:
        """RPC `drain`: {"window_s": n} -> starts the drain (once), answers at once."""
        window = params.get("window_s") if isinstance(params, dict) else None
        if window is None:
            window = self.config.drain_s
        if (
            isinstance(window, bool)
            or not isinstance(window, int | float)
            or not (0 <= window <= MAX_DRAIN_S)
        ):
            raise RpcError("bad_request", f"window_s must be a number from 0 to {MAX_DRAIN_S}")
        already = self.drain.started
        self.drain.start(float(window))
        return {
            "instance": self.instance,
            "connections": len(self.conns),
            "window_s": self.drain.window_s,
            "already_draining": already,
        }

    # -- HTTP on the WebSocket port ----------------------------------------------------

    def connection_counts(self) -> dict[str, int]:
        counts = dict.fromkeys(_STATE_NAMES.values(), 0)
        for conn in self.all:
            name = _STATE_NAMES.get(conn.state)
            if name:
                counts[name] += 1
        return counts

    def queued(self) -> int:
        return sum(len(c.queue) for c in self.all if c.queue)

    def http(self, method: str, path: str) -> bytes:
        if method != "GET":
            return _json_error(405, "method_not_allowed", "only GET is served here")
        if path == "/metrics":
            return http_response(200, exposition(), CONTENT_TYPE_LATEST)
        if path == "/healthz":
            body = {
                "status": "ok" if self.accepting else "draining",
                "instance": self.instance,
                "connections": len(self.conns),
            }
            return http_response(200, orjson.dumps(body), "application/json")
        return _json_error(404, "not_found", f"no route for {path[:100]}")

    async def stop_background(self) -> None:
        """Flush what the saver is owed and stop the register refill, at shutdown."""
        for task in [*self._resyncs, *self._background]:
            task.cancel()
        if self.drain.task is not None:
            self.drain.task.cancel()
        await self.qos.close()
        await self.replacer.close()
        await self.upstream.close()

    def shutdown(self) -> None:
        """Stop accepting and tell every client to reconnect elsewhere."""
        self.accepting = False
        for conn in list(self.all):
            self.close(conn, ErrorCode.SERVER_SHUTDOWN, "instance is shutting down")


def _json_error(status: int, code: str, message: str) -> bytes:
    body = orjson.dumps({"error": {"code": code, "message": message}})
    return http_response(status, body, "application/json")

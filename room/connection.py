"""One asyncio.Protocol object per client connection; no Task or coroutine per connection.

The connection turns bytes into decoded maps (TCP or WebSocket framing) and hands them to
the gateway; frames for the client wait in its bounded priority queue until the
gateway's flush tick writes them out in one call.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from im.protocol import websocket as ws
from im.protocol.codec import Encoding, decode
from im.protocol.errors import ErrorCode, ProtocolError
from im.protocol.framing import FrameDecoder
from im.protocol.ws_handshake import Accepted, Handshake, PlainRequest, Rejected
from room.queues import HIGH, FrameQueue, Outcome

if TYPE_CHECKING:
    from room.gateway import Gateway

# Connection states.
OPENING, AUTH_WAIT, AUTHING, ONLINE, CLOSED = range(5)

# Wire kinds: how a map becomes bytes on this connection (one encoding cached per kind).
TCP, WS_MSGPACK, WS_JSON = "tcp", "ws_msgpack", "ws_json"

MAX_WRITE_BATCH = 256 * 1024
CLOSE_GRACE_S = 2.0


class Connection(asyncio.Protocol):
    __slots__ = (
        "gateway",
        "transport",
        "state",
        "kind",
        "conn_id",
        "product",
        "uid",
        "device",
        "hb",
        "deadline",
        "bucket",
        "queue",
        "paused",
        "dirty",
        "parser",
        "rooms",
        "held",
        "qos1",
        "binds",
    )

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.transport: asyncio.Transport | None = None
        self.state = OPENING
        self.kind = TCP
        self.conn_id = ""
        self.product = ""
        self.uid = ""
        self.device = ""
        self.hb = 0.0
        self.deadline = 0.0
        self.bucket = 0
        self.queue: FrameQueue | None = None
        self.paused = False
        self.dirty = False
        self.parser: Any = None
        self.rooms: set | None = None  # RoomGroups joined; None until the first join
        self.held: list | None = None  # live pushes waiting for the pending ones (QoS 1)
        self.qos1 = False  # a qos 1 push was queued here: a drop may have been one
        self.binds: dict[str, str] | None = None  # more products on this connection -> uid

    # -- asyncio callbacks -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, so no isinstance here.
        self.transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(high=self.gateway.config.write_buffer_high)
        self.gateway.opened(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.state = CLOSED
        self.queue = None
        self.parser = None
        self.gateway.closed(self)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self.queue:
            self.gateway.mark_dirty(self)

    def data_received(self, data: bytes) -> None:
        if self.state == CLOSED:
            return
        try:
            self.received(data)
        except ProtocolError as err:
            self.gateway.protocol_error(self, err)

    def received(self, data: bytes) -> None:
        raise NotImplementedError

    # -- output ------------------------------------------------------------------------

    def enqueue(self, priority: int, frame: bytes) -> Outcome:
        queue = self.queue
        if queue is None:
            queue = self.queue = FrameQueue(self.gateway.config.queue_cap)
        elif queue.size >= queue.cap and not self.paused and self.state != CLOSED:
            # Full only because the tick has not come yet (a big batch from one RPC): the
            # socket can take it, so write now instead of evicting what was never sent.
            self.flush()
            queue = self.queue or FrameQueue(self.gateway.config.queue_cap)
            self.queue = queue
        outcome = queue.push(priority, frame)
        if not self.dirty and not self.paused:
            self.gateway.mark_dirty(self)
        return outcome

    def flush(self) -> None:
        """Write what the queue holds in one call, unless the transport asked us to wait."""
        self.dirty = False
        queue = self.queue
        if not queue or self.paused or self.state == CLOSED:
            return
        frames = queue.drain(MAX_WRITE_BATCH)
        self.transport.writelines(frames)  # type: ignore[union-attr]
        self.gateway.stats.frames_out += len(frames)
        if not queue:
            self.queue = None  # most connections are idle between pushes: hold nothing
        elif not self.paused:
            self.gateway.mark_dirty(self)

    def send_now(self, frame: bytes) -> None:
        """Queue a control frame (pong, auth_ok, error) ahead of pushes and flush it."""
        self.enqueue(HIGH, frame)
        self.flush()

    def close(self, code: ErrorCode, reason: str) -> None:
        """Tell the client why (error frame, or WebSocket close frame) and close.

        A client that does not read would keep a graceful close waiting on its buffer
        forever, so the transport is aborted if it has not gone after a short grace.
        """
        transport = self.transport
        if self.state == CLOSED or transport is None:
            return
        if code != ErrorCode.SLOW_CONSUMER:  # a slow consumer's queue is what overflowed
            self.flush()
        self.queue = None
        self.dirty = False
        self.state = CLOSED
        transport.write(self.closing_bytes(code, reason))
        transport.close()
        if transport.get_write_buffer_size():
            asyncio.get_running_loop().call_later(CLOSE_GRACE_S, transport.abort)

    def closing_bytes(self, code: ErrorCode, reason: str) -> bytes:
        return self.gateway.encode_for(self.kind, ProtocolError(code, reason).to_map())

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class TcpConnection(Connection):
    """4-byte length-prefixed msgpack maps."""

    __slots__ = ()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.parser = FrameDecoder(self.gateway.config.max_frame)
        self.state = AUTH_WAIT
        super().connection_made(transport)

    def received(self, data: bytes) -> None:
        gateway = self.gateway
        for payload in self.parser.feed(data):
            gateway.handle(self, decode(payload, Encoding.MSGPACK))
            if self.state == CLOSED:
                return


class WsConnection(Connection):
    """WebSocket: opening handshake through `websockets`, then our own lean framing."""

    __slots__ = ()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.parser = Handshake(path=self.gateway.config.ws_path)
        super().connection_made(transport)

    def received(self, data: bytes) -> None:
        if self.state == OPENING:
            data = self._handshake(data)
            if not data:
                return
        gateway = self.gateway
        for event in self.parser.feed(data):
            if type(event) is ws.Message:
                expected_text = self.kind == WS_JSON
                if event.text != expected_text:
                    raise ProtocolError(
                        ErrorCode.MALFORMED,
                        "text frames carry im.v1.json, binary frames im.v1.msgpack",
                    )
                encoding = Encoding.JSON if expected_text else Encoding.MSGPACK
                gateway.handle(self, decode(event.payload, encoding))
            elif type(event) is ws.Ping:
                gateway.touch(self)
                self.transport.write(ws.pong_frame(event.payload))  # type: ignore[union-attr]
            elif type(event) is ws.Close:
                self._closed_by_client(event)
            if self.state == CLOSED:
                return

    def _handshake(self, data: bytes) -> bytes:
        result = self.parser.receive(data)
        if result is None:
            return b""
        transport = self.transport
        assert transport is not None
        if type(result) is Accepted:
            self.kind = WS_JSON if result.subprotocol == Encoding.JSON.subprotocol else WS_MSGPACK
            self.parser = ws.FrameParser(self.gateway.config.max_frame)
            self.state = AUTH_WAIT
            transport.write(result.response)
            return result.leftover
        if type(result) is PlainRequest:
            transport.write(self.gateway.http(result.method, result.path))
        elif type(result) is Rejected:
            transport.write(result.response)
        self.state = CLOSED
        transport.close()
        return b""

    def _closed_by_client(self, event: ws.Close) -> None:
        code = event.code if event.code is not None else 1000
        self.transport.write(ws.close_frame(code, ""))  # type: ignore[union-attr]
        self.state = CLOSED
        self.transport.close()  # type: ignore[union-attr]

    def closing_bytes(self, code: ErrorCode, reason: str) -> bytes:
        if self.state == OPENING:
            return b""
        return ws.close_frame(int(code), reason)

"""One asyncio.Protocol object per client connection; no Task or coroutine per connection.

The connection turns bytes into decoded maps (TCP or WebSocket framing) and hands them to
the gateway; frames for the client wait in its bounded priority queue until the
gateway's flush tick writes them out in one call.

A connection on the encrypted channel (im.protocol.secure) has the TCP wire kind whatever
its transport: everything queued for it is TCP-framed plaintext, and its `transport` is a
Sealer that seals each frame on the way out, so shared room frames stay shared until the
last moment and the counters follow the order in which bytes leave.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import orjson

from im.protocol import secure
from im.protocol import websocket as ws
from im.protocol.codec import SUBPROTOCOLS, Encoding, decode
from im.protocol.errors import ErrorCode, ProtocolError
from im.protocol.framing import HEADER, FrameDecoder, frame
from im.protocol.secure import SECURE_SUBPROTOCOL
from im.protocol.ws_handshake import Accepted, Handshake, PlainRequest, Rejected, http_response
from room.queues import HIGH, FrameQueue, Outcome

if TYPE_CHECKING:
    from room.gateway import Gateway

# Connection states. HELLO_WAIT: the encrypted channel's hello may (TCP) or must (the
# secure WebSocket subprotocol) come next.
OPENING, AUTH_WAIT, AUTHING, ONLINE, CLOSED, HELLO_WAIT = range(6)

# Wire kinds: how a map becomes bytes on this connection (one encoding cached per kind).
TCP, WS_MSGPACK, WS_JSON = "tcp", "ws_msgpack", "ws_json"

_SECURE_SUBPROTOCOLS = (*SUBPROTOCOLS, SECURE_SUBPROTOCOL)

MAX_WRITE_BATCH = 256 * 1024
CLOSE_GRACE_S = 2.0

#: The HTTP answer to a WebSocket client refused before its handshake completed.
_HTTP_STATUS = {
    ErrorCode.TOO_MANY_CONNECTIONS: 429,
    ErrorCode.CONNECTION_RATE: 429,
    ErrorCode.ADDRESS_DENIED: 403,
    ErrorCode.SLOW_SENDER: 408,
    ErrorCode.SERVER_SHUTDOWN: 503,
}


def _is_hello(payload: bytes) -> bool:
    """The encrypted channel's hello; never a plain first frame, which is a msgpack map."""
    return len(payload) == secure.HELLO_SIZE and payload[0] == secure.VERSION


def _too_fast() -> ProtocolError:
    return ProtocolError(ErrorCode.FRAME_RATE, "frames sent faster than this connection's rate")


class Sealer:
    """Stands in for the transport of a connection on the encrypted channel.

    Whatever is written is a run of TCP frames of plaintext (one queued frame, or a room
    tick's frames joined for every member); each is sealed with this connection's next
    counter and framed for the wire by `wrap`. Anything else is the real transport's.
    """

    __slots__ = ("raw", "_seal", "_wrap")

    def __init__(
        self, raw: asyncio.Transport, session: secure.SecureSession, wrap: Callable[[bytes], bytes]
    ) -> None:
        self.raw = raw
        self._seal = session.seal
        self._wrap = wrap

    def _sealed(self, data: bytes, out: list[bytes]) -> None:
        seal, wrap = self._seal, self._wrap
        pos, end = 0, len(data)
        while pos < end:
            start = pos + HEADER
            pos = start + int.from_bytes(data[pos:start], "big")
            out.append(wrap(seal(data[start:pos])))

    def write(self, data: bytes) -> None:
        out: list[bytes] = []
        self._sealed(data, out)
        self.raw.writelines(out)

    def writelines(self, frames: Iterable[bytes]) -> None:
        out: list[bytes] = []
        for data in frames:
            self._sealed(data, out)
        self.raw.writelines(out)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.raw, name)


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
        "ip",
        "tat",
        "partial_at",
        "secure",
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
        self.ip = ""  # the address key room.limits counts this connection under
        self.tat = 0.0  # room.limits: when its next frame is due at its rate
        self.partial_at = 0.0  # room.limits: since when half a frame is buffered; 0 = none
        self.secure: secure.SecureSession | None = None  # the encrypted channel, once up

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
        self.gateway.limits.writable(self, False)

    def resume_writing(self) -> None:
        self.paused = False
        self.gateway.limits.writable(self, True)
        if self.queue:
            self.gateway.mark_dirty(self)

    def data_received(self, data: bytes) -> None:
        if self.state == CLOSED:
            return
        try:
            self.received(data)
        except ProtocolError as err:
            self.gateway.protocol_error(self, err)
            return
        state = self.state
        if state != OPENING and state != CLOSED:  # the handshake deadline covers OPENING
            pending = self.parser.buffered > 0
            if pending != (self.partial_at > 0):
                self.gateway.limits.partial(self, pending)

    def peer_host(self) -> str | None:
        """The client's IP address, for the per-address limits; None if it has none."""
        peer = self.transport.get_extra_info("peername") if self.transport else None
        return peer[0] if isinstance(peer, tuple) and peer else None

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
        closing = self.closing_bytes(code, reason)
        self.state = CLOSED
        self.write_direct(closing)
        transport.close()
        if transport.get_write_buffer_size():
            asyncio.get_running_loop().call_later(CLOSE_GRACE_S, transport.abort)

    def closing_bytes(self, code: ErrorCode, reason: str) -> bytes:
        return self.gateway.encode_for(self.kind, ProtocolError(code, reason).to_map())

    def write_direct(self, data: bytes) -> None:
        """Write past the queue (the closing bytes): sealed on the channel like any frame."""
        if data:
            self.transport.write(data)  # type: ignore[union-attr]

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def start_secure(self, hello: bytes, wrap: Callable[[bytes], bytes]) -> None:
        """Answer the channel's hello; from then on every frame both ways is sealed."""
        handshake = self.gateway.secure
        if handshake is None:
            raise ProtocolError(
                ErrorCode.SECURE_CHANNEL, "this gateway has no encrypted channel; use TLS"
            )
        reply, session = handshake.respond(hello)
        raw = self.transport
        assert raw is not None
        raw.write(wrap(reply))
        self.secure = session
        self.transport = Sealer(raw, session, wrap)  # type: ignore[assignment]
        self.state = AUTH_WAIT


class TcpConnection(Connection):
    """4-byte length-prefixed msgpack maps."""

    __slots__ = ()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.parser = FrameDecoder(self.gateway.config.max_frame)
        # With a channel key, the first frame may be its hello instead of a plain map.
        self.state = HELLO_WAIT if self.gateway.secure else AUTH_WAIT
        super().connection_made(transport)

    def received(self, data: bytes) -> None:
        gateway = self.gateway
        limits = gateway.limits
        for payload in self.parser.feed(data):
            if not limits.frame_allowed(self):
                raise _too_fast()
            if self.secure is not None:
                payload = self.secure.open(payload)
            elif self.state == HELLO_WAIT:
                if _is_hello(payload):
                    self.start_secure(payload, frame)
                    continue
                self.state = AUTH_WAIT
            gateway.handle(self, decode(payload, Encoding.MSGPACK))
            if self.state == CLOSED:
                return


class WsConnection(Connection):
    """WebSocket: opening handshake through `websockets`, then our own lean framing."""

    __slots__ = ()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        config = self.gateway.config
        self.parser = Handshake(
            _SECURE_SUBPROTOCOLS if self.gateway.secure else SUBPROTOCOLS,
            path=config.ws_path,
            max_request_bytes=config.max_http_head,
        )
        super().connection_made(transport)

    def received(self, data: bytes) -> None:
        if self.state == OPENING:
            data = self._handshake(data)
            if not data:
                return
        gateway = self.gateway
        limits = gateway.limits
        for event in self.parser.feed(data):
            if type(event) is not ws.Close and not limits.frame_allowed(self):
                raise _too_fast()
            if type(event) is ws.Message:
                expected_text = self.kind == WS_JSON
                if event.text != expected_text:
                    raise ProtocolError(
                        ErrorCode.MALFORMED,
                        "text frames carry im.v1.json, binary frames im.v1.msgpack",
                    )
                payload = event.payload
                if self.secure is not None:
                    payload = self.secure.open(payload)
                elif self.state == HELLO_WAIT:
                    self.start_secure(payload, ws.binary_frame)
                    continue
                encoding = Encoding.JSON if expected_text else Encoding.MSGPACK
                gateway.handle(self, decode(payload, encoding))
            elif type(event) is ws.Ping:
                gateway.touch(self)
                self.write_direct(ws.pong_frame(event.payload))
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
            gateway = self.gateway
            chosen = result.subprotocol
            if chosen == SECURE_SUBPROTOCOL:
                self.kind, self.state = TCP, HELLO_WAIT
            else:
                self.kind = WS_JSON if chosen == Encoding.JSON.subprotocol else WS_MSGPACK
                self.state = AUTH_WAIT
            self.parser = ws.FrameParser(gateway.config.max_frame)
            gateway.wheel.discard(self)  # the auth deadline may come before the handshake's
            self.deadline = gateway.limits.clock() + gateway.config.auth_timeout_s
            gateway.wheel.add(self)
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
        self.write_direct(ws.close_frame(code, ""))
        self.state = CLOSED
        self.transport.close()  # type: ignore[union-attr]

    def closing_bytes(self, code: ErrorCode, reason: str) -> bytes:
        if self.state == OPENING:  # no WebSocket yet: an HTTP answer with the same code
            body = {"error": {"code": code.name.lower(), "message": reason, "close": int(code)}}
            status = _HTTP_STATUS.get(code, 400)
            return http_response(status, orjson.dumps(body), "application/json")
        return ws.close_frame(int(code), reason)

    def write_direct(self, data: bytes) -> None:
        """Close frames and pongs: control frames are never sealed, the channel carries
        messages, not framing."""
        transport = self.transport
        if type(transport) is Sealer:
            transport = transport.raw
        transport.write(data)  # type: ignore[union-attr]

"""Client-side transports: one map per send/recv over TCP framing or WebSocket.

Both expose the same small surface so the client's connection loop does not care which
one it drives. A closed connection surfaces as `TransportClosed`, carrying the close code
and reason when the server sent them (WebSocket only: raw TCP has no close frame, the
server's `error` frame before the close tells the same story).

`tcps://` and `wss://` run over TLS. Given the gateway's public key (`server_key`), either
transport runs the encrypted channel (im.protocol.secure) instead: its handshake is the
first payload each way, then every payload is sealed.
"""

from __future__ import annotations

import asyncio
import contextlib
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass
from ssl import SSLContext, create_default_context
from typing import Any, Protocol
from urllib.parse import urlsplit

from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from im.protocol.codec import Encoding, decode, encode
from im.protocol.errors import ProtocolError
from im.protocol.framing import DEFAULT_MAX_FRAME, FrameDecoder, frame
from im.protocol.secure import REPLY_SIZE, SECURE_SUBPROTOCOL, ClientHandshake, SecureSession

#: Largest frame accepted from the server: a batch frame packs several pushes of up to
#: DEFAULT_MAX_FRAME each, so the limit is a multiple of it (JSON, which spells the same
#: maps longer than msgpack, included).
MAX_FRAME = 16 * DEFAULT_MAX_FRAME
READ_CHUNK = 64 * 1024
CLOSE_TIMEOUT = 1.0
SCHEMES = ("tcp", "tcps", "ws", "wss")
TLS_SCHEMES = ("tcps", "wss")


class TransportClosed(ConnectionError):
    """The connection ended; `code`/`reason` are the server's close frame, if any."""

    def __init__(self, code: int | None = None, reason: str = "") -> None:
        detail = f" with code {code}" + (f": {reason}" if reason else "") if code else ""
        super().__init__(f"connection closed{detail}")
        self.code = code
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Address:
    scheme: str
    host: str
    port: int
    url: str

    @classmethod
    def parse(cls, text: str) -> Address:
        """Accept "tcp://host:port", "tcps://host:port" (TLS), "ws://host:port/path" or
        "wss://..."; ValueError else."""
        try:
            parts = urlsplit(text)
            port = parts.port
        except ValueError as exc:
            raise ValueError(f"bad address {text!r}: {exc}") from None
        if parts.scheme not in SCHEMES:
            raise ValueError(f"bad address {text!r}: scheme must be one of {', '.join(SCHEMES)}")
        if not parts.hostname:
            raise ValueError(f"bad address {text!r}: missing host")
        if port is None:
            if parts.scheme in ("tcp", "tcps"):
                raise ValueError(f"bad address {text!r}: {parts.scheme} needs a port")
            port = 443 if parts.scheme == "wss" else 80
        return cls(parts.scheme, parts.hostname, port, text)


class Transport(Protocol):
    close_code: int | None
    close_reason: str

    async def send(self, message: dict[str, Any]) -> None: ...

    async def recv(self) -> dict[str, Any]: ...

    async def close(self) -> None: ...


def _refused_handshake(reply: bytes) -> Exception:
    """What a reply that is no channel reply means: the server's plain `error`, if it is one."""
    try:
        message = decode(reply, Encoding.MSGPACK)
    except ProtocolError:
        message = {}
    if message.get("op") == "error" and isinstance(message.get("code"), int):
        return TransportClosed(message["code"], str(message.get("reason", "")))
    return ConnectionError(f"not an encrypted channel reply ({len(reply)} bytes)")


class _Channel(ABC):
    """What both transports do around the bytes on the wire: encode, seal on the encrypted
    channel, and remember the server's close frame."""

    __slots__ = ("_encoding", "_session", "close_code", "close_reason")

    def __init__(self, encoding: Encoding) -> None:
        self._encoding = encoding
        self._session: SecureSession | None = None
        self.close_code: int | None = None
        self.close_reason = ""

    def _pack(self, message: dict[str, Any]) -> bytes:
        payload = encode(message, self._encoding)
        return payload if self._session is None else self._session.seal(payload)

    def _unpack(self, payload: bytes) -> dict[str, Any]:
        if self._session is not None:
            payload = self._session.open(payload)
        return decode(payload, self._encoding)

    async def _secure(self, server_key: bytes | None) -> None:
        """Run the channel handshake when there is a key; a failed one closes the connection."""
        if server_key is None:
            return
        try:
            self._session = await self._handshake(ClientHandshake(server_key))
        except BaseException:
            await self.close()
            raise

    @abstractmethod
    async def _handshake(self, handshake: ClientHandshake) -> SecureSession:
        """Send the hello, read the reply: the session it opens."""

    @abstractmethod
    async def close(self) -> None:
        """Close the connection; a failed handshake calls it too."""


class TcpTransport(_Channel):
    """Length-prefixed msgpack frames over asyncio streams (sealed on the channel)."""

    __slots__ = ("_reader", "_writer", "_decoder", "_ready")

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, max_frame: int
    ) -> None:
        super().__init__(Encoding.MSGPACK)
        self._reader = reader
        self._writer = writer
        self._decoder = FrameDecoder(max_frame)
        self._ready: deque[bytes] = deque()

    @classmethod
    async def open(
        cls,
        host: str,
        port: int,
        *,
        max_frame: int = MAX_FRAME,
        ssl: SSLContext | None = None,
        server_key: bytes | None = None,
    ) -> TcpTransport:
        """`ssl` runs TLS; `server_key` the encrypted channel (its handshake happens here)."""
        reader, writer = await asyncio.open_connection(host, port, limit=READ_CHUNK, ssl=ssl)
        transport = cls(reader, writer, max_frame)
        await transport._secure(server_key)
        return transport

    async def _handshake(self, handshake: ClientHandshake) -> SecureSession:
        self._writer.write(frame(handshake.hello))
        reply = await self._payload()
        if len(reply) != REPLY_SIZE:
            raise _refused_handshake(reply)
        return handshake.finish(reply)

    async def send(self, message: dict[str, Any]) -> None:
        if self._writer.is_closing():
            raise TransportClosed()
        self._writer.write(frame(self._pack(message)))
        await self._writer.drain()

    async def _payload(self) -> bytes:
        while not self._ready:
            data = await self._reader.read(READ_CHUNK)
            if not data:
                raise TransportClosed()
            self._ready.extend(self._decoder.feed(data))
        return self._ready.popleft()

    async def recv(self) -> dict[str, Any]:
        """Next map; cancelling it loses nothing, so callers may wrap it in a timeout."""
        return self._unpack(await self._payload())

    async def close(self) -> None:
        writer = self._writer
        writer.close()
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await writer.wait_closed()
        except (OSError, TimeoutError):
            writer.transport.abort()


class WsTransport(_Channel):
    """One map per WebSocket message: binary msgpack or text JSON, by subprotocol; on the
    encrypted channel (`im.v1.msgpack+secure`) binary sealed msgpack."""

    __slots__ = ("_ws", "_text")

    def __init__(self, ws: ClientConnection, encoding: Encoding) -> None:
        super().__init__(encoding)
        self._ws = ws
        self._text = encoding is Encoding.JSON

    @classmethod
    async def open(
        cls,
        url: str,
        encoding: Encoding,
        *,
        max_frame: int = MAX_FRAME,
        ssl: SSLContext | None = None,
        server_key: bytes | None = None,
    ) -> WsTransport:
        """Handshake failures (HTTP refusal, wrong subprotocol) come out as ConnectionError;
        `ssl` is for wss:// URLs; `server_key` runs the encrypted channel (msgpack only)."""
        if server_key is not None and encoding is not Encoding.MSGPACK:
            raise ValueError("the encrypted channel carries msgpack only")
        subprotocol = SECURE_SUBPROTOCOL if server_key is not None else encoding.subprotocol
        tls = {"ssl": ssl} if ssl is not None else {}  # none: websockets decides by the URL
        try:
            ws = await ws_connect(
                url,
                subprotocols=[subprotocol],
                max_size=max_frame,
                open_timeout=None,  # the caller bounds the whole connect + auth
                ping_interval=None,  # the protocol's own ping/pong is the heartbeat
                close_timeout=CLOSE_TIMEOUT,
                **tls,
            )
        except InvalidHandshake as exc:
            raise ConnectionError(f"WebSocket handshake with {url} failed: {exc}") from exc
        transport = cls(ws, encoding)
        if ws.subprotocol != subprotocol:
            await transport.close()
            raise ConnectionError(f"{url} did not accept subprotocol {subprotocol}")
        await transport._secure(server_key)
        return transport

    async def _handshake(self, handshake: ClientHandshake) -> SecureSession:
        try:
            await self._ws.send(handshake.hello)
            reply = await self._ws.recv(decode=False)
        except ConnectionClosed as exc:
            raise self._closed(exc) from None
        return handshake.finish(reply)

    async def send(self, message: dict[str, Any]) -> None:
        payload = self._pack(message)
        try:
            await self._ws.send(payload, text=self._text)
        except ConnectionClosed as exc:
            raise self._closed(exc) from None

    async def recv(self) -> dict[str, Any]:
        """Next map; cancelling it loses nothing, so callers may wrap it in a timeout."""
        try:
            data = await self._ws.recv(decode=False)
        except ConnectionClosed as exc:
            raise self._closed(exc) from None
        return self._unpack(data)

    async def close(self) -> None:
        with contextlib.suppress(OSError):
            await self._ws.close()

    def _closed(self, exc: ConnectionClosed) -> TransportClosed:
        if exc.rcvd is not None:
            self.close_code = exc.rcvd.code
            self.close_reason = exc.rcvd.reason
        return TransportClosed(self.close_code, self.close_reason)


async def open_transport(
    address: Address,
    encoding: Encoding,
    *,
    max_frame: int = MAX_FRAME,
    ssl: SSLContext | None = None,
    server_key: bytes | None = None,
) -> Transport:
    """Connect to `address`. TLS addresses use `ssl` (None: the system's trusted CAs);
    `server_key` runs the encrypted channel on any address."""
    if address.scheme in TLS_SCHEMES and ssl is None:
        ssl = create_default_context()
    if address.scheme in ("tcp", "tcps"):
        if encoding is not Encoding.MSGPACK:
            raise ValueError("TCP carries msgpack only")
        return await TcpTransport.open(
            address.host,
            address.port,
            max_frame=max_frame,
            ssl=ssl if address.scheme == "tcps" else None,
            server_key=server_key,
        )
    return await WsTransport.open(
        address.url,
        encoding,
        max_frame=max_frame,
        ssl=ssl if address.scheme == "wss" else None,
        server_key=server_key,
    )

"""Client-side transports: one map per send/recv over TCP framing or WebSocket.

Both expose the same small surface so the client's connection loop does not care which
one it drives. A closed connection surfaces as `TransportClosed`, carrying the close code
and reason when the server sent them (WebSocket only: raw TCP has no close frame, the
server's `error` frame before the close tells the same story).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from im.protocol.codec import Encoding, decode, encode
from im.protocol.framing import DEFAULT_MAX_FRAME, FrameDecoder, frame

#: Largest frame accepted from the server: a batch frame packs several pushes of up to
#: DEFAULT_MAX_FRAME each, so the limit is a multiple of it (JSON, which spells the same
#: maps longer than msgpack, included).
MAX_FRAME = 16 * DEFAULT_MAX_FRAME
READ_CHUNK = 64 * 1024
CLOSE_TIMEOUT = 1.0
SCHEMES = ("tcp", "ws", "wss")


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
        """Accept "tcp://host:port", "ws://host:port/path" or "wss://..."; ValueError else."""
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
            if parts.scheme == "tcp":
                raise ValueError(f"bad address {text!r}: tcp needs a port")
            port = 443 if parts.scheme == "wss" else 80
        return cls(parts.scheme, parts.hostname, port, text)


class Transport(Protocol):
    close_code: int | None
    close_reason: str

    async def send(self, message: dict[str, Any]) -> None: ...

    async def recv(self) -> dict[str, Any]: ...

    async def close(self) -> None: ...


class TcpTransport:
    """Length-prefixed msgpack frames over asyncio streams."""

    __slots__ = ("_reader", "_writer", "_decoder", "_ready", "close_code", "close_reason")

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, max_frame: int
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._decoder = FrameDecoder(max_frame)
        self._ready: deque[bytes] = deque()
        self.close_code: int | None = None
        self.close_reason = ""

    @classmethod
    async def open(cls, host: str, port: int, *, max_frame: int = MAX_FRAME) -> TcpTransport:
        reader, writer = await asyncio.open_connection(host, port, limit=READ_CHUNK)
        return cls(reader, writer, max_frame)

    async def send(self, message: dict[str, Any]) -> None:
        if self._writer.is_closing():
            raise TransportClosed()
        self._writer.write(frame(encode(message, Encoding.MSGPACK)))
        await self._writer.drain()

    async def recv(self) -> dict[str, Any]:
        """Next map; cancelling it loses nothing, so callers may wrap it in a timeout."""
        while not self._ready:
            data = await self._reader.read(READ_CHUNK)
            if not data:
                raise TransportClosed()
            self._ready.extend(self._decoder.feed(data))
        return decode(self._ready.popleft(), Encoding.MSGPACK)

    async def close(self) -> None:
        writer = self._writer
        writer.close()
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await writer.wait_closed()
        except (OSError, TimeoutError):
            writer.transport.abort()


class WsTransport:
    """One map per WebSocket message: binary msgpack or text JSON, by subprotocol."""

    __slots__ = ("_ws", "_encoding", "_text", "close_code", "close_reason")

    def __init__(self, ws: ClientConnection, encoding: Encoding) -> None:
        self._ws = ws
        self._encoding = encoding
        self._text = encoding is Encoding.JSON
        self.close_code: int | None = None
        self.close_reason = ""

    @classmethod
    async def open(cls, url: str, encoding: Encoding, *, max_frame: int = MAX_FRAME) -> WsTransport:
        """Handshake failures (HTTP refusal, wrong subprotocol) come out as ConnectionError."""
        try:
            ws = await ws_connect(
                url,
                subprotocols=[encoding.subprotocol],
                max_size=max_frame,
                open_timeout=None,  # the caller bounds the whole connect + auth
                ping_interval=None,  # the protocol's own ping/pong is the heartbeat
                close_timeout=CLOSE_TIMEOUT,
            )
        except InvalidHandshake as exc:
            raise ConnectionError(f"WebSocket handshake with {url} failed: {exc}") from exc
        if ws.subprotocol != encoding.subprotocol:
            await ws.close()
            raise ConnectionError(f"{url} did not accept subprotocol {encoding.subprotocol}")
        return cls(ws, encoding)

    async def send(self, message: dict[str, Any]) -> None:
        try:
            await self._ws.send(encode(message, self._encoding), text=self._text)
        except ConnectionClosed as exc:
            raise self._closed(exc) from None

    async def recv(self) -> dict[str, Any]:
        """Next map; cancelling it loses nothing, so callers may wrap it in a timeout."""
        try:
            data = await self._ws.recv(decode=False)
        except ConnectionClosed as exc:
            raise self._closed(exc) from None
        return decode(data, self._encoding)

    async def close(self) -> None:
        with contextlib.suppress(OSError):
            await self._ws.close()

    def _closed(self, exc: ConnectionClosed) -> TransportClosed:
        if exc.rcvd is not None:
            self.close_code = exc.rcvd.code
            self.close_reason = exc.rcvd.reason
        return TransportClosed(self.close_code, self.close_reason)


async def open_transport(
    address: Address, encoding: Encoding, *, max_frame: int = MAX_FRAME
) -> Transport:
    if address.scheme == "tcp":
        if encoding is not Encoding.MSGPACK:
            raise ValueError("TCP carries msgpack only")
        return await TcpTransport.open(address.host, address.port, max_frame=max_frame)
    return await WsTransport.open(address.url, encoding, max_frame=max_frame)

"""Server-side WebSocket framing (RFC 6455) for established connections, without extensions.

The opening handshake is `ws_handshake`'s job; once it is done a connection needs only this
parser and the encoders, which keeps an idle connection far smaller than a full `websockets`
protocol object. Errors carry our own codes (PROTOCOL_VIOLATION, FRAME_TOO_LARGE), which the
room sends back as the close code.
"""

from __future__ import annotations

import os
import struct
import sys
from dataclasses import dataclass

from im.protocol.errors import ErrorCode, ProtocolError

OP_CONT = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

DEFAULT_MAX_SIZE = 64 * 1024
MAX_CONTROL_PAYLOAD = 125

#: Close codes a peer may put on the wire: the registered ones, then 3000-4999 for libraries
#: and applications (1004-1006 and 1015 are reserved and must never be sent).
_SENDABLE_CLOSE_CODES = frozenset(
    {1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014}
)

_pack_short = struct.Struct("!BB").pack
_pack_medium = struct.Struct("!BBH").pack
_pack_long = struct.Struct("!BBQ").pack
_unpack_medium = struct.Struct("!H").unpack_from
_unpack_long = struct.Struct("!Q").unpack_from


def payload_length(buf: bytes | bytearray, pos: int, end: int) -> tuple[int, int] | None:
    """(payload length, offset after the length fields) of the frame header at `pos`, or
    None while its extended length has not fully arrived. Shared by both directions."""
    length = buf[pos + 1] & 0x7F
    head = pos + 2
    if length == 126:
        if end - head < 2:
            return None
        return _unpack_medium(buf, head)[0], head + 2
    if length == 127:
        if end - head < 8:
            return None
        return _unpack_long(buf, head)[0], head + 8
    return length, head


def _py_apply_mask(data: bytes | bytearray | memoryview, mask: bytes) -> bytes:
    """XOR `data` with the repeated 4-byte `mask`, one big-integer operation for all of it."""
    n = len(data)
    key = mask * (n >> 2) + mask[: n & 3]
    value = int.from_bytes(data, sys.byteorder) ^ int.from_bytes(key, sys.byteorder)
    return value.to_bytes(n, sys.byteorder)


try:
    from websockets.speedups import apply_mask
except ImportError:  # websockets built without its C extension
    apply_mask = _py_apply_mask


@dataclass(frozen=True, slots=True)
class Message:
    """A complete data message, fragments already joined; text ones are valid UTF-8."""

    text: bool
    payload: bytes


@dataclass(frozen=True, slots=True)
class Ping:
    payload: bytes


@dataclass(frozen=True, slots=True)
class Pong:
    payload: bytes


@dataclass(frozen=True, slots=True)
class Close:
    """The peer's close frame; `code` is None when the frame carried no payload."""

    code: int | None
    reason: str


Event = Message | Ping | Pong | Close


def _violation(reason: str) -> ProtocolError:
    return ProtocolError(ErrorCode.PROTOCOL_VIOLATION, reason)


def _too_large(size: int, limit: int) -> ProtocolError:
    return ProtocolError(
        ErrorCode.FRAME_TOO_LARGE, f"message of {size} bytes exceeds the limit of {limit}"
    )


def _parse_close(payload: bytes) -> Close:
    if not payload:
        return Close(None, "")
    if len(payload) == 1:
        raise _violation("close frame payload of 1 byte")
    code = (payload[0] << 8) | payload[1]
    if code not in _SENDABLE_CLOSE_CODES and not 3000 <= code < 5000:
        raise _violation(f"invalid close code {code}")
    try:
        reason = payload[2:].decode()
    except UnicodeDecodeError:
        raise _violation("invalid UTF-8 in close reason") from None
    return Close(code, reason)


class FrameParser:
    """Incremental parser of client frames: feed any split of the stream, get events back.

    A frame whose declared length would push a message past `max_size` is refused at its
    header, before any of its body is buffered, so a peer can make us hold at most one partial
    frame plus one partial message. Both buffers exist only while something is pending, so an
    idle connection costs just this object. A Close may come between fragments (RFC 6455 5.4)
    and drops the unfinished message; after a Close the rest of the stream is ignored (1.4).
    After a ProtocolError the connection must be closed.
    """

    __slots__ = ("_buf", "_closed", "_frag", "_frag_text", "max_size")

    def __init__(self, max_size: int = DEFAULT_MAX_SIZE) -> None:
        self.max_size = max_size
        self._buf: bytearray | None = None  # unparsed tail of the stream
        self._frag: bytearray | None = None  # the fragmented message being assembled
        self._frag_text = False
        self._closed = False

    @property
    def buffered(self) -> int:
        """Bytes held for a partial frame or a partial message."""
        return len(self._buf or b"") + len(self._frag or b"")

    def feed(self, data: bytes) -> list[Event]:
        if self._closed:
            return []
        buf = self._buf
        if buf is None:
            buf = data
        else:
            buf += data
        events: list[Event] = []
        pos = self._parse(buf, events)
        if self._closed or pos == len(buf):
            self._buf = None
        elif self._buf is None:
            self._buf = bytearray(buf[pos:])
        elif pos:
            del self._buf[:pos]
        return events

    def _parse(self, buf: bytes | bytearray, events: list[Event]) -> int:
        """Append the events of every complete frame in `buf`; return the bytes consumed."""
        pos = 0
        end = len(buf)
        while end - pos >= 2:
            b0 = buf[pos]
            b1 = buf[pos + 1]
            opcode = b0 & 0x0F
            fin = b0 & 0x80
            if b0 & 0x70:
                raise _violation("reserved bits set without a negotiated extension")
            if not b1 & 0x80:
                raise _violation("unmasked client frame")
            if opcode >= OP_CLOSE:
                if opcode > OP_PONG:
                    raise _violation(f"unknown opcode {opcode:#x}")
                if not fin:
                    raise _violation("fragmented control frame")
            elif opcode > OP_BINARY:
                raise _violation(f"unknown opcode {opcode:#x}")
            elif opcode == OP_CONT:
                if self._frag is None:
                    raise _violation("continuation frame without a message to continue")
            elif self._frag is not None:
                raise _violation("new message before the fragmented one ended")

            found = payload_length(buf, pos, end)
            if found is None:
                break
            length, head = found
            if length >> 63:
                raise _violation("frame length with the most significant bit set")
            if opcode >= OP_CLOSE:
                if length > MAX_CONTROL_PAYLOAD:
                    raise _violation(f"control frame of {length} bytes, limit 125")
            else:
                total = length if opcode else len(self._frag) + length
                if total > self.max_size:
                    raise _too_large(total, self.max_size)
            body = head + 4
            if end - body < length:
                break
            pos = body + length
            payload = apply_mask(buf[body:pos], buf[head:body])

            if opcode in (OP_TEXT, OP_BINARY):
                if fin:
                    events.append(_message(opcode == OP_TEXT, payload))
                else:
                    self._frag = bytearray(payload)
                    self._frag_text = opcode == OP_TEXT
            elif opcode == OP_CONT:
                self._frag += payload
                if fin:
                    payload = bytes(self._frag)
                    self._frag = None
                    events.append(_message(self._frag_text, payload))
            elif opcode == OP_PING:
                events.append(Ping(payload))
            elif opcode == OP_PONG:
                events.append(Pong(payload))
            else:
                events.append(_parse_close(payload))
                self._closed = True
                self._frag = None
                break
        return pos


def _message(text: bool, payload: bytes) -> Message:
    if text and not payload.isascii():
        try:
            payload.decode()
        except UnicodeDecodeError:
            raise _violation("invalid UTF-8 in text message") from None
    return Message(text, payload)


def _header(first: int, length: int, mask_bit: int) -> bytes:
    if length < 126:
        return _pack_short(first, mask_bit | length)
    if length < 0x10000:
        return _pack_medium(first, mask_bit | 126, length)
    return _pack_long(first, mask_bit | 127, length)


def _first_byte(opcode: int, payload_len: int, fin: bool) -> int:
    if opcode >= OP_CLOSE and (payload_len > MAX_CONTROL_PAYLOAD or not fin):
        raise ValueError("control frames carry at most 125 bytes and cannot be fragmented")
    return (0x80 if fin else 0) | opcode


def encode_frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    """One unmasked (server-to-client) frame."""
    return _header(_first_byte(opcode, len(payload), fin), len(payload), 0) + payload


def encode_client_frame(
    opcode: int, payload: bytes, fin: bool = True, mask_key: bytes | None = None
) -> bytes:
    """One masked frame, as a client must send it; a random key unless one is given."""
    if mask_key is None:
        mask_key = os.urandom(4)
    head = _header(_first_byte(opcode, len(payload), fin), len(payload), 0x80)
    return head + mask_key + apply_mask(payload, mask_key)


def text_frame(payload: bytes) -> bytes:
    """A text frame; `payload` must already be UTF-8 (the JSON encoding always is)."""
    return encode_frame(OP_TEXT, payload)


def binary_frame(payload: bytes) -> bytes:
    return encode_frame(OP_BINARY, payload)


def pong_frame(payload: bytes) -> bytes:
    return encode_frame(OP_PONG, payload)


def close_frame(code: int, reason: str) -> bytes:
    """A close frame; the reason is cut to 123 bytes on a character boundary."""
    raw = reason.encode()
    if len(raw) > MAX_CONTROL_PAYLOAD - 2:
        raw = raw[: MAX_CONTROL_PAYLOAD - 2].decode(errors="ignore").encode()
    return encode_frame(OP_CLOSE, code.to_bytes(2, "big") + raw)

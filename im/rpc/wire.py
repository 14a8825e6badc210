"""Internal RPC wire format, sans-I/O: values in, bytes out, and back.

Every message is one TCP frame of `im.protocol.framing` (a 4-byte big-endian payload length,
then the payload; at most `MAX_FRAME` bytes of payload) whose payload is a msgpack array:

    request   [0, id, method, params]
    response  [1, id, error, result]

`id` is an unsigned 64-bit integer chosen by the caller and echoed in the response; `method`
is a string; `params` and `result` are any msgpack value. `error` is nil on success (then
`result` holds the answer) or `[code, message]`, two strings (then `result` is nil).
Requests on one connection are pipelined: the server may answer them in any order, so the
caller matches answers to requests by `id` alone.

Error codes the RPC layer itself produces are the module constants below; handlers may send
any other code string by raising `RpcError`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import msgpack

from im.protocol.errors import ErrorCode, ProtocolError
from im.protocol.framing import FrameDecoder, frame

MAX_FRAME = 16 * 1024 * 1024
MAX_ID = 2**64 - 1
#: An error message longer than this is cut, so an exception text cannot blow up a frame.
MAX_ERROR_MESSAGE = 4096

REQUEST = 0
RESPONSE = 1

OVERLOADED = "overloaded"
UNKNOWN_METHOD = "unknown_method"
INTERNAL = "internal"
TIMEOUT = "timeout"
UNAVAILABLE = "unavailable"
TOO_LARGE = "too_large"
UNENCODABLE = "unencodable"


class RpcError(Exception):
    """A call failed; `code` is a short machine-readable string that crosses the wire."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class RpcTimeout(RpcError):
    """No answer within the call's deadline; the server may still have acted on it."""

    def __init__(self, message: str) -> None:
        super().__init__(TIMEOUT, message)


class RpcUnavailable(RpcError):
    """The request could not be delivered or the connection died before its answer."""

    def __init__(self, message: str) -> None:
        super().__init__(UNAVAILABLE, message)


def error_from_wire(code: str, message: str) -> RpcError:
    """Rebuild the most specific exception class for a received error code."""
    if code == TIMEOUT:
        return RpcTimeout(message)
    if code == UNAVAILABLE:
        return RpcUnavailable(message)
    return RpcError(code, message)


class Request(NamedTuple):
    id: int
    method: str
    params: Any


class Response(NamedTuple):
    id: int
    error: tuple[str, str] | None
    result: Any


_pack = msgpack.Packer(use_bin_type=True).pack


def _encode(message: list, max_frame: int) -> bytes:
    try:
        payload = _pack(message)
    except (TypeError, ValueError, OverflowError) as exc:
        raise RpcError(UNENCODABLE, f"{type(exc).__name__}: {exc}") from None
    if len(payload) > max_frame:
        raise RpcError(TOO_LARGE, f"{len(payload)} bytes exceed the frame limit of {max_frame}")
    return frame(payload)


def encode_request(req_id: int, method: str, params: Any, max_frame: int = MAX_FRAME) -> bytes:
    """One framed request; RpcError `unencodable` or `too_large` if `params` cannot go."""
    return _encode([REQUEST, req_id, method, params], max_frame)


def encode_response(req_id: int, result: Any, max_frame: int = MAX_FRAME) -> bytes:
    """One framed success; RpcError `unencodable` or `too_large` if `result` cannot go."""
    return _encode([RESPONSE, req_id, None, result], max_frame)


def encode_error(req_id: int, code: str, message: str) -> bytes:
    """One framed failure; cannot fail itself, so it is the fallback for every other error."""
    return frame(_pack([RESPONSE, req_id, [code, message[:MAX_ERROR_MESSAGE]], None]))


def _malformed(reason: str) -> ProtocolError:
    return ProtocolError(ErrorCode.MALFORMED, reason)


def decode(payload: bytes) -> Request | Response:
    """Parse one frame payload; anything off-format is a MALFORMED ProtocolError."""
    try:
        message = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except (ValueError, TypeError):
        raise _malformed("payload is not valid msgpack") from None
    if type(message) is not list or len(message) != 4:
        raise _malformed("payload must be an array of 4 items")
    kind, req_id, third, fourth = message
    if type(req_id) is not int or not 0 <= req_id <= MAX_ID:
        raise _malformed("id must be an unsigned 64-bit integer")
    if type(kind) is not int:
        raise _malformed("message kind must be an integer")
    if kind == REQUEST:
        if type(third) is not str:
            raise _malformed("method must be a string")
        return Request(req_id, third, fourth)
    if kind == RESPONSE:
        if third is None:
            return Response(req_id, None, fourth)
        if (
            type(third) is list
            and len(third) == 2
            and type(third[0]) is str
            and type(third[1]) is str
        ):
            return Response(req_id, (third[0], third[1]), fourth)
        raise _malformed("error must be nil or [code, message] strings")
    raise _malformed(f"unknown message kind {kind}")


class RequestDecoder:
    """Server side: stream bytes in, requests out; a response from the peer is malformed."""

    __slots__ = ("_frames",)

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._frames = FrameDecoder(max_frame)

    def feed(self, data: bytes) -> list[Request]:
        out: list[Request] = []
        for payload in self._frames.feed(data):
            message = decode(payload)
            if type(message) is not Request:
                raise _malformed("a server accepts only requests")
            out.append(message)
        return out


class ResponseDecoder:
    """Client side: stream bytes in, responses out; a request from the peer is malformed."""

    __slots__ = ("_frames",)

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._frames = FrameDecoder(max_frame)

    def feed(self, data: bytes) -> list[Response]:
        out: list[Response] = []
        for payload in self._frames.feed(data):
            message = decode(payload)
            if type(message) is not Response:
                raise _malformed("a client accepts only responses")
            out.append(message)
        return out


class Outbox:
    """Frames queued during one event-loop turn, so a burst goes out in a single write.

    `push` returns True for the first frame of a batch: the caller schedules one flush then.
    """

    __slots__ = ("_parts",)

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def push(self, data: bytes) -> bool:
        self._parts.append(data)
        return len(self._parts) == 1

    def take(self) -> bytes:
        parts = self._parts
        self._parts = []
        return b"".join(parts)

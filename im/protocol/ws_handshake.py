"""The WebSocket opening handshake, sans-I/O, with `websockets` doing the RFC 6455 checks.

A `websockets` ServerProtocol is kept only until the handshake ends; established connections
are framed by `im.protocol.websocket`, which is much smaller per connection. Only the request
head is ever given to the ServerProtocol, so the client frames that follow it stay ours.
"""

from __future__ import annotations

import http
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace

import orjson
from websockets.exceptions import NegotiationError
from websockets.http11 import Request, Response
from websockets.server import ServerProtocol

from im.http_errors import code_for_status, error_body
from im.protocol.codec import SUBPROTOCOLS, Encoding

#: What a client that names no subprotocol speaks.
DEFAULT_SUBPROTOCOL = Encoding.JSON.subprotocol
DEFAULT_MAX_REQUEST = 8192

_HEAD_END = b"\r\n\r\n"
# websockets logs every opened connection at INFO; at 10,000 connections that is noise,
# so its handshake logger starts at WARNING (a deployment can still lower it).
_log = logging.getLogger(__name__)
_log.setLevel(logging.WARNING)


@dataclass(frozen=True, slots=True)
class Accepted:
    """Write `response`, then frame with `subprotocol`; `leftover` is already-received frames."""

    response: bytes
    subprotocol: str
    leftover: bytes


@dataclass(frozen=True, slots=True)
class Rejected:
    """Write `response`, then close."""

    response: bytes


@dataclass(frozen=True, slots=True)
class PlainRequest:
    """An HTTP request that is no upgrade, to another path; `path` has no query string."""

    method: str
    path: str


HandshakeResult = Accepted | Rejected | PlainRequest


def http_response(status: int, body: bytes, content_type: str) -> bytes:
    """A complete HTTP/1.1 response after which the connection is closed."""
    phrase = http.HTTPStatus(status).phrase
    return (
        f"HTTP/1.1 {status} {phrase}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode("latin-1") + body


def _error_body(status: int, message: str) -> bytes:
    """The JSON error every HTTP answer of ours has (im.http_errors), code named by status."""
    return orjson.dumps(error_body(code_for_status(status, {}), message))


def _refused(status: int, message: str) -> Rejected:
    return Rejected(http_response(status, _error_body(status, message), "application/json"))


def _as_json(response: Response) -> Response:
    """A refusal `websockets` made, with its status and headers (426's Upgrade, say), and
    its text as the message of our JSON error body."""
    message = response.body.decode(errors="replace").strip()
    body = _error_body(response.status_code, message)
    headers = response.headers.copy()
    del headers["Content-Type"]
    del headers["Content-Length"]
    headers["Content-Type"] = "application/json"
    headers["Content-Length"] = str(len(body))
    return replace(response, headers=headers, body=body)


def _select_subprotocol(protocol: ServerProtocol, offered: Sequence[str]) -> str | None:
    """The client's first offer we speak (RFC 6455 4.1 orders offers by preference).

    No offer at all is accepted without a Sec-WebSocket-Protocol header and means
    DEFAULT_SUBPROTOCOL; offers that are all unknown fail the handshake with a 400.
    """
    if not offered:
        return None
    supported = protocol.available_subprotocols or ()
    for name in offered:
        if name in supported:
            return name
    raise NegotiationError("unsupported subprotocol; expected one of " + ", ".join(supported))


class Handshake:
    """One connection's opening handshake: feed bytes until a result comes back.

    A request head longer than `max_request_bytes` is refused with 431 without being buffered
    further; bytes that cannot start an HTTP request are refused with 400 as soon as a line of
    them is seen. Upgrades to `path` are accepted or rejected by RFC 6455 rules (400, 405, 426,
    ...); upgrades elsewhere get 404; requests without an Upgrade header to other paths come
    back as PlainRequest for the caller to answer. Drop the object once it returned a result.
    """

    __slots__ = ("_max", "_path", "_proto", "_size", "_tail")

    def __init__(
        self,
        subprotocols: Sequence[str] = SUBPROTOCOLS,
        path: str = "/ws",
        max_request_bytes: int = DEFAULT_MAX_REQUEST,
    ) -> None:
        self._proto = ServerProtocol(
            subprotocols=list(subprotocols),
            select_subprotocol=_select_subprotocol,
            logger=_log,
        )
        self._path = path
        self._max = max_request_bytes
        self._size = 0  # bytes of the request head received so far
        self._tail = b""  # its last 3 bytes, to find a blank line split across reads

    def receive(self, data: bytes) -> HandshakeResult | None:
        """The result once the request head is complete or hopeless; None to wait for more."""
        end = self._head_end(data)
        size = self._size + (len(data) if end < 0 else end)
        if size > self._max:
            return _refused(431, f"request head longer than {self._max} bytes")
        self._size = size
        proto = self._proto
        proto.receive_data(data if end < 0 else data[:end])
        if proto.handshake_exc is not None:
            return self._failed()
        if end < 0:
            self._tail = (self._tail + data[-3:])[-3:]
            return None
        (request,) = proto.events_received()
        return self._answer(request, bytes(data[end:]))

    def _head_end(self, data: bytes) -> int:
        """Index in `data` just past the blank line that ends the request head, or -1."""
        tail = self._tail
        if tail:
            i = (tail + data[:3]).find(_HEAD_END)
            if i >= 0:
                return i + 4 - len(tail)
        i = data.find(_HEAD_END)
        return i + 4 if i >= 0 else -1

    def _failed(self) -> Rejected:
        """The head could not be parsed; `websockets` words some cases (414, 431) itself."""
        written = b"".join(self._proto.data_to_send())
        if written:
            status = int(written.split(b" ", 2)[1])
            text = written.partition(b"\r\n\r\n")[2].decode(errors="replace").strip()
            return _refused(status, text)
        exc = self._proto.handshake_exc
        return _refused(400, f"bad HTTP request: {exc.__cause__ or exc}")

    def _answer(self, request: Request, leftover: bytes) -> HandshakeResult:
        path = request.path.partition("?")[0]
        if path != self._path:
            if "Upgrade" in request.headers:
                return _refused(404, f"no WebSocket endpoint at {path}; use {self._path}")
            return PlainRequest(request.method, path)
        proto = self._proto
        response = proto.accept(request)
        if response.status_code != 101:
            response = _as_json(response)
        proto.send_response(response)
        written = b"".join(proto.data_to_send())
        if response.status_code != 101:
            return Rejected(written)
        return Accepted(written, proto.subprotocol or DEFAULT_SUBPROTOCOL, leftover)

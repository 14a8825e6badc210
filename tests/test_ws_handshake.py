"""The opening handshake against real `websockets` client requests and broken ones."""

from __future__ import annotations

import orjson
import pytest
from websockets.client import ClientProtocol
from websockets.exceptions import InvalidStatus
from websockets.protocol import OPEN
from websockets.uri import parse_uri

from im.http_errors import code_for_status
from im.protocol.codec import SUBPROTOCOLS
from im.protocol.websocket import OP_BINARY, OP_TEXT, encode_client_frame
from im.protocol.ws_handshake import (
    DEFAULT_SUBPROTOCOL,
    Accepted,
    Handshake,
    PlainRequest,
    Rejected,
    http_response,
)

KEY_HEADERS = b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"


def client_request(
    subprotocols: list[str] | None, path: str = "/ws"
) -> tuple[ClientProtocol, bytes]:
    client = ClientProtocol(parse_uri(f"ws://127.0.0.1:9000{path}"), subprotocols=subprotocols)
    client.send_request(client.connect())
    return client, b"".join(client.data_to_send())


def status_of(result: Rejected) -> int:
    return int(result.response.split(b" ", 2)[1])


def body_of(result: Rejected) -> bytes:
    return result.response.partition(b"\r\n\r\n")[2]


def error_of(result: Rejected) -> dict[str, str]:
    """The refusal's JSON error, checked against the shape every HTTP answer of ours has."""
    head, _, body = result.response.partition(b"\r\n\r\n")
    head += b"\r\n"
    assert b"\r\nContent-Type: application/json\r\n" in head
    assert f"\r\nContent-Length: {len(body)}\r\n".encode() in head
    assert head.count(b"Content-Type") == 1 and head.count(b"Content-Length") == 1
    error = orjson.loads(body)["error"]
    assert error["code"] == code_for_status(status_of(result), {})
    return error


def upgrade(path: bytes = b"/ws", method: bytes = b"GET", extra: bytes = b"") -> bytes:
    return (
        method + b" " + path + b" HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\n" + KEY_HEADERS + extra + b"\r\n"
    )


@pytest.mark.parametrize("subprotocol", SUBPROTOCOLS)
def test_websockets_client_is_accepted_with_its_subprotocol(subprotocol: str) -> None:
    client, request = client_request([subprotocol])
    result = Handshake().receive(request)
    assert isinstance(result, Accepted)
    assert result.subprotocol == subprotocol
    assert result.leftover == b""
    client.receive_data(result.response)
    assert client.state is OPEN
    assert client.subprotocol == subprotocol
    assert client.handshake_exc is None


@pytest.mark.parametrize("offer", [list(SUBPROTOCOLS), list(reversed(SUBPROTOCOLS))])
def test_client_preference_order_wins(offer: list[str]) -> None:
    client, request = client_request(["chat", *offer])
    result = Handshake().receive(request)
    assert isinstance(result, Accepted)
    assert result.subprotocol == offer[0]
    client.receive_data(result.response)
    assert client.subprotocol == offer[0]


def test_no_subprotocol_offered_means_json_without_echo() -> None:
    client, request = client_request(None)
    result = Handshake().receive(request)
    assert isinstance(result, Accepted)
    assert result.subprotocol == DEFAULT_SUBPROTOCOL == "im.v1.json"
    assert b"sec-websocket-protocol" not in result.response.lower()
    client.receive_data(result.response)
    assert client.state is OPEN
    assert client.subprotocol is None


def test_only_unknown_subprotocols_are_refused_with_a_reason() -> None:
    client, request = client_request(["chat", "im.v2.json"])
    result = Handshake().receive(request)
    assert isinstance(result, Rejected)
    assert status_of(result) == 400
    assert (
        "unsupported subprotocol; expected one of im.v1.msgpack, im.v1.json"
        in (error_of(result)["message"])
    )
    client.receive_data(result.response)
    assert isinstance(client.handshake_exc, InvalidStatus)
    assert client.handshake_exc.response.status_code == 400


def test_subprotocols_can_be_narrowed() -> None:
    _, request = client_request(["im.v1.msgpack"])
    result = Handshake(subprotocols=["im.v1.json"]).receive(request)
    assert isinstance(result, Rejected)
    assert status_of(result) == 400


def test_eager_frames_come_back_as_leftover() -> None:
    _, request = client_request(["im.v1.json"])
    frames = encode_client_frame(OP_TEXT, b'{"op":"auth"}') + encode_client_frame(OP_BINARY, b"")
    result = Handshake().receive(request + frames)
    assert isinstance(result, Accepted)
    assert result.leftover == frames


def test_every_split_point_gives_the_same_result() -> None:
    _, request = client_request(["im.v1.msgpack"])
    frames = encode_client_frame(OP_TEXT, b"early")
    stream = request + frames
    head = len(request)
    for cut in range(1, len(stream)):
        handshake = Handshake()
        first = handshake.receive(stream[:cut])
        if cut < head:
            assert first is None, cut
            result = handshake.receive(stream[cut:])
            assert isinstance(result, Accepted), cut
            assert result.leftover == frames
        else:
            assert isinstance(first, Accepted), cut
            assert first.leftover == stream[head:cut]
            result = first
        assert result.subprotocol == "im.v1.msgpack"
        assert result.response.startswith(b"HTTP/1.1 101 ")


def test_byte_at_a_time() -> None:
    client, request = client_request(["im.v1.json"])
    handshake = Handshake()
    results = [handshake.receive(request[i : i + 1]) for i in range(len(request))]
    assert results[:-1] == [None] * (len(request) - 1)
    assert isinstance(results[-1], Accepted)
    client.receive_data(results[-1].response)
    assert client.state is OPEN


@pytest.mark.parametrize(
    ("raw", "method", "path"),
    [
        (b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", "GET", "/metrics"),
        (b"GET /healthz?verbose=1 HTTP/1.1\r\nHost: x\r\n\r\n", "GET", "/healthz"),
        (b"HEAD /healthz HTTP/1.0\r\n\r\n", "HEAD", "/healthz"),
    ],
)
def test_plain_requests_are_handed_back(raw: bytes, method: str, path: str) -> None:
    assert Handshake().receive(raw) == PlainRequest(method, path)


def test_upgrade_to_another_path_is_404() -> None:
    client, request = client_request(["im.v1.json"], path="/chat")
    result = Handshake().receive(request)
    assert isinstance(result, Rejected)
    assert status_of(result) == 404
    assert error_of(result) == {
        "code": "not_found",
        "message": "no WebSocket endpoint at /chat; use /ws",
    }
    client.receive_data(result.response)
    assert isinstance(client.handshake_exc, InvalidStatus)


def test_query_string_on_the_websocket_path_is_accepted() -> None:
    client, request = client_request(["im.v1.json"], path="/ws?v=1")
    result = Handshake().receive(request)
    assert isinstance(result, Accepted)
    client.receive_data(result.response)
    assert client.state is OPEN


def test_custom_path() -> None:
    _, request = client_request(["im.v1.json"], path="/im")
    assert isinstance(Handshake(path="/im").receive(request), Accepted)
    assert status_of(Handshake().receive(request)) == 404


def test_plain_get_on_the_websocket_path_is_426() -> None:
    result = Handshake().receive(b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n")
    assert isinstance(result, Rejected)
    assert status_of(result) == 426
    assert b"\r\nUpgrade: websocket\r\n" in result.response
    assert error_of(result)["code"] == "upgrade_required"


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (upgrade(method=b"POST"), 405),
        (upgrade().replace(b"HTTP/1.1", b"HTTP/1.0", 1), 505),
        (upgrade().replace(b"Version: 13", b"Version: 8"), 400),
        (upgrade().replace(b"dGhlIHNhbXBsZSBub25jZQ==", b"short"), 400),
        (upgrade().replace(b"Upgrade: websocket", b"Upgrade: h2c"), 426),
        (upgrade(extra=b"Sec-WebSocket-Protocol: \x01\r\n"), 400),
    ],
)
def test_bad_upgrades_are_refused_by_rfc_6455_rules(raw: bytes, status: int) -> None:
    result = Handshake().receive(raw)
    assert isinstance(result, Rejected)
    assert status_of(result) == status
    assert b"Connection: close" in result.response
    assert error_of(result)["message"]


@pytest.mark.parametrize(
    "raw",
    [
        b"HELLO\r\n\r\n",
        b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\r\n\r\n",
        b"GET /ws HTTP/1.1\r\nno colon here\r\n\r\n",
        b"GET /ws HTTP/1.1\nHost: x\r\n\r\n",
        b"GET /ws HTTP/2.0\r\n\r\n",
        upgrade(extra=b"Content-Length: 5\r\n"),
        upgrade(extra=b"Transfer-Encoding: chunked\r\n"),
    ],
)
def test_garbage_is_400(raw: bytes) -> None:
    result = Handshake().receive(raw)
    assert isinstance(result, Rejected)
    assert status_of(result) == 400
    assert error_of(result)["message"].startswith("bad HTTP request: ")


def test_garbage_is_refused_at_its_first_line() -> None:
    handshake = Handshake()
    assert handshake.receive(b"NOT HT") is None
    result = handshake.receive(b"TP\r\nmore")
    assert isinstance(result, Rejected)
    assert status_of(result) == 400
    assert "NOT HTTP" in error_of(result)["message"]


def test_endless_head_is_431_once_past_the_limit() -> None:
    handshake = Handshake(max_request_bytes=1024)
    assert handshake.receive(b"GET /ws HTTP/1.1\r\nX-Pad: ") is None
    fed = 25
    result = None
    while result is None:
        assert fed <= 1024
        result = handshake.receive(b"a" * 100)
        fed += 100
    assert isinstance(result, Rejected)
    assert status_of(result) == 431
    assert error_of(result) == {
        "code": "request_header_fields_too_large",
        "message": "request head longer than 1024 bytes",
    }
    assert fed > 1024


def test_complete_but_oversized_head_is_431() -> None:
    raw = upgrade(extra=b"X-Pad: " + b"a" * 9000 + b"\r\n")
    result = Handshake().receive(raw + b"frames")
    assert isinstance(result, Rejected)
    assert status_of(result) == 431


def test_head_of_exactly_the_limit_is_accepted() -> None:
    raw = upgrade()
    result = Handshake(max_request_bytes=len(raw)).receive(raw + b"x" * 100)
    assert isinstance(result, Accepted)
    assert result.leftover == b"x" * 100
    assert isinstance(Handshake(max_request_bytes=len(raw) - 1).receive(raw), Rejected)


def test_http_response_is_complete_and_closes() -> None:
    response = http_response(200, b"ok\n", "text/plain; version=0.0.4")
    assert response == (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n"
        b"Content-Length: 3\r\nConnection: close\r\n\r\nok\n"
    )
    assert http_response(503, b"", "text/plain").startswith(b"HTTP/1.1 503 Service Unavailable\r\n")


def test_limits_websockets_enforces_itself_keep_its_response() -> None:
    handshake = Handshake(max_request_bytes=20000)
    assert handshake.receive(b"GET /" + b"a" * 8000) is None
    result = handshake.receive(b"a" * 1000)
    assert isinstance(result, Rejected)
    assert status_of(result) == 414
    assert error_of(result)["message"]

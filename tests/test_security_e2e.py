"""Real attacks over real sockets: floods, slowloris, replayed sealed frames, forged tokens,
keys used where they do not belong; TLS and the encrypted channel end to end with the SDK;
and the HTTP surfaces: JSON errors everywhere, no CORS, no secrets in logs or /metrics."""

from __future__ import annotations

import asyncio
import hmac
import logging
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import orjson
import pytest
import pytest_asyncio
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

from center.admin import AdminApi
from dispatcher.config import DispatcherConfig
from dispatcher.route import address
from dispatcher.server import DispatcherServer
from im.auth import issue_token
from im.cli import main as im_main
from im.config import DEV_ADMIN_KEY, DEV_PRODUCT, Product, load_admin_key, load_products
from im.protocol.codec import Encoding, decode, encode
from im.protocol.errors import ErrorCode
from im.protocol.framing import FrameDecoder, frame
from im.protocol.secure import SECURE_SUBPROTOCOL, ClientHandshake, SecureSession
from im.register_client import RegisterClient
from im.sdk import Client
from im.sessions import Node
from im.tls import make_dev_cert
from room.server import load_secure_key
from tests.fixtures.system import HOST, TIMEOUT, Closed, RawTcp, System, eventually, metric_value

pytestmark = pytest.mark.timeout(60)

#: Per-address limits are off for loopback by default; these tests attack from it.
NO_EXEMPT = {"limit_exempt": ""}


def limited(metrics: str, limit: str) -> float:
    return metric_value(metrics, "im_room_limited_total", limit=limit)


async def raw_http(port: int, request: bytes, timeout: float = TIMEOUT) -> tuple[int, bytes]:
    """Send raw bytes to an HTTP port; (status, body) of the answer, read until close."""
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(request)
        answer = await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def json_error(body: bytes) -> dict[str, Any]:
    document = orjson.loads(body)
    assert set(document) == {"error"}, document
    assert isinstance(document["error"]["code"], str) and document["error"]["message"]
    return document["error"]


# -- floods from one address -----------------------------------------------------------


async def test_a_flood_of_connections_from_one_address_is_capped(make_system) -> None:
    room = await make_system(rooms=1, center=False, max_conns_per_ip=5, **NO_EXEMPT)
    held = [await room.raw(0, "tcp") for _ in range(5)]
    for client in held:
        await client.ping()
    refused = await room.raw(0, "tcp")
    closed = await refused.expect_close()
    assert closed.code == ErrorCode.TOO_MANY_CONNECTIONS
    status, body = await raw_http(room.ws_port(0), b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 429
    assert json_error(body) == {
        "code": "too_many_connections",
        "message": closed.reason,
        "close": ErrorCode.TOO_MANY_CONNECTIONS,
    }
    # The room's own /metrics connection counts too: it was refused like the others.
    refusals = room.rooms[0].gateway.limits.counts["connections_per_address"]
    assert refusals == 2
    held[0].close()
    gateway = room.rooms[0].gateway
    await eventually(lambda: gateway.limits.per_address.get(HOST) == 4)
    again = await room.raw(0, "tcp")
    await again.ping()  # a freed slot is usable again


async def test_new_connections_per_second_from_one_address_are_metered(make_system) -> None:
    room = await make_system(rooms=1, center=False, conn_rate_per_ip=5, **NO_EXEMPT)
    clients = [await room.raw(0, "tcp") for _ in range(16)]
    outcomes = []
    for client in clients:
        try:
            await client.ping()
            outcomes.append("ok")
        except (Closed, AssertionError):
            outcomes.append(client.last_error and client.last_error["code"])
    assert outcomes.count("ok") in (10, 11)  # a burst of 2 x 5, plus what refilled meanwhile
    assert set(outcomes) == {"ok", ErrorCode.CONNECTION_RATE}
    assert room.rooms[0].gateway.limits.counts["connection_rate"] == outcomes.count(
        ErrorCode.CONNECTION_RATE
    )


async def test_denied_addresses_are_refused_on_both_transports(make_system) -> None:
    room = await make_system(rooms=1, center=False, ip_allow="127.0.0.0/8", ip_deny="127.0.0.1")
    client = await room.raw(0, "tcp")
    assert (await client.expect_close()).code == ErrorCode.ADDRESS_DENIED
    status, body = await raw_http(room.ws_port(0), b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 403
    assert json_error(body)["close"] == ErrorCode.ADDRESS_DENIED
    assert room.rooms[0].gateway.limits.counts["address_denied"] == 2


async def test_a_frame_flood_on_one_connection_is_closed(make_system) -> None:
    room = await make_system(rooms=1, center=False, frame_rate=10)
    client = await room.online("flooder")
    client.send_raw(client.encode({"op": "ping"}) * 100)
    pongs = 0
    with pytest.raises(Closed) as closed:
        while True:
            message = await client.recv()
            pongs += message == {"op": "pong"}
    assert closed.value.code == ErrorCode.FRAME_RATE
    assert pongs < 21  # the auth and a burst of 2 x 10 were let through, nothing after


# -- slowloris and slow readers ----------------------------------------------------------


async def test_a_frame_trickling_in_is_closed_as_a_slow_sender(make_system) -> None:
    room = await make_system(rooms=1, center=False, slow_sender_s=0.3)
    client = await room.online("trickle")
    partial = frame(encode({"op": "ping"}, Encoding.MSGPACK))
    client.send_raw(partial[:3])
    started = time.monotonic()

    async def trickle() -> None:
        for byte in partial[3:-1] * 20:  # never completes: one byte every 100 ms
            await asyncio.sleep(0.1)
            client.send_raw(bytes([byte]))

    task = asyncio.create_task(trickle())
    try:
        closed = await client.expect_close(timeout=3)
    finally:
        task.cancel()
    assert closed.code == ErrorCode.SLOW_SENDER
    assert 0.3 <= time.monotonic() - started < 2.5  # the deadline, then the 1 s sweep
    assert room.rooms[0].gateway.limits.counts["slow_sender"] == 1


async def test_a_request_head_trickling_in_is_answered_408(make_system) -> None:
    room = await make_system(rooms=1, center=False, handshake_timeout_s=0.3)
    reader, writer = await asyncio.open_connection(HOST, room.ws_port(0))
    started = time.monotonic()
    writer.write(b"GET /ws HTTP/1.1\r\n")

    async def trickle() -> None:
        for byte in b"Host: 127.0.0.1\r\nUpgrade: websocket\r\n" * 10:
            await asyncio.sleep(0.05)
            writer.write(bytes([byte]))

    task = asyncio.create_task(trickle())
    try:
        answer = await asyncio.wait_for(reader.read(), 4)
    finally:
        task.cancel()
        writer.close()
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert json_error(answer.partition(b"\r\n\r\n")[2])["close"] == ErrorCode.SLOW_SENDER
    assert time.monotonic() - started < 3  # the deadline, its 1 s bucket, the 1 s sweep
    assert room.rooms[0].gateway.limits.counts["handshake_timeout"] == 1


async def test_a_request_head_over_the_limit_is_refused_431(make_system) -> None:
    room = await make_system(rooms=1, center=False, max_http_head=1024)
    request = b"GET /ws HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 2000 + b"\r\n\r\n"
    status, body = await raw_http(room.ws_port(0), request)
    assert status == 431
    assert json_error(body)["code"] == "request_header_fields_too_large"


@pytest.mark.parametrize(
    ("request_head", "status", "code"),
    [
        (b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n", 426, "upgrade_required"),
        (b"GET /chat HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n", 404, "not_found"),
        (b"\x16\x03\x01\x00\xa5\x01\x00\x00\r\n\r\n", 400, "bad_request"),
        (
            b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: short\r\nSec-WebSocket-Version: 13\r\n\r\n",
            400,
            "bad_request",
        ),
    ],
)
async def test_websocket_handshake_refusals_have_the_json_body(
    make_system, request_head: bytes, status: int, code: str
) -> None:
    room = await make_system(rooms=1, center=False)
    answered, body = await raw_http(room.ws_port(0), request_head)
    assert answered == status
    assert json_error(body)["code"] == code


async def test_a_client_that_stops_reading_is_closed_as_a_slow_reader(make_system) -> None:
    room = await make_system(
        rooms=1, center=False, slow_reader_s=0.4, queue_cap=100_000, write_buffer_high=16384
    )
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, room.tcp_addr(0))
    reader, writer = await asyncio.open_connection(sock=sock)
    client = RawTcp(reader, writer)
    await client.auth("sleepy", room.token("sleepy"))
    gateway = room.rooms[0].gateway
    conn = gateway.conns[client.conn_id]
    rpc = room.room_rpc(0)
    body = {"pad": "x" * 16000}
    for batch in range(200):  # low priority: a full queue drops, it never overflows
        msgs = [
            {"op": "push", "id": f"s{batch}.{i}", "type": "t", "pri": "low", "qos": 0, "ts": 1}
            | {"body": body}
            for i in range(20)
        ]
        await rpc.call("push", {"items": [{"conns": [client.conn_id], "msg": m} for m in msgs]})
        if conn.paused:
            break
        await asyncio.sleep(0.005)
    assert conn.paused, "the socket never filled"
    await eventually(lambda: gateway.stats.closes[ErrorCode.SLOW_CONSUMER] == 1, timeout=3)
    assert gateway.limits.counts["slow_reader"] == 1
    assert client.conn_id not in gateway.conns


# -- forged and misplaced credentials ----------------------------------------------------


def _forged_tokens(system: System) -> dict[str, str]:
    now = int(time.time())
    claims = {"sub": "mallory", "aud": DEV_PRODUCT, "iat": now, "exp": now + 600}
    unsigned = jwt.encode(claims, key=None, algorithm="none")  # type: ignore[arg-type]
    return {
        "wrong secret": jwt.encode(claims, "not-the-secret", algorithm="HS256"),
        "alg none": unsigned,
        "expired": jwt.encode({**claims, "exp": now - 600}, "dev", algorithm="HS256"),
        "other uid": system.token("alice"),
        "tampered": system.token("mallory")[:-2] + "AA",
    }


async def test_forged_tokens_are_refused_4001(make_system) -> None:
    room = await make_system(rooms=1, center=False)
    for case, token in _forged_tokens(room).items():
        client = await room.raw(0, "tcp")
        client.send({"op": "auth", "product": DEV_PRODUCT, "uid": "mallory", "token": token})
        closed = await client.expect_close()
        assert closed.code == ErrorCode.AUTH_FAILED, case
    assert room.rooms[0].gateway.stats.auth_failed == 5
    assert await room.register_client().lookup(DEV_PRODUCT, ["mallory"]) == {}


@pytest_asyncio.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def test_business_and_admin_keys_are_not_interchangeable(make_system, http) -> None:
    system = await make_system(rooms=1)
    url = system.center_url
    business = {"Authorization": f"Bearer {system.api_key}"}
    admin = {"Authorization": f"Bearer {DEV_ADMIN_KEY}"}
    async with http.get(f"{url}/v1/admin/switches", headers=business) as answer:
        assert answer.status == 403
        assert json_error(await answer.read())["code"] == "forbidden"
    push = {"uids": ["u1"], "body": {"x": 1}}
    async with http.post(f"{url}/v1/push/users", json=push, headers=admin) as answer:
        assert answer.status == 401
        assert json_error(await answer.read())["code"] == "unauthorized"
    async with http.get(f"{url}/v1/admin/switches", headers=admin) as answer:
        assert answer.status == 200
    with pytest.raises(ValueError, match="differ from every product"):
        AdminApi(object(), "shared-key", lambda key: key == "shared-key")  # type: ignore[arg-type]


async def test_keys_are_compared_in_constant_time_against_every_key(
    make_system, http, monkeypatch
) -> None:
    products = {
        name: Product(name, f"{name}-token-secret-0123456789", f"{name}-api-key-0123456789")
        for name in ("p1", "p2", "p3")
    }
    system = await make_system(rooms=1, products=products)
    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    url = f"{system.center_url}/v1/rooms/r1"
    for key in ("p1-api-key-0123456789", "p3-api-key-0123456789", "nope"):
        compared.clear()
        async with http.get(url, headers={"Authorization": f"Bearer {key}"}) as answer:
            assert answer.status == (401 if key == "nope" else 200)
        # Every product's key is compared, whichever matches, so timing reveals nothing.
        assert sorted(b for _, b in compared) == sorted(
            p.api_key.encode() for p in products.values()
        )
    compared.clear()
    admin_url = f"{system.center_url}/v1/admin/switches"
    headers = {"Authorization": "Bearer p2-api-key-0123456789"}
    async with http.get(admin_url, headers=headers) as answer:
        assert answer.status == 403
    assert [b for _, b in compared].count(DEV_ADMIN_KEY.encode()) == 1
    assert len(compared) == 1 + len(products)


# -- the HTTP surfaces -------------------------------------------------------------------


@pytest_asyncio.fixture
async def dispatcher_url(make_system) -> AsyncIterator[tuple[System, str]]:
    system = await make_system(rooms=1)
    config = DispatcherConfig(host=HOST, port=0, register=system.register_address)
    server = DispatcherServer(config, RegisterClient(system.register_address))
    await server.start()
    yield system, server.url
    await server.close()


async def test_cors_is_off_but_for_the_public_route_answer(dispatcher_url, http) -> None:
    system, dispatcher = dispatcher_url
    origin = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    key = {"Authorization": f"Bearer {system.api_key}"}
    for url in (
        f"{system.center_url}/v1/push/users",
        f"{system.center_url}/v1/rooms/r1",
        f"{system.center_url}/v1/admin/switches",
        f"{dispatcher}/v1/route",
    ):
        async with http.options(url, headers=origin) as answer:  # no preflight is granted
            assert answer.status == 405
            assert not [h for h in answer.headers if h.lower().startswith("access-control-")]
    for url in (f"{system.center_url}/v1/rooms/r1", f"{system.center_url}/healthz"):
        async with http.get(url, headers={**origin, **key}) as answer:
            assert not [h for h in answer.headers if h.lower().startswith("access-control-")]
    # The route answer is public and takes no credentials: any page may read it, no more.
    async with http.get(f"{dispatcher}/v1/route?product=demo&uid=u", headers=origin) as answer:
        cors = {h.lower(): v for h, v in answer.headers.items() if h.lower().startswith("access-")}
        assert cors == {"access-control-allow-origin": "*"}


async def test_every_error_answer_has_the_json_body(dispatcher_url, http) -> None:
    system, dispatcher = dispatcher_url
    center = system.center_url
    key = {"Authorization": f"Bearer {system.api_key}"}
    big = b"{" + b" " * (2 * 1024 * 1024) + b"}"
    cases: list[tuple[str, str, dict[str, str], bytes | None, int]] = [
        ("GET", f"{center}/nope", {}, None, 404),
        ("DELETE", f"{center}/v1/push/users", key, None, 405),
        ("POST", f"{center}/v1/push/users", {}, b"{}", 401),
        ("POST", f"{center}/v1/push/users", key, b"{not json", 400),
        ("POST", f"{center}/v1/push/users", key, big, 413),
        ("GET", f"{dispatcher}/nope", {}, None, 404),
        ("POST", f"{dispatcher}/v1/route", {}, big, 405),
        ("GET", f"{dispatcher}/v1/route?product=demo", {}, None, 400),
        ("GET", f"{dispatcher}/v1/route?product=demo&uid=u&transport=pigeon", {}, None, 400),
    ]
    for method, url, headers, body, status in cases:
        async with http.request(method, url, headers=headers, data=body) as answer:
            assert answer.status == status, (method, url)
            assert answer.content_type == "application/json", (method, url)
            json_error(await answer.read())
    port = system.ws_port(0)
    for request, status in (
        (b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n", 404),
        (b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", 405),
    ):
        got, body = await raw_http(port, request)
        assert got == status
        json_error(body)


async def test_secrets_never_reach_logs_or_metrics(
    make_system, http, caplog, tmp_path: Path
) -> None:
    secret = "token-secret-Zq8vW3xL0pT6-aK1mN5bV7cX2zL4"
    api_key = "api-key-Hn4rB7kM2cY9-sD3fG6hJ8kL0pO2i"
    webhook_secret = "webhook-secret-Jd5sF1gQ8wE3-rT5yU7"
    key_file = tmp_path / "secure.key"
    assert im_main(["secure-key", "--out", str(key_file)]) == 0
    secure_hex = key_file.read_text().strip()
    make_dev_cert(tmp_path / "cert.pem", tmp_path / "key.pem")
    tls_key = (tmp_path / "key.pem").read_text().splitlines()[1]  # a line of the key's body
    config = tmp_path / "im.toml"
    config.write_text(
        'admin_key = "admin-key-Wq2eR4tY6uI8-oP0aS1dF3gH5"\n'
        f'[products.acme]\nsecret = "{secret}"\napi_key = "{api_key}"\n'
        f'webhook = "http://127.0.0.1:9/hook"\nwebhook_secret = "{webhook_secret}"\n'
    )
    caplog.set_level(logging.DEBUG)
    products = load_products(config)
    admin_key = load_admin_key(config)
    assert admin_key is not None
    system = await make_system(rooms=1, products=products, secure_key=str(key_file))
    tls_room = await make_system(
        rooms=1,
        center=False,
        tls_cert=str(tmp_path / "cert.pem"),
        tls_key=str(tmp_path / "key.pem"),
    )
    token = issue_token(products["acme"], "u1")
    secrets = [secret, api_key, webhook_secret, secure_hex, tls_key, token, admin_key]
    # Auth failures: a token for another uid, and a token signed with the api key.
    for uid, bad in (("u2", token), ("u1", issue_token(Product("acme", api_key, ""), "u1"))):
        client = await system.raw(0, "tcp")
        client.send({"op": "auth", "product": "acme", "uid": uid, "token": bad})
        assert (await client.expect_close()).code == ErrorCode.AUTH_FAILED
    # Keys where they do not belong, and keys that are almost right.
    center = system.center_url
    for key in (api_key, api_key[:-1], admin_key, secret):
        for url in (f"{center}/v1/admin/switches", f"{center}/v1/rooms/r1"):
            async with http.get(url, headers={"Authorization": f"Bearer {key}"}) as answer:
                await answer.read()
    # Config that is refused: the messages name the problem, not the value.
    broken = tmp_path / "broken.toml"
    broken.write_text(f'admin_key = "{secret[:5]}"\n[products.acme]\nsecret = "{secret}"\n')
    for loader in (load_products, load_admin_key):
        with pytest.raises(Exception) as refused:
            loader(broken)
        assert secret not in str(refused.value) and secret[:5] not in str(refused.value)
    bad_key = tmp_path / "bad.key"
    bad_key.write_text(secure_hex[:-2] + "zz")
    with pytest.raises(ValueError) as refused:
        load_secure_key(bad_key)
    assert secure_hex[:-2] not in str(refused.value)
    metrics = [await system.room_metrics(0)]
    async with http.get(f"{center}/metrics") as answer:
        metrics.append(await answer.text())
    config_d = DispatcherConfig(host=HOST, port=0, register=system.register_address)
    dispatcher = DispatcherServer(config_d, RegisterClient(system.register_address))
    await dispatcher.start()
    try:
        async with http.get(f"{dispatcher.url}/metrics") as answer:
            metrics.append(await answer.text())
    finally:
        await dispatcher.close()
    assert tls_room.rooms[0].gateway.node.tcp.startswith("tcps://")
    logged = caplog.text + "".join(repr(r.args) for r in caplog.records)
    assert "encrypted channel on" in logged  # the capture works: the room's start is in it
    assert "im_room_paused_connections{" in metrics[0]  # the room's own families are in
    for value in secrets:
        assert value not in logged
        for body in metrics:
            assert value not in body


# -- TLS ---------------------------------------------------------------------------------


@pytest.fixture
def dev_cert(tmp_path: Path) -> tuple[str, str]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    make_dev_cert(cert, key)
    return str(cert), str(key)


async def _push_and_receive(system: System, http: aiohttp.ClientSession, clients: list[Client]):
    key = {"Authorization": f"Bearer {system.api_key}"}
    body = {"uids": [f"tls{i}" for i in range(len(clients))], "body": {"n": 1}}
    async with http.post(f"{system.center_url}/v1/push/users", json=body, headers=key) as answer:
        assert answer.status == 200
    for client in clients:
        message = await client.recv(timeout=TIMEOUT)
        assert message.body == {"n": 1}


async def test_tls_on_both_listeners_with_a_dev_cert(make_system, http, dev_cert) -> None:
    cert, key = dev_cert
    system = await make_system(rooms=1, tls_cert=cert, tls_key=key)
    room = system.rooms[0]
    assert room.ws_address.startswith("wss://")
    assert room.gateway.node.tcp == f"tcps://{room.tcp_address}"
    assert address(room.gateway.node, "tcp") == f"tcps://{room.tcp_address}"
    addresses = [room.ws_address, f"tcps://{room.tcp_address}"]
    clients = [
        Client([a], product=DEV_PRODUCT, uid=f"tls{i}", token=system.token(f"tls{i}"), ssl=cert)
        for i, a in enumerate(addresses)
    ]
    try:
        for client in clients:
            await client.connect()
        await _push_and_receive(system, http, clients)
    finally:
        for client in clients:
            await client.close()
    plain = await RawTcp.open(*system.tcp_addr(0))  # no TLS: the server never answers a map
    plain.send({"op": "ping"})
    with pytest.raises((Closed, TimeoutError, ValueError)):
        await plain.recv(timeout=1)
    plain.close()
    untrusting = Client(
        [room.ws_address], product=DEV_PRODUCT, uid="x", token=system.token("x"), reconnect=False
    )
    with pytest.raises(Exception, match="CERTIFICATE_VERIFY_FAILED|certificate verify"):
        await untrusting.connect()


def test_the_dispatcher_keeps_a_node_s_tcp_scheme() -> None:
    assert address(Node("r", "h:1", tcp="h:2"), "tcp") == "tcp://h:2"
    assert address(Node("r", "h:1", tcp="tcps://h:2"), "tcp") == "tcps://h:2"
    assert address(Node("r", "h:1"), "tcp") == ""


# -- the encrypted channel ---------------------------------------------------------------


@pytest.fixture
def channel_key(tmp_path: Path) -> tuple[str, str]:
    """(key file for the room, public key hex for clients), as `im secure-key` makes them."""
    path = tmp_path / "channel.key"
    assert im_main(["secure-key", "--out", str(path)]) == 0
    public = load_secure_key(path).public_key().public_bytes_raw().hex()
    return str(path), public


def test_secure_key_writes_a_private_key_once(channel_key, capsys) -> None:
    key_file, public = channel_key
    assert Path(key_file).stat().st_mode & 0o777 == 0o600
    before = Path(key_file).read_text()
    assert im_main(["secure-key", "--out", key_file]) == 2  # never over an existing key
    assert Path(key_file).read_text() == before
    assert "File exists" in capsys.readouterr().err
    assert len(bytes.fromhex(public)) == 32


async def test_the_sdk_over_the_encrypted_channel(make_system, http, channel_key) -> None:
    key_file, public = channel_key
    system = await make_system(rooms=1, secure_key=key_file)
    addresses = [system.tcp_url(0), system.ws_url(0)]
    clients = [
        Client(
            [a],
            product=DEV_PRODUCT,
            uid=f"tls{i}",
            token=system.token(f"tls{i}"),
            server_key=public,
        )
        for i, a in enumerate(addresses)
    ]
    plain = await system.online("plain")  # plain clients of the same room are unaffected
    try:
        for client in clients:
            await client.connect()
            assert await client.join("hall") >= 1
        plain.send({"op": "join", "room": "hall"})
        assert (await plain.recv())["op"] == "joined"
        await _push_and_receive(system, http, clients)
        key = {"Authorization": f"Bearer {system.api_key}"}
        room_push = {"body": {"say": "hi"}, "pri": "high"}
        async with http.post(
            f"{system.center_url}/v1/push/rooms/hall", json=room_push, headers=key
        ) as answer:
            assert answer.status == 200
        for client in clients:  # one shared frame, sealed for each of them
            assert (await client.recv(timeout=TIMEOUT)).body == {"say": "hi"}
        assert (await plain.recv())["body"] == {"say": "hi"}
        assert await clients[0].ping() >= 0
    finally:
        for client in clients:
            await client.close()
    wrong = X25519PrivateKey.generate().public_key().public_bytes_raw()
    impostor = Client(
        [system.tcp_url(0)],
        product=DEV_PRODUCT,
        uid="x",
        token=system.token("x"),
        server_key=wrong,
        reconnect=False,
    )
    with pytest.raises(Exception, match="server confirm"):
        await impostor.connect()


class SecureTcp:
    """The channel by hand over a raw TCP socket, to send what a real client never would."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.decoder = FrameDecoder(1 << 20)
        self.session: SecureSession | None = None

    @classmethod
    async def open(cls, system: System, public: str) -> SecureTcp:
        self = cls(*await asyncio.open_connection(*system.tcp_addr(0)))
        handshake = ClientHandshake(bytes.fromhex(public))
        self.writer.write(frame(handshake.hello))
        self.session = handshake.finish(await self.payload())
        return self

    async def payload(self) -> bytes:
        while True:
            ready = self.decoder.feed(b"")
            if ready:
                return ready[0]
            data = await asyncio.wait_for(self.reader.read(1 << 16), TIMEOUT)
            if not data:
                raise Closed(None, "eof")
            found = self.decoder.feed(data)
            if found:
                return found[0]

    def seal(self, message: dict) -> bytes:
        assert self.session is not None
        return frame(self.session.seal(encode(message, Encoding.MSGPACK)))

    async def recv(self) -> dict:
        assert self.session is not None
        return decode(self.session.open(await self.payload()), Encoding.MSGPACK)


async def test_replayed_and_tampered_sealed_frames_are_refused(make_system, channel_key) -> None:
    key_file, public = channel_key
    system = await make_system(rooms=1, center=False, secure_key=key_file)
    gateway = system.rooms[0].gateway
    # TCP: the auth frame sent again, byte for byte.
    client = await SecureTcp.open(system, public)
    sealed_auth = client.seal(
        {"op": "auth", "product": DEV_PRODUCT, "uid": "victim", "token": system.token("victim")}
    )
    client.writer.write(sealed_auth)
    assert (await client.recv())["op"] == "auth_ok"
    client.writer.write(sealed_auth)
    error = await client.recv()  # the refusal itself comes sealed
    assert error["code"] == ErrorCode.SECURE_CHANNEL and "replayed" in error["reason"]
    assert await client.reader.read() == b""
    # TCP: one flipped bit in an otherwise fresh frame.
    client = await SecureTcp.open(system, public)
    tampered = bytearray(client.seal({"op": "ping"}))
    tampered[-1] ^= 1
    client.writer.write(bytes(tampered))
    assert (await client.recv())["code"] == ErrorCode.SECURE_CHANNEL
    # WebSocket: a recorded frame replayed on the same connection.
    async with ws_connect(system.ws_url(0), subprotocols=[SECURE_SUBPROTOCOL]) as ws:
        handshake = ClientHandshake(bytes.fromhex(public))
        await ws.send(handshake.hello)
        session = handshake.finish(await ws.recv(decode=False))
        ping = session.seal(encode({"op": "ping"}, Encoding.MSGPACK))
        await ws.send(ping)
        pong = decode(session.open(await ws.recv(decode=False)), Encoding.MSGPACK)
        assert pong == {"op": "pong"}
        await ws.send(ping)
        with pytest.raises(ConnectionClosed) as closed:
            await ws.recv()
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == ErrorCode.SECURE_CHANNEL
    assert gateway.stats.closes[ErrorCode.SECURE_CHANNEL] == 3
    assert await system.register_client().lookup(DEV_PRODUCT, ["victim"]) == {}


async def test_a_gateway_without_a_key_refuses_the_channel(make_system) -> None:
    system = await make_system(rooms=1, center=False)
    client = await RawTcp.open(*system.tcp_addr(0))
    client.send_raw(frame(ClientHandshake(bytes(32)).hello))
    assert (await client.expect_close()).code == ErrorCode.MALFORMED  # as before the channel
    client.close()
    request = (
        "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        f"Sec-WebSocket-Protocol: {SECURE_SUBPROTOCOL}\r\n\r\n"
    )
    status, body = await raw_http(system.ws_port(0), request.encode())
    assert status == 400 and b"unsupported subprotocol" in body

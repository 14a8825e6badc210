"""A real room instance against raw sockets: every kind of bad input gets its error code,
costs only the offending connection, and leaves the instance serving everyone else."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import jwt
import msgpack
import orjson
import pytest

from im.auth import issue_token
from im.config import Product
from im.protocol import websocket as ws
from im.protocol.errors import ErrorCode
from im.protocol.framing import frame
from tests.fixtures.system import (
    ENGINES,
    TRANSPORTS,
    RawClient,
    System,
    eventually,
    http_get,
    metric_value,
)

MAX_FRAME = 64 * 1024


@pytest.fixture
async def room(make_system) -> System:
    return await make_system(rooms=1, center=False)


def push(msg_id: str, pri: str = "high", body: Any = "hi", qos: int = 0) -> dict[str, Any]:
    return {
        "op": "push",
        "id": msg_id,
        "type": "chat",
        "pri": pri,
        "qos": qos,
        "ts": 1,
        "body": body,
    }


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


async def assert_serving(room: System, uid: str = "bystander") -> None:
    """A fresh client can still authenticate, ping and receive a push."""
    client = await room.online(uid)
    await client.ping()
    reply = await room.room_rpc(0).call(
        "push", {"items": [{"conns": [client.conn_id], "msg": push("check")}]}
    )
    assert reply == {"written": 1, "missing": []}
    assert (await client.recv())["id"] == "check"


# -- framing ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("garbage", "code"),
    [
        pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", ErrorCode.FRAME_TOO_LARGE, id="http"),
        pytest.param(frame(b"hello"), ErrorCode.MALFORMED, id="not-msgpack"),
        pytest.param(frame(b"\xc1\xc1\xc1"), ErrorCode.MALFORMED, id="reserved-byte"),
        pytest.param(frame(msgpack.packb([1, 2])), ErrorCode.MALFORMED, id="not-a-map"),
        pytest.param(frame(msgpack.packb({"x": 1})), ErrorCode.MALFORMED, id="no-op"),
        pytest.param(frame(msgpack.packb({"op": 7})), ErrorCode.MALFORMED, id="op-not-string"),
    ],
)
async def test_tcp_garbage_is_refused_and_closed(room: System, garbage: bytes, code: int) -> None:
    client = await room.raw(0, "tcp")
    client.send_raw(garbage)
    closed = await client.expect_close()
    assert closed.code == code
    assert closed.reason
    await assert_serving(room)


async def test_tcp_oversized_header_is_refused_before_the_body(room: System) -> None:
    client = await room.raw(0, "tcp")
    client.send_raw((MAX_FRAME + 1).to_bytes(4, "big"))  # the header alone, no body follows
    closed = await client.expect_close(timeout=2)
    assert closed.code == ErrorCode.FRAME_TOO_LARGE
    assert str(MAX_FRAME + 1) in closed.reason
    await assert_serving(room)


async def test_tcp_frame_at_the_limit_is_read(room: System) -> None:
    client = await room.raw(0, "tcp")
    padding = "p" * (MAX_FRAME - 64)
    payload = msgpack.packb({"op": "ping", "pad": padding})
    assert len(payload) <= MAX_FRAME
    client.send_raw(frame(payload))
    assert await client.recv() == {"op": "pong"}


@pytest.mark.parametrize("transport", ["ws_msgpack", "ws_json"])
async def test_ws_oversized_frame_is_closed_4006(room: System, transport: str) -> None:
    client = await room.raw(0, transport)
    opcode = 0x82 if transport == "ws_msgpack" else 0x81
    # A masked frame header announcing 1 MiB; the body is never sent.
    client.send_raw(bytes([opcode, 0x80 | 127]) + (1 << 20).to_bytes(8, "big") + b"mask")
    closed = await client.expect_close(timeout=2)
    assert closed.code == ErrorCode.FRAME_TOO_LARGE
    assert "exceeds" in closed.reason
    await assert_serving(room)


@pytest.mark.parametrize(
    ("transport", "opcode"), [("ws_msgpack", ws.OP_TEXT), ("ws_json", ws.OP_BINARY)]
)
async def test_ws_frame_of_the_wrong_kind_is_closed_4000(
    room: System, transport: str, opcode: int
) -> None:
    client = await room.raw(0, transport)
    client.send_raw(ws.encode_client_frame(opcode, orjson.dumps({"op": "ping"})))
    closed = await client.expect_close()
    assert closed.code == ErrorCode.MALFORMED
    assert "im.v1" in closed.reason


async def test_ws_unmasked_frame_is_a_protocol_violation(room: System) -> None:
    client = await room.raw(0, "ws_msgpack")
    client.send_raw(ws.binary_frame(msgpack.packb({"op": "ping"})))
    closed = await client.expect_close()
    assert closed.code == ErrorCode.PROTOCOL_VIOLATION


# -- authentication --------------------------------------------------------------------


def _auth_case(case: str, room: System) -> tuple[str, str, str]:
    """(product, uid, token) for each way a token can be wrong."""
    uid = "alice"
    if case == "wrong-secret":
        forged = Product("demo", "f" * 32, "k" * 16)
        return "demo", uid, issue_token(forged, uid)
    if case == "not-a-jwt":
        return "demo", uid, "not.a.jwt"
    if case == "expired":
        return "demo", uid, room.token(uid, ttl=-60)
    if case == "other-uid":
        return "demo", uid, room.token("mallory")
    if case == "alg-none":
        claims = {"sub": uid, "aud": "demo", "exp": int(time.time()) + 60}
        return "demo", uid, jwt.encode(claims, None, algorithm="none")
    assert case == "unknown-product"
    return "nosuch", uid, room.token(uid)


AUTH_CASES = {
    "wrong-secret": "signature",
    "not-a-jwt": "invalid",
    "expired": "expired",
    "other-uid": "another uid",
    "alg-none": "algorithm",
    "unknown-product": "unknown product",
}


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("case", list(AUTH_CASES))
async def test_bad_token_is_refused_4001(room: System, case: str, transport: str) -> None:
    product, uid, token = _auth_case(case, room)
    client = await room.raw(0, transport)
    client.send({"op": "auth", "product": product, "uid": uid, "token": token})
    closed = await client.expect_close()
    assert closed.code == ErrorCode.AUTH_FAILED
    assert AUTH_CASES[case] in closed.reason
    assert await room.register_client().lookup(product, [uid]) == {}


async def test_no_auth_within_the_deadline_is_closed_4002(make_system) -> None:
    room = await make_system(rooms=1, center=False, auth_timeout_s=0.5)
    started = time.monotonic()
    quiet = await room.raw(0, "tcp")
    pinging = await room.raw(0, "ws_json")
    await pinging.ping()  # a ping is not an authentication: the deadline still applies
    closed = await quiet.expect_close(timeout=4)
    assert closed.code == ErrorCode.AUTH_TIMEOUT
    assert time.monotonic() - started >= 0.5
    assert (await pinging.expect_close(timeout=4)).code == ErrorCode.AUTH_TIMEOUT


async def test_silent_online_client_is_closed_4007(make_system) -> None:
    room = await make_system(
        rooms=1, center=False, heartbeat_s=0.4, heartbeat_min_s=0.1, auth_timeout_s=1
    )
    silent = await room.online("silent")
    lively = await room.online("lively", transport="ws_msgpack")
    started = time.monotonic()

    async def keep_pinging() -> None:
        while True:
            await asyncio.sleep(0.15)
            await lively.ping()

    pinger = asyncio.create_task(keep_pinging())
    try:
        closed = await silent.expect_close(timeout=5)
        assert closed.code == ErrorCode.HEARTBEAT_TIMEOUT
        assert time.monotonic() - started >= 3 * 0.4 - 0.05
        assert not pinger.done()
    finally:
        pinger.cancel()
    await lively.ping()
    assert room.rooms[0].gateway.stats.closes[ErrorCode.HEARTBEAT_TIMEOUT] == 1


async def test_heartbeat_shorter_than_the_auth_deadline_is_enforced(make_system) -> None:
    room = await make_system(
        rooms=1, center=False, heartbeat_s=0.4, heartbeat_min_s=0.1, auth_timeout_s=6
    )
    silent = await room.online("silent")
    # 3 heartbeats (1.2 s), plus the sweep period and the wheel resolution (1 s each).
    closed = await silent.expect_close(timeout=3.4)
    assert closed.code == ErrorCode.HEARTBEAT_TIMEOUT


async def test_heartbeat_asked_by_the_client_is_clamped(make_system) -> None:
    room = await make_system(rooms=1, center=False, heartbeat_max_s=60)
    client = await room.raw(0)
    reply = await client.auth("alice", room.token("alice"), hb=3000)
    assert reply["hb"] == 60


# -- the message model -----------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_ping_is_answered_before_and_after_auth(room: System, transport: str) -> None:
    client = await room.raw(0, transport)
    await client.ping()
    await client.auth("alice", room.token("alice"))
    await client.ping()


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_ack_before_auth_is_4003_and_not_fatal(room: System, transport: str) -> None:
    client = await room.raw(0, transport)
    client.send({"op": "ack", "ids": ["m1"]})
    error = await client.recv()
    assert error["op"] == "error"
    assert error["code"] == ErrorCode.NOT_AUTHENTICATED
    await client.auth("alice", room.token("alice"))
    await client.ping()


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_unknown_op_is_4004_and_not_fatal(room: System, transport: str) -> None:
    client = await room.raw(0, transport)
    client.send({"op": "subscribe", "room": "x"})
    error = await client.recv()
    assert (error["op"], error["code"]) == ("error", ErrorCode.UNKNOWN_OP)
    assert "subscribe" in error["reason"]
    await client.auth("alice", room.token("alice"))
    client.send({"op": "frobnicate"})
    assert (await client.recv())["code"] == ErrorCode.UNKNOWN_OP
    await client.ping()


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_wrong_field_type_is_4005_naming_the_field(room: System, transport: str) -> None:
    client = await room.raw(0, transport)
    client.send({"op": "auth", "product": "demo", "uid": 123, "token": room.token("123")})
    error = await client.recv()
    assert (error["op"], error["code"]) == ("error", ErrorCode.BAD_FIELD)
    assert "'uid'" in error["reason"]
    await client.auth("alice", room.token("alice"))
    client.send({"op": "ack", "ids": "m1"})
    error = await client.recv()
    assert error["code"] == ErrorCode.BAD_FIELD
    assert "'ids'" in error["reason"]
    await client.ping()


async def test_second_auth_is_refused_4012(room: System) -> None:
    client = await room.online("alice")
    client.send({"op": "auth", "product": "demo", "uid": "bob", "token": room.token("bob")})
    error = await client.recv()
    assert error["code"] == ErrorCode.ALREADY_AUTHENTICATED
    found = await room.register_client().lookup("demo", ["alice", "bob"])
    assert list(found) == ["alice"]


# -- outbound --------------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_priorities_leave_in_order_high_normal_low(room: System, transport: str) -> None:
    client = await room.online("alice", transport=transport)
    order = [("l1", "low"), ("n1", "normal"), ("h1", "high"), ("l2", "low"), ("h2", "high")]
    order.append(("n2", "normal"))
    items = [{"conns": [client.conn_id], "msg": push(i, pri)} for i, pri in order]
    reply = await room.room_rpc(0).call("push", {"items": items})
    assert reply == {"written": 6, "missing": []}
    received = [(await client.recv())["id"] for _ in order]
    assert received == ["h1", "h2", "n1", "n2", "l1", "l2"]


async def test_push_to_an_unknown_connection_is_reported_missing(room: System) -> None:
    client = await room.online("alice")
    items = [{"conns": [client.conn_id, "nosuch.1"], "msg": push("m1", body={"k": [1, 2]})}]
    reply = await room.room_rpc(0).call("push", {"items": items})
    assert reply == {"written": 1, "missing": ["nosuch.1"]}
    received = await client.recv()
    assert received == push("m1", body={"k": [1, 2]})


BIG = "x" * (32 * 1024)
FLOOD_BATCH = 6  # frames per RPC: one flush tick writes them all to a client that reads


class Reader:
    """Reads a raw client in the background and keeps the ids it receives."""

    def __init__(self, client: RawClient) -> None:
        self.client = client
        self.ids: list[str] = []
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            message = await self.client.recv(timeout=30)
            self.ids.append(message["id"])

    async def stop_after(self, last_id: str) -> list[str]:
        await eventually(lambda: last_id in self.ids or self.task.done(), timeout=10)
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        return self.ids


async def flood(room: System, slow: RawClient, others: list[RawClient]) -> tuple[list[str], int]:
    """Push 32 KiB high-priority frames to `slow` and `others`, at a pace a reading client
    keeps up with, until the room reports `slow` gone; the ids sent and the most frames
    ever queued in the room."""
    gateway = room.rooms[0].gateway
    rpc = room.room_rpc(0)
    conns = [slow.conn_id, *(c.conn_id for c in others)]
    sent: list[str] = []
    most_queued = 0
    for batch in range(400):
        ids = [f"b{batch}.{k}" for k in range(FLOOD_BATCH)]
        items = [{"conns": conns, "msg": push(i, body=BIG)} for i in ids]
        reply = await rpc.call("push", {"items": items})
        sent += ids
        most_queued = max(most_queued, gateway.queued())
        if slow.conn_id in reply["missing"]:
            return sent, most_queued
        await asyncio.sleep(0.01)
    raise AssertionError("the client that never reads was never closed")


async def test_slow_consumer_is_closed_4008_while_readers_keep_receiving(room: System) -> None:
    gateway = room.rooms[0].gateway
    cap = room.rooms[0].config.queue_cap
    slow = await room.online("slow")  # never reads until the end
    readers = []
    for i, transport in enumerate(TRANSPORTS):
        readers.append(Reader(await room.online(f"fast{i}", transport=transport)))
    rss_before = rss_bytes()
    sent, most_queued = await flood(room, slow, [r.client for r in readers])
    assert gateway.stats.closes[ErrorCode.SLOW_CONSUMER] == 1
    assert most_queued <= cap + FLOOD_BATCH * len(readers)  # one batch per reader in flight
    assert rss_bytes() - rss_before < 48 * 1024 * 1024
    for reader in readers:
        assert await reader.stop_after(sent[-1]) == sent
        await reader.client.ping()
    # The slow client finally reads: what the kernel held, then why it was closed.
    closed = await slow.expect_close(timeout=10)
    assert closed.code == ErrorCode.SLOW_CONSUMER
    assert "overflow" in closed.reason


async def test_slow_consumer_lets_go_of_its_frames_without_reading(room: System) -> None:
    gateway = room.rooms[0].gateway
    slow = await room.online("slow")  # never reads at all
    await flood(room, slow, [])
    assert gateway.stats.closes[ErrorCode.SLOW_CONSUMER] == 1
    await eventually(lambda: gateway.queued() == 0 and not gateway.all, timeout=3)


# -- HTTP on the WebSocket port and the register ---------------------------------------


async def test_healthz_and_metrics_on_the_ws_port(room: System) -> None:
    await room.online("alice")
    port = room.ws_port(0)
    status, headers, body = await http_get("127.0.0.1", port, "/healthz")
    assert status == 200
    assert headers["content-type"].startswith("application/json")
    health = orjson.loads(body)
    assert health == {
        "status": "ok",
        "instance": room.rooms[0].gateway.instance,
        "connections": 1,
    }
    status, headers, body = await http_get("127.0.0.1", port, "/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain")
    instance = room.rooms[0].gateway.instance
    text = body.decode()
    assert metric_value(text, "im_room_connections", instance=instance, state="online") == 1
    assert metric_value(text, "im_room_auth_ok_total", instance=instance) == 1
    status, _, body = await http_get("127.0.0.1", port, "/nosuch")
    assert status == 404
    assert orjson.loads(body)["error"]["code"] == "not_found"


@pytest.mark.parametrize("engine", ENGINES)
async def test_register_sees_sessions_while_connected(make_system, engine: str) -> None:
    room = await make_system(engine, rooms=1, center=False)
    register = room.register_client()
    instance = room.rooms[0].gateway.instance
    clients: list[RawClient] = [
        await room.online("alice", transport=transport) for transport in TRANSPORTS
    ]
    found = await register.lookup("demo", ["alice", "bob"])
    assert sorted(s.conn for s in found["alice"]) == sorted(c.conn_id for c in clients)
    assert {s.instance for s in found["alice"]} == {instance}
    assert "bob" not in found
    for client in clients:
        client.close()

    async def gone() -> bool:
        return await register.lookup("demo", ["alice"]) == {}

    await eventually(gone)
    nodes = await register.nodes()
    assert [n.instance for n in nodes] == [instance]

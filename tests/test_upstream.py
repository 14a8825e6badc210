"""room.upstream against a real room instance (its real connections, raw TCP clients) and a
real coordinator over RPC posting to a real webhook on 127.0.0.1."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
import pytest
from aiohttp import web
from prometheus_client import REGISTRY

from coordinator.config import CoordinatorConfig
from coordinator.server import CoordinatorServer
from im.config import DEV_PRODUCT, DEV_SECRET, Product
from im.protocol.errors import ErrorCode
from im.protocol.messages import validate_server
from room.connection import CLOSED, Connection
from room.upstream import MAX_PENDING, TokenBucket, Upstream
from tests.fixtures.system import RawClient, System, eventually


class Hook:
    """The business webhook: records each batch it is posted."""

    def __init__(self) -> None:
        self.url = ""
        self.batches: list[dict[str, Any]] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.batches.append(orjson.loads(await request.read()))
        return web.Response(status=204)

    def items(self, key: str) -> list[dict[str, Any]]:
        return [item for batch in self.batches for item in batch[key]]


@pytest.fixture
async def hook() -> AsyncIterator[Hook]:
    recorder = Hook()
    app = web.Application()
    app.router.add_post("/hook", recorder.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    recorder.url = f"http://127.0.0.1:{runner.addresses[0][1]}/hook"
    yield recorder
    await runner.cleanup()


@pytest.fixture
async def room(make_system) -> System:
    # The instance's own upstream (if the gateway has one) is off: these tests drive theirs.
    return await make_system(rooms=1, center=False, coordinator="")


MakeUpstream = Callable[..., Awaitable[Upstream]]


@pytest.fixture
async def make_upstream(room: System, hook: Hook) -> AsyncIterator[MakeUpstream]:
    """`await make_upstream(webhook=True, coordinator=None, up_rate=20, **coordinator_config)`:
    an Upstream of the room's gateway talking to a fresh coordinator (or to `coordinator`)."""
    closers: list[Callable[[], Awaitable[None]]] = []

    async def make(
        webhook: bool = True,
        coordinator: str | None = None,
        up_rate: float = 20.0,
        **overrides: Any,
    ) -> Upstream:
        if coordinator is None:
            product = Product(DEV_PRODUCT, DEV_SECRET, DEV_SECRET, hook.url if webhook else None)
            settings = {"port": 0, "metrics_port": 0, "batch_ms": 5.0, **overrides}
            config = CoordinatorConfig(**settings)
            server = CoordinatorServer(config, {DEV_PRODUCT: product})
            await server.start()
            closers.append(server.close)
            coordinator = server.rpc.address
        gateway = room.rooms[0].gateway
        config = dataclasses.replace(gateway.config, coordinator=coordinator, up_rate=up_rate)
        upstream = Upstream(config, gateway.encode_for)
        closers.insert(0, upstream.close)
        return upstream

    yield make
    for close in closers:
        await close()


async def online(room: System, uid: str) -> tuple[RawClient, Connection]:
    client = await room.online(uid)
    return client, room.rooms[0].gateway.conns[client.conn_id]


def up(seq: int, body: Any = None) -> dict[str, Any]:
    return {"op": "up", "seq": seq, "type": "chat", "body": {"n": seq} if body is None else body}


async def answers(client: RawClient, n: int) -> list[dict[str, Any]]:
    out = [await client.recv() for _ in range(n)]
    for message in out:
        assert validate_server(message) in ("up_ack", "error")
    return out


def refused(seq: int, code: ErrorCode) -> tuple[int, int]:
    return int(code), seq


def counted(outcome: str, family: str = "im_room_up_frames_total") -> float:
    return REGISTRY.get_sample_value(family, {"outcome": outcome}) or 0.0


async def test_accepted_frames_are_acked_in_order_and_reach_the_webhook(room, make_upstream, hook):
    upstream = await make_upstream()
    client, conn = await online(room, "alice")
    acked = counted("acked")
    for seq in range(3):
        upstream.up(conn, up(seq))
    assert await answers(client, 3) == [{"op": "up_ack", "seq": seq} for seq in range(3)]
    assert counted("acked") - acked == 3
    await eventually(lambda: len(hook.items("messages")) == 3)
    assert hook.batches[0]["product"] == DEV_PRODUCT
    assert [(m["uid"], m["conn"], m["seq"], m["body"]) for m in hook.items("messages")] == [
        ("alice", client.conn_id, seq, {"n": seq}) for seq in range(3)
    ]


async def test_over_the_rate_the_client_gets_4014_with_the_seq(room, make_upstream):
    upstream = await make_upstream(up_rate=5.0)  # bursts of 10
    client, conn = await online(room, "alice")
    other, other_conn = await online(room, "bob")
    for seq in range(13):
        upstream.up(conn, up(seq))
    upstream.up(other_conn, up(0))  # buckets are per connection
    got = await answers(client, 13)
    errors = [(m["code"], m["seq"]) for m in got if m["op"] == "error"]
    assert errors == [refused(seq, ErrorCode.UPSTREAM_RATE) for seq in (10, 11, 12)]
    assert sorted(m["seq"] for m in got if m["op"] == "up_ack") == list(range(10))
    assert await other.recv() == {"op": "up_ack", "seq": 0}
    await asyncio.sleep(0.25)  # 5 a second: one token back
    upstream.up(conn, up(13))
    assert await client.recv() == {"op": "up_ack", "seq": 13}


def test_token_bucket_refills_at_the_rate_up_to_the_burst():
    bucket = TokenBucket(burst=2.0, now=0.0)
    assert [bucket.take(1.0, 2.0, now=0.0) for _ in range(3)] == [True, True, False]
    assert bucket.take(1.0, 2.0, now=1.0)
    assert not bucket.take(1.0, 2.0, now=1.5)
    assert [bucket.take(1.0, 2.0, now=100.0) for _ in range(3)] == [True, True, False]


async def test_a_full_coordinator_backlog_is_4013_with_the_seq(room, make_upstream):
    upstream = await make_upstream(queue_cap=2, batch_ms=10_000.0)
    client, conn = await online(room, "alice")
    for seq in range(4):
        upstream.up(conn, up(seq))
    got = await answers(client, 4)
    assert [(m["op"], m["seq"]) for m in got] == [
        ("up_ack", 0),
        ("up_ack", 1),
        ("error", 2),
        ("error", 3),
    ]
    assert {m.get("code") for m in got[2:]} == {int(ErrorCode.UPSTREAM_BUSY)}
    assert "retry later" in got[2]["reason"]


async def test_a_product_without_webhook_and_an_unforwardable_body(room, make_upstream):
    upstream = await make_upstream(webhook=False)
    client, conn = await online(room, "alice")
    upstream.up(conn, up(1))
    message = await client.recv()
    assert (message["code"], message["seq"]) == refused(1, ErrorCode.UNKNOWN_OP)
    assert "not configured for this product" in message["reason"]
    upstream = await make_upstream()
    upstream.up(conn, up(2, body=b"\x00raw"))
    message = await client.recv()
    assert (message["code"], message["seq"]) == refused(2, ErrorCode.BAD_FIELD)
    assert "body" in message["reason"]


async def test_upstream_off_answers_not_configured(room, make_upstream):
    upstream = await make_upstream(coordinator="")
    client, conn = await online(room, "alice")
    upstream.online(conn)
    upstream.up(conn, up(4))
    message = await client.recv()
    assert (message["code"], message["seq"]) == refused(4, ErrorCode.UNKNOWN_OP)
    assert message["reason"] == "up: upstream is not configured"


async def test_coordinator_down_refuses_at_once_and_drops_events(
    room, make_upstream, unused_tcp_port
):
    upstream = await make_upstream(coordinator=f"127.0.0.1:{unused_tcp_port}")
    client, conn = await online(room, "alice")
    dropped = counted("dropped", "im_room_up_events_total")
    upstream.online(conn)
    for seq in range(3):
        upstream.up(conn, up(seq))
    got = await answers(client, 3)
    assert [(m["code"], m["seq"]) for m in got] == [
        refused(seq, ErrorCode.UPSTREAM_BUSY) for seq in range(3)
    ]
    assert got[0]["reason"] == "upstream unavailable, retry later"
    # Three attempts, 0.2 s then 0.4 s apart, then the event is dropped and counted.
    await eventually(lambda: counted("dropped", "im_room_up_events_total") - dropped == 1)
    assert room.rooms[0].gateway.conns[client.conn_id] is conn  # the client stays connected


async def test_events_reach_the_webhook_in_order(room, make_upstream, hook):
    upstream = await make_upstream()
    client, conn = await online(room, "alice")
    sent = counted("accepted", "im_room_up_events_total")
    _, never_online = await online(room, "bob")
    upstream.online(conn)
    upstream.offline(conn)
    upstream.offline(conn)  # the gateway may forget a connection twice
    upstream.offline(never_online)  # never announced online: no offline either
    await eventually(lambda: len(hook.items("events")) == 2)
    await asyncio.sleep(0.05)
    assert [(e["event"], e["uid"], e["conn"]) for e in hook.items("events")] == [
        ("online", "alice", client.conn_id),
        ("offline", "alice", client.conn_id),
    ]
    assert counted("accepted", "im_room_up_events_total") - sent == 2


async def test_an_up_from_a_connection_not_announced_announces_it(room, make_upstream, hook):
    upstream = await make_upstream()
    client, conn = await online(room, "alice")
    upstream.up(conn, up(1))
    assert await client.recv() == {"op": "up_ack", "seq": 1}
    upstream.offline(conn)
    await eventually(lambda: len(hook.items("events")) == 2)
    assert [e["event"] for e in hook.items("events")] == ["online", "offline"]


async def test_a_connection_gone_before_the_answer_gets_nothing(room, make_upstream):
    upstream = await make_upstream()
    _, conn = await online(room, "alice")
    other, other_conn = await online(room, "bob")
    upstream.up(conn, up(1))
    room.rooms[0].gateway.close(conn, ErrorCode.SERVER_SHUTDOWN, "test")
    upstream.offline(conn)
    upstream.up(other_conn, up(2))
    assert await other.recv() == {"op": "up_ack", "seq": 2}
    assert conn.state == CLOSED
    assert conn.queue is None  # nothing was queued for the closed connection


async def test_the_pending_backlog_is_bounded(room, make_upstream):
    upstream = await make_upstream(up_rate=1e6)
    client, conn = await online(room, "alice")
    for seq in range(MAX_PENDING + 3):  # all before the first flush tick
        upstream.up(conn, up(seq))
    first = [await client.recv() for _ in range(3)]  # refused at once, before any answer
    assert [(m["code"], m["seq"]) for m in first] == [
        refused(seq, ErrorCode.UPSTREAM_BUSY) for seq in range(MAX_PENDING, MAX_PENDING + 3)
    ]
    assert (await client.recv()) == {"op": "up_ack", "seq": 0}


async def test_closing_sends_the_last_events(room, make_upstream, hook):
    upstream = await make_upstream()
    client, conn = await online(room, "alice")
    upstream.online(conn)
    upstream.offline(conn)
    await upstream.close()  # before the flush tick: close sends them itself
    await eventually(lambda: len(hook.items("events")) == 2)
    assert [e["event"] for e in hook.items("events")] == ["online", "offline"]
    assert hook.items("events")[0]["conn"] == client.conn_id


async def test_closing_with_the_coordinator_down_is_quick(room, make_upstream, unused_tcp_port):
    upstream = await make_upstream(coordinator=f"127.0.0.1:{unused_tcp_port}")
    _, conn = await online(room, "alice")
    dropped = counted("dropped", "im_room_up_events_total")
    upstream.online(conn)
    await asyncio.sleep(0.05)  # the first try has failed: the sender waits to retry
    started = asyncio.get_running_loop().time()
    upstream.offline(conn)
    await upstream.close()
    assert asyncio.get_running_loop().time() - started < 0.3  # retrying would take > 0.5 s
    assert counted("dropped", "im_room_up_events_total") - dropped == 2

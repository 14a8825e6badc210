"""End to end, as a business server and its users see the system: HTTP to center, the SDK
to the room instances over TCP and both WebSocket encodings, on both register engines."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from im.sdk import Client, Message
from tests.fixtures.system import ENGINES, TRANSPORTS, System, eventually, metric_value

FAST = {"backoff_min": 0.02, "backoff_max": 0.1, "connect_timeout": 2.0}

Connect = Callable[..., Awaitable[Client]]


@pytest_asyncio.fixture
async def connect(make_system) -> AsyncIterator[Connect]:
    """`await connect(system, uid, transport="tcp", rooms=(0,), device="")`: an SDK client,
    online, closed at teardown (before the system stops)."""
    clients: list[Client] = []

    async def open_client(
        system: System,
        uid: str,
        transport: str = "tcp",
        rooms: tuple[int, ...] = (0,),
        device: str = "",
    ) -> Client:
        if transport == "tcp":
            addresses = [system.tcp_url(i) for i in rooms]
        else:
            addresses = [system.ws_url(i) for i in rooms]
        client = Client(
            addresses,
            product="demo",
            uid=uid,
            token=system.token(uid),
            device=device,
            encoding="json" if transport == "ws_json" else "msgpack",
            **FAST,
        )
        clients.append(client)
        await client.connect()
        return client

    yield open_client
    await asyncio.gather(*(client.close() for client in clients))


class Business:
    """A business server: pushes and session queries over center's HTTP API."""

    def __init__(self, http: aiohttp.ClientSession, system: System) -> None:
        self.http = http
        self.system = system
        self.auth = {"Authorization": f"Bearer {system.api_key}"}

    async def push(self, uids: list[str], **fields: Any) -> dict[str, Any]:
        document = {"uids": uids, "body": fields.pop("body", {"text": "hi"}), **fields}
        url = f"{self.system.center_url}/v1/push/users"
        async with self.http.post(url, json=document, headers=self.auth) as response:
            assert response.status == 200, await response.text()
            return await response.json()

    async def sessions(self, uid: str) -> list[dict[str, str]]:
        url = f"{self.system.center_url}/v1/users/{uid}/sessions"
        async with self.http.get(url, headers=self.auth) as response:
            assert response.status == 200, await response.text()
            document = await response.json()
        assert document["uid"] == uid
        return document["sessions"]


@pytest_asyncio.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


@pytest.fixture
def business(http: aiohttp.ClientSession, system: System) -> Business:
    return Business(http, system)


async def no_more(client: Client, wait: float = 0.2) -> bool:
    """True when nothing else arrives within `wait` seconds."""
    try:
        extra = await client.recv(timeout=wait)
    except TimeoutError:
        return True
    raise AssertionError(f"unexpected extra push {extra!r}")


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_push_reaches_an_online_user(
    system: System, business: Business, connect: Connect, transport: str
) -> None:
    client = await connect(system, "alice", transport)
    before_ms = int(time.time() * 1000)
    body = {"text": "你好", "n": 1, "nested": {"list": [1, 2.5, None, True]}}
    answer = await business.push(["alice"], type="gift", pri="high", body=body)
    assert answer["online"] == 1
    message = await client.recv(timeout=3)
    assert isinstance(message, Message)
    assert message.id == answer["id"]
    assert (message.type, message.pri, message.qos, message.body) == ("gift", "high", 0, body)
    assert before_ms - 5000 <= message.ts <= int(time.time() * 1000) + 1000
    assert await no_more(client)


async def test_two_devices_on_two_instances_both_receive(
    system: System, business: Business, connect: Connect
) -> None:
    phone = await connect(system, "alice", "tcp", rooms=(0,), device="phone")
    laptop = await connect(system, "alice", "ws_json", rooms=(1,), device="laptop")
    instances = {room.gateway.instance for room in system.rooms}
    assert {phone.conn_id.split(".")[0], laptop.conn_id.split(".")[0]} == instances
    answer = await business.push(["alice"], body="both")
    assert answer["online"] == 2
    for client in (phone, laptop):
        message = await client.recv(timeout=3)
        assert (message.id, message.body) == (answer["id"], "both")
    sessions = await business.sessions("alice")
    assert sorted((s["device"], s["conn"]) for s in sessions) == sorted(
        [("phone", phone.conn_id), ("laptop", laptop.conn_id)]
    )


async def test_offline_user_counts_zero(system: System, business: Business) -> None:
    answer = await business.push(["nobody"])
    assert answer["online"] == 0
    assert answer["id"]
    assert await business.sessions("nobody") == []


async def test_multicast_to_1000_with_50_online(
    system: System, business: Business, connect: Connect
) -> None:
    uids = [f"user{i:04d}" for i in range(1000)]
    online = uids[::20]
    assert len(online) == 50
    clients = await asyncio.gather(
        *(connect(system, uid, TRANSPORTS[i % 3], rooms=(i % 2,)) for i, uid in enumerate(online))
    )
    answer = await business.push(uids, type="notice", pri="low", body={"seq": 7})
    assert answer["online"] == 50
    received = await asyncio.gather(*(client.recv(timeout=5) for client in clients))
    assert {m.id for m in received} == {answer["id"]}
    assert all(m.body == {"seq": 7} for m in received)
    extras = await asyncio.gather(*(no_more(client) for client in clients))
    assert all(extras)


async def test_sessions_listed_then_gone_after_close(
    system: System, business: Business, connect: Connect
) -> None:
    client = await connect(system, "alice", "ws_msgpack", rooms=(1,), device="tablet")
    sessions = await business.sessions("alice")
    assert sessions == [
        {"conn": client.conn_id, "instance": system.rooms[1].gateway.instance, "device": "tablet"}
    ]
    await client.close()

    async def gone() -> bool:
        return await business.sessions("alice") == []

    await eventually(gone)
    assert (await business.push(["alice"]))["online"] == 0


async def test_stopped_instance_removes_its_sessions_and_pushes_go_on(
    system: System, business: Business, connect: Connect
) -> None:
    on_first = await connect(system, "alice", "tcp", rooms=(0,), device="a")
    on_second = await connect(system, "alice", "tcp", rooms=(1,), device="b")
    assert on_first.conn_id
    await system.stop_room(0)
    second = system.rooms[1].gateway.instance

    async def only_second() -> bool:
        return [s["instance"] for s in await business.sessions("alice")] == [second]

    # Sessions are 60 s leases here: only an explicit removal can make them go this fast.
    await eventually(only_second)
    answer = await business.push(["alice"], body="still here")
    assert answer["online"] == 1
    assert (await on_second.recv(timeout=3)).id == answer["id"]


@pytest.mark.parametrize("engine", ENGINES)
async def test_sessions_of_a_vanished_instance_expire(
    make_system, http: aiohttp.ClientSession, connect: Connect, engine: str
) -> None:
    system = await make_system(engine, session_ttl_s=1.0, node_ttl_s=1.0)
    business = Business(http, system)
    await connect(system, "alice", "tcp", rooms=(0,))
    survivor = await connect(system, "alice", "ws_json", rooms=(1,))
    vanished = system.rooms[0]
    await vanished.store.close()  # the instance loses the register, then dies uncleanly
    await system.stop_room(0)
    survivor_instance = system.rooms[1].gateway.instance

    async def expired() -> bool:
        return [s["instance"] for s in await business.sessions("alice")] == [survivor_instance]

    await eventually(expired, timeout=4)
    answer = await business.push(["alice"], body="after expiry")
    assert answer["online"] == 1
    assert (await survivor.recv(timeout=3)).body == "after expiry"


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_sdk_reconnects_to_the_second_instance(
    system: System, business: Business, connect: Connect, transport: str
) -> None:
    client = await connect(system, "alice", transport, rooms=(0, 1))
    first, second = (room.gateway.instance for room in system.rooms)
    assert client.conn_id.startswith(first + ".")
    await system.stop_room(0)
    await eventually(lambda: client.connected and client.conn_id.startswith(second + "."))

    async def delivered() -> bool:
        return (await business.push(["alice"], body="welcome back"))["online"] == 1

    await eventually(delivered)
    message = await client.recv(timeout=3)
    assert message.body == "welcome back"


async def test_qos1_push_is_acked_by_the_sdk(
    system: System, business: Business, connect: Connect
) -> None:
    client = await connect(system, "alice", "ws_json", rooms=(1,))
    instance = system.rooms[1].gateway.instance
    acks_before = metric_value(
        await system.room_metrics(1), "im_room_acks_total", instance=instance
    )
    answer = await business.push(["alice"], qos=1, body="keep me")
    message = await client.recv(timeout=3)
    assert (message.id, message.qos) == (answer["id"], 1)

    async def acked() -> bool:
        text = await system.room_metrics(1)
        return metric_value(text, "im_room_acks_total", instance=instance) == acks_before + 1

    await eventually(acked)

"""QoS 1 end to end, on the memory and the Redis engines: a business server calls center over
HTTP, clients (raw ones that ACK by hand, and the SDK) log in to two room instances, and the
saver keeps what was not ACKed. Covers storage before the answer, pending messages at login
before live ones, ACKs, flash reconnects to another instance, broadcasts stored once,
idempotency keys, delivery states, dead letters and push-pull notifies.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from im.config import DEV_PRODUCT
from im.sdk import Client
from saver.config import SaverConfig
from saver.engines.redis import RedisStore as RedisMessageStore
from saver.server import SaverServer
from tests.fixtures.business import BusinessApi
from tests.fixtures.system import ENGINES, RawClient, eventually

#: How long to listen for something that must not come.
QUIET = 0.3
PUSH_USERS = "/v1/push/users"


class Business(BusinessApi):
    async def push(self, uid: str, body: Any, **fields: Any) -> dict[str, Any]:
        return await self.ok("POST", PUSH_USERS, {"uids": [uid], "qos": 1, "body": body, **fields})


@pytest_asyncio.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def pushes(client: RawClient, count: int) -> list[dict[str, Any]]:
    got = []
    while len(got) < count:
        message = await client.recv()
        if message["op"] == "push":
            got.append(message)
    return got


async def silent(client: RawClient) -> None:
    """Nothing but pongs within QUIET."""
    with pytest.raises(TimeoutError):
        while True:
            message = await client.recv(QUIET)
            assert message["op"] != "push", message


def ack(client: RawClient, *messages: dict[str, Any]) -> None:
    client.send({"op": "ack", "ids": [m["id"] for m in messages]})


@pytest.mark.parametrize("engine", ENGINES)
async def test_offline_messages_come_at_login_in_order_then_live_ones(
    make_system, http, engine: str
) -> None:
    system = await make_system(engine)
    business = Business(http, system)
    stored = [await business.push("u1", {"n": n}) for n in range(3)]
    for answer in stored:
        assert (answer["recipients"], answer["stored"], answer["online"]) == (1, 1, 0)
        assert await business.states(answer["id"]) == {"u1": "stored"}

    client = await system.online("u1", 1)
    first = await pushes(client, 3)
    assert [m["id"] for m in first] == [a["id"] for a in stored]
    assert [m["body"] for m in first] == [{"n": 0}, {"n": 1}, {"n": 2}]
    live = await business.push("u1", {"n": 3})
    assert live["online"] == 1
    (fourth,) = await pushes(client, 1)
    assert fourth["id"] == live["id"]
    await eventually(lambda: _state_is(business, live["id"], "written"))

    ack(client, *first, fourth)
    for msg_id in [*[a["id"] for a in stored], live["id"]]:
        await eventually(lambda msg_id=msg_id: _state_is(business, msg_id, "acked"))
    status, answer = await business.call("GET", f"/v1/messages/{live['id']}")
    assert answer["recipients"] == 1 and answer["counts"]["acked"] == 1
    client.close()
    await silent(await system.online("u1", 0))  # acked: nothing is pending any more


async def _state_is(business: Business, msg_id: str, state: str) -> bool:
    return (await business.states(msg_id)).get("u1") == state


@pytest.mark.parametrize("engine", ENGINES)
async def test_an_idempotency_key_stores_once_and_answers_the_first_answer(
    make_system, http, engine: str
) -> None:
    system = await make_system(engine, rooms=1)
    business = Business(http, system)
    body = {"uids": ["u2"], "qos": 1, "body": {"order": 7}}
    key = {"Idempotency-Key": "order-7-paid"}
    status, first, headers = await business.request("POST", PUSH_USERS, body, headers=key)
    assert status == 200 and "Idempotent-Replayed" not in headers
    status, again, headers = await business.request("POST", PUSH_USERS, body, headers=key)
    assert (status, again, headers.get("Idempotent-Replayed")) == (200, first, "true")

    changed = {**body, "body": {"order": 8}}
    status, refused, _ = await business.request("POST", PUSH_USERS, changed, headers=key)
    assert status == 422 and refused["error"]["code"] == "idempotency_conflict"
    status, refused, _ = await business.request(
        "POST", PUSH_USERS, body, headers={"Idempotency-Key": " "}
    )
    assert status == 400 and "Idempotency-Key" in refused["error"]["message"]

    client = await system.online("u2")
    (only,) = await pushes(client, 1)
    assert only["id"] == first["id"]
    await silent(client)


@pytest.mark.parametrize("engine", ENGINES)
async def test_a_message_never_acked_is_dead_lettered_after_five_deliveries(
    make_system, http, engine: str
) -> None:
    system = await make_system(engine, rooms=1)
    business = Business(http, system)
    answer = await business.push("u3", {"x": 1})
    for _ in range(5):
        client = await system.online("u3")
        (again,) = await pushes(client, 1)
        assert again["id"] == answer["id"]
        client.close()
    await silent(await system.online("u3"))
    assert await business.states(answer["id"]) == {"u3": "dead_lettered"}


@pytest.mark.parametrize("engine", ENGINES)
async def test_a_flash_reconnect_to_another_instance_misses_and_repeats_nothing(
    make_system, http, engine: str
) -> None:
    system = await make_system(engine, rooms=2)
    business = Business(http, system)
    client = Client(
        [system.tcp_url(0), system.tcp_url(1)],
        product=DEV_PRODUCT,
        uid="u4",
        token=system.token("u4"),
        backoff_min=0.05,
        backoff_max=0.2,
    )
    await client.connect()
    total = 120

    async def business_side() -> None:
        for n in range(total):
            await business.push("u4", {"n": n})
            if n == total // 3:
                await system.stop_room(0)  # the client's instance goes away mid-stream
            await asyncio.sleep(0.01)

    sender = asyncio.create_task(business_side())
    seen = []
    try:
        async with asyncio.timeout(20):
            while len(seen) < total:
                seen.append((await client.recv()).body["n"])
        await sender
        with pytest.raises(TimeoutError):
            extra = await client.recv(QUIET)
            seen.append(extra.body["n"])
    finally:
        await client.close()
    assert seen == list(range(total))  # every one, once, in order


@pytest.mark.parametrize("engine", ENGINES)
async def test_a_qos1_broadcast_is_stored_once_and_reaches_later_logins_once(
    make_system, http, engine: str
) -> None:
    system = await make_system(engine)
    business = Business(http, system)
    early = await system.online("b1", 0)
    status, answer = await business.call(
        "POST", "/v1/push/broadcast", {"qos": 1, "body": {"notice": 1}, "spread_s": 0}
    )
    assert status == 200 and answer["stored"] == 1
    (live,) = await pushes(early, 1)
    assert live["id"] == answer["id"]
    ack(early, live)

    late = await system.online("b2", 1)  # logged in after the broadcast: gets it at login
    (stored,) = await pushes(late, 1)
    assert stored["id"] == answer["id"] and stored["body"] == {"notice": 1}
    ack(late, stored)
    await asyncio.sleep(0.2)  # the rooms flush ACKs every few milliseconds
    early.close()
    late.close()
    await silent(await system.online("b1", 1))
    await silent(await system.online("b2", 0))
    status, answer = await business.call("GET", f"/v1/messages/{answer['id']}")
    assert status == 404  # broadcasts keep no per-user states


@pytest.mark.parametrize("engine", ENGINES)
async def test_a_pull_notify_carries_the_key_and_no_body(make_system, http, engine: str) -> None:
    system = await make_system(engine, rooms=1)
    business = Business(http, system)
    client = await system.online("u5")
    answer = await business.push("u5", None, pull="orders/991")
    del answer
    status, refused = await business.call(
        "POST", PUSH_USERS, {"uids": ["u5"], "qos": 1, "pull": ""}
    )
    assert status == 400 and "'pull'" in refused["error"]["message"]
    (notify,) = await pushes(client, 1)
    assert notify["pull"] == "orders/991" and notify["body"] is None

    status, _ = await business.call("POST", PUSH_USERS, {"uids": ["u5"], "pull": "orders/992"})
    assert status == 200
    (bare,) = await pushes(client, 1)
    assert bare["pull"] == "orders/992" and "body" not in bare


async def test_without_the_saver_qos1_is_refused_and_qos0_still_flows(make_system, http) -> None:
    system = await make_system("memory", rooms=1)
    business = Business(http, system)
    await system.saver.close()
    client = await system.online("u6")  # login still works: nothing can be pending
    status, refused, headers = await business.request(
        "POST", PUSH_USERS, {"uids": ["u6"], "qos": 1, "body": 1}
    )
    assert status == 503 and refused["error"]["code"] == "unavailable"
    assert "saver" in refused["error"]["message"] and headers["Retry-After"] == "1"
    status, answer = await business.call("POST", PUSH_USERS, {"uids": ["u6"], "body": 2})
    assert status == 200 and answer["online"] == 1
    (live,) = await pushes(client, 1)
    assert live["body"] == 2


async def test_pending_messages_missed_while_the_saver_was_down_come_later(
    make_system, http, redis_url: str
) -> None:
    system = await make_system("redis", rooms=1, qos_resync_s=0.2)
    business = Business(http, system)
    answer = await business.push("u7", {"kept": True})
    host, port = system.saver_address.rsplit(":", 1)
    await system.saver.close()
    client = await system.online("u7")
    await silent(client)
    system.saver = SaverServer(
        SaverConfig(host=host, port=int(port), metrics_port=0), RedisMessageStore(redis_url)
    )
    await system.saver.start()
    (late,) = await pushes(client, 1)
    assert late["id"] == answer["id"]
    metrics = await system.room_metrics()
    assert "im_room_qos" in metrics


async def test_bad_message_ids_and_unknown_ones_are_clear_errors(make_system, http) -> None:
    system = await make_system("memory", rooms=1)
    business = Business(http, system)
    status, body = await business.call("GET", "/v1/messages/not-an-id")
    assert status == 400 and "'id'" in body["error"]["message"]
    qos0 = await Business(http, system).call("POST", PUSH_USERS, {"uids": ["u8"], "body": 0})
    status, body = await business.call("GET", f"/v1/messages/{qos0[1]['id']}")
    assert status == 404 and body["error"]["code"] == "not_found"
    status, body = await business.call("POST", PUSH_USERS, {"uids": ["u8"], "body": 0, "ttl": 60})
    assert status == 400 and "'ttl'" in body["error"]["message"]

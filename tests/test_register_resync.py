"""Register cold backup: a register that lost its data is refilled by the room instances at
once (they notice the changed epoch on their next node renewal), not at their next session
renewal; and the node row carries the load the dispatcher balances on."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from im.config import DEV_PRODUCT
from im.sdk import Client
from im.sessions import NodeRenewal
from tests.fixtures.redis_server import RedisServer
from tests.fixtures.system import MakeSystem, System, eventually, metric_value

FAST = {"backoff_min": 0.02, "backoff_max": 0.1, "connect_timeout": 2.0}
USERS = 6
# Node renewals every 0.2 s; session renewals every 20 s, far beyond the test, so only a
# resync can bring the sessions back in time.
ROOM = {"node_ttl_s": 0.6, "session_ttl_s": 60.0}


def test_conn_rate_is_accepts_per_second_between_renewals() -> None:
    renewal = NodeRenewal(accepted=10, now=100.0)
    assert renewal.conn_rate(10, 100.0) == 0.0  # no time has passed: nothing to divide by
    assert renewal.conn_rate(40, 102.0) == 15.0
    assert renewal.conn_rate(40, 105.0) == 0.0
    assert renewal.conn_rate(41, 105.5) == 2.0


def test_only_a_changed_known_epoch_means_lost_data() -> None:
    renewal = NodeRenewal(0, 0.0)
    assert not renewal.lost_data("a")  # the first epoch heard is no news
    assert not renewal.lost_data("a")
    assert not renewal.lost_data("")  # a register without epochs
    assert renewal.epoch == "a"
    assert renewal.lost_data("b")
    assert renewal.epoch == "b"
    assert not renewal.lost_data("b")


@pytest.fixture
async def clients() -> AsyncIterator[list[Client]]:
    made: list[Client] = []
    yield made
    await asyncio.gather(*(client.close() for client in made))


async def _online(system: System, clients: list[Client], uid: str) -> Client:
    client = Client(
        [system.tcp_url(0)], product=DEV_PRODUCT, uid=uid, token=system.token(uid), **FAST
    )
    clients.append(client)
    await client.connect()
    return client


async def _resyncs(system: System) -> float:
    instance = system.rooms[0].gateway.instance
    return metric_value(
        await system.room_metrics(0), "im_room_register_resyncs_total", instance=instance
    )


@pytest.mark.parametrize("loss", ["flushall", "restart"])
async def test_a_register_that_lost_its_data_is_refilled_at_once(
    make_system: MakeSystem, redis_server: RedisServer, clients: list[Client], loss: str
) -> None:
    system = await make_system("redis", rooms=1, center=False, **ROOM)
    uids = [f"u{i}" for i in range(USERS)]
    for uid in uids:
        await _online(system, clients, uid)
    await clients[0].join("lobby")
    register = system.register_client()
    instance = system.rooms[0].gateway.instance
    expected = {uid: {client.conn_id} for uid, client in zip(uids, clients, strict=True)}

    async def sessions() -> dict[str, set[str | None]]:
        found = await register.lookup(DEV_PRODUCT, uids)
        return {uid: {s.conn for s in rows} for uid, rows in found.items()}

    await eventually(lambda: register.room_instances(DEV_PRODUCT, "lobby"))
    assert await sessions() == expected
    await asyncio.sleep(0.5)  # a few node renewals with an unchanged epoch
    assert await _resyncs(system) == 0

    if loss == "flushall":
        redis_server.flushall()
    else:
        redis_server.restart()

    async def whole_again() -> bool:  # sessions first, then the room index
        rooms = await register.room_instances(DEV_PRODUCT, "lobby")
        return await sessions() == expected and rooms == {instance: 1}

    await eventually(whole_again, timeout=3.0)
    assert [node.instance for node in await register.nodes()] == [instance]
    assert await _resyncs(system) == 1
    assert system.rooms[0].gateway.stats.register_resyncs == 1


async def test_the_node_row_carries_the_load(
    make_system: MakeSystem, clients: list[Client]
) -> None:
    loop = asyncio.get_running_loop()
    before_start = loop.time()
    # A long node lease: the renewals after the start's are the ones this test makes.
    system = await make_system(
        "memory",
        rooms=1,
        center=False,
        node_ttl_s=60.0,
        isp="cmcc",
        max_conns=500,
        max_conn_rate=50.0,
    )
    gateway = system.rooms[0].gateway
    for i in range(3):
        await _online(system, clients, f"u{i}")
    register = system.register_client()

    await gateway.renew_node()
    at_most = loop.time() - before_start  # longer than the interval the rate is over
    (node,) = await register.nodes()
    assert (node.isp, node.max_conns, node.max_conn_rate) == ("cmcc", 500, 50.0)
    assert (node.conns, node.draining) == (3, False)
    assert node.conn_rate >= 3 / at_most

    gateway.accepting = False
    await gateway.renew_node()
    (node,) = await register.nodes()
    assert (node.conn_rate, node.draining) == (0.0, True)

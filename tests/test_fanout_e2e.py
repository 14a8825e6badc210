"""Room push, broadcast and the live switches end to end, on every engine: a business server
calls center over HTTP, clients (raw ones and the SDK) sit on two room instances, and the
jobs go through the bus (in-process, or Kafka on a real Tansu broker) and the fan-out
workers. Switches are changed with PUT /v1/admin/switches while the clients stay connected.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from im.config import DEV_ADMIN_KEY, DEV_PRODUCT, Product, dev_products
from im.sdk import Client
from room.fanout import shard_of
from tests.fixtures.business import BusinessApi
from tests.fixtures.system import (
    FANOUT_ENGINES,
    RawClient,
    System,
    at_second_start,
    eventually,
    metric_value,
)

#: The first job on Kafka waits for the workers to join their group.
WAIT = 15.0
#: How long to listen for something that must not come.
QUIET = 0.3
#: Room instances look for new switches this often here (center's feed polls every 0.5 s).
POLL_S = 0.1
#: Calls a burst has in flight at once (test_concurrent_pushes_are_all_accepted goes further).
BURST_CALLS = 50
#: The switches center's publisher and workers apply; rooms apply all the others.
CENTER_SWITCHES = {"room_pin", "shard_size"}
OTHER = Product("other", "other-secret-0123456789abcdef", "other-key")


class Business(BusinessApi):
    """Room pushes, bursts of them, room counts and the switches, as these tests use them."""

    async def push_room(self, room: str, **fields: Any) -> dict[str, Any]:
        return await self.ok("POST", f"/v1/push/rooms/{room}", {"body": None, **fields})

    async def burst(self, room: str, count: int, **fields: Any) -> list[str]:
        """`count` room pushes at once, BURST_CALLS at a time; their ids."""
        calls = asyncio.Semaphore(BURST_CALLS)

        async def one(n: int) -> str:
            async with calls:
                return (await self.push_room(room, **fields, body={"n": n}))["id"]

        return await asyncio.gather(*(one(n) for n in range(count)))

    async def room_info(self, room: str) -> dict[str, Any]:
        return await self.ok("GET", f"/v1/rooms/{room}")

    async def members(self, room: str, count: int) -> None:
        """Wait until the register counts `count` members in the room."""

        async def counted() -> bool:
            return (await self.room_info(room))["members"] == count

        await eventually(counted)

    async def switches(self) -> dict[str, Any]:
        return await self.ok("GET", "/v1/admin/switches", key=DEV_ADMIN_KEY)

    async def apply(self, **fields: Any) -> int:
        """PUT a whole document (defaults for what is not given) and wait until every room
        instance has it in force, and center and its workers too when it sets a switch they
        read."""
        answer = await self.ok("PUT", "/v1/admin/switches", fields, key=DEV_ADMIN_KEY)
        version = answer["version"]
        system = self.system
        assert system.center is not None
        feeds = [room.gateway.switches_feed for room in system.rooms]
        if fields.keys() & CENTER_SWITCHES:
            feeds.append(system.center.switches)
        await eventually(lambda: all(feed.version == version for feed in feeds))
        return version


@pytest.fixture(params=FANOUT_ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest_asyncio.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT)) as session:
        yield session


@pytest_asyncio.fixture
async def system(make_system, engine: str) -> System:
    return await make_system(engine, switches_poll_s=POLL_S)


@pytest.fixture
def business(http: aiohttp.ClientSession, system: System) -> Business:
    return Business(http, system)


async def member(system: System, uid: str, room: str, i: int, transport: str = "tcp") -> RawClient:
    client = await system.online(uid, i, transport)
    client.send({"op": "join", "room": room})
    answer = await client.recv()
    assert answer["op"] == "joined" and answer["room"] == room, answer
    return client


async def frames_until(client: RawClient, last_id: str) -> list[dict[str, Any]]:
    """Frames received up to and including the push `last_id`."""
    got = []
    while True:
        frame = await client.recv(WAIT)
        got.append(frame)
        if frame.get("op") == "push" and frame["id"] == last_id:
            return got


async def quiet(client: RawClient, wait: float = QUIET) -> list[dict[str, Any]]:
    """Whatever arrives within `wait` seconds."""
    got = []
    while True:
        try:
            got.append(await client.recv(wait))
        except TimeoutError:
            return got


async def silent(*clients: RawClient) -> bool:
    """True when none of the clients receives anything within QUIET seconds."""
    heard = await asyncio.gather(*(quiet(client) for client in clients))
    assert heard == [[]] * len(clients), heard
    return True


def pushes(frames: list[dict[str, Any]], **match: Any) -> list[dict[str, Any]]:
    """The pushes among frames, batch frames unpacked, that have the `match` fields."""
    flat = []
    for frame in frames:
        flat.extend(frame["msgs"] if frame.get("op") == "batch" else [frame])
    return [m for m in flat if m.get("op") == "push" and match.items() <= m.items()]


async def room_drops(system: System, i: int, room: str, reason: str, type_: str = "") -> float:
    labels = {"instance": system.rooms[i].gateway.instance, "room": room, "reason": reason}
    if type_:
        labels["type"] = type_
    return metric_value(await system.room_metrics(i), "im_room_room_drops_total", **labels)


# -- room push, broadcast, users ---------------------------------------------------------


async def test_room_push_reaches_members_on_both_instances_once(
    system: System, business: Business
) -> None:
    a = await member(system, "a", "live", 0, "tcp")
    b = await member(system, "b", "live", 1, "ws_msgpack")
    c = await member(system, "c", "live", 1, "ws_json")
    sdk = Client([system.ws_url(0)], product=DEV_PRODUCT, uid="d", token=system.token("d"))
    await sdk.connect()
    try:
        assert await sdk.join("live") >= 1
        outsiders = [await system.online("e", 0), await system.online("f", 1, "ws_json")]
        await business.members("live", 4)
        info = await business.room_info("live")
        instances = [room.gateway.instance for room in system.rooms]
        assert info == {
            "room": "live",
            "members": 4,
            "instances": {instances[0]: 2, instances[1]: 2},
        }

        answers = [await business.push_room("live", type="gift", body={"n": n}) for n in range(5)]
        assert [answer["members"] for answer in answers] == [4] * 5
        ids = [answer["id"] for answer in answers]
        for client in (a, b, c):
            got = await frames_until(client, ids[-1])
            assert [m["id"] for m in pushes(got)] == ids
            assert all(m["room"] == "live" and m["type"] == "gift" for m in pushes(got))
        received = [await sdk.recv(WAIT) for _ in ids]
        assert [m.id for m in received] == ids and {m.room for m in received} == {"live"}
        assert await silent(a, b, c, *outsiders)
        with pytest.raises(TimeoutError):
            await sdk.recv(0.05)

        a.send({"op": "leave", "room": "live"})
        assert await a.recv() == {"op": "left", "room": "live"}
        await business.members("live", 3)
        last = await business.push_room("live", body="after a left")
        assert last["members"] == 3
        assert pushes(await frames_until(b, last["id"]))
        assert await silent(a)
    finally:
        await sdk.close()


async def test_unknown_room_is_empty_and_its_push_accepted(business: Business) -> None:
    assert await business.room_info("nobody-here") == {
        "room": "nobody-here",
        "members": 0,
        "instances": {},
    }
    assert (await business.push_room("nobody-here"))["members"] == 0


async def test_broadcast_reaches_every_connection_of_the_product_once(
    make_system, http: aiohttp.ClientSession, engine: str
) -> None:
    system = await make_system(engine, products={**dev_products(), OTHER.name: OTHER})
    business = Business(http, system)
    clients = [
        await system.online("u1", 0, "tcp"),
        await system.online("u1", 1, "ws_msgpack"),
        await system.online("u2", 0, "ws_json"),
        await system.online("u3", 1, "tcp"),
    ]
    stranger = await system.raw(0)
    await stranger.auth("u1", system.token("u1", OTHER.name), product=OTHER.name)
    answer = await business.ok("POST", "/v1/push/broadcast", {"type": "notice", "body": "all"})
    assert answer["spread_s"] == 0
    for client in clients:
        got = await frames_until(client, answer["id"])
        assert [(m["id"], m["body"]) for m in pushes(got)] == [(answer["id"], "all")]
    assert await silent(*clients, stranger)


async def test_paced_broadcast_is_spread_over_its_window(
    system: System, business: Business
) -> None:
    clients = [await system.online(f"p{n}", n % 2) for n in range(10)]
    loop = asyncio.get_running_loop()

    async def arrival(client: RawClient) -> float:
        frame = await client.recv(WAIT)
        assert frame["op"] == "push" and frame["body"] == "paced"
        return loop.time()

    waiting = [asyncio.ensure_future(arrival(client)) for client in clients]
    answer = await business.ok("POST", "/v1/push/broadcast", {"body": "paced", "spread_s": 1})
    assert answer["spread_s"] == 1
    times = sorted(await asyncio.gather(*waiting))
    first = times[0]
    # Five connections per instance in slices 0.2 s apart: arrivals cover about 0.8 s.
    assert 0.6 <= times[-1] - first <= 1.5, times
    assert sum(t - first < 0.3 for t in times) <= 6, times
    assert await silent(*clients)


async def test_users_pushes_go_through_the_bus(system: System, business: Business) -> None:
    phone = await system.online("alice", 0, "tcp")
    laptop = await system.online("alice", 1, "ws_json")
    bob = await system.online("bob", 1, "ws_msgpack")
    carol = await system.online("carol", 0)
    ids = []
    for n in range(5):
        answer = await business.ok("POST", "/v1/push/users", {"uids": ["alice"], "body": n})
        assert answer["online"] == 2
        ids.append(answer["id"])
    multi = await business.ok(
        "POST", "/v1/push/users", {"uids": ["alice", "bob", "ghost"], "body": "m"}
    )
    assert multi["online"] == 3
    for client in (phone, laptop):
        got: list[dict[str, Any]] = []
        while len(pushes(got)) < 6:
            got.append(await client.recv(WAIT))
        # One user's pushes keep their order; the multicast is keyed apart from them.
        assert [m["id"] for m in pushes(got) if m["id"] != multi["id"]] == ids
        assert [m["id"] for m in pushes(got)].count(multi["id"]) == 1
    assert [m["id"] for m in pushes(await frames_until(bob, multi["id"]))] == [multi["id"]]
    assert await silent(phone, laptop, bob, carol)


@pytest.mark.parametrize(
    "engine",
    [
        "memory",
        "redis",
        "kafka",
    ],
)
async def test_concurrent_pushes_are_all_accepted(make_system, engine: str) -> None:
    """A business server may well have hundreds of pushes in flight; a healthy register
    must not turn them away."""
    system = await make_system(engine)
    headers = {"Authorization": f"Bearer {system.api_key}"}
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), headers=headers
    ) as http:

        async def push(n: int) -> int:
            url = f"{system.center_url}/v1/push/rooms/busy"
            async with http.post(url, json={"body": n}) as response:
                return response.status

        statuses = await asyncio.gather(*(push(n) for n in range(300)))
    assert statuses == [200] * 300


# -- live switches -------------------------------------------------------------------------


async def test_big_rooms_and_room_budget(system: System, business: Business) -> None:
    clients = [await member(system, "a", "stage", 0), await member(system, "b", "stage", 1)]
    await business.apply(room_budget=3)  # the room is not big yet: no budget applies
    ids = await business.burst("stage", 8)
    last = (await business.push_room("stage", pri="high", body="end"))["id"]
    for client in clients:
        assert {m["id"] for m in pushes(await frames_until(client, last))} == {*ids, last}

    await business.apply(big_rooms=["stage"], room_budget=3)
    await at_second_start()
    ids = await business.burst("stage", 8)
    last = (await business.push_room("stage", pri="high", body="end"))["id"]
    for i, client in enumerate(clients):
        got = pushes(await frames_until(client, last), pri="normal")
        assert set(m["id"] for m in got) <= set(ids)
        assert 3 <= len(got) <= 6  # 3 a second, the burst within one or two seconds
        assert await room_drops(system, i, "stage", "room_budget") == len(ids) - len(got)


async def test_size_thresholds_make_a_growing_room_big(system: System, business: Business) -> None:
    await business.apply(size_thresholds=[4, 10, 20], common_msg={"1": ["enter"]})
    clients = [
        await member(system, "a", "grow", 0),
        await member(system, "b", "grow", 0),
        await member(system, "c", "grow", 1),
    ]
    await business.members("grow", 3)
    enter = (await business.push_room("grow", type="enter"))["id"]
    last = (await business.push_room("grow", body="end"))["id"]
    for client in clients:
        assert [m["id"] for m in pushes(await frames_until(client, last))] == [enter, last]

    clients.append(await member(system, "d", "grow", 1))
    await business.members("grow", 4)
    await business.push_room("grow", type="enter")
    last = (await business.push_room("grow", body="end"))["id"]
    for client in clients:
        assert [m["id"] for m in pushes(await frames_until(client, last))] == [last]
    for i in (0, 1):
        assert await room_drops(system, i, "grow", "common_msg", "enter") == 1


async def test_common_msg_drops_types_by_size_level(system: System, business: Business) -> None:
    clients = [await member(system, "a", "c1", 0), await member(system, "b", "c1", 1)]
    await business.apply(big_rooms=["c1"])
    sent = [(await business.push_room("c1", type=t))["id"] for t in ("enter", "level_up", "chat")]
    for client in clients:
        assert [m["id"] for m in pushes(await frames_until(client, sent[-1]))] == sent

    # Level 1 drops "enter"; "level_up" is listed for level 2 only, so it still goes.
    await business.apply(big_rooms=["c1"], common_msg={"1": ["enter"], "2": ["level_up"]})
    sent = [(await business.push_room("c1", type=t))["id"] for t in ("enter", "level_up", "chat")]
    for i, client in enumerate(clients):
        assert [m["id"] for m in pushes(await frames_until(client, sent[-1]))] == sent[1:]
        assert await room_drops(system, i, "c1", "common_msg", "enter") == 1


async def test_msg_type_ratio_splits_the_budget(system: System, business: Business) -> None:
    clients = [await member(system, "a", "ra", 0), await member(system, "b", "ra", 1)]
    for client in clients:
        client.send({"op": "join", "room": "rb"})
        assert (await client.recv())["op"] == "joined"

    async def burst(room: str) -> list[list[dict[str, Any]]]:
        await at_second_start()
        answers = await asyncio.gather(
            *(business.push_room(room, type=("chat", "enter")[n % 2], body=n) for n in range(12))
        )
        assert len(answers) == 12
        last = (await business.push_room(room, pri="high", type="gift"))["id"]
        return [pushes(await frames_until(client, last), pri="normal") for client in clients]

    # One pool of 10 a second: no type is held to a share.
    await business.apply(big_rooms=["ra", "rb"], room_budget=10)
    await burst("ra")
    for i in (0, 1):
        assert await room_drops(system, i, "ra", "type_share") == 0

    # chat owns 2 of the 10 a second, enter 8; in a room's first second nothing is lent.
    await business.apply(
        big_rooms=["ra", "rb"], room_budget=10, msg_type_ratio={"chat": 20, "enter": 80}
    )
    for i, got in enumerate(await burst("rb")):
        chats = [m for m in got if m["type"] == "chat"]
        assert len([m for m in got if m["type"] == "enter"]) == 6
        assert len(chats) < 6
        dropped = await room_drops(system, i, "rb", "type_share", "chat")
        assert dropped > 0 and dropped + len(chats) == 6


async def test_merge_likes(system: System, business: Business) -> None:
    clients = [await member(system, "a", "likes", 0), await member(system, "b", "likes", 1)]
    await business.apply(big_rooms=["likes"])
    ids = await business.burst("likes", 4, type="like", pri="low")
    last = (await business.push_room("likes", pri="high", body="end"))["id"]
    for client in clients:
        assert {m["id"] for m in pushes(await frames_until(client, last), type="like")} == set(ids)

    await business.apply(big_rooms=["likes"], merge_likes=True)
    await business.burst("likes", 10, type="like", pri="low")
    for client in clients:
        merged: list[dict[str, Any]] = []

        async def counted(client: RawClient = client, merged: list = merged) -> bool:
            merged.extend(pushes(await quiet(client, 0.1), type="like"))
            return sum(m["body"]["count"] for m in merged) >= 10

        await eventually(counted, timeout=WAIT)
        assert all(m["body"]["merged"] and m["room"] == "likes" for m in merged)
        assert sum(m["body"]["msgs"] for m in merged) == 10
        assert 1 <= len(merged) <= 3  # one a second per instance


async def test_compress_complex_packs_low_pushes_in_batch_frames(
    system: System, business: Business
) -> None:
    raw = await member(system, "a", "cc", 0)
    sdk = Client([system.tcp_url(1)], product=DEV_PRODUCT, uid="b", token=system.token("b"))
    await sdk.connect()
    try:
        await sdk.join("cc")
        await business.members("cc", 2)
        await business.apply(big_rooms=["cc"])
        plain = await business.burst("cc", 4, pri="low")
        frames: list[dict[str, Any]] = []
        while len(pushes(frames)) < 4:
            frames.append(await raw.recv(WAIT))
        assert [f["op"] for f in frames] == ["push"] * 4

        await business.apply(big_rooms=["cc"], compress_complex=True)
        packed = await business.burst("cc", 4, pri="low")
        high = (await business.push_room("cc", pri="high", type="gift"))["id"]
        frames = []
        while len(pushes(frames)) < 5:
            frames.append(await raw.recv(WAIT))
        batches = [f for f in frames if f["op"] == "batch"]
        assert 1 <= len(batches) < 4
        assert sorted(m["id"] for m in pushes(batches)) == sorted(packed)
        assert [f["id"] for f in frames if f["op"] == "push"] == [high]  # high is never packed
        assert await silent(raw)

        got = [await sdk.recv(WAIT) for _ in range(9)]  # the SDK unpacks batch frames
        assert sorted(m.id for m in got) == sorted([*plain, *packed, high])
        with pytest.raises(TimeoutError):
            await sdk.recv(QUIET)
    finally:
        await sdk.close()


async def sharded_room(system: System, business: Business) -> dict[int, dict[str, RawClient]]:
    """Four members of "show" in two sub-rooms of at most 2, each sub-room on both instances."""
    by_shard: dict[int, dict[str, RawClient]] = {0: {}, 1: {}}
    for n in range(40):
        uid = f"viewer{n}"
        shard = by_shard[shard_of(uid, 2)]
        if len(shard) < 2:
            shard[uid] = await member(system, uid, "show", len(shard))
    await business.members("show", 4)
    return by_shard


async def reached(business: Business, clients: dict[str, RawClient], **fields: Any) -> set[str]:
    """The uids a push to "show" reaches."""
    push_id = (await business.push_room("show", **fields))["id"]
    end = (await business.push_room("show", pri="high", body="end"))["id"]
    got = set()
    for uid, client in clients.items():
        if push_id in {m["id"] for m in pushes(await frames_until(client, end))}:
            got.add(uid)
    return got


async def test_shard_size_keeps_audience_chat_in_its_sub_room(
    system: System, business: Business
) -> None:
    by_shard = await sharded_room(system, business)
    clients = {**by_shard[0], **by_shard[1]}
    sender, other = next(iter(by_shard[1])), next(iter(by_shard[0]))
    assert await reached(business, clients, type="chat", **{"from": sender}) == set(clients)
    await business.apply(shard_size=2)
    assert await reached(business, clients, type="chat", **{"from": sender}) == set(by_shard[1])
    assert await reached(business, clients, type="chat", **{"from": other}) == set(by_shard[0])
    assert await reached(business, clients, type="chat") == set(clients)  # the host's chat


async def test_high_priority_from_the_audience_reaches_every_shard(
    system: System, business: Business
) -> None:
    """docs/OPERATIONS.md: high priority goes to "every shard", a gift sent by a viewer too."""
    by_shard = await sharded_room(system, business)
    clients = {**by_shard[0], **by_shard[1]}
    await business.apply(shard_size=2)
    sender = next(iter(by_shard[1]))
    gift = {"type": "gift", "pri": "high", "from": sender}
    assert await reached(business, clients, **gift) == set(clients)


async def test_room_pin_sends_a_room_through_the_named_worker(
    make_system, http: aiohttp.ClientSession, engine: str
) -> None:
    system = await make_system(engine, workers=2, switches_poll_s=POLL_S)
    business = Business(http, system)
    assert system.center is not None
    w0, w1 = system.center.workers
    assert (w0.name, w1.name) == ("w0", "w1")
    clients = [await member(system, "a", "hot", 0), await member(system, "b", "hot", 1)]
    for client in clients:
        client.send({"op": "join", "room": "cold"})
        assert (await client.recv())["op"] == "joined"
    await business.apply(room_pin={"hot": "w1"})
    hot = [(await business.push_room("hot", body=n))["id"] for n in range(5)]
    cold = [(await business.push_room("cold", body=n))["id"] for n in range(5)]
    for client in clients:
        got = await frames_until(client, hot[-1])
        while len(pushes(got)) < 10:
            got.append(await client.recv(WAIT))
        assert [m["id"] for m in pushes(got, room="hot")] == hot
        assert [m["id"] for m in pushes(got, room="cold")] == cold
    assert all(w1.ledger.finished(i) and not w0.ledger.finished(i) for i in hot)
    assert all(w0.ledger.finished(i) or w1.ledger.finished(i) for i in cold)


async def test_idc_budget_and_float_range(system: System, business: Business) -> None:
    viewer = await member(system, "a", "far", 0)
    for room in system.rooms:
        await room.gateway.refresh_idc()
        assert room.gateway.rooms.instances_in_idc == 2
    # 100 deliveries a second for the IDC: 50 for each of its two instances.
    switches = {"big_rooms": ["far"], "room_budget": 1000, "idc_budget": {"default": 100}}

    async def delivered_in_one_second() -> int:
        await at_second_start()
        await business.burst("far", 110)
        last = (await business.push_room("far", pri="high", type="gift"))["id"]
        got = await frames_until(viewer, last)
        return len(pushes(got, pri="normal"))

    await business.apply(**switches, float_range=0)
    assert await delivered_in_one_second() == 50
    assert await room_drops(system, 0, "far", "idc_budget") == 60

    # Each second the limit is drawn again from [0, 100]: 50 exactly twice in a row is rare.
    await business.apply(**switches, float_range=1)
    counts = [await delivered_in_one_second() for _ in range(2)]
    assert all(0 <= count <= 100 for count in counts)
    assert counts != [50, 50]


async def test_a_bad_switch_value_is_refused_and_the_old_ones_stay(
    system: System, business: Business
) -> None:
    clients = [await member(system, "a", "keep", 0), await member(system, "b", "keep", 1)]
    version = await business.apply(big_rooms=["keep"], common_msg={"1": ["enter"]})
    before = await business.switches()
    for bad, field in [
        ({"msg_type_ratio": {"chat": 150}}, "msg_type_ratio.chat"),
        ({"size_thresholds": [10, 5, 20]}, "size_thresholds"),
        ({"room_budget": -1}, "room_budget"),
        ({"float_range": 2}, "float_range"),
        ({"roombudget": 5}, "roombudget"),
    ]:
        status, answer = await business.call("PUT", "/v1/admin/switches", bad, key=DEV_ADMIN_KEY)
        assert status == 400, answer
        assert answer["error"]["code"] == "invalid_switch"
        assert answer["error"]["field"] == field and field in answer["error"]["message"]
    assert await business.switches() == before and before["version"] == version
    await asyncio.sleep(3 * POLL_S)
    await business.push_room("keep", type="enter")
    last = (await business.push_room("keep", body="end"))["id"]
    for client in clients:
        assert [m["id"] for m in pushes(await frames_until(client, last))] == [last]


async def test_a_business_key_cannot_touch_the_switches(business: Business) -> None:
    before = await business.switches()
    for method, body in (("GET", None), ("PUT", {"room_budget": 1})):
        status, answer = await business.call(method, "/v1/admin/switches", body)
        assert (status, answer["error"]["code"]) == (403, "forbidden")
        status, answer = await business.call(method, "/v1/admin/switches", body, key="")
        assert (status, answer["error"]["code"]) == (401, "unauthorized")
    assert await business.switches() == before

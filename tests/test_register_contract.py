"""One contract for every SessionStore engine, plus what only the Redis layout promises."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import msgpack
import pytest
import redis.asyncio as aioredis

from im.register_client import RegisterClient
from im.rpc import RpcClient, RpcError
from im.sessions import MAX_TOP_ROOMS, Node, RoomLoad, Session, SessionStore
from register.config import RegisterConfig
from register.engines.memory import MemoryStore
from register.engines.redis import RedisStore
from register.server import RegisterServer


@asynccontextmanager
async def _memory(request: pytest.FixtureRequest) -> AsyncIterator[SessionStore]:
    store = MemoryStore()
    yield store
    await store.close()


@asynccontextmanager
async def _redis(request: pytest.FixtureRequest) -> AsyncIterator[SessionStore]:
    store = RedisStore(request.getfixturevalue("redis_url"))
    yield store
    await store.close()


@asynccontextmanager
async def _rpc(request: pytest.FixtureRequest) -> AsyncIterator[SessionStore]:
    """The register service itself: RegisterClient -> RPC -> RegisterServer -> memory."""
    server = RegisterServer(RegisterConfig(port=0, metrics_port=0), MemoryStore())
    await server.start()
    client = RegisterClient(server.rpc.address)
    yield client
    await client.close()
    await server.close()


# One entry per engine: each opens a fresh, empty store and cleans up after it.
ENGINES: dict[str, Callable[[pytest.FixtureRequest], AbstractAsyncContextManager[SessionStore]]]
ENGINES = {"memory": _memory, "redis": _redis, "rpc": _rpc}

TTL = 30.0


@pytest.fixture(params=list(ENGINES))
async def store(request: pytest.FixtureRequest) -> AsyncIterator[SessionStore]:
    async with ENGINES[request.param](request) as opened:
        yield opened


def _conns(found: dict[str, list[Session]], uid: str) -> set[str]:
    return {s.conn for s in found.get(uid, [])}


async def test_put_then_lookup(store: SessionStore) -> None:
    session = Session("chat", "u1", "c1", "room-1", "ios")
    await store.put_sessions([session], TTL)
    assert await store.lookup("chat", ["u1"]) == {"u1": [session]}


async def test_several_conns_and_devices_per_user(store: SessionStore) -> None:
    sessions = [
        Session("chat", "u1", "c1", "room-1", "ios"),
        Session("chat", "u1", "c2", "room-2", "android"),
        Session("chat", "u1", "c3", "room-1", "web"),
    ]
    await store.put_sessions(sessions, TTL)
    found = await store.lookup("chat", ["u1"])
    assert sorted(found["u1"], key=lambda s: s.conn) == sessions


async def test_lookup_many_uids_leaves_out_unknown_ones(store: SessionStore) -> None:
    sessions = [Session("chat", f"u{i}", f"c{i}", f"room-{i % 4}", "") for i in range(1000)]
    await store.put_sessions(sessions, TTL)
    uids = [f"u{i}" for i in range(2000)]
    found = await store.lookup("chat", uids)
    assert len(found) == 1000
    assert all(found[s.uid] == [s] for s in sessions)
    assert "u1000" not in found


async def test_lookup_of_nothing(store: SessionStore) -> None:
    assert await store.lookup("chat", []) == {}
    assert await store.lookup("chat", ["nobody", "nobody"]) == {}


async def test_remove_only_the_named_conn(store: SessionStore) -> None:
    keep = Session("chat", "u1", "c1", "room-1", "ios")
    drop = Session("chat", "u1", "c2", "room-1", "web")
    other = Session("chat", "u2", "c2", "room-1", "web")
    await store.put_sessions([keep, drop, other], TTL)
    await store.remove_sessions([drop, Session("chat", "u3", "c9", "room-1")])
    found = await store.lookup("chat", ["u1", "u2"])
    assert found == {"u1": [keep], "u2": [other]}
    await store.remove_sessions([keep])
    assert await store.lookup("chat", ["u1"]) == {}


async def test_renew_extends_the_lease(store: SessionStore) -> None:
    renewed = Session("chat", "u1", "c1", "room-1")
    lapsed = Session("chat", "u1", "c2", "room-1")
    await store.put_sessions([renewed, lapsed], 0.4)
    await asyncio.sleep(0.25)
    await store.put_sessions([renewed], 0.4)
    await asyncio.sleep(0.25)
    assert await store.lookup("chat", ["u1"]) == {"u1": [renewed]}


async def test_expired_sessions_and_nodes_are_invisible(store: SessionStore) -> None:
    await store.put_sessions([Session("chat", "u1", "c1", "room-1")], 0.2)
    await store.put_node(Node("room-1", "127.0.0.1:7001"), 0.2)
    assert _conns(await store.lookup("chat", ["u1"]), "u1") == {"c1"}
    assert [n.instance for n in await store.nodes()] == ["room-1"]
    await asyncio.sleep(0.3)
    assert await store.lookup("chat", ["u1"]) == {}
    assert await store.nodes() == []


async def test_products_are_separate(store: SessionStore) -> None:
    chat = Session("chat", "u1", "c1", "room-1")
    live = Session("live", "u1", "c2", "room-2")
    await store.put_sessions([chat, live], TTL)
    assert await store.lookup("chat", ["u1"]) == {"u1": [chat]}
    assert await store.lookup("live", ["u1"]) == {"u1": [live]}
    assert await store.lookup("shop", ["u1"]) == {}


async def test_node_table(store: SessionStore) -> None:
    one = Node("room-1", "127.0.0.1:7001", "ws://127.0.0.1:8001/ws", "127.0.0.1:9001", "bj", 3)
    two = Node("room-2", "127.0.0.1:7002", idc="sh")
    await store.put_node(one, TTL)
    await store.put_node(two, 0.3)
    assert sorted(await store.nodes(), key=lambda n: n.instance) == [one, two]

    busier = Node("room-1", one.rpc, one.ws, one.tcp, one.idc, 250)
    await store.put_node(busier, TTL)
    await store.put_node(two, TTL)  # renewal outlives the first 0.3 s lease
    await asyncio.sleep(0.35)
    assert sorted(await store.nodes(), key=lambda n: n.instance) == [busier, two]

    await store.remove_node("room-1")
    await store.remove_node("room-9")
    assert await store.nodes() == [two]


LOADED = Node(
    "room-1",
    "127.0.0.1:7001",
    "ws://127.0.0.1:8001/ws",
    "127.0.0.1:9001",
    "bj",
    conns=120,
    isp="cmcc",
    max_conns=5000,
    conn_rate=12.5,
    max_conn_rate=200.0,
    draining=True,
)


async def test_node_load_fields_are_kept(store: SessionStore) -> None:
    idle = Node("room-2", "127.0.0.1:7002", isp="unicom", max_conns=10)
    await store.put_node(LOADED, TTL)
    await store.put_node(idle, TTL)
    assert sorted(await store.nodes(), key=lambda n: n.instance) == [LOADED, idle]
    undrained = Node(*LOADED.to_wire()[:-1], draining=False)
    await store.put_node(undrained, TTL)
    assert sorted(await store.nodes(), key=lambda n: n.instance) == [undrained, idle]


async def test_epoch_stays_while_the_store_keeps_its_data(store: SessionStore) -> None:
    epoch = await store.put_node(Node("room-1", "127.0.0.1:7001"), TTL)
    assert isinstance(epoch, str) and len(epoch) >= 8
    await store.put_sessions([Session("chat", "u1", "c1", "room-1")], TTL)
    assert await store.put_node(Node("room-2", "127.0.0.1:7002"), TTL) == epoch
    await store.remove_node("room-1")
    await store.remove_node("room-2")
    assert await store.put_node(Node("room-1", "127.0.0.1:7001", conns=5), TTL) == epoch


async def test_a_new_memory_store_has_a_new_epoch() -> None:
    first, second = MemoryStore(), MemoryStore()
    node = Node("room-1", "127.0.0.1:7001")
    assert await first.put_node(node, TTL) != await second.put_node(node, TTL)
    await first.close()
    await second.close()


def test_node_wire_round_trip() -> None:
    assert Node.from_wire(LOADED.to_wire()) == LOADED
    assert Node.from_wire(Node("room-2", "127.0.0.1:7002").to_wire()) == Node(
        "room-2", "127.0.0.1:7002"
    )


def test_node_wire_reads_old_rows_text_numbers_and_newer_rows() -> None:
    old = ["room-1", "127.0.0.1:7001", "ws://h:1/ws", "h:2", "bj", 7]
    assert Node.from_wire(old) == Node("room-1", "127.0.0.1:7001", "ws://h:1/ws", "h:2", "bj", 7)
    text = ["room-1", "r:1", "", "", "bj", "7", "cmcc", "100", "2.5", "0.0", "1"]
    assert Node.from_wire(text) == Node(
        "room-1", "r:1", idc="bj", conns=7, isp="cmcc", max_conns=100, conn_rate=2.5, draining=True
    )
    assert Node.from_wire([*LOADED.to_wire(), "a field of a later version"]) == LOADED


@pytest.mark.parametrize(
    ("row", "mentions"),
    [
        (["room-1", "r:1", "", "", "bj"], "6 or at least 11 fields"),
        (["room-1", "r:1", "", "", "bj", 1, "cmcc"], "6 or at least 11 fields"),
        (["room-1", "r:1", "", "", "bj", -1], "conns"),
        (["room-1", "r:1", "", "", "bj", 1, "", -5, 0.0, 0.0, False], "max_conns"),
        (["room-1", "r:1", "", "", "bj", 1, "", 0, float("nan"), 0.0, False], "conn_rate"),
        (["room-1", "r:1", "", "", "bj", 1, "", 0, 0.0, float("inf"), False], "max_conn_rate"),
        (["room-1", "r:1", "", "", "bj", 1, "", 0, 0.0, 0.0, "yes"], "draining"),
        (["room-1", 7001, "", "", "bj", 1], "rpc"),
        (["room-1", "r:1", "", "", "bj", 1, None, 0, 0.0, 0.0, False], "isp"),
        (["room-1", "r:1", "", "", "bj", "many"], "invalid literal"),
    ],
)
def test_bad_node_rows_are_refused(row: list, mentions: str) -> None:
    with pytest.raises(ValueError, match=mentions):
        Node.from_wire(row)


async def test_register_server_answers_bad_node_rows_with_bad_request() -> None:
    server = RegisterServer(RegisterConfig(port=0, metrics_port=0), MemoryStore())
    await server.start()
    client = RpcClient(server.rpc.address)
    try:
        old = ["room-old", "127.0.0.1:7001", "", "", "bj", 3]
        epoch = await client.call("nodes.put", [old, TTL])
        assert isinstance(epoch, str) and epoch
        assert await client.call("nodes.list") == [
            ["room-old", "127.0.0.1:7001", "", "", "bj", 3, "", 0, 0.0, 0.0, False]
        ]
        for bad in (["room-1", "r:1", "", "", "bj", -1], ["room-1"], "room-1"):
            with pytest.raises(RpcError) as caught:
                await client.call("nodes.put", [bad, TTL])
            assert caught.value.code == "bad_request"
    finally:
        await client.close()
        await server.close()


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (("a:b", "c"), ("a", "b:c")),
        (("{a", "b}"), ("{a:b}", "")),
        (("a}", ":b"), ("a", "}:b")),
        (("a%3Ab", "c"), ("a:b", "c")),
        (("直播", "用户:1"), ("直播:用户", "1")),
    ],
)
async def test_odd_characters_do_not_collide(
    store: SessionStore, first: tuple[str, str], second: tuple[str, str]
) -> None:
    one = Session(*first, "c1", "room-1", "设备")
    two = Session(*second, "c2", "room-2")
    await store.put_sessions([one, two], TTL)
    assert await store.lookup(first[0], [first[1]]) == {first[1]: [one]}
    assert await store.lookup(second[0], [second[1]]) == {second[1]: [two]}
    await store.remove_sessions([one])
    assert await store.lookup(first[0], [first[1]]) == {}
    assert await store.lookup(second[0], [second[1]]) == {second[1]: [two]}


async def test_non_positive_ttl_is_refused(store: SessionStore) -> None:
    with pytest.raises(ValueError, match="ttl"):
        await store.put_sessions([Session("chat", "u1", "c1", "room-1")], 0)
    with pytest.raises(ValueError, match="ttl"):
        await store.put_node(Node("room-1", "127.0.0.1:7001"), -1)
    with pytest.raises(ValueError, match="ttl"):
        await store.put_node(Node("room-1", "127.0.0.1:7001"), float("nan"))


async def test_rooms_put_then_lookup(store: SessionStore) -> None:
    await store.put_rooms("room-1", [("live", "r1", 3), ("live", "r2", 1)], TTL)
    assert await store.room_instances("live", "r1") == {"room-1": 3}
    assert await store.room_instances("live", "r2") == {"room-1": 1}
    assert await store.room_instances("live", "r3") == {}
    await store.put_rooms("room-1", [("live", "r1", 7)], TTL)
    assert await store.room_instances("live", "r1") == {"room-1": 7}


async def test_two_instances_in_one_room(store: SessionStore) -> None:
    await store.put_rooms("room-1", [("live", "r1", 2)], TTL)
    await store.put_rooms("room-2", [("live", "r1", 5)], TTL)
    assert await store.room_instances("live", "r1") == {"room-1": 2, "room-2": 5}


async def test_count_zero_removes_the_instance_from_the_room(store: SessionStore) -> None:
    await store.put_rooms("room-1", [("live", "r1", 2)], TTL)
    await store.put_rooms("room-2", [("live", "r1", 5)], TTL)
    await store.put_rooms("room-1", [("live", "r1", 0), ("live", "never", 0)], TTL)
    assert await store.room_instances("live", "r1") == {"room-2": 5}
    assert await store.room_instances("live", "never") == {}
    await store.put_rooms("room-2", [("live", "r1", 0)], TTL)
    assert await store.room_instances("live", "r1") == {}


async def test_room_entries_expire_unless_renewed(store: SessionStore) -> None:
    await store.put_rooms("room-1", [("live", "r1", 2)], 0.4)
    await store.put_rooms("room-2", [("live", "r1", 5)], 0.4)
    await asyncio.sleep(0.25)
    await store.put_rooms("room-2", [("live", "r1", 6)], 0.4)
    await asyncio.sleep(0.25)
    assert await store.room_instances("live", "r1") == {"room-2": 6}
    await asyncio.sleep(0.25)
    assert await store.room_instances("live", "r1") == {}


async def test_rooms_of_different_products_are_separate(store: SessionStore) -> None:
    await store.put_rooms("room-1", [("live", "r1", 2), ("chat", "r1", 4)], TTL)
    assert await store.room_instances("live", "r1") == {"room-1": 2}
    assert await store.room_instances("chat", "r1") == {"room-1": 4}
    await store.put_rooms("room-1", [("chat", "r1", 0)], TTL)
    assert await store.room_instances("live", "r1") == {"room-1": 2}
    assert await store.room_instances("shop", "r1") == {}


async def test_500_rooms_in_one_call(store: SessionStore) -> None:
    rows = [("live", f"r{i}", i + 1) for i in range(500)]
    await store.put_rooms("room-1", rows, TTL)
    await store.put_rooms("room-2", rows[:250], TTL)
    for _, room, count in rows[::50] + rows[-1:]:
        expected = {"room-1": count} | ({"room-2": count} if count <= 250 else {})
        assert await store.room_instances("live", room) == expected


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (("a:b", "c"), ("a", "b:c")),
        (("{a", "b}"), ("{a:b}", "")),
        (("直播", "房:1"), ("直播:房", "1")),
    ],
)
async def test_odd_room_names_do_not_collide(
    store: SessionStore, first: tuple[str, str], second: tuple[str, str]
) -> None:
    await store.put_rooms("room-1", [(*first, 1), (*second, 2)], TTL)
    assert await store.room_instances(*first) == {"room-1": 1}
    assert await store.room_instances(*second) == {"room-1": 2}


@pytest.mark.parametrize(
    ("rows", "ttl", "mentions"),
    [
        ([("live", "r1", 1)], 0, "ttl"),
        ([("live", "r1", -1)], TTL, "count"),
        ([("live", "r1", True)], TTL, "count"),
        ([("live", "r1", 1.5)], TTL, "count"),
        ([("live", "r1")], TTL, "product, room, count"),
        ([("live", 7, 1)], TTL, "string"),
    ],
)
async def test_bad_room_rows_are_refused_whole(
    store: SessionStore, rows: list, ttl: float, mentions: str
) -> None:
    with pytest.raises(ValueError, match=mentions):
        await store.put_rooms("room-1", [("live", "ok", 1), *rows], ttl)
    assert await store.room_instances("live", "ok") == {}


async def test_top_rooms_ranks_by_members_across_instances(store: SessionStore) -> None:
    await store.put_rooms("room-1", [("live", "big", 4), ("live", "mid", 5), ("live", "s", 1)], TTL)
    await store.put_rooms("room-2", [("live", "big", 3), ("other", "mid", 6)], TTL)
    top = await store.top_rooms(3)
    assert [(r.product, r.room, r.members) for r in top] == [
        ("live", "big", 7),
        ("other", "mid", 6),
        ("live", "mid", 5),
    ]
    assert top[0] == RoomLoad("live", "big", {"room-1": 4, "room-2": 3})
    assert [r.room for r in await store.top_rooms(MAX_TOP_ROOMS)] == ["big", "mid", "mid", "s"]


async def test_top_rooms_follow_count_changes_and_leave_out_empty_rooms(
    store: SessionStore,
) -> None:
    await store.put_rooms("room-1", [("live", "a", 9), ("live", "b", 2)], TTL)
    await store.put_rooms("room-1", [("live", "a", 1), ("live", "b", 8)], TTL)
    assert [(r.room, r.members) for r in await store.top_rooms(2)] == [("b", 8), ("a", 1)]
    await store.put_rooms("room-1", [("live", "b", 0)], TTL)
    assert [(r.room, r.members) for r in await store.top_rooms(2)] == [("a", 1)]


async def test_top_rooms_leave_out_expired_instances(store: SessionStore) -> None:
    await store.put_rooms("room-1", [("live", "a", 5), ("live", "gone", 9)], 0.2)
    await store.put_rooms("room-2", [("live", "a", 2)], TTL)
    await asyncio.sleep(0.3)
    assert await store.top_rooms(5) == [RoomLoad("live", "a", {"room-2": 2})]


@pytest.mark.parametrize("limit", [0, -1, MAX_TOP_ROOMS + 1, 2.0, "3", True, None])
async def test_top_rooms_limit_is_bounded(store: SessionStore, limit: object) -> None:
    with pytest.raises(ValueError, match="limit"):
        await store.top_rooms(limit)  # type: ignore[arg-type]


async def test_register_server_answers_a_bad_top_rooms_limit_with_bad_request() -> None:
    server = RegisterServer(RegisterConfig(port=0, metrics_port=0), MemoryStore())
    await server.start()
    client = RpcClient(server.rpc.address)
    try:
        await client.call("rooms.put", ["room-1", [["live", "r1", 2]], TTL])
        assert await client.call("rooms.top", 1) == [["live", "r1", {"room-1": 2}]]
        for bad in (0, MAX_TOP_ROOMS + 1, "1", [1]):
            with pytest.raises(RpcError) as caught:
                await client.call("rooms.top", bad)
            assert caught.value.code == "bad_request"
    finally:
        await client.close()
        await server.close()


async def test_memory_sweep_drops_expired_users_nobody_looks_up() -> None:
    store = MemoryStore()
    await store.put_sessions([Session("chat", f"u{i}", "c", "room-1") for i in range(500)], 0.05)
    assert len(store) == 500
    await asyncio.sleep(0.1)
    for i in range(10):
        await store.put_sessions([Session("chat", f"v{i}", "c", "room-1")], TTL)
    assert len(store) == 10
    await store.close()


async def test_memory_sweep_drops_expired_rooms_nobody_looks_up() -> None:
    store = MemoryStore()
    await store.put_rooms("room-1", [("live", f"r{i}", 1) for i in range(300)], 0.05)
    assert store.room_entries == 300
    await asyncio.sleep(0.1)
    for i in range(10):
        await store.put_rooms("room-2", [("live", f"s{i}", 1)], TTL)
    assert store.room_entries == 10
    await store.close()


@pytest.fixture
async def raw_redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


async def test_redis_user_key_carries_the_hash_tag(
    redis_url: str, raw_redis: aioredis.Redis
) -> None:
    store = RedisStore(redis_url)
    await store.put_sessions(
        [Session("chat", "u1", "c1", "room-1"), Session("a:b", "{c}", "c2", "room-1")], TTL
    )
    keys = {key async for key in raw_redis.scan_iter(match="im:s:*")}
    assert keys == {b"im:s:{chat:u1}", b"im:s:{a%3Ab:%7Bc%7D}"}
    assert 0 < await raw_redis.pttl("im:s:{chat:u1}") <= TTL * 1000
    await store.close()


async def test_redis_lookup_deletes_expired_fields(
    redis_url: str, raw_redis: aioredis.Redis
) -> None:
    store = RedisStore(redis_url)
    live = Session("chat", "u1", "c1", "room-1")
    await store.put_sessions([live], TTL)
    await store.put_sessions([Session("chat", "u1", "c2", "room-1")], 0.1)
    assert await raw_redis.hlen("im:s:{chat:u1}") == 2
    await asyncio.sleep(0.15)
    assert await store.lookup("chat", ["u1"]) == {"u1": [live]}
    assert await raw_redis.hkeys("im:s:{chat:u1}") == [b"c1"]
    await store.close()


async def test_redis_key_expires_with_its_longest_lease(
    redis_url: str, raw_redis: aioredis.Redis
) -> None:
    store = RedisStore(redis_url, prefix="t")
    await store.put_sessions([Session("chat", "u1", "c1", "room-1")], 0.1)
    await store.put_sessions([Session("chat", "u1", "c2", "room-1")], 0.3)
    await asyncio.sleep(0.2)
    assert await raw_redis.exists("t:s:{chat:u1}") == 1
    await asyncio.sleep(0.2)
    assert await raw_redis.exists("t:s:{chat:u1}") == 0
    await store.close()


async def test_redis_batch_is_one_round_trip(redis_url: str, raw_redis: aioredis.Redis) -> None:
    store = RedisStore(redis_url)
    await store.put_sessions([Session("chat", "warm", "c", "room-1")], TTL)
    await store.lookup("chat", ["warm"])
    sessions = [Session("chat", f"u{i}", "c", "room-1") for i in range(300)]
    uids = [s.uid for s in sessions]
    for batch in (
        lambda: store.put_sessions(sessions, TTL),
        lambda: store.lookup("chat", uids),
        lambda: store.remove_sessions(sessions),
    ):
        before = (await raw_redis.info("stats"))["total_reads_processed"]
        await batch()
        after = (await raw_redis.info("stats"))["total_reads_processed"]
        # One pipelined batch of 300 users arrives in a few socket reads (plus the INFO);
        # a round trip per user would cost 300.
        assert after - before <= 10
    await store.close()


async def test_redis_survives_a_server_restart(redis_server, redis_url: str) -> None:
    store = RedisStore(redis_url)
    session = Session("chat", "u1", "c1", "room-1")
    await store.put_sessions([session], TTL)
    redis_server.restart()
    assert await store.lookup("chat", ["u1"]) == {}
    await store.put_sessions([session], TTL)
    await store.put_node(Node("room-1", "127.0.0.1:7001"), TTL)
    assert await store.lookup("chat", ["u1"]) == {"u1": [session]}
    assert [n.instance for n in await store.nodes()] == ["room-1"]
    await store.close()


async def test_redis_room_hash_layout(redis_url: str, raw_redis: aioredis.Redis) -> None:
    store = RedisStore(redis_url)
    await store.put_rooms("room-1", [("live", "r1", 3), ("a:b", "{c}", 1)], TTL)
    await store.put_rooms("room-2", [("live", "r1", 4)], TTL)
    keys = {key async for key in raw_redis.scan_iter(match="im:r:*")}
    assert keys == {b"im:r:{live:r1}", b"im:r:{a%3Ab:%7Bc%7D}"}
    fields = await raw_redis.hgetall("im:r:{live:r1}")
    decoded = {name: msgpack.unpackb(value) for name, value in fields.items()}
    assert {name: count for name, (_, count) in decoded.items()} == {b"room-1": 3, b"room-2": 4}
    assert all(isinstance(expiry, int) for expiry, _ in decoded.values())
    assert 0 < await raw_redis.pttl("im:r:{live:r1}") <= TTL * 1000
    await store.put_rooms("room-1", [("a:b", "{c}", 0)], TTL)
    assert await raw_redis.exists("im:r:{a%3Ab:%7Bc%7D}") == 0
    await store.close()


async def test_redis_room_lookup_deletes_expired_fields(
    redis_url: str, raw_redis: aioredis.Redis
) -> None:
    store = RedisStore(redis_url)
    await store.put_rooms("room-1", [("live", "r1", 3)], TTL)
    await store.put_rooms("room-2", [("live", "r1", 4)], 0.1)
    await asyncio.sleep(0.15)
    assert await raw_redis.hlen("im:r:{live:r1}") == 2
    assert await store.room_instances("live", "r1") == {"room-1": 3}
    assert await raw_redis.hkeys("im:r:{live:r1}") == [b"room-1"]
    await store.close()


async def test_redis_rooms_batch_is_one_round_trip(
    redis_url: str, raw_redis: aioredis.Redis
) -> None:
    store = RedisStore(redis_url)
    await store.put_rooms("room-1", [("live", "warm", 1)], TTL)
    rows = [("live", f"r{i}", 1) for i in range(500)]
    before = (await raw_redis.info("stats"))["total_reads_processed"]
    await store.put_rooms("room-1", rows, TTL)
    after = (await raw_redis.info("stats"))["total_reads_processed"]
    assert after - before <= 10
    await store.close()


async def test_redis_epoch_changes_when_redis_loses_its_data(
    redis_server, redis_url: str, raw_redis: aioredis.Redis
) -> None:
    store = RedisStore(redis_url)
    node = Node("room-1", "127.0.0.1:7001")
    first = await store.put_node(node, TTL)
    assert await raw_redis.get("im:epoch") == first.encode()
    assert await raw_redis.pttl("im:epoch") == -1  # no lease: it lives as long as the data
    redis_server.flushall()
    second = await store.put_node(node, TTL)
    assert second != first
    assert await store.put_node(node, TTL) == second
    redis_server.restart()
    third = await store.put_node(node, TTL)
    assert third not in (first, second)
    assert [n.instance for n in await store.nodes()] == ["room-1"]
    await store.close()


async def test_redis_stores_have_their_own_epoch_per_prefix(redis_url: str) -> None:
    one, two = RedisStore(redis_url, prefix="a"), RedisStore(redis_url, prefix="b")
    node = Node("room-1", "127.0.0.1:7001")
    assert await one.put_node(node, TTL) != await two.put_node(node, TTL)
    assert await one.put_node(node, TTL) == await one.put_node(node, TTL)
    await one.close()
    await two.close()


async def test_redis_node_row_layout(redis_url: str, raw_redis: aioredis.Redis) -> None:
    store = RedisStore(redis_url)
    await store.put_node(LOADED, TTL)
    expiry, *fields = msgpack.unpackb(await raw_redis.hget("im:nodes", "room-1"))
    assert isinstance(expiry, int)
    assert fields == [
        "127.0.0.1:7001",
        "ws://127.0.0.1:8001/ws",
        "127.0.0.1:9001",
        "bj",
        "120",
        "cmcc",
        "5000",
        "12.5",
        "200.0",
        "1",
    ]
    await store.close()


async def test_redis_reads_node_rows_of_older_instances(
    redis_url: str, raw_redis: aioredis.Redis
) -> None:
    store = RedisStore(redis_url)
    seconds, micros = await raw_redis.time()
    expiry = seconds * 1000 + micros // 1000 + 30_000
    old = msgpack.packb([expiry, "127.0.0.1:7009", "ws://h:1/ws", "h:2", "sh", "4"])
    await raw_redis.hset("im:nodes", "room-old", old)
    assert await store.nodes() == [
        Node("room-old", "127.0.0.1:7009", "ws://h:1/ws", "h:2", "sh", 4)
    ]
    await store.close()


async def test_redis_top_rooms_index_shares_one_slot_and_answers_fresh_counts(
    redis_url: str, raw_redis: aioredis.Redis
) -> None:
    store = RedisStore(redis_url)
    await store.put_rooms("room-1", [("live", "a", 10)], 0.2)
    await store.put_rooms("room-2", [("live", "a", 1), ("live", "b", 5)], TTL)
    keys = {key async for key in raw_redis.scan_iter(match="im:top:*")}
    assert keys == {b"im:top:{im}:totals", b"im:top:{im}:leases"}
    assert await raw_redis.zscore("im:top:{im}:totals", msgpack.packb(["live", "a"])) == 11
    await asyncio.sleep(0.3)
    # The index still ranks "a" by its old total of 11; the answer reads it fresh.
    assert await store.top_rooms(2) == [
        RoomLoad("live", "b", {"room-2": 5}),
        RoomLoad("live", "a", {"room-2": 1}),
    ]
    await store.close()


async def test_redis_top_rooms_prunes_rooms_whose_leases_ended(
    redis_url: str, raw_redis: aioredis.Redis
) -> None:
    store = RedisStore(redis_url)
    await store.put_rooms("room-1", [("live", f"r{i}", i + 1) for i in range(20)], 0.1)
    await asyncio.sleep(0.2)
    assert await store.top_rooms(5) == []
    assert await raw_redis.zcard("im:top:{im}:totals") == 0
    assert await raw_redis.zcard("im:top:{im}:leases") == 0
    await store.close()

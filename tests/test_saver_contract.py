"""One contract for every MessageStore engine, plus what only the Redis layout promises."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from typing import Any

import aiohttp
import msgpack
import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from im.ids import new_id
from im.messages_store import MessageStore, StoreResult
from im.saver_client import SaverClient
from saver.config import SaverConfig, from_args
from saver.engines import SaverLimits
from saver.engines.memory import MemoryStore
from saver.engines.redis import RedisStore
from saver.server import SaverServer

TTL = 30.0


@asynccontextmanager
async def _memory(request: pytest.FixtureRequest, limits: SaverLimits) -> AsyncIterator[Any]:
    store = MemoryStore(limits)
    yield store
    await store.close()


@asynccontextmanager
async def _redis(request: pytest.FixtureRequest, limits: SaverLimits) -> AsyncIterator[Any]:
    store = RedisStore(request.getfixturevalue("redis_url"), limits=limits)
    yield store
    await store.close()


@asynccontextmanager
async def _rpc(request: pytest.FixtureRequest, limits: SaverLimits) -> AsyncIterator[Any]:
    """The saver service itself: SaverClient -> RPC -> SaverServer -> memory."""
    server = SaverServer(SaverConfig(port=0, metrics_port=0), MemoryStore(limits))
    await server.start()
    client = SaverClient(server.rpc.address)
    yield client
    await client.close()
    await server.close()


# One entry per engine: each opens a fresh, empty store with the given limits.
_Opener = Callable[[pytest.FixtureRequest, SaverLimits], AbstractAsyncContextManager[Any]]
ENGINES: dict[str, _Opener] = {"memory": _memory, "redis": _redis, "rpc": _rpc}

MakeStore = Callable[..., Awaitable[MessageStore]]


@pytest.fixture(params=list(ENGINES))
async def make_store(request: pytest.FixtureRequest) -> AsyncIterator[MakeStore]:
    async with AsyncExitStack() as stack:

        async def make(**limits: Any) -> MessageStore:
            opener = ENGINES[request.param](request, SaverLimits(**limits))
            return await stack.enter_async_context(opener)

        yield make


@pytest.fixture
async def store(make_store: MakeStore) -> MessageStore:
    return await make_store()


def push(text: str = "hi", **extra: Any) -> dict:
    msg_id = new_id()
    return {
        "op": "push",
        "id": msg_id,
        "type": "chat",
        "pri": "high",
        "qos": 1,
        "ts": 1,
        "body": {"text": text},
        **extra,
    }


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_pending_returns_messages_in_id_order(store: MessageStore) -> None:
    first, second, third = push("1"), push("2"), push("3")
    for msg in (third, first, second):
        assert await store.store("chat", ["u1"], msg, TTL) == StoreResult(1, 0)
    assert await store.pending("chat", "u1") == [first, second, third]
    assert await store.pending("chat", "u2") == []


async def test_multicast_stores_one_entry_per_user(store: MessageStore) -> None:
    msg = push()
    assert await store.store("chat", ["u1", "u2", "u3", "u2"], msg, TTL) == (3, 0)
    for uid in ("u1", "u2", "u3"):
        assert await store.pending("chat", uid) == [msg]
    assert await store.store("chat", [], push(), TTL) == (0, 0)


async def test_a_retried_store_adds_nothing(store: MessageStore) -> None:
    msg = push()
    await store.store("chat", ["u1", "u2"], msg, TTL)
    assert await store.store("chat", ["u1", "u2"], msg, TTL) == (0, 0)
    assert await store.pending("chat", "u1") == [msg]
    assert await store.ack("chat", "u1", [msg["id"]]) == 1
    assert await store.store("chat", ["u1"], msg, TTL) == (0, 0)  # acked: never again
    assert await store.pending("chat", "u1") == []
    assert await store.pending("chat", "u2") == [msg]


async def test_states_of_a_finished_message_stay_for_the_grace_time(
    make_store: MakeStore,
) -> None:
    store = await make_store(state_grace_s=0.2)
    done, waiting = push("done"), push("waiting")
    await store.store("chat", ["u1"], done, TTL)
    await store.store("chat", ["u1", "u2"], waiting, TTL)
    assert await store.ack("chat", "u1", [done["id"], waiting["id"]]) == 2
    assert await store.store("chat", ["u1"], done, TTL) == (0, 0)  # a retry, within grace
    assert await store.pending("chat", "u1") == []
    delivery = await store.delivery("chat", done["id"])
    assert delivery is not None and delivery.states == {"u1": "acked"}
    await asyncio.sleep(0.3)
    assert await store.delivery("chat", done["id"]) is None
    delivery = await store.delivery("chat", waiting["id"])
    assert delivery is not None and delivery.states == {"u1": "acked", "u2": "stored"}


async def test_default_ttl_is_a_week(store: MessageStore) -> None:
    msg = push()
    await store.store("chat", ["u1"], msg)
    await store.store_broadcast("chat", cast := push("all"))
    assert await store.pending("chat", "u1") == [msg, cast]


async def test_expired_messages_are_never_returned(store: MessageStore) -> None:
    short, long = push("short"), push("long")
    await store.store("chat", ["u1"], short, 0.2)
    await store.store("chat", ["u1"], long, TTL)
    await asyncio.sleep(0.3)
    assert await store.pending("chat", "u1") == [long]
    delivery = await store.delivery("chat", short["id"])
    assert delivery is not None
    assert delivery.states == {"u1": "expired"}


async def test_expired_entries_are_swept_when_new_ones_arrive(store: MessageStore) -> None:
    before = metric("im_saver_expired_total")
    long = push("long")
    await store.store("chat", ["u1"], long, TTL)
    await store.store("chat", ["u1"], push("short"), 0.1)
    await asyncio.sleep(0.15)
    msg = push("new")
    assert await store.store("chat", ["u1"], msg, TTL) == (1, 0)
    assert metric("im_saver_expired_total") - before == 1
    assert await store.pending("chat", "u1") == [long, msg]
    assert metric("im_saver_expired_total") - before == 1


async def test_the_cap_drops_the_oldest_and_counts_them(make_store: MakeStore) -> None:
    store = await make_store(inbox_cap=3)
    before = metric("im_saver_evicted_total", kind="unicast")
    msgs = [push(str(i)) for i in range(5)]
    results = [await store.store("chat", ["u1"], msg, TTL) for msg in msgs]
    assert results == [(1, 0), (1, 0), (1, 0), (1, 1), (1, 1)]
    assert await store.pending("chat", "u1") == msgs[2:]
    assert metric("im_saver_evicted_total", kind="unicast") - before == 2
    delivery = await store.delivery("chat", msgs[0]["id"])
    assert delivery is not None and delivery.states == {"u1": "evicted"}


async def test_a_multicast_evicts_per_user(make_store: MakeStore) -> None:
    store = await make_store(inbox_cap=2)
    old = push("old")
    await store.store("chat", ["u1"], old, TTL)
    await store.store("chat", ["u1"], push(), TTL)
    msg = push("new")
    assert await store.store("chat", ["u1", "u2"], msg, TTL) == (2, 1)
    assert [m["body"]["text"] for m in await store.pending("chat", "u1")] == ["hi", "new"]
    assert await store.pending("chat", "u2") == [msg]


async def test_ack_removes_only_the_named_messages(store: MessageStore) -> None:
    msgs = [push(str(i)) for i in range(3)]
    for msg in msgs:
        await store.store("chat", ["u1", "u2"], msg, TTL)
    ids = [msgs[0]["id"], msgs[2]["id"], new_id(), "not an id", msgs[0]["id"]]
    assert await store.ack("chat", "u1", ids) == 2
    assert await store.pending("chat", "u1") == [msgs[1]]
    assert await store.pending("chat", "u2") == msgs
    assert await store.ack("chat", "u1", ids) == 0
    assert await store.ack("chat", "u1", []) == 0


async def test_ack_many_spans_users_and_products(store: MessageStore) -> None:
    chat, live = push("chat"), push("live")
    await store.store("chat", ["u1", "u2"], chat, TTL)
    await store.store("live", ["u1"], live, TTL)
    rows = [
        ("chat", "u1", [chat["id"]]),
        ("chat", "u2", [chat["id"]]),
        ("live", "u1", [live["id"], chat["id"]]),
        ("chat", "u3", [chat["id"]]),
    ]
    assert await store.ack_many(rows) == 3
    for product, uid in (("chat", "u1"), ("chat", "u2"), ("live", "u1")):
        assert await store.pending(product, uid) == []
    assert await store.ack_many([]) == 0


async def test_a_message_never_acked_is_dead_lettered(make_store: MakeStore) -> None:
    store = await make_store(max_attempts=2)
    before = metric("im_saver_dead_letters_total", kind="unicast")
    stuck, fine = push("stuck"), push("fine")
    await store.store("chat", ["u1", "u2"], stuck, TTL)
    await store.store("chat", ["u1"], fine, TTL)
    assert await store.pending("chat", "u1") == [stuck, fine]
    assert await store.ack("chat", "u1", [fine["id"]]) == 1
    assert await store.pending("chat", "u1") == [stuck]
    assert await store.pending("chat", "u1") == []  # third attempt: dead-lettered
    assert await store.pending("chat", "u1") == []
    assert metric("im_saver_dead_letters_total", kind="unicast") - before == 1
    (letter,) = await store.dead_letters("chat")
    assert (letter.uid, letter.msg) == ("u1", stuck)
    assert letter.at_ms > 1_700_000_000_000
    assert await store.pending("chat", "u2") == [stuck]  # u2's copy has its own count
    delivery = await store.delivery("chat", stuck["id"])
    assert delivery is not None and delivery.states == {"u1": "dead_lettered", "u2": "stored"}
    assert await store.dead_letters("live") == []


async def test_dead_letters_are_capped_newest_first(make_store: MakeStore) -> None:
    store = await make_store(max_attempts=1, dead_letter_cap=2)
    msgs = [push(str(i)) for i in range(3)]
    for msg in msgs:
        await store.store("chat", ["u1"], msg, TTL)
    assert await store.pending("chat", "u1") == msgs
    assert await store.pending("chat", "u1") == []
    letters = await store.dead_letters("chat", 10)
    assert [letter.msg for letter in letters] == [msgs[2], msgs[1]]
    assert len(await store.dead_letters("chat", 1)) == 1


async def test_broadcast_is_stored_once_and_reaches_each_user_until_acked(
    store: MessageStore,
) -> None:
    cast = push("to all")
    assert await store.store_broadcast("chat", cast, TTL) == (1, 0)
    assert await store.store_broadcast("chat", cast, TTL) == (0, 0)
    # An online user got it live and ACKs it: it never comes back.
    assert await store.ack("chat", "online", [cast["id"]]) == 1
    assert await store.ack("chat", "online", [cast["id"]]) == 0
    assert await store.pending("chat", "online") == []
    # A user who logs in later gets it at login, again at each login until the ACK.
    assert await store.pending("chat", "later") == [cast]
    assert await store.pending("chat", "later") == [cast]
    assert await store.ack("chat", "later", [cast["id"]]) == 1
    assert await store.pending("chat", "later") == []
    assert await store.pending("live", "later") == []


async def test_broadcasts_merge_with_unicast_in_id_order(store: MessageStore) -> None:
    first, cast, last = push("first"), push("cast"), push("last")
    await store.store("chat", ["u1"], last, TTL)
    await store.store_broadcast("chat", cast, TTL)
    await store.store("chat", ["u1"], first, TTL)
    assert await store.pending("chat", "u1") == [first, cast, last]
    assert await store.ack("chat", "u1", [first["id"], cast["id"], last["id"]]) == 3
    assert await store.pending("chat", "u1") == []


async def test_expired_broadcasts_are_never_returned(store: MessageStore) -> None:
    short, long = push("short"), push("long")
    await store.store_broadcast("chat", short, 0.2)
    await store.store_broadcast("chat", long, TTL)
    assert await store.pending("chat", "u1") == [short, long]
    await asyncio.sleep(0.3)
    assert await store.pending("chat", "u2") == [long]
    assert await store.ack("chat", "u2", [short["id"]]) == 0


async def test_a_broadcast_never_acked_is_dead_lettered(make_store: MakeStore) -> None:
    store = await make_store(max_attempts=1)
    before = metric("im_saver_dead_letters_total", kind="broadcast")
    cast = push("cast")
    await store.store_broadcast("chat", cast, TTL)
    assert await store.pending("chat", "u1") == [cast]
    assert await store.pending("chat", "u1") == []
    assert await store.pending("chat", "u2") == [cast]
    assert metric("im_saver_dead_letters_total", kind="broadcast") - before == 1
    assert [(d.uid, d.msg) for d in await store.dead_letters("chat")] == [("u1", cast)]


async def test_broadcast_cap_drops_the_oldest(make_store: MakeStore) -> None:
    store = await make_store(broadcast_cap=2)
    casts = [push(str(i)) for i in range(3)]
    results = [await store.store_broadcast("chat", cast, TTL) for cast in casts]
    assert results == [(1, 0), (1, 0), (1, 1)]
    assert await store.pending("chat", "u1") == casts[1:]


async def test_watermark_passes_acked_broadcasts(make_store: MakeStore) -> None:
    store = await make_store(broadcast_settle_s=0)
    casts = [push(str(i)) for i in range(3)]
    for cast in casts[:2]:
        await store.store_broadcast("chat", cast, TTL)
    assert await store.pending("chat", "u1") == casts[:2]
    assert await store.ack("chat", "u1", [casts[1]["id"]]) == 1
    assert await store.pending("chat", "u1") == casts[:1]
    assert await store.ack("chat", "u1", [casts[0]["id"]]) == 1
    assert await store.pending("chat", "u1") == []
    await store.store_broadcast("chat", casts[2], TTL)
    assert await store.pending("chat", "u1") == casts[2:]
    assert await store.ack("chat", "u1", [casts[0]["id"], casts[2]["id"]]) == 1
    assert await store.pending("chat", "u1") == []


async def test_pending_pages_with_limit_and_after(store: MessageStore) -> None:
    msgs = [push("0"), push("1"), push("cast"), push("2"), push("3")]
    cast = msgs[2]
    for msg in msgs:
        if msg is cast:
            await store.store_broadcast("chat", msg, TTL)
        else:
            await store.store("chat", ["u1"], msg, TTL)
    assert await store.pending("chat", "u1", limit=2) == msgs[:2]
    assert await store.pending("chat", "u1", limit=2, after=msgs[1]["id"]) == msgs[2:4]
    assert await store.pending("chat", "u1", limit=2, after=msgs[3]["id"]) == msgs[4:]
    assert await store.pending("chat", "u1", after=msgs[4]["id"]) == []


async def test_pending_keeps_to_its_byte_budget(make_store: MakeStore) -> None:
    store = await make_store(max_pending_bytes=600)
    msgs = [push("x" * 200) for _ in range(4)]
    for msg in msgs:
        await store.store("chat", ["u1"], msg, TTL)
    assert await store.pending("chat", "u1") == msgs[:2]
    assert await store.pending("chat", "u1", after=msgs[1]["id"]) == msgs[2:]
    big = push("y" * 1000)
    await store.store("chat", ["u2"], big, TTL)
    assert await store.pending("chat", "u2") == [big]  # one message always fits


async def test_idempotency_key_keeps_the_first_answer(store: MessageStore) -> None:
    first = {"id": new_id(), "online": 3}
    assert await store.remember_idempotency("chat", "req-1", first) is None
    assert await store.remember_idempotency("chat", "req-1", {"id": "other"}) == first
    assert await store.remember_idempotency("live", "req-1", {"id": "other"}) is None
    assert await store.remember_idempotency("chat", "req-2", {"n": 1}, 0.2) is None
    await asyncio.sleep(0.3)
    assert await store.remember_idempotency("chat", "req-2", {"n": 2}) is None
    assert await store.remember_idempotency("chat", "req-2", {"n": 3}) == {"n": 2}


async def test_recall_reads_a_held_answer_without_setting_one(store: MessageStore) -> None:
    assert await store.recall_idempotency("chat", "req-3") is None
    assert await store.recall_idempotency("chat", "req-3") is None  # reading kept nothing
    assert await store.remember_idempotency("chat", "req-3", {"n": 1}, 0.2) is None
    assert await store.recall_idempotency("chat", "req-3") == {"n": 1}
    assert await store.recall_idempotency("live", "req-3") is None
    await asyncio.sleep(0.3)
    assert await store.recall_idempotency("chat", "req-3") is None
    with pytest.raises(ValueError, match="key"):
        await store.recall_idempotency("chat", "")


async def test_delivery_states_per_recipient(store: MessageStore) -> None:
    msg = push()
    await store.store("chat", ["u1", "u2", "u3", "u4"], msg, TTL)
    await store.mark_written("chat", [("u1", msg["id"]), ("u2", msg["id"]), ("u9", msg["id"])])
    assert await store.pending("chat", "u2") == [msg]
    assert await store.ack("chat", "u2", [msg["id"]]) == 1
    await store.mark_written("chat", [("u2", msg["id"]), ("u1", "not an id")])
    delivery = await store.delivery("chat", msg["id"])
    assert delivery is not None
    assert delivery.recipients == 4
    assert delivery.states == {"u1": "written", "u2": "acked", "u3": "stored", "u4": "stored"}
    assert delivery.counts()["stored"] == 2
    assert delivery.counts()["expired"] == 0
    assert await store.delivery("live", msg["id"]) is None
    assert await store.delivery("chat", new_id()) is None
    cast = push()
    await store.store_broadcast("chat", cast, TTL)
    assert await store.delivery("chat", cast["id"]) is None


async def test_delivery_tracks_the_first_recipients_and_counts_all(
    make_store: MakeStore,
) -> None:
    store = await make_store(state_cap=2)
    msg = push()
    assert await store.store("chat", ["u1", "u2", "u3"], msg, TTL) == (3, 0)
    delivery = await store.delivery("chat", msg["id"])
    assert delivery is not None
    assert (delivery.recipients, delivery.states) == (3, {"u1": "stored", "u2": "stored"})
    assert await store.ack("chat", "u1", [msg["id"]]) == 1
    assert await store.ack("chat", "u2", [msg["id"]]) == 1
    assert await store.pending("chat", "u3") == [msg]  # untracked, but still delivered


async def test_a_body_outlives_partial_acks_and_evictions(make_store: MakeStore) -> None:
    store = await make_store(inbox_cap=1)
    shared = push("shared")
    await store.store("chat", ["u1", "u2", "u3"], shared, TTL)
    assert await store.ack("chat", "u1", [shared["id"]]) == 1
    assert await store.store("chat", ["u2"], push("newer"), TTL) == (1, 1)
    assert await store.pending("chat", "u3") == [shared]


@pytest.mark.parametrize(
    ("call", "mentions"),
    [
        (lambda s: s.store("chat", ["u1"], {"type": "chat"}, TTL), "message id"),
        (lambda s: s.store("chat", ["u1"], {"id": "nope"}, TTL), "message id"),
        (lambda s: s.store("chat", ["u1"], "text", TTL), "map"),
        (lambda s: s.store("chat", ["u1"], push(), 0), "ttl"),
        (lambda s: s.store("chat", ["u1"], push(), -1), "ttl"),
        (lambda s: s.store("chat", ["u1"], push(), float("nan")), "ttl"),
        (lambda s: s.store("chat", ["u1"], push(), 10**9), "ttl"),
        (lambda s: s.store("chat", "u1", push(), TTL), "uids"),
        (lambda s: s.store("chat", [""], push(), TTL), "uid"),
        (lambda s: s.store("chat", [7], push(), TTL), "uid"),
        (lambda s: s.store("", ["u1"], push(), TTL), "product"),
        (lambda s: s.store("chat", ["u1"], push(big="x" * 2_000_000), TTL), "limit"),
        (lambda s: s.store("chat", ["u1"], push(tags={1, 2}), TTL), "serialize"),
        (lambda s: s.store_broadcast("chat", {"id": 5}, TTL), "message id"),
        (lambda s: s.pending("chat", "u1", limit=0), "limit"),
        (lambda s: s.pending("chat", "u1", limit=5000), "limit"),
        (lambda s: s.pending("chat", "u1", after="zz"), "after"),
        (lambda s: s.pending("chat", "", limit=1), "uid"),
        (lambda s: s.ack("chat", "u1", "abc"), "ids"),
        (lambda s: s.ack_many([("chat", "u1")]), "product, uid, ids"),
        (lambda s: s.mark_written("chat", [("u1",)]), "uid, id"),
        (lambda s: s.delivery("chat", "nope"), "message id"),
        (lambda s: s.dead_letters("chat", 0), "limit"),
        (lambda s: s.remember_idempotency("chat", "", {}), "key"),
        (lambda s: s.remember_idempotency("chat", "k", ["list"]), "map"),
        (lambda s: s.remember_idempotency("chat", "k", {}, 0), "ttl"),
    ],
)
async def test_bad_input_is_refused(
    store: MessageStore, call: Callable[[MessageStore], Awaitable[Any]], mentions: str
) -> None:
    with pytest.raises(ValueError, match=mentions):
        await call(store)
    assert await store.pending("chat", "u1") == []


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (("a:b", "c"), ("a", "b:c")),
        (("{a", "b}"), ("{a:b}", "x")),
        (("a%3Ab", "c"), ("a:b", "c")),
        (("直播", "用户:1"), ("直播:用户", "1")),
    ],
)
async def test_odd_characters_do_not_collide(
    store: MessageStore, first: tuple[str, str], second: tuple[str, str]
) -> None:
    one, two = push("one"), push("two")
    await store.store(first[0], [first[1]], one, TTL)
    await store.store(second[0], [second[1]], two, TTL)
    await store.store_broadcast(first[0], cast := push("cast"), TTL)
    assert await store.pending(*first) == [one, cast]
    assert await store.pending(*second) == [two]


async def test_limits_are_checked() -> None:
    with pytest.raises(ValueError, match="inbox_cap"):
        SaverLimits(inbox_cap=0)
    with pytest.raises(ValueError, match="state_grace_s"):
        SaverLimits(state_grace_s=float("nan"))
    config = from_args(["--inbox-cap", "7", "--redis", "redis://x"], environ={})
    assert (config.port, config.metrics_port) == (8072, 8073)
    assert config.limits().inbox_cap == 7


async def test_memory_sweep_drops_expired_inboxes_nobody_reads() -> None:
    store = MemoryStore()
    await store.store("chat", [f"u{i}" for i in range(300)], push(), 0.05)
    assert len(store) == 300
    await asyncio.sleep(0.1)
    for i in range(10):
        await store.store("chat", [f"v{i}"], push(), TTL)
    assert len(store) == 10
    await store.close()


async def test_server_health_and_metrics() -> None:
    server = SaverServer(SaverConfig(port=0, metrics_port=0), MemoryStore())
    await server.start()
    client = SaverClient(server.rpc.address)
    try:
        await client.ping()
        base = f"http://127.0.0.1:{server.metrics_port}"
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{base}/healthz") as response:
                assert response.status == 200
                assert (await response.json())["engine"] == "MemoryStore"
            async with http.get(f"{base}/metrics") as response:
                assert "im_saver_stored_total" in await response.text()
    finally:
        await client.close()
        await server.close()


@pytest.fixture
async def raw_redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


async def test_redis_keys_carry_hash_tags(redis_url: str, raw_redis: aioredis.Redis) -> None:
    store = RedisStore(redis_url)
    msg = push()
    await store.store("a:b", ["{c}"], msg, TTL)
    await store.store_broadcast("a:b", push(), TTL)
    keys = {key.decode() async for key in raw_redis.scan_iter(match="im:*")}
    assert keys == {
        "im:q:{a%3Ab:%7Bc%7D}",
        "im:qm:{a%3Ab:%7Bc%7D}",
        f"im:m:{{a%3Ab:{msg['id']}}}",
        "im:bc:{a%3Ab}",
        "im:bb:{a%3Ab}",
    }
    assert 0 < await raw_redis.pttl("im:q:{a%3Ab:%7Bc%7D}") <= TTL * 1000
    grace = store.limits.state_grace_s
    assert TTL * 1000 < await raw_redis.pttl(f"im:m:{{a%3Ab:{msg['id']}}}") <= (TTL + grace) * 1000
    await store.close()


async def test_redis_body_is_kept_once_and_freed_after_the_last_ack(
    redis_url: str, raw_redis: aioredis.Redis
) -> None:
    store = RedisStore(redis_url)
    msg = push()
    key = store.message_key("chat", msg["id"])
    await store.store("chat", ["u1", "u2"], msg, TTL)
    assert msgpack.unpackb(await raw_redis.hget(key, "b")) == msg
    assert await store.ack("chat", "u1", [msg["id"]]) == 1
    assert await raw_redis.hexists(key, "b")
    assert await store.ack("chat", "u2", [msg["id"]]) == 1
    assert not await raw_redis.hexists(key, "b")
    delivery = await store.delivery("chat", msg["id"])
    assert delivery is not None and delivery.states == {"u1": "acked", "u2": "acked"}
    await store.close()


async def test_redis_watermark_shrinks_to_one_field(
    redis_url: str, raw_redis: aioredis.Redis
) -> None:
    store = RedisStore(redis_url, limits=SaverLimits(broadcast_settle_s=0))
    casts = [push(str(i)) for i in range(3)]
    for cast in casts:
        await store.store_broadcast("chat", cast, TTL)
    assert await store.pending("chat", "u1") == casts
    marks = store.user_keys("chat", "u1")[2]
    assert await raw_redis.hlen(marks) == 3
    assert await store.ack("chat", "u1", [cast["id"] for cast in casts]) == 3
    assert await raw_redis.hgetall(marks) == {b"": casts[2]["id"].encode()}
    assert 0 < await raw_redis.pttl(marks) <= (TTL + 1) * 1000
    await store.close()


async def test_redis_batches_are_a_few_round_trips(
    redis_url: str, raw_redis: aioredis.Redis
) -> None:
    store = RedisStore(redis_url)
    await store.store("chat", ["warm"], warm := push(), TTL)
    await store.ack("chat", "warm", [warm["id"]])
    uids = [f"u{i}" for i in range(500)]
    msg = push()
    for batch in (
        lambda: store.store("chat", uids, msg, TTL),
        lambda: store.mark_written("chat", [(uid, msg["id"]) for uid in uids]),
        lambda: store.ack_many([("chat", uid, [msg["id"]]) for uid in uids]),
    ):
        before = (await raw_redis.info("stats"))["total_reads_processed"]
        await batch()
        after = (await raw_redis.info("stats"))["total_reads_processed"]
        # A step per pipeline arrives in a few socket reads (plus the INFO); a round trip
        # per user would cost 500.
        assert after - before <= 12
    await store.close()


async def test_redis_survives_a_server_restart(redis_server, redis_url: str) -> None:
    store = RedisStore(redis_url)
    await store.store("chat", ["u1"], push(), TTL)
    redis_server.restart()
    assert await store.pending("chat", "u1") == []
    msg = push()
    await store.store("chat", ["u1"], msg, TTL)
    assert await store.pending("chat", "u1") == [msg]
    await store.close()

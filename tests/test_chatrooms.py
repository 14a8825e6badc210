"""Chat rooms on real room instances: membership, room pushes, broadcast pacing and the
big-room switches, driven through the rooms' RPC as center's workers drive them."""

from __future__ import annotations

import asyncio
import time

import pytest

from im.protocol.errors import ErrorCode
from room import chatrooms
from room.chatrooms import paced_slices
from room.fanout import shard_of
from tests.fixtures.system import System, at_second_start, eventually, metric_value

TRANSPORTS = ["tcp", "ws_msgpack", "ws_json"]


def push(n: int, *, pri: str = "normal", type_: str = "chat", room: str = "r1") -> dict:
    return {
        "op": "push",
        "id": f"m{n}",
        "type": type_,
        "pri": pri,
        "qos": 0,
        "ts": int(time.time() * 1000),
        "body": {"n": n},
        "room": room,
    }


async def joined(system: System, uid: str, room: str, i: int = 0, transport: str = "tcp"):
    client = await system.online(uid, i, transport)
    client.send({"op": "join", "room": room})
    answer = await client.recv()
    assert answer["op"] == "joined" and answer["room"] == room
    return client


async def room_push(system: System, i: int, message: dict, **extra) -> dict:
    params = {"product": "demo", "room": message["room"], "msg": message, **extra}
    return await system.room_rpc(i).call("room_push", params)


async def drain(client, timeout: float = 0.3) -> list[dict]:
    got = []
    while True:
        try:
            got.append(await client.recv(timeout=timeout))
        except TimeoutError:
            return got


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_join_push_leave(make_system, transport):
    system = await make_system(rooms=1, center=False)
    alice = await joined(system, "alice", "r1", transport=transport)
    outsider = await system.online("bob", 0, transport)
    answer = await room_push(system, 0, push(1))
    assert answer == {"written": 1, "dropped": 0}
    got = await alice.recv()
    assert got["op"] == "push" and got["room"] == "r1" and got["body"] == {"n": 1}
    assert await drain(outsider) == []
    alice.send({"op": "leave", "room": "r1"})
    assert await alice.recv() == {"op": "left", "room": "r1"}
    assert (await room_push(system, 0, push(2)))["written"] == 0


async def test_register_knows_members_per_instance(system: System):
    await joined(system, "a", "r1", 0)
    await joined(system, "b", "r1", 1)
    c = await joined(system, "c", "r1", 1)
    register = system.register_client()
    instances = [room.gateway.instance for room in system.rooms]

    async def counts():
        return await register.room_instances("demo", "r1")

    await eventually(lambda: counts_equal(counts, {instances[0]: 1, instances[1]: 2}))
    c.close()
    await eventually(lambda: counts_equal(counts, {instances[0]: 1, instances[1]: 1}))


async def counts_equal(counts, expected) -> bool:
    return await counts() == expected


async def test_one_tick_of_frames_is_one_shared_write(make_system):
    system = await make_system(rooms=1, center=False, room_flush_ms=50)
    members = [await joined(system, f"u{i}", "r1") for i in range(5)]
    chat = system.rooms[0].gateway.rooms
    writes_before = chat.writes
    for n in range(10):
        await room_push(system, 0, push(n))
    for member in members:
        assert [m["body"]["n"] for m in await drain(member)] == list(range(10))
    assert chat.writes - writes_before == 5  # one write per member for the whole tick
    assert chat.delivered >= 50


async def test_shards_limit_audience_chat_to_the_senders_sub_room(make_system):
    system = await make_system(rooms=1, center=False)
    uids = [f"viewer{i}" for i in range(12)]
    clients = {uid: await joined(system, uid, "r1") for uid in uids}
    shards = 3
    target = shard_of("viewer0", shards)
    await room_push(system, 0, push(1), shard=[target, shards], members_total=12)
    await room_push(system, 0, push(2, pri="high"))  # host/high: every shard
    for uid, client in clients.items():
        got = [m["body"]["n"] for m in await drain(client)]
        if shard_of(uid, shards) == target:
            assert sorted(got) == [1, 2]
        else:
            assert got == [2]


async def test_broadcast_reaches_every_connection_of_the_product(system: System):
    clients = [await system.online(f"u{i}", i % 2) for i in range(6)]
    message = {**push(1), "room": None}
    message.pop("room")
    for i in range(2):
        answer = await system.room_rpc(i).call(
            "broadcast", {"product": "demo", "msg": message, "spread_s": 0}
        )
        assert answer == {"written": 3}
    for client in clients:
        assert (await client.recv())["id"] == "m1"


async def test_paced_broadcast_is_spread_over_the_window(make_system):
    system = await make_system(rooms=1, center=False)
    clients = [await system.online(f"u{i}", 0) for i in range(40)]
    message = push(1)
    message.pop("room")
    started = time.monotonic()
    await system.room_rpc(0).call("broadcast", {"product": "demo", "msg": message, "spread_s": 1.0})
    arrivals = []
    for client in clients:
        await client.recv(timeout=3)
        arrivals.append(time.monotonic() - started)
    assert max(arrivals) >= 0.7  # the last slice leaves near the end of the window
    assert sum(1 for t in arrivals if t < 0.3) <= 20  # not everyone at once


async def test_too_many_rooms_is_a_clear_error(make_system):
    system = await make_system(rooms=1, center=False, max_rooms_per_conn=2)
    client = await system.online("u", 0)
    for room in ("a", "b"):
        client.send({"op": "join", "room": room})
        assert (await client.recv())["op"] == "joined"
    client.send({"op": "join", "room": "c"})
    error = await client.recv()
    assert error["code"] == ErrorCode.BAD_FIELD and "rooms" in error["reason"]
    client.send({"op": "join", "room": "a"})  # joining again is not a new room
    assert (await client.recv())["op"] == "joined"


async def test_bad_room_push_is_refused(make_system):
    system = await make_system(rooms=1, center=False)
    rpc = system.room_rpc(0)
    for params in (None, {"product": "demo"}, {"product": "demo", "room": "r", "msg": {"op": "x"}}):
        with pytest.raises(Exception) as info:
            await rpc.call("room_push", params)
        assert "bad_request" in str(info.value)


# -- the switches, set through the register as an operator would ---------------------------


async def with_switches(system: System, document: dict) -> None:
    register = system.register_client()
    version = await register.put_switches(document)
    await eventually(
        lambda: all(r.gateway.switches_version >= version for r in system.rooms), timeout=3
    )


async def test_big_room_budget_drops_only_what_the_switches_say(make_system):
    system = await make_system(rooms=1, center=False)
    member = await joined(system, "u", "r1")
    await with_switches(system, {"big_rooms": ["r1"], "room_budget": 3})
    await at_second_start()
    answers = [await room_push(system, 0, push(n)) for n in range(6)]
    answers.append(await room_push(system, 0, push(99, pri="high", type_="gift")))
    got = sorted(m["body"]["n"] for m in await drain(member))
    assert got == [0, 1, 2, 99]
    assert sum(1 for a in answers if a["dropped"]) == 3
    metrics = await system.room_metrics(0)
    assert (
        metric_value(
            metrics, "im_room_room_drops_total", room="r1", type="chat", reason="room_budget"
        )
        == 3
    )


async def test_small_room_is_not_degraded(make_system):
    system = await make_system(rooms=1, center=False)
    member = await joined(system, "u", "r1")
    await with_switches(system, {"room_budget": 1})
    for n in range(5):
        await room_push(system, 0, push(n))
    assert len(await drain(member)) == 5


async def test_compress_complex_packs_low_pushes_into_one_batch_frame(make_system):
    system = await make_system(rooms=1, center=False, room_flush_ms=50)
    member = await joined(system, "u", "r1", transport="ws_json")
    await with_switches(system, {"big_rooms": ["r1"], "room_budget": 100, "compress_complex": True})
    for n in range(4):
        await room_push(system, 0, push(n, pri="low", type_="level_up"))
    frames = await drain(member)
    batches = [f for f in frames if f["op"] == "batch"]
    assert len(batches) == 1
    assert [m["body"]["n"] for m in batches[0]["msgs"]] == [0, 1, 2, 3]


async def test_likes_are_merged_into_one_count_per_second(make_system):
    system = await make_system(rooms=1, center=False)
    member = await joined(system, "u", "r1")
    await with_switches(system, {"big_rooms": ["r1"], "room_budget": 100, "merge_likes": True})
    for n in range(7):
        await room_push(system, 0, push(n, pri="low", type_="like"))
    frames = await drain(member, timeout=1.6)
    likes = [f for f in frames if f.get("type") == "like"]
    assert len(likes) == 1
    assert likes[0]["body"]["count"] == 7


async def test_common_msg_drops_a_type_entirely_at_that_size(make_system):
    system = await make_system(rooms=1, center=False)
    member = await joined(system, "u", "r1")
    await with_switches(
        system, {"big_rooms": ["r1"], "room_budget": 100, "common_msg": {"1": ["enter"]}}
    )
    await room_push(system, 0, push(1, type_="enter"))
    await room_push(system, 0, push(2, type_="chat"))
    assert [m["body"]["n"] for m in await drain(member)] == [2]


async def test_idc_budget_throttles_big_room_normal_traffic_but_not_high(make_system):
    system = await make_system(rooms=1, center=False, idc="bj")
    members = [await joined(system, f"u{i}", "r1") for i in range(4)]
    await with_switches(
        system,
        {"big_rooms": ["r1"], "room_budget": 100, "idc_budget": {"bj": 8}, "float_range": 0},
    )
    await at_second_start()
    for n in range(5):
        await room_push(system, 0, push(n))  # each costs 4 deliveries: 2 fit in 8/s
    await room_push(system, 0, push(9, pri="high"))
    got = sorted(m["body"]["n"] for m in await drain(members[0]))
    assert got == [0, 1, 9]


def test_batches_are_split_below_the_client_frame_limit():
    from room.chatrooms import MAX_BATCH_BYTES, _split_batch

    big = [{"op": "push", "body": "x" * 100_000, "n": n} for n in range(12)]
    batches = _split_batch(big)
    assert [m for b in batches for m in b] == big
    assert len(batches) > 1
    for batch in batches:
        assert sum(len(str(m)) for m in batch) <= MAX_BATCH_BYTES + 200 * len(batch)


async def test_high_priority_flushes_the_room_at_once_and_takes_waiting_frames_along(
    make_system,
):
    system = await make_system(rooms=1, center=False, room_flush_ms=2000)
    member = await joined(system, "u", "r1")
    await room_push(system, 0, push(1))  # waits for the 2 s tick
    assert await drain(member, timeout=0.3) == []
    started = time.monotonic()
    await room_push(system, 0, push(2, pri="high", type_="gift"))
    first = await member.recv(timeout=1)
    second = await member.recv(timeout=1)
    assert time.monotonic() - started < 0.5
    assert {first["body"]["n"], second["body"]["n"]} == {1, 2}


async def test_several_messages_in_one_room_push_keep_their_order(make_system):
    system = await make_system(rooms=1, center=False)
    member = await joined(system, "u", "r1")
    items = [{"msg": push(n), "shard": None} for n in range(5)]
    answer = await system.room_rpc(0).call(
        "room_push", {"product": "demo", "room": "r1", "items": items, "members_total": 1}
    )
    assert answer == {"written": 5, "dropped": 0}
    assert [m["body"]["n"] for m in await drain(member)] == [0, 1, 2, 3, 4]
    with pytest.raises(Exception, match="bad_request"):
        await system.room_rpc(0).call(
            "room_push",
            {"product": "demo", "room": "r1", "items": [{"msg": push(9), "shard": [3, 2]}]},
        )


@pytest.mark.parametrize(("total", "spread"), [(150, 2.0), (7, 30.0), (10_000, 5.0), (1, 1.0)])
def test_paced_slices_cover_everyone_once_evenly_over_the_window(total, spread) -> None:
    slices = paced_slices(total, spread)
    covered = [i for _, start, end in slices for i in range(start, end)]
    assert covered == list(range(total))
    sizes = [end - start for _, start, end in slices]
    assert max(sizes) - min(sizes) <= 1  # the last part of the window gets its share too
    delays = [delay for delay, _, _ in slices]
    assert delays[0] == 0 and delays == sorted(delays) and delays[-1] < spread


# -- flush passes ----------------------------------------------------------------------------


async def test_a_big_pass_is_written_a_slice_per_loop_iteration(make_system, monkeypatch):
    monkeypatch.setattr(chatrooms, "SLICE_MEMBERS", 2)
    system = await make_system(rooms=1, center=False)
    members = [await joined(system, f"u{i}", "r1") for i in range(5)]
    chat = system.rooms[0].gateway.rooms
    before = chat.writes
    params = {"product": "demo", "room": "r1", "msg": push(1, pri="high", type_="gift")}
    assert await chat.rpc_room_push(params) == {"written": 5, "dropped": 0}
    await asyncio.sleep(0)  # the turn that lets the RPC answer out first
    await asyncio.sleep(0)  # one slice
    assert chat.writes - before == 2
    for member in members:
        assert [m["body"]["n"] for m in await drain(member)] == [1]
    assert chat.writes - before == 5


async def test_a_high_push_joins_the_pass_under_way_and_a_second_pass_serves_the_rest(
    make_system, monkeypatch
):
    monkeypatch.setattr(chatrooms, "SLICE_MEMBERS", 2)
    system = await make_system(rooms=1, center=False)
    members = [await joined(system, f"u{i}", "r1") for i in range(5)]
    chat = system.rooms[0].gateway.rooms
    before = chat.writes
    for n in (1, 2):
        params = {"product": "demo", "room": "r1", "msg": push(n, pri="high", type_="gift")}
        await chat.rpc_room_push(params)
        await asyncio.sleep(0)
        await asyncio.sleep(0)
    for member in members:
        assert [m["body"]["n"] for m in await drain(member)] == [1, 2]
    # The first slice wrote 1 to u0 and u1; 2 came before the next slice, so u2..u4 got 1
    # and 2 in one write each, and a second pass wrote 2 to u0 and u1: 7 writes, not 10.
    assert chat.writes - before == 7


async def test_a_high_push_goes_ahead_of_a_tick_pass_in_another_room(make_system, monkeypatch):
    monkeypatch.setattr(chatrooms, "SLICE_MEMBERS", 2)
    system = await make_system(rooms=1, center=False, room_flush_ms=60_000)
    quiet = [await joined(system, f"q{i}", "quiet") for i in range(4)]
    hot = [await joined(system, f"h{i}", "hot") for i in range(2)]
    chat = system.rooms[0].gateway.rooms
    await chat.rpc_room_push({"product": "demo", "room": "quiet", "msg": push(1, room="quiet")})
    chat._pass(chat.groups["demo", "quiet"], urgent=False)  # as its tick would ...
    high = push(2, pri="high", room="hot")
    await chat.rpc_room_push({"product": "demo", "room": "hot", "msg": high})
    await asyncio.sleep(0)
    await asyncio.sleep(0)  # ... but the first slice goes to the high push
    hot_group, quiet_group = chat.groups["demo", "hot"], chat.groups["demo", "quiet"]
    assert all(mark == hot_group.head for mark in hot_group.members.values())
    assert all(mark < quiet_group.head for mark in quiet_group.members.values())
    for client, n in [*((c, 2) for c in hot), *((c, 1) for c in quiet)]:
        assert [m["body"]["n"] for m in await drain(client)] == [n]


async def test_a_pass_takes_waiting_messages_along_and_their_tick_starts_again(make_system):
    system = await make_system(rooms=1, center=False, room_flush_ms=600)
    member = await joined(system, "u", "r1")
    await room_push(system, 0, push(1))  # waits for its tick ...
    await room_push(system, 0, push(2, pri="high", type_="gift"))  # ... a pass takes it along
    assert [m["body"]["n"] for m in await drain(member, timeout=0.3)] == [1, 2]
    started = time.monotonic()
    await room_push(system, 0, push(3))
    assert (await member.recv(timeout=3))["body"]["n"] == 3
    assert time.monotonic() - started >= 0.5  # a tick of its own, not what was left of 1's

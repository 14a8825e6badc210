"""The switch document model, and one contract for every SwitchStore engine."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import pytest
import redis.asyncio as aioredis
from hypothesis import given
from hypothesis import strategies as st

from im.switches import (
    DOCUMENT,
    FIELDS,
    SwitchError,
    Switches,
    SwitchStore,
    diff,
    parse_switches,
    to_document,
)
from register.engines.switches_memory import MemorySwitchStore
from register.engines.switches_redis import RedisSwitchStore

FULL = {
    "big_rooms": ["live-2", "live-1"],
    "size_thresholds": [1000, 5000, 50000],
    "room_budget": 15,
    "msg_type_ratio": {"chat": 40, "like": 20, "enter": 5},
    "common_msg": {"1": ["enter"], "3": ["like", "level_up"]},
    "merge_likes": True,
    "compress_complex": True,
    "shard_size": 500,
    "room_pin": {"live-1": "worker-a"},
    "idc_budget": {"bj": 200000, "sh": 150000},
    "float_range": 0.5,
}


# --- the model ---------------------------------------------------------------------------


def test_defaults_are_the_documented_ones() -> None:
    assert parse_switches({}) == Switches()
    assert to_document(Switches()) == {
        "big_rooms": [],
        "size_thresholds": [3000, 10000, 20000],
        "room_budget": 20,
        "msg_type_ratio": {},
        "common_msg": {},
        "merge_likes": False,
        "compress_complex": False,
        "shard_size": 0,
        "room_pin": {},
        "idc_budget": {},
        "float_range": 0.2,
    }
    assert tuple(to_document(Switches())) == FIELDS


def test_full_document_parses_and_comes_back_canonical() -> None:
    switches = parse_switches(FULL)
    assert switches.big_rooms == {"live-1", "live-2"}
    assert switches.size_thresholds == (1000, 5000, 50000)
    assert switches.msg_type_ratio == {"chat": 40, "like": 20, "enter": 5}
    assert switches.common_msg == {1: {"enter"}, 3: {"like", "level_up"}}
    assert switches.room_pin == {"live-1": "worker-a"}
    assert switches.float_range == 0.5
    document = to_document(switches)
    assert document == {
        **FULL,
        "big_rooms": ["live-1", "live-2"],
        "common_msg": {"1": ["enter"], "3": ["level_up", "like"]},
    }
    assert parse_switches(document) == switches


def test_missing_fields_take_defaults() -> None:
    switches = parse_switches({"merge_likes": True})
    assert switches == dataclasses.replace(Switches(), merge_likes=True)


def test_integer_float_range_is_a_float() -> None:
    assert parse_switches({"float_range": 1}).float_range == 1.0
    assert isinstance(parse_switches({"float_range": 0}).float_range, float)


def test_switches_cannot_be_changed_in_place() -> None:
    switches = parse_switches(FULL)
    with pytest.raises(dataclasses.FrozenInstanceError):
        switches.room_budget = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        switches.msg_type_ratio["chat"] = 100  # type: ignore[index]
    with pytest.raises(TypeError):
        switches.room_pin["x"] = "y"  # type: ignore[index]


BAD: list[tuple[Any, str]] = [
    ([], DOCUMENT),
    ({"room_budgett": 3}, "room_budgett"),
    ({"big_rooms": "live-1"}, "big_rooms"),
    ({"big_rooms": ["ok", 7]}, "big_rooms[1]"),
    ({"big_rooms": [""]}, "big_rooms[0]"),
    ({"big_rooms": ["r" * 129]}, "big_rooms[0]"),
    ({"size_thresholds": [1, 2]}, "size_thresholds"),
    ({"size_thresholds": [10, 5, 20]}, "size_thresholds"),
    ({"size_thresholds": [10, 10, 20]}, "size_thresholds"),
    ({"size_thresholds": [0, 10, 20]}, "size_thresholds[0]"),
    ({"size_thresholds": [1, "2", 3]}, "size_thresholds[1]"),
    ({"room_budget": -1}, "room_budget"),
    ({"room_budget": 2.5}, "room_budget"),
    ({"room_budget": True}, "room_budget"),
    ({"room_budget": None}, "room_budget"),
    ({"room_budget": 10**12}, "room_budget"),
    ({"msg_type_ratio": [40]}, "msg_type_ratio"),
    ({"msg_type_ratio": {"chat": 101}}, "msg_type_ratio.chat"),
    ({"msg_type_ratio": {"chat": -5}}, "msg_type_ratio.chat"),
    ({"msg_type_ratio": {"chat": "40"}}, "msg_type_ratio.chat"),
    ({"msg_type_ratio": {"chat": 60, "like": 41}}, "msg_type_ratio"),
    ({"msg_type_ratio": {"": 5}}, "msg_type_ratio."),
    ({"common_msg": {"4": ["enter"]}}, "common_msg.4"),
    ({"common_msg": {"0": ["enter"]}}, "common_msg.0"),
    ({"common_msg": {"1": "enter"}}, "common_msg.1"),
    ({"common_msg": {"2": ["ok", 3]}}, "common_msg.2[1]"),
    ({"merge_likes": 1}, "merge_likes"),
    ({"compress_complex": "yes"}, "compress_complex"),
    ({"shard_size": -100}, "shard_size"),
    ({"room_pin": {"live-1": 3}}, "room_pin.live-1"),
    ({"room_pin": {"live-1": ""}}, "room_pin.live-1"),
    ({"idc_budget": {"bj": -1}}, "idc_budget.bj"),
    ({"idc_budget": {"bj": 1.5}}, "idc_budget.bj"),
    ({"float_range": 1.01}, "float_range"),
    ({"float_range": -0.1}, "float_range"),
    ({"float_range": float("nan")}, "float_range"),
    ({"float_range": "0.2"}, "float_range"),
    ({"float_range": False}, "float_range"),
]


@pytest.mark.parametrize(("document", "field"), BAD, ids=[field for _, field in BAD])
def test_bad_value_names_its_field(document: Any, field: str) -> None:
    with pytest.raises(SwitchError) as caught:
        parse_switches(document)
    assert caught.value.field == field
    assert str(caught.value).startswith(f"{field}: ")
    assert caught.value.message


def test_long_lists_are_refused() -> None:
    with pytest.raises(SwitchError) as caught:
        parse_switches({"big_rooms": [f"r{i}" for i in range(10_001)]})
    assert caught.value.field == "big_rooms"
    assert "at most" in caught.value.message


def test_size_level_counts_thresholds_reached() -> None:
    switches = Switches()
    assert [switches.size_level(n, "r") for n in (0, 2999, 3000, 9999, 10_000, 20_000)] == [
        0,
        0,
        1,
        1,
        2,
        3,
    ]
    custom = parse_switches({"size_thresholds": [10, 20, 30]})
    assert [custom.size_level(n, "r") for n in (9, 10, 25, 10**6)] == [0, 1, 2, 3]


def test_listed_big_room_is_at_least_level_one() -> None:
    switches = parse_switches({"big_rooms": ["hot"]})
    assert switches.size_level(0, "hot") == 1
    assert switches.size_level(0, "cold") == 0
    assert switches.size_level(15_000, "hot") == 2


def test_common_msg_drops_at_its_level_and_above() -> None:
    switches = parse_switches({"common_msg": {"1": ["enter"], "3": ["like"]}})
    assert switches.dropped_types(0) == frozenset()
    assert switches.dropped_types(1) == {"enter"}
    assert switches.dropped_types(2) == {"enter"}
    assert switches.dropped_types(3) == {"enter", "like"}


def test_diff_lists_only_changed_fields() -> None:
    old = to_document(Switches())
    new = to_document(parse_switches({"room_budget": 5, "big_rooms": ["r1"]}))
    assert diff(old, new) == {
        "big_rooms": {"old": [], "new": ["r1"]},
        "room_budget": {"old": 20, "new": 5},
    }
    assert diff(new, new) == {}
    assert diff({}, {"merge_likes": True}) == {"merge_likes": {"old": None, "new": True}}


_names = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=8)
_ascending = st.lists(st.integers(1, 10**6), min_size=3, max_size=3, unique=True).map(sorted)
_documents = st.fixed_dictionaries(
    {},
    optional={
        "big_rooms": st.lists(_names, max_size=5),
        "size_thresholds": _ascending,
        "room_budget": st.integers(0, 10**6),
        "msg_type_ratio": st.dictionaries(_names, st.integers(0, 33), max_size=3),
        "common_msg": st.dictionaries(
            st.sampled_from(["1", "2", "3"]), st.lists(_names, max_size=3)
        ),
        "merge_likes": st.booleans(),
        "compress_complex": st.booleans(),
        "shard_size": st.integers(0, 10**6),
        "room_pin": st.dictionaries(_names, _names, max_size=3),
        "idc_budget": st.dictionaries(_names, st.integers(0, 10**9), max_size=3),
        "float_range": st.floats(0, 1),
    },
)


@given(_documents)
def test_every_valid_document_round_trips(document: dict[str, Any]) -> None:
    switches = parse_switches(document)
    canonical = to_document(switches)
    assert parse_switches(canonical) == switches
    assert to_document(parse_switches(canonical)) == canonical


# --- the store contract --------------------------------------------------------------------


@asynccontextmanager
async def _memory(request: pytest.FixtureRequest) -> AsyncIterator[SwitchStore]:
    store = MemorySwitchStore()
    yield store
    await store.close()


@asynccontextmanager
async def _redis(request: pytest.FixtureRequest) -> AsyncIterator[SwitchStore]:
    store = RedisSwitchStore(request.getfixturevalue("redis_url"))
    yield store
    await store.close()


ENGINES: dict[str, Callable[[pytest.FixtureRequest], AbstractAsyncContextManager[SwitchStore]]]
ENGINES = {"memory": _memory, "redis": _redis}


@pytest.fixture(params=list(ENGINES))
async def store(request: pytest.FixtureRequest) -> AsyncIterator[SwitchStore]:
    async with ENGINES[request.param](request) as opened:
        yield opened


async def test_never_written_store_is_version_zero(store: SwitchStore) -> None:
    assert await store.get_switches() is None
    assert await store.get_switches(0) is None
    assert await store.get_switches(3) == (0, {})


async def test_put_bumps_the_version_and_get_returns_the_document(store: SwitchStore) -> None:
    assert await store.put_switches(FULL) == 1
    assert await store.get_switches() == (1, FULL)
    second = {**FULL, "room_budget": 3, "room_pin": {"房间": "工人"}}
    assert await store.put_switches(second) == 2
    assert await store.get_switches(1) == (2, second)


async def test_get_is_none_while_the_version_is_unchanged(store: SwitchStore) -> None:
    await store.put_switches({"merge_likes": True})
    assert await store.get_switches(1) is None
    await store.put_switches({"merge_likes": False})
    assert await store.get_switches(1) == (2, {"merge_likes": False})
    assert await store.get_switches(2) is None


async def test_a_version_ahead_of_the_store_gets_the_document(store: SwitchStore) -> None:
    """A poller that knew a version the store lost (emptied Redis) takes what is there."""
    await store.put_switches({"shard_size": 5})
    assert await store.get_switches(7) == (1, {"shard_size": 5})


async def test_callers_cannot_change_the_stored_document(store: SwitchStore) -> None:
    document = {"big_rooms": ["a"]}
    await store.put_switches(document)
    document["big_rooms"].append("b")
    _, got = await store.get_switches()
    got["big_rooms"].append("c")
    assert await store.get_switches() == (1, {"big_rooms": ["a"]})


async def test_non_json_document_is_refused_and_nothing_changes(store: SwitchStore) -> None:
    await store.put_switches({"room_budget": 1})
    with pytest.raises(TypeError):
        await store.put_switches({"room_budget": object()})
    assert await store.get_switches() == (1, {"room_budget": 1})


async def test_concurrent_puts_get_distinct_versions(store: SwitchStore) -> None:
    versions = await asyncio.gather(*(store.put_switches({"room_budget": i}) for i in range(50)))
    assert sorted(versions) == list(range(1, 51))
    version, document = await store.get_switches()
    assert version == 50
    assert document == {"room_budget": versions.index(50)}


# --- what only the Redis engine promises ---------------------------------------------------


async def test_redis_stores_share_one_document(redis_url: str) -> None:
    writer, reader = RedisSwitchStore(redis_url), RedisSwitchStore(redis_url)
    try:
        assert await writer.put_switches({"merge_likes": True}) == 1
        assert await reader.get_switches() == (1, {"merge_likes": True})
        assert await reader.put_switches({"merge_likes": False}) == 2
        assert await writer.get_switches(1) == (2, {"merge_likes": False})
    finally:
        await writer.close()
        await reader.close()


async def test_redis_layout_and_prefix(redis_url: str) -> None:
    store, other = RedisSwitchStore(redis_url), RedisSwitchStore(redis_url, prefix="other")
    client = aioredis.Redis.from_url(redis_url)
    try:
        await store.put_switches({"shard_size": 9})
        assert store.key == "im:switches"
        assert await client.hgetall("im:switches") == {
            b"version": b"1",
            b"document": b'{"shard_size":9}',
        }
        assert await other.get_switches(5) == (0, {})
    finally:
        await store.close()
        await other.close()
        await client.aclose()


async def test_redis_scripts_reload_after_the_cache_is_flushed(redis_url: str) -> None:
    store = RedisSwitchStore(redis_url)
    client = aioredis.Redis.from_url(redis_url)
    try:
        await store.put_switches({"room_budget": 1})
        await client.script_flush()
        assert await store.get_switches() == (1, {"room_budget": 1})
        await client.script_flush()
        assert await store.put_switches({"room_budget": 2}) == 2
    finally:
        await store.close()
        await client.aclose()

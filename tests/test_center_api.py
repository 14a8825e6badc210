"""Center's HTTP API over real sockets: aiohttp on a free port, the in-process bus and
worker, rooms as real RPC servers."""

from __future__ import annotations

import asyncio
import json
import socket
import types
import zlib
from collections.abc import AsyncIterator, Sequence
from importlib import resources
from typing import Any

import aiohttp
import pytest
from prometheus_client import REGISTRY

from center.config import CenterConfig
from center.jobs import decode_job
from center.push import NODE_MISS_REFRESH_S
from center.server import CenterServer
from im.bus import BusUnavailable
from im.bus.memory import MemoryBus
from im.config import Product
from im.ids import id_time_ms
from im.protocol.messages import validate_server
from im.rpc import RpcServer, RpcUnavailable
from im.sessions import Node, Session
from register.engines.memory import MemoryStore
from register.engines.switches_memory import MemorySwitchStore
from saver.config import SaverConfig
from saver.engines.memory import MemoryStore as MessageMemory
from saver.server import SaverServer
from tests.fixtures.room_calls import room_push_entries
from tests.fixtures.system import eventually

KEY = "demo-api-key-0123456789"
OTHER_KEY = "other-api-key-0123456789"
PRODUCTS = {
    "demo": Product("demo", "s" * 32, KEY),
    "other": Product("other", "t" * 32, OTHER_KEY),
}
AUTH = {"Authorization": f"Bearer {KEY}"}
TTL = 60.0
MAX_BODY = 256 * 1024


class FakeRoom:
    """A room instance's RPC side: records each call and writes to the conns it holds."""

    def __init__(self, instance: str, conns: Sequence[str]) -> None:
        self.instance = instance
        self.conns = set(conns)
        self.calls: list[dict[str, Any]] = []
        self.room_calls: list[dict[str, Any]] = []
        self.broadcasts: list[dict[str, Any]] = []
        handlers = {"push": self.push, "room_push": self.room_push, "broadcast": self.broadcast}
        self.server = RpcServer(handlers, name=f"fake-{instance}")

    async def push(self, params: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(params)
        written, missing = 0, []
        for item in params["items"]:
            for conn in item["conns"]:
                if conn in self.conns:
                    written += 1
                else:
                    missing.append(conn)
        return {"written": written, "missing": missing}

    async def room_push(self, params: dict[str, Any]) -> dict[str, Any]:
        entries = room_push_entries(params)
        self.room_calls.extend(entries)
        return {"written": len(entries), "dropped": 0}

    async def broadcast(self, params: dict[str, Any]) -> dict[str, Any]:
        self.broadcasts.append(params)
        return {"written": len(self.conns)}


class FailingStore(MemoryStore):
    """A register that cannot be reached."""

    async def lookup(self, product: str, uids: Sequence[str]) -> dict[str, list[Session]]:
        raise RpcUnavailable("register at 127.0.0.1:1 is down")

    async def room_instances(self, product: str, room: str) -> dict[str, int]:
        raise RpcUnavailable("register at 127.0.0.1:1 is down")


class FailingBus(MemoryBus):
    """A bus whose broker cannot be reached."""

    async def publish(self, topic: str, key: str, value: bytes) -> None:
        raise BusUnavailable("no broker answered in 5 s")


def _session(uid: str, conn: str, instance: str, product: str = "demo") -> Session:
    return Session(product, uid, conn, instance, device="phone")


async def _start_room(store: MemoryStore, instance: str, sessions: list[Session]) -> FakeRoom:
    room = FakeRoom(instance, [s.conn for s in sessions])
    await room.server.start("127.0.0.1", 0)
    await store.put_node(Node(instance, rpc=room.server.address), TTL)
    await store.put_sessions(sessions, TTL)
    return room


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture
async def store() -> AsyncIterator[MemoryStore]:
    engine = MemoryStore()
    yield engine
    await engine.close()


@pytest.fixture
def switch_store() -> MemorySwitchStore:
    return MemorySwitchStore()


@pytest.fixture
async def rooms(store: MemoryStore) -> AsyncIterator[dict[str, FakeRoom]]:
    started = {
        "room-a": await _start_room(
            store,
            "room-a",
            [
                _session("u1", "a1", "room-a"),
                _session("u1", "a2", "room-a"),
                _session("u3", "a3", "room-a"),
            ],
        ),
        # x1 is the same uid under another product: it must never receive demo's pushes.
        "room-b": await _start_room(
            store,
            "room-b",
            [_session("u2", "b1", "room-b"), _session("u1", "x1", "room-b", product="other")],
        ),
    }
    yield started
    for room in started.values():
        await room.server.close()


@pytest.fixture
async def saver() -> AsyncIterator[SaverServer]:
    """The message saver a center stores qos 1 pushes in."""
    server = SaverServer(SaverConfig(host="127.0.0.1", port=0, metrics_port=0), MessageMemory())
    await server.start()
    yield server
    await server.close()


async def _center(
    store: Any,
    switch_store: MemorySwitchStore | None = None,
    products: Any = PRODUCTS,
    bus: MemoryBus | None = None,
    saver: SaverServer | None = None,
) -> CenterServer:
    """Center over `store`; without a saver, qos 1 pushes answer 503."""
    saver_address = saver.rpc.address if saver is not None else ""
    config = CenterConfig(port=0, rpc_timeout=1.0, max_body=MAX_BODY, saver=saver_address)
    server = CenterServer(config, store, products, switch_store=switch_store, bus=bus)
    await server.start()
    return server


@pytest.fixture
async def center(
    store: MemoryStore,
    switch_store: MemorySwitchStore,
    rooms: dict[str, FakeRoom],
    saver: SaverServer,
) -> AsyncIterator[CenterServer]:
    """Center with one in-process worker; closed before the rooms, which it may still call."""
    server = await _center(store, switch_store, saver=saver)
    yield server
    await server.close()


@pytest.fixture
async def http(center: CenterServer) -> AsyncIterator[tuple[aiohttp.ClientSession, str]]:
    async with aiohttp.ClientSession() as client:
        yield client, center.url


async def _call(
    http: tuple[aiohttp.ClientSession, str],
    method: str,
    path: str,
    *,
    headers: dict[str, str] | None = AUTH,
    **kwargs: Any,
) -> tuple[int, Any, aiohttp.ClientResponse]:
    client, url = http
    async with client.request(method, url + path, headers=headers, **kwargs) as response:
        raw = await response.read()
        body = json.loads(raw) if response.content_type == "application/json" else raw.decode()
        return response.status, body, response


def _assert_error(status: int, body: Any, expected_status: int, code: str) -> None:
    assert status == expected_status, body
    assert set(body) == {"error"}
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]


async def _jobs_done(kind: str, before: float, count: int = 1) -> None:
    """Wait until the worker finished `count` more jobs of `kind` than `before`."""
    await eventually(
        lambda: _metric("im_worker_jobs_total", job=kind, result="done") >= before + count
    )


async def test_unicast_reaches_each_instance_with_one_rpc(http, rooms) -> None:
    status, body, _ = await _call(
        http,
        "POST",
        "/v1/push/users",
        json={"uids": ["u1", "u2", "u3", "u1", "nobody"], "type": "gift", "pri": "high",
              "qos": 1, "body": {"text": "hi", "n": [1, 2]}},
    )  # fmt: skip
    assert status == 200, body
    assert body["online"] == 4
    room_a, room_b = rooms["room-a"], rooms["room-b"]
    await eventually(lambda: room_a.calls and room_b.calls)
    assert len(room_a.calls) == 1 and len(room_b.calls) == 1
    (item_a,) = room_a.calls[0]["items"]
    (item_b,) = room_b.calls[0]["items"]
    assert sorted(item_a["conns"]) == ["a1", "a2", "a3"]
    assert item_b["conns"] == ["b1"]  # not x1: that is u1 of another product
    for msg in (item_a["msg"], item_b["msg"]):
        assert validate_server(msg) == "push"
        assert msg["id"] == body["id"]
        assert (msg["type"], msg["pri"], msg["qos"]) == ("gift", "high", 1)
        assert msg["body"] == {"text": "hi", "n": [1, 2]}
        assert msg["ts"] == id_time_ms(body["id"])
        assert "room" not in msg


async def test_defaults_and_null_body(http, rooms) -> None:
    status, body, _ = await _call(
        http, "POST", "/v1/push/users", json={"uids": ["u2"], "body": None}
    )
    assert (status, body["online"]) == (200, 1)
    await eventually(lambda: rooms["room-b"].calls)
    msg = rooms["room-b"].calls[0]["items"][0]["msg"]
    assert (msg["type"], msg["pri"], msg["qos"], msg["body"]) == ("chat", "normal", 0, None)


async def test_api_key_selects_the_product(http, rooms) -> None:
    headers = {"Authorization": f"Bearer {OTHER_KEY}"}
    status, body, _ = await _call(
        http, "POST", "/v1/push/users", headers=headers, json={"uids": ["u1"], "body": 1}
    )
    assert (status, body["online"]) == (200, 1)
    await eventually(lambda: rooms["room-b"].calls)
    assert rooms["room-b"].calls[0]["items"][0]["conns"] == ["x1"]
    assert rooms["room-a"].calls == []


async def test_offline_uid_is_online_zero(http, rooms) -> None:
    done = _metric("im_worker_jobs_total", job="users", result="done")
    status, body, _ = await _call(
        http, "POST", "/v1/push/users", json={"uids": ["ghost"], "body": "x"}
    )
    assert (status, body["online"]) == (200, 0)
    await _jobs_done("users", done)
    assert all(room.calls == [] for room in rooms.values())


async def test_ids_increase_across_pushes(http) -> None:
    ids = []
    for _ in range(5):
        _, body, _ = await _call(http, "POST", "/v1/push/users", json={"uids": ["u"], "body": 0})
        ids.append(body["id"])
    assert ids == sorted(ids) and len(set(ids)) == 5


async def test_ten_thousand_uids_accepted_one_more_refused(http, rooms) -> None:
    uids = [f"user-{i}" for i in range(9_999)] + ["u2"]
    status, body, _ = await _call(http, "POST", "/v1/push/users", json={"uids": uids, "body": 1})
    assert (status, body["online"]) == (200, 1)
    await eventually(lambda: rooms["room-b"].calls)
    assert len(rooms["room-b"].calls) == 1
    status, body, _ = await _call(
        http, "POST", "/v1/push/users", json={"uids": [*uids, "one-more"], "body": 1}
    )
    _assert_error(status, body, 400, "invalid_field")
    assert "'uids'" in body["error"]["message"] and "10000" in body["error"]["message"]


async def _room_members(store: MemoryStore) -> None:
    await store.put_rooms("room-a", [("demo", "r1", 2), ("other", "r1", 5)], TTL)
    await store.put_rooms("room-b", [("demo", "r1", 1)], TTL)


async def test_room_push_reaches_each_instance_of_the_room(http, rooms, store) -> None:
    await _room_members(store)
    status, body, _ = await _call(
        http,
        "POST",
        "/v1/push/rooms/r1",
        json={"type": "gift", "pri": "high", "body": {"n": 1}, "from": "host"},
    )
    assert status == 200, body
    assert set(body) == {"id", "members"} and body["members"] == 3
    await eventually(lambda: rooms["room-a"].room_calls and rooms["room-b"].room_calls)
    for room in rooms.values():
        (call,) = room.room_calls
        assert (call["product"], call["room"], call["members_total"]) == ("demo", "r1", 3)
        assert call["shard"] is None  # no switches: no virtual sub-rooms
        msg = call["msg"]
        assert validate_server(msg) == "push"
        assert (msg["id"], msg["room"], msg["type"], msg["pri"]) == (
            body["id"],
            "r1",
            "gift",
            "high",
        )
        assert (msg["qos"], msg["body"], msg["ts"]) == (0, {"n": 1}, id_time_ms(body["id"]))
        assert room.calls == [] and room.broadcasts == []


async def test_room_push_with_shards_names_the_senders_sub_room(
    http, rooms, store, center, switch_store
) -> None:
    await _room_members(store)
    await switch_store.put_switches({"shard_size": 2})
    await center.switches.poll()
    status, body, _ = await _call(
        http, "POST", "/v1/push/rooms/r1", json={"body": "hi", "from": "fan-7"}
    )
    assert status == 200, body
    await eventually(lambda: rooms["room-a"].room_calls)
    expected = [zlib.crc32(b"fan-7") % 2, 2]  # 3 members in shards of at most 2
    assert rooms["room-a"].room_calls[0]["shard"] == expected


async def test_room_push_to_a_pinned_room_goes_to_the_workers_own_topic(
    http, rooms, store, center, switch_store
) -> None:
    await _room_members(store)
    await switch_store.put_switches({"room_pin": {"r1": "w7"}})
    await center.switches.poll()
    status, body, _ = await _call(http, "POST", "/v1/push/rooms/r1", json={"body": 1})
    assert (status, body["members"]) == (200, 3)
    probe = center.bus.consumer(["im.pin.w7"], "probe")
    await probe.start()
    try:
        records = await probe.fetch(10, timeout=1.0)
    finally:
        await probe.close()
    assert [record.key for record in records] == ["r1"]
    job = decode_job(records[0].value)
    assert (job.kind, job.room, job.id) == ("room", "r1", body["id"])
    assert all(room.room_calls == [] for room in rooms.values())  # no worker w7 runs


async def test_room_info(http, rooms, store) -> None:
    await _room_members(store)
    status, body, _ = await _call(http, "GET", "/v1/rooms/r1")
    assert (status, body) == (
        200,
        {"room": "r1", "members": 3, "instances": {"room-a": 2, "room-b": 1}},
    )
    status, body, _ = await _call(
        http, "GET", "/v1/rooms/r1", headers={"Authorization": f"Bearer {OTHER_KEY}"}
    )
    assert (status, body["members"], body["instances"]) == (200, 5, {"room-a": 5})
    status, body, _ = await _call(http, "GET", "/v1/rooms/empty%2Froom")
    assert (status, body) == (200, {"room": "empty/room", "members": 0, "instances": {}})
    status, body, _ = await _call(http, "GET", "/v1/rooms/" + "r" * 129)
    _assert_error(status, body, 400, "invalid_field")
    assert "'room'" in body["error"]["message"]
    status, body, _ = await _call(http, "GET", "/v1/rooms/" + "r" * 128)
    assert (status, body["members"]) == (200, 0)


async def test_broadcast_reaches_every_instance_once(http, rooms) -> None:
    status, body, _ = await _call(
        http, "POST", "/v1/push/broadcast", json={"type": "notice", "body": "hi", "spread_s": 2.5}
    )
    assert status == 200, body
    assert body["spread_s"] == 2.5
    await eventually(lambda: all(room.broadcasts for room in rooms.values()))
    for room in rooms.values():
        (call,) = room.broadcasts
        assert (call["product"], call["spread_s"]) == ("demo", 2.5)
        assert (call["msg"]["id"], call["msg"]["type"], call["msg"]["body"]) == (
            body["id"],
            "notice",
            "hi",
        )
        assert "room" not in call["msg"]


async def test_broadcast_spread_defaults_to_the_products_setting(store, rooms) -> None:
    paced = types.SimpleNamespace(name="demo", api_key=KEY, broadcast_spread_s=1.5)
    server = await _center(store, products={"demo": paced})
    try:
        async with aiohttp.ClientSession() as client:
            http = (client, server.url)
            status, body, _ = await _call(http, "POST", "/v1/push/broadcast", json={"body": 1})
            assert (status, body["spread_s"]) == (200, 1.5)
            await eventually(lambda: rooms["room-a"].broadcasts)
            assert rooms["room-a"].broadcasts[0]["spread_s"] == 1.5
            status, body, _ = await _call(
                http, "POST", "/v1/push/broadcast", json={"body": 1, "spread_s": 0}
            )
            assert (status, body["spread_s"]) == (200, 0)
    finally:
        await server.close()


async def test_broadcast_spread_is_zero_without_a_product_setting(http) -> None:
    status, body, _ = await _call(http, "POST", "/v1/push/broadcast", json={"body": 1})
    assert (status, body["spread_s"]) == (200, 0)


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-key-0123456789"},
        {"Authorization": f"Basic {KEY}"},
        {"Authorization": "Bearer "},
        {"Authorization": f"Bearer {KEY}x"},
    ],
)
async def test_missing_or_wrong_bearer_is_401(http, rooms, headers) -> None:
    for method, path, kwargs in [
        ("POST", "/v1/push/users", {"json": {"uids": ["u1"], "body": 1}}),
        ("POST", "/v1/push/rooms/r1", {"json": {"body": 1}}),
        ("POST", "/v1/push/broadcast", {"json": {"body": 1}}),
        ("GET", "/v1/rooms/r1", {}),
        ("GET", "/v1/users/u1/sessions", {}),
    ]:
        status, body, response = await _call(http, method, path, headers=headers, **kwargs)
        _assert_error(status, body, 401, "unauthorized")
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    await asyncio.sleep(0.1)
    for room in rooms.values():
        assert room.calls == room.room_calls == room.broadcasts == []


PUSH_PATHS = ("/v1/push/users", "/v1/push/rooms/r1", "/v1/push/broadcast")


@pytest.mark.parametrize("path", PUSH_PATHS)
@pytest.mark.parametrize("raw", [b"", b"{", b'{"uids": [}', b"\xff\xfe", b"nul"])
async def test_bad_json_is_400(http, path: str, raw: bytes) -> None:
    status, body, _ = await _call(http, "POST", path, data=raw)
    _assert_error(status, body, 400, "invalid_json")


@pytest.mark.parametrize("path", PUSH_PATHS)
@pytest.mark.parametrize("document", [[], "text", 3, None])
async def test_json_that_is_not_an_object_is_400(http, path: str, document: Any) -> None:
    status, body, _ = await _call(http, "POST", path, json=document)
    _assert_error(status, body, 400, "invalid_json")


MESSAGE_ERRORS = [
    ({"type": 5}, "'type'"),
    ({"type": ""}, "'type'"),
    ({"type": "t" * 65}, "'type'"),
    ({"pri": "urgent"}, "'pri'"),
    ({"pri": 1}, "'pri'"),
    ({"qos": 2}, "'qos'"),
    ({"qos": True}, "'qos'"),
    ({"qos": 1.0}, "'qos'"),
    ({"qos": "1"}, "'qos'"),
    ({"tpye": "chat"}, "'tpye'"),
]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"uids": "u1"}, "'uids'"),
        ({"uids": []}, "'uids'"),
        ({"uids": ["u1", 7]}, "'uids[1]'"),
        ({"uids": ["u1", ""]}, "'uids[1]'"),
        ({"uids": ["x" * 129]}, "'uids[0]'"),
        ({"uids": None}, "'uids'"),
        ({"from": "u9"}, "'from'"),
        ({"spread_s": 1}, "'spread_s'"),
        *MESSAGE_ERRORS,
    ],
)
async def test_each_wrong_field_is_400_naming_it(http, rooms, change, field) -> None:
    document = {"uids": ["u1"], "type": "chat", "pri": "high", "qos": 0, "body": {}, **change}
    status, body, _ = await _call(http, "POST", "/v1/push/users", json=document)
    _assert_error(status, body, 400, "invalid_field")
    assert field in body["error"]["message"]
    await asyncio.sleep(0.05)
    assert all(room.calls == [] for room in rooms.values())


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"from": ""}, "'from'"),
        ({"from": 5}, "'from'"),
        ({"from": "f" * 129}, "'from'"),
        ({"uids": ["u1"]}, "'uids'"),
        ({"spread_s": 1}, "'spread_s'"),
        ({"room": "r2"}, "'room'"),
        *MESSAGE_ERRORS,
    ],
)
async def test_each_wrong_room_push_field_is_400_naming_it(http, change, field) -> None:
    document = {"type": "chat", "pri": "low", "qos": 0, "body": {}, "from": "u1", **change}
    status, body, _ = await _call(http, "POST", "/v1/push/rooms/r1", json=document)
    _assert_error(status, body, 400, "invalid_field")
    assert field in body["error"]["message"]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"spread_s": -1}, "'spread_s'"),
        ({"spread_s": 3600.5}, "'spread_s'"),
        ({"spread_s": "1"}, "'spread_s'"),
        ({"spread_s": True}, "'spread_s'"),
        ({"spread_s": None}, "'spread_s'"),
        ({"from": "u1"}, "'from'"),
        ({"uids": ["u1"]}, "'uids'"),
        *MESSAGE_ERRORS,
    ],
)
async def test_each_wrong_broadcast_field_is_400_naming_it(http, rooms, change, field) -> None:
    document = {"type": "chat", "pri": "low", "qos": 0, "body": {}, "spread_s": 10, **change}
    status, body, _ = await _call(http, "POST", "/v1/push/broadcast", json=document)
    _assert_error(status, body, 400, "invalid_field")
    assert field in body["error"]["message"]
    await asyncio.sleep(0.05)
    assert all(room.broadcasts == [] for room in rooms.values())


async def test_room_name_in_the_path_is_checked(http) -> None:
    status, body, _ = await _call(http, "POST", "/v1/push/rooms/" + "r" * 129, json={"body": 1})
    _assert_error(status, body, 400, "invalid_field")
    assert "'room'" in body["error"]["message"] and "128" in body["error"]["message"]
    status, body, _ = await _call(http, "POST", "/v1/push/rooms/a%20b%2Fc", json={"body": 1})
    assert (status, body["members"]) == (200, 0)


@pytest.mark.parametrize(
    ("path", "document", "missing"),
    [
        ("/v1/push/users", {"uids": ["u1"]}, "body"),
        ("/v1/push/users", {"body": 1}, "uids"),
        ("/v1/push/rooms/r1", {"type": "chat"}, "body"),
        ("/v1/push/broadcast", {"spread_s": 1}, "body"),
    ],
)
async def test_required_fields(http, path: str, document: dict, missing: str) -> None:
    status, body, _ = await _call(http, "POST", path, json=document)
    _assert_error(status, body, 400, "invalid_field")
    assert f"'{missing}'" in body["error"]["message"]


async def test_body_nested_too_deeply_is_400(http) -> None:
    raw = b'{"uids":["u1"],"body":' + b"[" * 600 + b"]" * 600 + b"}"
    status, body, _ = await _call(http, "POST", "/v1/push/users", data=raw)
    _assert_error(status, body, 400, "invalid_field")
    assert "'body'" in body["error"]["message"]


async def test_request_over_the_body_limit_is_413(http) -> None:
    raw = b'{"uids":["u1"],"body":"' + b"x" * MAX_BODY + b'"}'
    status, body, _ = await _call(http, "POST", "/v1/push/users", data=raw)
    _assert_error(status, body, 413, "too_large")
    assert str(MAX_BODY) in body["error"]["message"]


@pytest.mark.parametrize(
    ("path", "extra"),
    [("/v1/push/users", {"uids": ["u1"]}), ("/v1/push/rooms/r1", {}), ("/v1/push/broadcast", {})],
)
async def test_push_over_the_client_frame_limit_is_413(http, rooms, path, extra) -> None:
    document = {**extra, "body": "x" * (64 * 1024)}
    status, body, _ = await _call(http, "POST", path, json=document)
    _assert_error(status, body, 413, "too_large")
    assert "'body'" in body["error"]["message"]
    status, _, _ = await _call(http, "POST", path, json={**extra, "body": "x" * 60_000})
    assert status == 200


async def test_unknown_path_is_404_and_wrong_method_405(http) -> None:
    status, body, _ = await _call(http, "GET", "/v1/nope")
    _assert_error(status, body, 404, "not_found")
    assert "/v1/nope" in body["error"]["message"]
    for method, path, allowed in [
        ("GET", "/v1/push/users", "POST"),
        ("GET", "/v1/push/broadcast", "POST"),
        ("PUT", "/v1/rooms/r1", "GET"),
        ("GET", "/v1/push/rooms/r1", "POST"),
    ]:
        status, body, response = await _call(http, method, path)
        _assert_error(status, body, 405, "method_not_allowed")
        assert allowed in response.headers["Allow"]
    status, body, _ = await _call(http, "DELETE", "/healthz")
    _assert_error(status, body, 405, "method_not_allowed")


async def test_online_counts_the_sessions_found_and_failing_instances_spare_the_others(
    http, rooms, store
) -> None:
    down = f"127.0.0.1:{_free_port()}"
    await store.put_node(Node("room-down", rpc=down), 1.0)  # its lease ends soon: then gone
    await store.put_sessions(
        [_session("u1", "d1", "room-down"), _session("u2", "g1", "room-ghost")], TTL
    )
    before = {
        reason: _metric("im_worker_rpc_failures_total", method="push", reason=reason)
        for reason in ("rpc_unavailable", "gone")
    }
    done = _metric("im_worker_jobs_total", job="users", result="done")
    status, body, _ = await _call(
        http, "POST", "/v1/push/users", json={"uids": ["u1", "u2"], "body": 1}
    )
    assert (status, body["online"]) == (200, 5)  # every session the register holds
    await eventually(lambda: rooms["room-a"].calls and rooms["room-b"].calls)
    await _jobs_done("users", done)
    assert len(rooms["room-a"].calls) == len(rooms["room-b"].calls) == 1
    after = {
        reason: _metric("im_worker_rpc_failures_total", method="push", reason=reason)
        for reason in before
    }
    assert after["rpc_unavailable"] > before["rpc_unavailable"]
    assert after["gone"] >= before["gone"] + 2  # room-ghost at once, room-down at lease end


async def test_register_failing_is_503() -> None:
    server = await _center(FailingStore())
    try:
        async with aiohttp.ClientSession() as client:
            http = (client, server.url)
            for method, path, kwargs in [
                ("POST", "/v1/push/users", {"json": {"uids": ["u1"], "body": 1}}),
                ("POST", "/v1/push/rooms/r1", {"json": {"body": 1}}),
                ("GET", "/v1/rooms/r1", {}),
                ("GET", "/v1/users/u1/sessions", {}),
            ]:
                status, body, response = await _call(http, method, path, **kwargs)
                _assert_error(status, body, 503, "unavailable")
                assert "register" in body["error"]["message"]
                assert response.headers["Retry-After"] == "1"
            status, body, _ = await _call(http, "GET", "/healthz")
            assert status == 200
    finally:
        await server.close()


async def test_bus_failing_is_503(store) -> None:
    bus = FailingBus()
    await bus.start()
    server = await _center(store, bus=bus)
    try:
        async with aiohttp.ClientSession() as client:
            http = (client, server.url)
            for path, document in [
                ("/v1/push/users", {"uids": ["u1"], "body": 1}),
                ("/v1/push/rooms/r1", {"body": 1}),
                ("/v1/push/broadcast", {"body": 1}),
            ]:
                status, body, response = await _call(http, "POST", path, json=document)
                _assert_error(status, body, 503, "unavailable")
                assert "bus" in body["error"]["message"]
                assert response.headers["Retry-After"] == "1"
    finally:
        await server.close()
        await bus.close()


async def test_sessions_endpoint(http, rooms) -> None:
    status, body, _ = await _call(http, "GET", "/v1/users/u1/sessions")
    assert status == 200
    assert body["uid"] == "u1"
    assert sorted(body["sessions"], key=lambda s: s["conn"]) == [
        {"conn": "a1", "instance": "room-a", "device": "phone"},
        {"conn": "a2", "instance": "room-a", "device": "phone"},
    ]
    status, body, _ = await _call(http, "GET", "/v1/users/nobody/sessions")
    assert (status, body) == (200, {"uid": "nobody", "sessions": []})
    status, body, _ = await _call(http, "GET", "/v1/users/" + "x" * 129 + "/sessions")
    _assert_error(status, body, 400, "invalid_field")
    assert "'uid'" in body["error"]["message"]


async def test_healthz_and_metrics_need_no_key(http) -> None:
    status, body, _ = await _call(http, "GET", "/healthz", headers=None)
    assert (status, body) == (200, {"status": "ok"})
    await _call(http, "GET", "/v1/nope")
    await _call(http, "POST", "/v1/push/users", json={"uids": ["u1"], "body": 1})
    status, text, response = await _call(http, "GET", "/metrics", headers=None)
    assert status == 200 and response.content_type == "text/plain"
    assert "im_center_http_requests_total" in text
    assert 'route="/healthz",status="200"' in text
    assert 'route="unmatched",status="404"' in text
    assert 'im_center_push_seconds_count{job="users"}' in text
    assert "im_worker_jobs_total" in text


def _resolve(document: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        target: Any = document
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    return node


def _loosely_valid(document: dict[str, Any], schema: dict[str, Any], value: Any) -> bool:
    """Types and required keys, recursively: enough to catch a drifting document."""
    schema = _resolve(document, schema)
    kinds = {"object": dict, "array": list, "string": str, "integer": int}
    kind = schema.get("type")
    if kind in kinds and not isinstance(value, kinds[kind]):
        return False
    if "enum" in schema and value not in schema["enum"]:
        return False
    if isinstance(value, dict):
        if not set(schema.get("required", ())) <= value.keys():
            return False
        properties = schema.get("properties", {})
        extra = schema.get("additionalProperties")  # a schema for keys not listed, if any
        for key, item in value.items():
            sub = properties.get(key, extra)
            if not isinstance(sub, dict) or not _loosely_valid(document, sub, item):
                return False
        return True
    if isinstance(value, list) and "items" in schema:
        return all(_loosely_valid(document, schema["items"], v) for v in value)
    return True


def _template(path: str) -> str:
    if path.endswith("/kick"):
        return "/v1/users/{uid}/kick"
    for prefix, template in [
        ("/v1/users/", "/v1/users/{uid}/sessions"),
        ("/v1/push/rooms/", "/v1/push/rooms/{room}"),
        ("/v1/rooms/", "/v1/rooms/{room}"),
        ("/v1/messages/", "/v1/messages/{id}"),
    ]:
        if path.startswith(prefix):
            return template
    return path


async def test_openapi_document_matches_the_answers(http, rooms, store) -> None:
    status, document, _ = await _call(http, "GET", "/openapi.json", headers=None)
    assert status == 200
    assert document == json.loads(resources.files("center").joinpath("openapi.json").read_text())
    assert document["openapi"].startswith("3.1")
    paths = document["paths"]
    assert set(paths) == {
        "/v1/push/users",
        "/v1/push/rooms/{room}",
        "/v1/push/broadcast",
        "/v1/rooms/{room}",
        "/v1/users/{uid}/sessions",
        "/v1/messages/{id}",
        "/v1/users/{uid}/kick",
        "/healthz",
        "/metrics",
        "/openapi.json",
    }
    assert document["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    await store.put_rooms("room-a", [("demo", "r1", 2)], TTL)
    exchanges = [
        ("/v1/push/rooms/r1", "post", {"json": {"body": 1, "from": "u1"}}, AUTH),
        ("/v1/push/rooms/r1", "post", {"json": {"body": 1, "pri": "top"}}, AUTH),
        ("/v1/push/rooms/r1", "post", {"json": {"body": 1}}, None),
        ("/v1/push/rooms/r1", "post", {"json": {"body": "x" * 70_000}}, AUTH),
        ("/v1/push/broadcast", "post", {"json": {"body": 1, "spread_s": 1}}, AUTH),
        ("/v1/push/broadcast", "post", {"json": {"body": 1, "spread_s": -1}}, AUTH),
        ("/v1/push/broadcast", "post", {"json": {"body": 1}}, None),
        ("/v1/push/broadcast", "get", {}, AUTH),
        ("/v1/rooms/r1", "get", {}, AUTH),
        ("/v1/rooms/r1", "get", {}, None),
        ("/v1/rooms/" + "r" * 129, "get", {}, AUTH),
        ("/v1/push/users", "post", {"json": {"uids": ["u1"], "body": 1}}, AUTH),
        ("/v1/push/users", "post", {"json": {"uids": 1, "body": 1}}, AUTH),
        ("/v1/push/users", "post", {"data": b"{"}, AUTH),
        ("/v1/push/users", "post", {"json": {"uids": ["u1"], "body": 1}}, None),
        ("/v1/push/users", "post", {"json": {"uids": ["u1"], "body": "x" * 70_000}}, AUTH),
        ("/v1/push/users", "get", {}, AUTH),
        ("/v1/users/u1/sessions", "get", {}, AUTH),
        ("/v1/users/u1/sessions", "get", {}, None),
        ("/v1/push/users", "post", {"json": {"uids": ["u1"], "qos": 1, "body": 1}}, AUTH),
        ("/v1/push/users", "post", {"json": {"uids": ["u1"], "pull": "k"}}, AUTH),
        ("/v1/push/users", "post", {"json": {"uids": ["u1"], "body": 1, "ttl": 9}}, AUTH),
        ("/v1/messages/" + "0" * 20, "get", {}, AUTH),
        ("/v1/messages/x", "get", {}, AUTH),
        ("/v1/users/u1/kick", "post", {"json": {"reason": "bye"}}, AUTH),
        ("/v1/users/u1/kick", "post", {"json": {"reason": ""}}, AUTH),
        ("/healthz", "get", {}, None),
    ]
    seen = set()
    for path, method, kwargs, headers in exchanges:
        status, body, _ = await _call(http, method.upper(), path, headers=headers, **kwargs)
        template = _template(path)
        operation = paths[template].get(method) or next(iter(paths[template].values()))
        assert str(status) in operation["responses"], (method, path, status)
        response = _resolve(document, operation["responses"][str(status)])
        schema = response["content"]["application/json"]["schema"]
        assert _loosely_valid(document, schema, body), (method, path, status, body)
        seen.add(status)
    assert seen == {200, 400, 401, 404, 405, 413}
    for template, item in paths.items():
        for method, operation in item.items():
            assert "200" in operation["responses"], (template, method)
            if operation.get("security", document["security"]):
                assert "401" in operation["responses"], (template, method)
    not_found = document["components"]["responses"]["NotFound"]["content"]["application/json"]
    status, body, _ = await _call(http, "GET", "/nowhere")
    assert status == 404 and _loosely_valid(document, not_found["schema"], body)


async def test_a_room_that_just_started_is_reached_without_waiting_for_the_cache(
    http, rooms, store
) -> None:
    status, body, _ = await _call(http, "POST", "/v1/push/users", json={"uids": ["u2"], "body": 1})
    assert (status, body["online"]) == (200, 1)
    await eventually(lambda: rooms["room-b"].calls)  # the worker's node table is cached now
    late = await _start_room(store, "room-late", [_session("u9", "l1", "room-late")])
    try:
        await asyncio.sleep(NODE_MISS_REFRESH_S * 1.5)
        status, body, _ = await _call(
            http, "POST", "/v1/push/users", json={"uids": ["u9"], "body": 1}
        )
        assert (status, body["online"]) == (200, 1)
        await eventually(lambda: late.calls, timeout=NODE_MISS_REFRESH_S * 5)
        assert late.calls[0]["items"][0]["conns"] == ["l1"]
    finally:
        await late.server.close()


class BrokenStore(MemoryStore):
    """A store with a bug: its answer is not a mapping."""

    async def lookup(self, product: str, uids: Sequence[str]) -> Any:
        return None


async def test_unexpected_error_is_500_json_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    server = await _center(BrokenStore())
    try:
        async with aiohttp.ClientSession() as client:
            status, body, _ = await _call(
                (client, server.url), "POST", "/v1/push/users", json={"uids": ["u1"], "body": 1}
            )
    finally:
        await server.close()
    _assert_error(status, body, 500, "internal")
    assert any(
        record.levelname == "ERROR" and "/v1/push/users" in record.getMessage()
        for record in caplog.records
    )

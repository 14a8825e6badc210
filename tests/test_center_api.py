"""Center's HTTP API over real sockets: aiohttp on a free port, rooms as real RPC servers."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Sequence
from importlib import resources
from typing import Any

import aiohttp
import pytest
from prometheus_client import REGISTRY

from center.config import CenterConfig
from center.push import NODE_MISS_REFRESH_S
from center.server import CenterServer
from im.config import Product
from im.ids import id_time_ms
from im.protocol.messages import validate_server
from im.rpc import RpcServer, RpcUnavailable
from im.sessions import Node, Session
from register.engines.memory import MemoryStore

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
    """A room instance's RPC side: records each push and writes to the conns it holds."""

    def __init__(self, instance: str, conns: Sequence[str]) -> None:
        self.instance = instance
        self.conns = set(conns)
        self.calls: list[dict[str, Any]] = []
        self.server = RpcServer({"push": self.push}, name=f"fake-{instance}")

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


class FailingStore(MemoryStore):
    """A register that cannot be reached."""

    async def lookup(self, product: str, uids: Sequence[str]) -> dict[str, list[Session]]:
        raise RpcUnavailable("register at 127.0.0.1:1 is down")


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


async def _center(store: Any) -> CenterServer:
    server = CenterServer(CenterConfig(port=0, rpc_timeout=1.0, max_body=MAX_BODY), store, PRODUCTS)
    await server.start()
    return server


@pytest.fixture
async def http(store: MemoryStore) -> AsyncIterator[tuple[aiohttp.ClientSession, str]]:
    server = await _center(store)
    async with aiohttp.ClientSession() as client:
        yield client, server.url
    await server.close()


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


async def test_defaults_and_null_body(http, rooms) -> None:
    status, body, _ = await _call(
        http, "POST", "/v1/push/users", json={"uids": ["u2"], "body": None}
    )
    assert (status, body["online"]) == (200, 1)
    msg = rooms["room-b"].calls[0]["items"][0]["msg"]
    assert (msg["type"], msg["pri"], msg["qos"], msg["body"]) == ("chat", "normal", 0, None)


async def test_api_key_selects_the_product(http, rooms) -> None:
    headers = {"Authorization": f"Bearer {OTHER_KEY}"}
    status, body, _ = await _call(
        http, "POST", "/v1/push/users", headers=headers, json={"uids": ["u1"], "body": 1}
    )
    assert (status, body["online"]) == (200, 1)
    assert rooms["room-b"].calls[0]["items"][0]["conns"] == ["x1"]
    assert rooms["room-a"].calls == []


async def test_offline_uid_is_online_zero(http, rooms) -> None:
    status, body, _ = await _call(
        http, "POST", "/v1/push/users", json={"uids": ["ghost"], "body": "x"}
    )
    assert (status, body["online"]) == (200, 0)
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
    assert len(rooms["room-b"].calls) == 1
    status, body, _ = await _call(
        http, "POST", "/v1/push/users", json={"uids": [*uids, "one-more"], "body": 1}
    )
    _assert_error(status, body, 400, "invalid_field")
    assert "'uids'" in body["error"]["message"] and "10000" in body["error"]["message"]


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
        ("GET", "/v1/users/u1/sessions", {}),
    ]:
        status, body, response = await _call(http, method, path, headers=headers, **kwargs)
        _assert_error(status, body, 401, "unauthorized")
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert all(room.calls == [] for room in rooms.values())


@pytest.mark.parametrize("raw", [b"", b"{", b'{"uids": [}', b"\xff\xfe", b"nul"])
async def test_bad_json_is_400(http, raw: bytes) -> None:
    status, body, _ = await _call(http, "POST", "/v1/push/users", data=raw)
    _assert_error(status, body, 400, "invalid_json")


@pytest.mark.parametrize("document", [[], "text", 3, None])
async def test_json_that_is_not_an_object_is_400(http, document: Any) -> None:
    status, body, _ = await _call(http, "POST", "/v1/push/users", json=document)
    _assert_error(status, body, 400, "invalid_json")


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"uids": "u1"}, "'uids'"),
        ({"uids": []}, "'uids'"),
        ({"uids": ["u1", 7]}, "'uids[1]'"),
        ({"uids": ["u1", ""]}, "'uids[1]'"),
        ({"uids": ["x" * 129]}, "'uids[0]'"),
        ({"uids": None}, "'uids'"),
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
    ],
)
async def test_each_wrong_field_is_400_naming_it(http, rooms, change, field) -> None:
    document = {"uids": ["u1"], "type": "chat", "pri": "high", "qos": 0, "body": {}, **change}
    status, body, _ = await _call(http, "POST", "/v1/push/users", json=document)
    _assert_error(status, body, 400, "invalid_field")
    assert field in body["error"]["message"]
    assert all(room.calls == [] for room in rooms.values())


@pytest.mark.parametrize("missing", ["uids", "body"])
async def test_required_fields(http, missing: str) -> None:
    document = {"uids": ["u1"], "body": 1}
    del document[missing]
    status, body, _ = await _call(http, "POST", "/v1/push/users", json=document)
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


async def test_push_over_the_client_frame_limit_is_413(http, rooms) -> None:
    document = {"uids": ["u1"], "body": "x" * (64 * 1024)}
    status, body, _ = await _call(http, "POST", "/v1/push/users", json=document)
    _assert_error(status, body, 413, "too_large")
    assert "'body'" in body["error"]["message"]
    assert rooms["room-a"].calls == []
    status, _, _ = await _call(
        http, "POST", "/v1/push/users", json={"uids": ["u1"], "body": "x" * 60_000}
    )
    assert status == 200


async def test_unknown_path_is_404_and_wrong_method_405(http) -> None:
    status, body, _ = await _call(http, "GET", "/v1/nope")
    _assert_error(status, body, 404, "not_found")
    assert "/v1/nope" in body["error"]["message"]
    status, body, response = await _call(http, "GET", "/v1/push/users")
    _assert_error(status, body, 405, "method_not_allowed")
    assert "POST" in response.headers["Allow"]
    status, body, _ = await _call(http, "DELETE", "/healthz")
    _assert_error(status, body, 405, "method_not_allowed")


async def test_failed_instances_are_not_counted(http, rooms, store) -> None:
    down = f"127.0.0.1:{_free_port()}"
    await store.put_node(Node("room-down", rpc=down), TTL)
    await store.put_sessions(
        [_session("u1", "d1", "room-down"), _session("u2", "g1", "room-ghost")], TTL
    )
    before = {
        reason: _metric("im_center_route_failures_total", reason=reason)
        for reason in ("rpc_unavailable", "unknown_instance")
    }
    status, body, _ = await _call(
        http, "POST", "/v1/push/users", json={"uids": ["u1", "u2"], "body": 1}
    )
    assert (status, body["online"]) == (200, 3)  # a1, a2 on room-a and b1 on room-b
    assert len(rooms["room-a"].calls) == len(rooms["room-b"].calls) == 1
    after = {reason: _metric("im_center_route_failures_total", reason=reason) for reason in before}
    assert after["rpc_unavailable"] == before["rpc_unavailable"] + 1
    assert after["unknown_instance"] == before["unknown_instance"] + 1


async def test_stale_sessions_reported_missing_are_not_counted(http, rooms, store) -> None:
    await store.put_sessions([_session("u2", "b-gone", "room-b")], TTL)
    before = _metric("im_center_route_failures_total", reason="missing")
    status, body, _ = await _call(http, "POST", "/v1/push/users", json={"uids": ["u2"], "body": 1})
    assert (status, body["online"]) == (200, 1)
    assert sorted(rooms["room-b"].calls[0]["items"][0]["conns"]) == ["b-gone", "b1"]
    assert _metric("im_center_route_failures_total", reason="missing") == before + 1


async def test_register_failing_is_503() -> None:
    server = await _center(FailingStore())
    try:
        async with aiohttp.ClientSession() as client:
            http = (client, server.url)
            status, body, response = await _call(
                http, "POST", "/v1/push/users", json={"uids": ["u1"], "body": 1}
            )
            _assert_error(status, body, 503, "unavailable")
            assert response.headers["Retry-After"] == "1"
            status, body, _ = await _call(http, "GET", "/v1/users/u1/sessions")
            _assert_error(status, body, 503, "unavailable")
            status, body, _ = await _call(http, "GET", "/healthz")
            assert status == 200
    finally:
        await server.close()


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
    status, text, response = await _call(http, "GET", "/metrics", headers=None)
    assert status == 200 and response.content_type == "text/plain"
    assert "im_center_http_requests_total" in text
    assert 'route="/healthz",status="200"' in text
    assert 'route="unmatched",status="404"' in text
    assert "im_center_push_seconds" in text


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
        return all(_loosely_valid(document, properties[k], v) for k, v in value.items())
    if isinstance(value, list) and "items" in schema:
        return all(_loosely_valid(document, schema["items"], v) for v in value)
    return True


async def test_openapi_document_matches_the_answers(http, rooms) -> None:
    status, document, _ = await _call(http, "GET", "/openapi.json", headers=None)
    assert status == 200
    assert document == json.loads(resources.files("center").joinpath("openapi.json").read_text())
    assert document["openapi"].startswith("3.1")
    paths = document["paths"]
    assert set(paths) == {
        "/v1/push/users",
        "/v1/users/{uid}/sessions",
        "/healthz",
        "/metrics",
        "/openapi.json",
    }
    assert document["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    exchanges = [
        ("/v1/push/users", "post", {"json": {"uids": ["u1"], "body": 1}}, AUTH),
        ("/v1/push/users", "post", {"json": {"uids": 1, "body": 1}}, AUTH),
        ("/v1/push/users", "post", {"data": b"{"}, AUTH),
        ("/v1/push/users", "post", {"json": {"uids": ["u1"], "body": 1}}, None),
        ("/v1/push/users", "post", {"json": {"uids": ["u1"], "body": "x" * 70_000}}, AUTH),
        ("/v1/push/users", "get", {}, AUTH),
        ("/v1/users/u1/sessions", "get", {}, AUTH),
        ("/v1/users/u1/sessions", "get", {}, None),
        ("/healthz", "get", {}, None),
    ]
    seen = set()
    for path, method, kwargs, headers in exchanges:
        status, body, _ = await _call(http, method.upper(), path, headers=headers, **kwargs)
        template = "/v1/users/{uid}/sessions" if path.startswith("/v1/users/") else path
        operation = paths[template].get(method) or paths[template]["post"]
        assert str(status) in operation["responses"], (method, path, status)
        response = _resolve(document, operation["responses"][str(status)])
        schema = response["content"]["application/json"]["schema"]
        assert _loosely_valid(document, schema, body), (method, path, status, body)
        seen.add(status)
    assert seen == {200, 400, 401, 405, 413}
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
    assert (status, body["online"]) == (200, 1)  # the node table is cached now
    late = await _start_room(store, "room-late", [_session("u9", "l1", "room-late")])
    try:
        await asyncio.sleep(NODE_MISS_REFRESH_S * 1.5)
        status, body, _ = await _call(
            http, "POST", "/v1/push/users", json={"uids": ["u9"], "body": 1}
        )
        assert (status, body["online"]) == (200, 1)
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

"""The dispatcher over real HTTP on a free loopback port, reading the node table of a real
register (memory engine) over its RPC; and the SDK's route() helper against it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from prometheus_client import REGISTRY

from dispatcher.config import DispatcherConfig, from_args
from dispatcher.nodes import NodeTable, RegisterUnavailable
from dispatcher.server import DispatcherServer
from im.register_client import RegisterClient
from im.sdk.dispatch import DispatchError, Route, route
from im.sessions import Node
from register.config import RegisterConfig
from register.engines.memory import MemoryStore
from register.server import RegisterServer
from tests.fixtures.system import metric_value

HOST = "127.0.0.1"
TTL = 30.0
ROUTE_TTL_S = 45.0

Start = Callable[..., Awaitable[DispatcherServer]]


def node(name: str, idc: str = "a", **fields: Any) -> Node:
    return Node(
        name, rpc=f"{HOST}:1", ws=f"ws://{name}:8090/ws", tcp=f"{name}:8091", idc=idc, **fields
    )


def ws(name: str) -> str:
    return f"ws://{name}:8090/ws"


class CountingRegister(RegisterClient):
    """The real register client, counting node table reads."""

    def __init__(self, address: str) -> None:
        super().__init__(address)
        self.reads = 0

    async def nodes(self) -> list[Node]:
        self.reads += 1
        return await super().nodes()


@pytest_asyncio.fixture
async def register() -> AsyncIterator[RegisterServer]:
    server = RegisterServer(RegisterConfig(host=HOST, port=0, metrics_port=0), MemoryStore())
    await server.start()
    yield server
    await server.close()


@pytest_asyncio.fixture
async def feed(register: RegisterServer) -> AsyncIterator[Callable[..., Awaitable[None]]]:
    client = RegisterClient(register.rpc.address)

    async def put(*nodes: Node) -> None:
        for one in nodes:
            await client.put_node(one, TTL)

    yield put
    await client.close()


@pytest_asyncio.fixture
async def start(register: RegisterServer) -> AsyncIterator[Start]:
    servers: list[DispatcherServer] = []

    async def start(**overrides: Any) -> DispatcherServer:
        config = DispatcherConfig(
            host=HOST, port=0, register=register.rpc.address, route_ttl_s=ROUTE_TTL_S, **overrides
        )
        server = DispatcherServer(config, CountingRegister(config.register))
        servers.append(server)
        await server.start()
        return server

    yield start
    for server in servers:
        await server.close()


@pytest_asyncio.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def get(
    http: aiohttp.ClientSession, server: DispatcherServer, path: str, **params: Any
) -> tuple[int, dict, aiohttp.ClientResponse]:
    pairs = [
        (name, one)
        for name, value in params.items()
        for one in (value if isinstance(value, list) else [value])
    ]
    async with http.get(server.url + path, params=pairs) as response:
        return response.status, json.loads(await response.read()), response


def counter(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_a_user_gets_every_instance_with_a_sticky_first_choice(
    feed: Callable, start: Start, http: aiohttp.ClientSession
) -> None:
    await feed(node("r0"), node("r1"), node("r2"))
    server = await start()
    status, body, response = await get(http, server, "/v1/route", product="p", uid="u1")
    assert status == 200
    assert response.headers["Cache-Control"] == "no-store"
    assert response.headers["Access-Control-Allow-Origin"] == "*"  # pages of any site
    assert sorted(body["addresses"]) == [ws("r0"), ws("r1"), ws("r2")]
    assert body["ttl_s"] == ROUTE_TTL_S
    for _ in range(3):
        assert (await get(http, server, "/v1/route", product="p", uid="u1"))[1] == body
    firsts = set()
    for i in range(60):
        firsts.add(
            (await get(http, server, "/v1/route", product="p", uid=f"u{i}"))[1]["addresses"][0]
        )
    assert firsts == {ws("r0"), ws("r1"), ws("r2")}


async def test_tcp_transport_answers_tcp_urls(
    feed: Callable, start: Start, http: aiohttp.ClientSession
) -> None:
    await feed(node("r0"))
    server = await start()
    _, body, _ = await get(http, server, "/v1/route", product="p", uid="u", transport="tcp")
    assert body["addresses"] == ["tcp://r0:8091"]


async def test_retry_excludes_failed_addresses_and_falls_back_to_other_idcs(
    feed: Callable, start: Start, http: aiohttp.ClientSession
) -> None:
    await feed(node("a0", "a"), node("a1", "a"), node("b0", "b"))
    server = await start()
    _, body, _ = await get(http, server, "/v1/route", product="p", uid="u", idc="a")
    assert sorted(body["addresses"][:2]) == [ws("a0"), ws("a1")]
    assert body["addresses"][2] == ws("b0")
    top = body["addresses"][0]
    _, body, _ = await get(http, server, "/v1/route", product="p", uid="u", idc="a", retry=top)
    assert top not in body["addresses"]
    assert body["addresses"][1] == ws("b0")
    both = [ws("a0"), ws("a1")]
    _, body, _ = await get(http, server, "/v1/route", product="p", uid="u", idc="a", retry=both)
    assert body["addresses"] == [ws("b0")]
    every = [*both, ws("b0")]
    status, body, _ = await get(http, server, "/v1/route", product="p", uid="u", retry=every)
    assert status == 200
    assert body["addresses"] == [] and 500 <= body["retry_after_ms"] <= 5000


async def test_draining_and_full_instances_are_skipped(
    feed: Callable, start: Start, http: aiohttp.ClientSession
) -> None:
    await feed(
        node("drain", draining=True),
        node("full", conns=100, max_conns=100),
        node("storm", conn_rate=80.0, max_conn_rate=50.0),
        node("free", conns=5, max_conns=100),
    )
    server = await start()
    for i in range(20):
        _, body, _ = await get(http, server, "/v1/route", product="p", uid=f"u{i}")
        assert body["addresses"] == [ws("free")]


async def test_a_saturated_cluster_answers_a_spread_retry_after(
    feed: Callable, start: Start, http: aiohttp.ClientSession
) -> None:
    await feed(node("full", conns=10, max_conns=10), node("drain", draining=True))
    server = await start(retry_min_ms=1000, retry_max_ms=9000)
    saturated = counter("im_dispatcher_saturated_total")
    answered = counter("im_dispatcher_requests_total", result="saturated")
    waits = []
    for _ in range(40):
        status, body, _ = await get(http, server, "/v1/route", product="p", uid="u")
        assert status == 200
        assert body["addresses"] == []
        assert "ttl_s" not in body
        waits.append(body["retry_after_ms"])
    assert all(1000 <= wait < 9000 for wait in waits)
    assert len(set(waits)) > 30  # drawn per request, not one shared value
    assert max(waits) - min(waits) > 4000  # a full cluster spreads over the whole window
    async with http.get(server.url + "/metrics") as response:
        exposition = await response.text()
    assert metric_value(exposition, "im_dispatcher_saturated_total") == saturated + 40
    assert (
        metric_value(exposition, "im_dispatcher_requests_total", result="saturated")
        == answered + 40
    )
    assert metric_value(exposition, "im_dispatcher_request_seconds_count") >= 40


async def test_a_cluster_just_at_its_rate_limit_is_retried_soon(
    feed: Callable, start: Start, http: aiohttp.ClientSession
) -> None:
    await feed(node("r0", conn_rate=50.0, max_conn_rate=50.0))
    server = await start(retry_min_ms=500, retry_max_ms=5000)
    for _ in range(20):
        _, body, _ = await get(http, server, "/v1/route", product="p", uid="u")
        assert 500 <= body["retry_after_ms"] < 1000


async def test_no_instance_at_all_is_503(start: Start, http: aiohttp.ClientSession) -> None:
    server = await start()
    before = counter("im_dispatcher_requests_total", result="no_nodes")
    status, body, response = await get(http, server, "/v1/route", product="p", uid="u")
    assert status == 503
    assert body["error"]["code"] == "unavailable"
    assert "no room instance" in body["error"]["message"]
    assert response.headers["Retry-After"] == "1"
    assert counter("im_dispatcher_requests_total", result="no_nodes") == before + 1


async def test_instances_without_the_transport_are_503(
    feed: Callable, start: Start, http: aiohttp.ClientSession
) -> None:
    await feed(Node("r0", rpc=f"{HOST}:1", ws=ws("r0")))
    server = await start()
    status, body, _ = await get(http, server, "/v1/route", product="p", uid="u", transport="tcp")
    assert status == 503
    assert "'tcp'" in body["error"]["message"]


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"uid": "u"}, "product"),
        ({"product": "p"}, "uid"),
        ({"product": "p", "uid": "u", "transport": "quic"}, "transport"),
        ({"product": "p", "uid": "u" * 200}, "uid"),
        ({"product": "p", "uid": "u", "retry": [f"ws://h{i}" for i in range(40)]}, "retry"),
    ],
)
async def test_bad_queries_are_400_naming_the_parameter(
    feed: Callable, start: Start, http: aiohttp.ClientSession, params: dict, named: str
) -> None:
    await feed(node("r0"))
    server = await start()
    before = counter("im_dispatcher_requests_total", result="bad_request")
    status, body, _ = await get(http, server, "/v1/route", **params)
    assert status == 400
    assert body["error"]["code"] == "bad_request"
    assert f"parameter '{named}'" in body["error"]["message"]
    assert counter("im_dispatcher_requests_total", result="bad_request") == before + 1


async def test_unknown_paths_and_methods_answer_json(
    start: Start, http: aiohttp.ClientSession
) -> None:
    server = await start()
    status, body, _ = await get(http, server, "/v1/nope")
    assert (status, body["error"]["code"]) == (404, "not_found")
    assert "/v1/nope" in body["error"]["message"]
    async with http.post(server.url + "/v1/route") as response:
        assert response.status == 405
        assert "GET" in response.headers["Allow"]
        assert (await response.json())["error"]["code"] == "method_not_allowed"


async def test_one_register_read_per_period_whatever_the_request_rate(
    feed: Callable, start: Start, http: aiohttp.ClientSession
) -> None:
    await feed(node("r0"))
    server = await start(node_cache_s=1.0)
    source = server.table._source
    assert isinstance(source, CountingRegister)
    answers = await asyncio.gather(
        *(get(http, server, "/v1/route", product="p", uid=f"u{i}") for i in range(50))
    )
    assert all(status == 200 for status, _, _ in answers)
    for i in range(50):
        await get(http, server, "/v1/route", product="p", uid=f"v{i}")
    assert source.reads == 1
    await feed(node("r1"))
    await asyncio.sleep(1.05)
    _, body, _ = await get(http, server, "/v1/route", product="p", uid="u")
    assert source.reads == 2
    assert len(body["addresses"]) == 2


async def test_an_old_table_is_served_while_the_register_is_down(
    register: RegisterServer, feed: Callable
) -> None:
    await feed(node("r0"))
    now = [0.0]
    table = NodeTable(
        CountingRegister(register.rpc.address), max_age_s=1.0, stale_s=10.0, clock=lambda: now[0]
    )
    try:
        assert [n.instance for n in await table.get()] == ["r0"]
        await register.close()
        now[0] = 5.0
        assert [n.instance for n in await table.get()] == ["r0"]
        now[0] = 10.5
        with pytest.raises(RegisterUnavailable):
            await table.get()
    finally:
        await table.close()


async def test_a_down_register_with_no_table_is_503(
    register: RegisterServer, start: Start, http: aiohttp.ClientSession
) -> None:
    server = await start()
    await register.close()
    status, body, _ = await get(http, server, "/v1/route", product="p", uid="u")
    assert status == 503
    assert "register" in body["error"]["message"]
    status, body, _ = await get(http, server, "/healthz")
    assert (status, body["error"]["code"]) == (503, "unavailable")


async def test_healthz_and_openapi(
    feed: Callable, start: Start, http: aiohttp.ClientSession
) -> None:
    await feed(node("r0"), node("r1"))
    server = await start()
    status, body, response = await get(http, server, "/healthz")
    assert (status, body) == (200, {"status": "ok", "nodes": 2})
    assert "Access-Control-Allow-Origin" not in response.headers  # only the route is open
    status, document, _ = await get(http, server, "/openapi.json")
    assert status == 200
    assert document["openapi"].startswith("3.0.")
    parameters = {p["name"] for p in document["paths"]["/v1/route"]["get"]["parameters"]}
    assert {"product", "uid", "transport", "idc", "retry"} <= parameters


async def test_sdk_route_reads_addresses(
    feed: Callable, start: Start, http: aiohttp.ClientSession
) -> None:
    await feed(node("a0", "a"), node("b0", "b"))
    server = await start()
    found = await route(server.url, "p", "u1", idc="b")
    assert found == Route([ws("b0"), ws("a0")], ROUTE_TTL_S, None)
    found = await route(server.url + "/", "p", "u1", idc="b", retry=[ws("b0")])
    assert found.addresses == [ws("a0")]
    found = await route(server.url, "p", "u1", transport="tcp")
    assert sorted(found.addresses) == ["tcp://a0:8091", "tcp://b0:8091"]
    # The helper sends exactly what the HTTP API reads: the same answer as a plain GET.
    _, body, _ = await get(http, server, "/v1/route", product="p", uid="u1", idc="b")
    assert body["addresses"] == [ws("b0"), ws("a0")]


async def test_sdk_route_reads_retry_after(feed: Callable, start: Start) -> None:
    await feed(node("r0", draining=True))
    server = await start()
    found = await route(server.url, "p", "u1")
    assert found.addresses == [] and found.ttl_s == 0.0
    assert found.retry_after_ms is not None and 500 <= found.retry_after_ms < 5000


async def test_sdk_route_raises_on_errors(start: Start) -> None:
    server = await start()
    with pytest.raises(DispatchError) as caught:
        await route(server.url, "p", "u1", transport="udp")
    assert (caught.value.status, caught.value.code) == (400, "bad_request")
    assert "transport" in str(caught.value)
    with pytest.raises(DispatchError) as caught:
        await route(server.url, "p", "u1")
    assert (caught.value.status, caught.value.code) == (503, "unavailable")


async def test_sdk_route_raises_when_unreachable(start: Start) -> None:
    server = await start()
    url = server.url
    await server.close()
    with pytest.raises(DispatchError) as caught:
        await route(url, "p", "u1", timeout=2.0)
    assert caught.value.status == 0
    assert "unreachable" in str(caught.value)


def test_config_from_flags_and_environment() -> None:
    config = from_args([], environ={})
    assert (config.host, config.port, config.register, config.node_cache_s) == (
        "127.0.0.1",
        8081,
        "127.0.0.1:8070",
        1.0,
    )
    environ = {"IM_DISPATCHER_PORT": "9001", "IM_DISPATCHER_REGISTER": "10.0.0.1:8070"}
    config = from_args(["--port", "9002", "--node-cache-s", "0.5"], environ=environ)
    assert (config.port, config.register, config.node_cache_s) == (9002, "10.0.0.1:8070", 0.5)
    with pytest.raises(SystemExit):
        from_args(["--retry-min-ms", "6000"], environ={})

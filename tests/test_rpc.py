"""Internal RPC: wire format, then real client and server on loopback sockets."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgpack
import pytest
import uvloop
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from im.protocol.errors import ErrorCode, ProtocolError
from im.protocol.framing import frame
from im.rpc import RpcClient, RpcError, RpcServer, RpcTimeout, RpcUnavailable, wire
from im.rpc.client import MIN_BACKOFF, parse_address

# --- wire ---------------------------------------------------------------------------------

msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text()
    | st.binary(),
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.dictionaries(st.text() | st.integers(-(2**63), 2**63 - 1), inner, max_size=5)
    ),
    max_leaves=20,
)
ids = st.integers(min_value=0, max_value=wire.MAX_ID)


def feed_in_pieces(decoder: Any, data: bytes, cuts: list[int]) -> list[Any]:
    out = []
    prev = 0
    for cut in sorted({c % (len(data) + 1) for c in cuts}) + [len(data)]:
        out += decoder.feed(data[prev:cut])
        prev = cut
    return out


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(ids, st.text(), msgpack_values), min_size=1, max_size=5),
    st.lists(st.integers(min_value=0)),
)
def test_requests_round_trip_across_any_split(
    requests: list[tuple[int, str, Any]], cuts: list[int]
) -> None:
    data = b"".join(wire.encode_request(*request) for request in requests)
    decoded = feed_in_pieces(wire.RequestDecoder(), data, cuts)
    assert decoded == [wire.Request(*request) for request in requests]


@settings(max_examples=200, deadline=None)
@given(ids, msgpack_values, st.none() | st.tuples(st.text(), st.text()), st.lists(st.integers(0)))
def test_responses_round_trip_across_any_split(
    req_id: int, result: Any, error: tuple[str, str] | None, cuts: list[int]
) -> None:
    if error is None:
        data = wire.encode_response(req_id, result)
        expected = wire.Response(req_id, None, result)
    else:
        data = wire.encode_error(req_id, *error)
        expected = wire.Response(req_id, (error[0], error[1][: wire.MAX_ERROR_MESSAGE]), None)
    assert feed_in_pieces(wire.ResponseDecoder(), data * 2, cuts) == [expected, expected]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_decoder_rejects_garbage_only_with_protocol_error(garbage: bytes) -> None:
    for decoder in (wire.RequestDecoder(max_frame=1024), wire.ResponseDecoder(max_frame=1024)):
        try:
            decoder.feed(frame(garbage))
        except ProtocolError as exc:
            assert exc.code in (ErrorCode.MALFORMED, ErrorCode.FRAME_TOO_LARGE)


@pytest.mark.parametrize(
    "message",
    [
        {"op": 0},
        [0, 1, "m"],
        [True, 1, "m", None],
        [0, -1, "m", None],
        [0, 1.0, "m", None],
        [0, 1, 5, None],
        [1, 1, ["code"], None],
        [1, 1, "code", None],
        [7, 1, None, None],
    ],
)
def test_decode_refuses_off_format_messages(message: Any) -> None:
    with pytest.raises(ProtocolError) as info:
        wire.decode(msgpack.packb(message))
    assert info.value.code is ErrorCode.MALFORMED


def test_each_side_refuses_the_other_sides_messages() -> None:
    with pytest.raises(ProtocolError, match="only requests"):
        wire.RequestDecoder().feed(wire.encode_response(1, None))
    with pytest.raises(ProtocolError, match="only responses"):
        wire.ResponseDecoder().feed(wire.encode_request(1, "m", None))


def test_encoding_refuses_what_cannot_be_sent() -> None:
    with pytest.raises(RpcError) as info:
        wire.encode_request(1, "m", object())
    assert info.value.code == wire.UNENCODABLE
    with pytest.raises(RpcError) as info:
        wire.encode_response(1, b"x" * 100, max_frame=64)
    assert info.value.code == wire.TOO_LARGE


def test_error_classes_and_text() -> None:
    err = RpcError("not_found", "no such user")
    assert (err.code, err.message, str(err)) == (
        "not_found",
        "no such user",
        "not_found: no such user",
    )
    assert isinstance(wire.error_from_wire("timeout", "t"), RpcTimeout)
    assert isinstance(wire.error_from_wire("unavailable", "u"), RpcUnavailable)
    assert type(wire.error_from_wire("other", "o")) is RpcError
    assert RpcTimeout("late").code == "timeout"
    assert RpcUnavailable("gone").code == "unavailable"


def test_outbox_batches_until_taken() -> None:
    box = wire.Outbox()
    assert box.push(b"a") is True
    assert box.push(b"b") is False
    assert box.take() == b"ab"
    assert box.push(b"c") is True
    assert box.take() == b"c"


@pytest.mark.parametrize(
    ("address", "parsed"),
    [("127.0.0.1:80", ("127.0.0.1", 80)), ("[::1]:9000", ("::1", 9000)), ("h:1", ("h", 1))],
)
def test_parse_address(address: str, parsed: tuple[str, int]) -> None:
    assert parse_address(address) == parsed


@pytest.mark.parametrize("address", ["nohost", ":80", "h:", "h:0", "h:70000", "h:x"])
def test_parse_address_refuses_bad_input(address: str) -> None:
    with pytest.raises(ValueError, match="host:port"):
        RpcClient(address)


# --- client and server over loopback ----------------------------------------------------


class Gate:
    """Handlers that block until released, counting how many are waiting."""

    def __init__(self) -> None:
        self.open = asyncio.Event()
        self.waiting = 0

    async def handler(self, params: Any) -> Any:
        self.waiting += 1
        await self.open.wait()
        return params

    async def until_waiting(self, count: int) -> None:
        async with asyncio.timeout(2):
            while self.waiting < count:
                await asyncio.sleep(0.005)


async def echo(params: Any) -> Any:
    return params


async def sleep_then_echo(params: dict) -> Any:
    await asyncio.sleep(params["delay"])
    return params["tag"]


async def fail(params: Any) -> Any:
    raise ValueError(f"boom {params}")


async def not_found(params: Any) -> Any:
    raise RpcError("not_found", f"no user {params}")


async def unencodable(params: Any) -> Any:
    return object()


async def big(params: int) -> bytes:
    return b"x" * params


HANDLERS = {
    "echo": echo,
    "sleep": sleep_then_echo,
    "fail": fail,
    "not_found": not_found,
    "unencodable": unencodable,
    "big": big,
}

StartServer = Callable[..., Awaitable[RpcServer]]


@pytest.fixture
async def start_server() -> AsyncIterator[StartServer]:
    servers: list[RpcServer] = []

    async def start(handlers: dict | None = None, port: int = 0, **kwargs: Any) -> RpcServer:
        server = RpcServer({**HANDLERS, **(handlers or {})}, name="test", **kwargs)
        await server.start("127.0.0.1", port)
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.close()


@pytest.fixture
async def clients() -> AsyncIterator[Callable[..., RpcClient]]:
    made: list[RpcClient] = []

    def make(address: str, **kwargs: Any) -> RpcClient:
        client = RpcClient(address, name="test", **kwargs)
        made.append(client)
        return client

    yield make
    for client in made:
        await client.close()


VALUES = [
    None,
    True,
    False,
    0,
    -1,
    2**64 - 1,
    -(2**63),
    1.5,
    "",
    "héllo ✓",
    b"\x00\xff",
    [],
    [1, [2, [3, None]]],
    {"a": {"b": [1, 2]}, "c": b"bytes"},
    {1: "int key", 2: [True]},
    "x" * 100_000,
]


async def test_round_trip_of_msgpack_values(start_server: StartServer, clients: Any) -> None:
    server = await start_server()
    host, port = server._address or ("", 0)
    assert port > 0 and server.address == f"127.0.0.1:{port}"
    client = clients(server.address)
    for value in VALUES:
        assert await client.call("echo", value) == value
    assert await client.call("echo") is None


async def test_pipelined_calls_are_answered_out_of_order(
    start_server: StartServer, clients: Any
) -> None:
    server = await start_server()
    client = clients(server.address)
    finished: list[int] = []

    async def one(tag: int, delay: float) -> None:
        assert await client.call("sleep", {"delay": delay, "tag": tag}) == tag
        finished.append(tag)

    count = 40
    await asyncio.gather(*(one(i, (count - i) * 0.003) for i in range(count)))
    assert finished == list(reversed(range(count)))
    assert len(server._conns) == 1


async def test_many_concurrent_calls_run_concurrently_on_one_connection(
    start_server: StartServer, clients: Any
) -> None:
    server = await start_server()
    client = clients(server.address)
    started = time.perf_counter()
    results = await asyncio.gather(
        *(client.call("sleep", {"delay": 0.1, "tag": i}) for i in range(2000))
    )
    assert results == list(range(2000))
    assert time.perf_counter() - started < 20  # serially 200 s; concurrently ~0.1 s + load
    assert len(server._conns) == 1


async def test_unknown_method(start_server: StartServer, clients: Any) -> None:
    server = await start_server()
    client = clients(server.address)
    with pytest.raises(RpcError) as info:
        await client.call("nope", 1)
    assert info.value.code == "unknown_method"
    assert "nope" in info.value.message
    assert str(info.value).startswith("unknown_method: ")
    assert await client.call("echo", 2) == 2


async def test_handler_errors(
    start_server: StartServer, clients: Any, caplog: pytest.LogCaptureFixture
) -> None:
    server = await start_server()
    client = clients(server.address)
    with caplog.at_level(logging.ERROR, logger="im.rpc"), pytest.raises(RpcError) as info:
        await client.call("fail", 7)
    assert info.value.code == "internal"
    assert "boom 7" in info.value.message
    assert any(r.exc_info and "fail" in r.getMessage() for r in caplog.records)

    with pytest.raises(RpcError) as info:
        await client.call("not_found", 9)
    assert (info.value.code, info.value.message) == ("not_found", "no user 9")

    with pytest.raises(RpcError) as info:
        await client.call("unencodable")
    assert info.value.code == "unencodable"

    assert await client.call("echo", "still up") == "still up"


async def test_result_too_large_is_an_error_not_a_dead_connection(
    start_server: StartServer, clients: Any
) -> None:
    server = await start_server(max_frame=4096)
    client = clients(server.address)
    assert await client.call("big", 100) == b"x" * 100
    with pytest.raises(RpcError) as info:
        await client.call("big", 10_000)
    assert info.value.code == "too_large"
    assert await client.call("echo", 1) == 1


async def test_unencodable_params_fail_before_sending(
    start_server: StartServer, clients: Any
) -> None:
    server = await start_server()
    client = clients(server.address)
    with pytest.raises(RpcError) as info:
        await client.call("echo", {1, 2})
    assert info.value.code == "unencodable"
    assert await client.call("echo", [1, 2]) == [1, 2]


async def test_timeout_then_late_answer_is_discarded(
    start_server: StartServer, clients: Any
) -> None:
    gate = Gate()
    server = await start_server({"slow": gate.handler})
    client = clients(server.address, timeout=5.0)
    before = REGISTRY.get_sample_value(
        "im_rpc_client_errors_total", {"name": "test", "method": "slow", "code": "timeout"}
    )
    started = time.perf_counter()
    with pytest.raises(RpcTimeout) as info:
        await client.call("slow", "late", timeout=0.05)
    assert time.perf_counter() - started < 1.0
    assert info.value.code == "timeout"
    gate.open.set()
    await asyncio.sleep(0.02)  # the late answer arrives and must be dropped
    assert await client.call("echo", "fresh") == "fresh"
    after = REGISTRY.get_sample_value(
        "im_rpc_client_errors_total", {"name": "test", "method": "slow", "code": "timeout"}
    )
    assert after == (before or 0) + 1


async def test_server_killed_then_restarted(start_server: StartServer, clients: Any) -> None:
    gate = Gate()
    server = await start_server({"block": gate.handler})
    port = (server._address or ("", 0))[1]
    client = clients(server.address, timeout=5.0)
    assert await client.call("echo", 0) == 0

    pending = [asyncio.ensure_future(client.call("block", i)) for i in range(5)]
    await gate.until_waiting(5)
    closing = asyncio.ensure_future(server.close())
    results = await asyncio.wait_for(asyncio.gather(*pending, return_exceptions=True), 1.0)
    assert all(isinstance(r, RpcUnavailable) for r in results)
    gate.open.set()
    await closing

    started = time.perf_counter()
    with pytest.raises(RpcUnavailable):
        await client.call("echo", 1)
    with pytest.raises(RpcUnavailable, match="next attempt"):
        await client.call("echo", 1)  # inside the backoff: fails without trying
    assert time.perf_counter() - started < 0.5

    await start_server(port=port)
    async with asyncio.timeout(3):
        while True:
            try:
                assert await client.call("echo", "back") == "back"
                break
            except RpcUnavailable:
                await asyncio.sleep(0.02)
    assert await client.call("echo", "again") == "again"


async def test_connect_refused_is_unavailable(clients: Any) -> None:
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    client = clients(f"127.0.0.1:{port}")
    with pytest.raises(RpcUnavailable) as info:
        await client.call("echo", 1)
    assert info.value.code == "unavailable"


async def test_client_max_inflight_overloaded(start_server: StartServer, clients: Any) -> None:
    gate = Gate()
    server = await start_server({"block": gate.handler})
    client = clients(server.address, max_inflight=3)
    pending = [asyncio.ensure_future(client.call("block", i)) for i in range(3)]
    await gate.until_waiting(3)
    with pytest.raises(RpcError) as info:
        await client.call("echo", "one too many")
    assert info.value.code == "overloaded"
    gate.open.set()
    assert await asyncio.gather(*pending) == [0, 1, 2]
    assert await client.call("echo", "room again") == "room again"


async def test_server_max_inflight_per_connection_overloaded(
    start_server: StartServer, clients: Any
) -> None:
    gate = Gate()
    server = await start_server({"block": gate.handler}, max_inflight_per_conn=2)
    client = clients(server.address)
    pending = [asyncio.ensure_future(client.call("block", i)) for i in range(2)]
    await gate.until_waiting(2)
    assert REGISTRY.get_sample_value("im_rpc_server_inflight", {"name": "test"}) >= 2
    with pytest.raises(RpcError) as info:
        await client.call("block", "third")
    assert info.value.code == "overloaded"
    gate.open.set()
    assert await asyncio.gather(*pending) == [0, 1]
    assert await client.call("block", "third") == "third"


async def test_close_fails_pending_calls(start_server: StartServer, clients: Any) -> None:
    gate = Gate()
    server = await start_server({"block": gate.handler})
    client = clients(server.address)
    pending = asyncio.ensure_future(client.call("block", 1))
    await gate.until_waiting(1)
    await client.close()
    with pytest.raises(RpcUnavailable):
        await pending
    with pytest.raises(RpcUnavailable):
        await client.call("echo", 1)
    gate.open.set()


@pytest.mark.parametrize(
    "garbage",
    [
        frame(b"hello"),  # not one msgpack value
        frame(b"\x81\xa1a\x01"),  # a map, not an array
        wire.encode_response(1, "a response sent to a server"),
        b"\xff\xff\xff\xff",  # a length far over the limit
        frame(b"\x94\xc3\x01\xa1m\xc0"),  # kind is a boolean
    ],
)
async def test_garbage_closes_that_connection_only(
    start_server: StartServer, clients: Any, garbage: bytes
) -> None:
    server = await start_server()
    client = clients(server.address)
    assert await client.call("echo", "before") == "before"
    host, port = server._address or ("", 0)
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(garbage)
    await writer.drain()
    async with asyncio.timeout(2):
        assert await reader.read() == b""
    writer.close()
    assert await client.call("echo", "after") == "after"
    other = clients(server.address)
    assert await other.call("echo", "new") == "new"


async def test_server_request_metric_counts(start_server: StartServer, clients: Any) -> None:
    server = await start_server()
    client = clients(server.address)
    labels = {"name": "test", "method": "echo"}
    before = REGISTRY.get_sample_value("im_rpc_server_requests_total", labels) or 0
    for i in range(3):
        await client.call("echo", i)
    assert REGISTRY.get_sample_value("im_rpc_server_requests_total", labels) == before + 3
    count = REGISTRY.get_sample_value(
        "im_rpc_client_latency_seconds_count", {"name": "test", "method": "echo"}
    )
    assert count is not None and count >= 3


def test_works_on_uvloop() -> None:
    """The services run on uvloop, whose transports are not asyncio's classes."""

    async def scenario() -> None:
        server = RpcServer(HANDLERS, name="test")
        host, port = await server.start("127.0.0.1", 0)
        client = RpcClient(server.address, name="test")
        try:
            calls = [client.call("sleep", {"delay": (50 - i) * 0.001, "tag": i}) for i in range(50)]
            assert await asyncio.gather(*calls) == list(range(50))
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(frame(b"hello"))
            async with asyncio.timeout(2):
                assert await reader.read() == b""
            writer.close()
            await server.close()
            with pytest.raises(RpcUnavailable):
                await client.call("echo", 1)
            server = RpcServer(HANDLERS, name="test")
            await server.start(host, port)
            await asyncio.sleep(MIN_BACKOFF * 2)
            assert await client.call("echo", "back") == "back"
        finally:
            await client.close()
            await server.close()

    uvloop.run(scenario())


async def test_a_store_outage_is_unavailable_and_logged_once_in_a_while(caplog) -> None:
    from redis.exceptions import BusyLoadingError

    from im.rpc.service import refusing_bad_values

    async def loading(params: Any) -> Any:
        raise BusyLoadingError("Redis is loading the dataset in memory")

    handler = refusing_bad_values(loading)
    for _ in range(3):
        with pytest.raises(RpcError) as info:
            await handler(None)
        assert info.value.code == "unavailable" and "loading" in info.value.message
    outages = [r for r in caplog.records if "store unavailable" in r.getMessage()]
    assert len(outages) == 1 and outages[0].exc_info is None  # one line, no traceback

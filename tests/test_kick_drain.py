"""Kick, replacement of an older login, and graceful drain, end to end: real room
instances, center over HTTP, the dispatcher, `im drain` and SIGTERM on a room process."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import sys
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from dispatcher.config import DispatcherConfig
from dispatcher.server import DispatcherServer
from im.config import DEV_PRODUCT
from im.protocol.errors import ErrorCode
from im.register_client import RegisterClient
from im.sdk import Client, ServerError
from room.drain import MAX_AFTER_MS, hint_span, jitter_ms, schedule
from tests.fixtures.system import ENGINES, RawTcp, System, eventually

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest_asyncio.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def kick(http: aiohttp.ClientSession, system: System, uid: str, body: Any = None) -> Any:
    async with http.post(
        f"{system.center_url}/v1/users/{uid}/kick",
        json=body,
        headers={"Authorization": f"Bearer {System.api_key}"},
    ) as response:
        return response.status, await response.json()


@pytest.mark.parametrize("engine", ENGINES)
async def test_kick_closes_a_users_connections_on_every_instance(
    make_system, http, engine: str
) -> None:
    system = await make_system(engine)
    phone = await system.raw(0)
    await phone.auth("k1", system.token("k1"), device="phone")
    laptop = await system.raw(1)
    await laptop.auth("k1", system.token("k1"), device="laptop")
    bystander = await system.online("k2", 0)

    status, answer = await kick(http, system, "k1", {"reason": "account suspended"})
    assert status == 200, answer
    assert answer == {"uid": "k1", "sessions": 2, "kicked": 2, "unreachable": []}
    for client in (phone, laptop):
        closed = await client.expect_close()
        assert (closed.code, closed.reason) == (ErrorCode.KICKED, "account suspended")
    await bystander.ping()

    status, refused = await kick(http, system, "k2", {"reason": ""})
    assert status == 400 and "'reason'" in refused["error"]["message"]


async def test_kick_can_name_one_device_and_the_sdk_stops_for_good(make_system, http) -> None:
    system = await make_system("memory")
    tablet = Client(
        [system.tcp_url(0)], product=DEV_PRODUCT, uid="k3", token=system.token("k3"),
        device="tablet",
    )  # fmt: skip
    await tablet.connect()
    phone = await system.raw(1)
    await phone.auth("k3", system.token("k3"), device="phone")
    status, answer = await kick(http, system, "k3", {"device": "tablet"})
    assert (status, answer["sessions"], answer["kicked"]) == (200, 1, 1)
    with pytest.raises(ServerError) as ended:
        await tablet.recv(timeout=3)
    assert ended.value.code == ErrorCode.KICKED
    await phone.ping()  # the other device stays
    await tablet.close()


@pytest.mark.parametrize("engine", ENGINES)
async def test_a_login_with_the_same_device_replaces_the_older_one(
    make_system, engine: str
) -> None:
    system = await make_system(engine)
    old = await system.raw(0)
    await old.auth("r1", system.token("r1"), device="phone")
    other_device = await system.raw(0)
    await other_device.auth("r1", system.token("r1"), device="watch")
    no_device = await system.online("r1", 0)

    new = await system.raw(1)  # another instance: replaced through its kick RPC
    await new.auth("r1", system.token("r1"), device="phone")
    closed = await old.expect_close()
    assert closed.code == ErrorCode.REPLACED
    for survivor in (other_device, no_device, new):
        await survivor.ping()

    newest = await system.raw(1)  # and on the same instance
    await newest.auth("r1", system.token("r1"), device="phone")
    assert (await new.expect_close()).code == ErrorCode.REPLACED
    await newest.ping()


async def test_drain_moves_every_client_without_losing_qos1_messages(make_system, http) -> None:
    system = await make_system("memory", rooms=2)
    register = RegisterClient(system.register_address)
    dispatcher = DispatcherServer(
        DispatcherConfig(port=0, register=system.register_address, node_cache_s=0.1), register
    )
    await dispatcher.start()
    users = [f"d{i}" for i in range(12)]
    # Half ask the dispatcher where to go, half have a fixed list (room 0 first).
    clients = {
        uid: Client(
            () if i % 2 else [system.tcp_url(0), system.tcp_url(1)],
            dispatcher=dispatcher.url if i % 2 else None,
            transport="tcp",
            product=DEV_PRODUCT,
            uid=uid,
            token=system.token(uid),
            backoff_min=0.05,
            backoff_max=0.2,
        )
        for i, uid in enumerate(users)
    }
    draining = system.rooms[0].gateway.instance
    try:
        for client in clients.values():
            await client.connect()
        assert sum(c.conn_id.startswith(draining) for c in clients.values()) >= len(users) // 2
        received: dict[str, list[int]] = {uid: [] for uid in users}

        async def read(uid: str) -> None:
            while True:
                received[uid].append((await clients[uid].recv()).body)

        readers = [asyncio.create_task(read(uid)) for uid in users]
        rpc = system.room_rpc(0)
        sent = 0
        for n in range(60):
            if n == 10:
                answer = await rpc.call("drain", {"window_s": 1.0})
                assert answer["window_s"] == 1.0 and answer["already_draining"] is False
            async with http.post(
                f"{system.center_url}/v1/push/users",
                json={"uids": users, "qos": 1, "body": n},
                headers={"Authorization": f"Bearer {System.api_key}"},
            ) as response:
                assert response.status == 200
            sent += 1
            await asyncio.sleep(0.05)
        await eventually(lambda: all(len(r) >= sent for r in received.values()), timeout=15)
        for uid in users:
            assert received[uid] == list(range(sent)), uid  # all, once, in order
        await eventually(lambda: system.rooms[0].finished.is_set(), timeout=5)
        assert not system.rooms[0].gateway.conns
        assert not any(c.conn_id.startswith(draining) for c in clients.values())
        nodes = {n.instance: n for n in await register.nodes()}
        assert nodes[system.rooms[0].gateway.instance].draining
        for task in readers:
            task.cancel()
    finally:
        for client in clients.values():
            await client.close()
        await dispatcher.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_im_drain_and_sigterm_drain_a_room_process(make_system) -> None:
    system = await make_system("memory", rooms=1, center=False)
    ws, tcp, rpc = _free_port(), _free_port(), _free_port()
    env = {**os.environ, "IM_ROOM_DRAIN_S": "0.5", "IM_CONFIG": ""}
    argv = [sys.executable, "-m", "room", "--register", system.register_address, "--saver", "",
            "--ws-port", str(ws), "--tcp-port", str(tcp), "--rpc-port", str(rpc)]  # fmt: skip
    room = await asyncio.create_subprocess_exec(*argv, cwd=ROOT, env=env)
    try:
        await eventually(lambda: _listening(tcp), timeout=10)
        client = await RawTcp.open("127.0.0.1", tcp)
        await client.auth("s1", system.token("s1"))
        room.send_signal(signal.SIGTERM)
        hint = await client.recv()
        assert hint["op"] == "reconnect" and hint["reason"] == "drain"
        assert 0 <= hint["after_ms"] <= 1000
        async with asyncio.timeout(10):
            assert await room.wait() == 0
    finally:
        if room.returncode is None:
            room.kill()
            await room.wait()

    room = await asyncio.create_subprocess_exec(*argv, cwd=ROOT, env=env)
    try:
        await eventually(lambda: _listening(tcp), timeout=10)
        client = await RawTcp.open("127.0.0.1", tcp)
        await client.auth("s2", system.token("s2"))
        drain = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "im", "drain", f"127.0.0.1:{rpc}",
            "--register", system.register_address, "--window-s", "0.3",
            cwd=ROOT, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, _ = await drain.communicate()
        assert drain.returncode == 0 and b'"connections":1' in out
        assert (await client.recv())["op"] == "reconnect"
        async with asyncio.timeout(10):
            assert await room.wait() == 0  # a drained instance exits on its own
        missing = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "im", "drain", "nope", "--register", system.register_address,
            cwd=ROOT, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, err = await missing.communicate()
        assert missing.returncode == 1 and b"no live room instance 'nope'" in err
    finally:
        if room.returncode is None:
            room.kill()
            await room.wait()


async def _listening(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    return True


@pytest.mark.parametrize("window", [30.0, 5.0, 1.0, 0.2, 0.0])
def test_drain_hints_leave_room_for_every_move_inside_the_window(window: float) -> None:
    moments = schedule(500, hint_span(window), random.Random(7))
    assert moments == sorted(moments) and len(moments) == 500
    last_back = max(moments, default=0.0) + jitter_ms(window) / 1000
    assert last_back <= window  # the latest hint plus the largest after_ms
    if window >= 5:
        assert last_back >= window - 1.0  # and the window is used, not wasted
    assert jitter_ms(window) <= MAX_AFTER_MS

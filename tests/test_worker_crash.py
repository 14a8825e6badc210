"""A fan-out worker process killed with SIGKILL in the middle of a stream, on Kafka.

Center (no workers of its own) publishes a steady stream of room pushes and multicasts to
four clients on two room instances; the worker runs as `python3 -m center.worker_main`.
It is killed mid-stream and a new one started. Nothing may be lost. The new worker does
not know what the dead one served, so the messages of the batch the dead one had in hand
may arrive twice: every repeat must be of a message published before the kill, and there
can be no more than one batch's worth. The numbers are printed for docs/OPERATIONS.md.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import IO

import aiohttp
import pytest
import pytest_asyncio

from center.worker import BATCH
from tests.fixtures.system import Closed, RawClient, System, eventually, metric_value

pytestmark = pytest.mark.slow

PUSHES = 2000
RATE = 200  # pushes a second
KILL_AT = 800  # pushes published when the worker is killed
ROOM = "stream"
UIDS = ("s0", "s1", "s2", "s3")
#: The dead member keeps its partitions until its group session (here 2 s) expires, and
#: Tansu settles the new join after that.
SESSION_S = 2.0
RECOVERY = 60.0
#: Once deliveries resumed after the kill, this long without a push means the backlog is done.
SETTLED = 3.0


class Workers:
    """Worker processes started by the test; those still running are stopped at the end."""

    def __init__(self, system: System, log: IO[bytes]) -> None:
        self.system = system
        self.log = log
        self.started: list[subprocess.Popen[bytes]] = []

    def start(self, name: str) -> subprocess.Popen[bytes]:
        assert self.system.brokers is not None
        process = subprocess.Popen(
            [
                sys.executable, "-m", "center.worker_main",
                "--brokers", self.system.brokers,
                "--register", self.system.register_address,
                "--name", name,
                "--metrics-port", "0",
                "--session-timeout-s", str(SESSION_S),
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "IM_LOG_LEVEL": "WARNING"},
        )  # fmt: skip
        self.started.append(process)
        return process

    def stop(self) -> None:
        for process in self.started:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


@pytest_asyncio.fixture
async def workers(make_system, tmp_path: Path) -> AsyncIterator[Workers]:
    system = await make_system("kafka", workers=0)
    with (tmp_path / "workers.log").open("ab") as log:
        started = Workers(system, log)
        try:
            yield started
        finally:
            started.stop()


@pytest_asyncio.fixture
async def http_session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


class Receiver:
    """Reads one client's pushes as they come: every id, repeats included."""

    def __init__(self, client: RawClient) -> None:
        self.ids: list[str] = []
        self.last = time.monotonic()
        self._task = asyncio.ensure_future(self._read(client))

    async def _read(self, client: RawClient) -> None:
        try:
            while True:
                frame = await client.recv(timeout=None)
                if frame.get("op") == "push":
                    self.ids.append(frame["id"])
                    self.last = time.monotonic()
        except Closed:
            return

    def stop(self) -> None:
        self._task.cancel()

    def duplicates(self) -> list[str]:
        seen: set[str] = set()
        repeats = []
        for message_id in self.ids:
            if message_id in seen:
                repeats.append(message_id)
            seen.add(message_id)
        return repeats


async def stream(
    post: Callable[[int], Awaitable[str]],
    count: int,
    rate: float,
    at: int,
    then: Callable[[], None],
) -> list[str]:
    """`count` pushes at `rate` a second, calling `then()` once `at` of them are out."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    ids = []
    for n in range(count):
        if n == at:
            then()
        await asyncio.sleep(max(0.0, start + n / rate - loop.time()))
        ids.append(await post(n))
    return ids


async def settle(receivers: list[Receiver], ids: list[str], after_kill: set[str]) -> None:
    """Until every client has every id; or, once messages published after the kill flow
    again, until nothing more comes for SETTLED seconds; at most RECOVERY seconds."""
    deadline = time.monotonic() + RECOVERY
    wanted = set(ids)
    while time.monotonic() < deadline:
        if all(wanted <= set(r.ids) for r in receivers):
            return
        resumed = all(after_kill & set(r.ids) for r in receivers)
        if resumed and time.monotonic() - max(r.last for r in receivers) > SETTLED:
            return
        await asyncio.sleep(0.1)


async def test_a_worker_killed_mid_stream_loses_nothing(
    workers: Workers, http_session: aiohttp.ClientSession, capsys: pytest.CaptureFixture
) -> None:
    system = workers.system
    dead = workers.start("w0")
    clients = []
    for n, uid in enumerate(UIDS):
        client = await system.online(uid, n % 2, ("tcp", "ws_msgpack")[n // 2])
        client.send({"op": "join", "room": ROOM})
        assert (await client.recv())["op"] == "joined"
        clients.append(client)
    headers = {"Authorization": f"Bearer {system.api_key}"}

    async def post(n: int) -> str:
        if n % 2:
            path, body = "/v1/push/users", {"uids": list(UIDS), "body": n}
        else:
            path, body = f"/v1/push/rooms/{ROOM}", {"body": n}
        async with http_session.post(system.center_url + path, json=body, headers=headers) as r:
            assert r.status == 200, await r.text()
            return (await r.json())["id"]

    receivers = [Receiver(client) for client in clients]
    warm_up = await post(0)  # the worker's first group join takes seconds
    await eventually(lambda: all(warm_up in r.ids for r in receivers), timeout=RECOVERY)

    killed: dict[str, float] = {}

    def kill_and_restart() -> None:
        os.kill(dead.pid, signal.SIGKILL)
        killed["at"] = time.monotonic()
        killed["delivered"] = min(len(r.ids) for r in receivers)
        workers.start("w0")

    started = time.monotonic()
    ids = [warm_up, *await stream(post, PUSHES, RATE, KILL_AT, kill_and_restart)]
    published = time.monotonic()
    assert dead.wait(timeout=5) == -signal.SIGKILL
    before_kill = set(ids[: KILL_AT + 1])  # the warm-up and the stream up to the kill
    assert 0 < killed["delivered"] < len(before_kill), "the kill must land mid-stream"

    await settle(receivers, ids, set(ids) - before_kill)
    settled = time.monotonic()
    await asyncio.sleep(0.5)  # late repeats, if any, would come now
    for receiver in receivers:
        receiver.stop()

    lost = [len(set(ids) - set(r.ids)) for r in receivers]
    duplicates = [r.duplicates() for r in receivers]
    evicted = [
        metric_value(
            await system.room_metrics(i),
            "im_room_drops_total",
            instance=room.gateway.instance,
            reason="queue_full_evicted",
        )
        for i, room in enumerate(system.rooms)
    ]
    report = (
        f"worker SIGKILL mid-stream: {len(ids)} pushes published over "
        f"{published - started:.1f} s, killed after {KILL_AT} ({killed['delivered']} "
        f"delivered to every client by then); settled {settled - killed['at']:.1f} s after "
        f"the kill; per client: lost {lost}, duplicates {[len(d) for d in duplicates]} "
        f"(bound: one batch, {BATCH}); frames the rooms evicted from full queues: {evicted}"
    )
    with capsys.disabled():
        print("\n" + report)
    assert lost == [0] * len(receivers), report
    for receiver, repeats in zip(receivers, duplicates, strict=True):
        assert set(receiver.ids) == set(ids), report  # nothing foreign
        assert len(repeats) <= BATCH, report
        assert set(repeats) <= before_kill, report  # only the dead worker's batch again

"""`python3 -m bench.console_shot`: a screenshot of the operations console under load.

It starts `im up` (room instances, register, saver, center, dispatcher, each its own
process) on a block of free ports, connects a few hundred Python SDK clients to three chat
rooms across the instances, makes the biggest room a big room with a small budget, pushes
room messages and unicasts at a steady rate, opens center's /console in Debian's chromium
(headless, driven by Playwright), logs in with the development admin key and saves a
full-page screenshot once the rates have some history. `ImUp` and `chromium` are shared
with bench/browser_latency.py.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import uvloop

from bench.ports import is_free
from bench.servers import stop_process
from im.auth import issue_token
from im.config import DEV_ADMIN_KEY, DEV_PRODUCT, dev_products
from im.sdk import Client

CHROMIUM = "/usr/bin/chromium"
HOST = "127.0.0.1"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0
PORT_TRIES = 200
#: A block: register R..R+3, center R+10, dispatcher R+11, rooms from R+20 (RPC at +100).
BLOCK_SPAN = 130
CONNECT_CONCURRENCY = 50
#: The rooms of the scene and the share of the clients in each.
ROOMS = {"live-1": 0.6, "live-2": 0.25, "lobby": 0.15}
#: Switches in force during the shot: the biggest room is degraded.
SWITCHES = {"big_rooms": ["live-1"], "room_budget": 5, "merge_likes": True}
#: Room pushes by type: (type, priority, share).
MIX = (("chat", "normal", 0.6), ("like", "low", 0.3), ("gift", "high", 0.1))


class ImUp:
    """`im up` on a block of free ports; `async with` starts it and stops it with SIGINT."""

    def __init__(self, rooms: int, log_dir: Path) -> None:
        self.rooms = rooms
        self.log_path = log_dir / "im-up.log"
        self.block = self._pick()
        self.center_url = f"http://{HOST}:{self.block + 10}"
        self.dispatcher_url = f"http://{HOST}:{self.block + 11}"
        self.ws_urls = [f"ws://{HOST}:{self.block + 20 + 2 * i}/ws" for i in range(rooms)]
        self._process: subprocess.Popen | None = None

    def _ports(self, block: int) -> list[int]:
        rooms = [block + 20 + i for i in range(2 * self.rooms)]
        rpcs = [block + 120 + i for i in range(self.rooms)]
        return [*range(block, block + 4), block + 10, block + 11, *rooms, *rpcs]

    def _pick(self) -> int:
        rng = random.Random()
        for _ in range(PORT_TRIES):
            block = rng.randrange(20000, 60000 - BLOCK_SPAN)
            if all(is_free(port) for port in self._ports(block)):
                return block
        raise RuntimeError("no block of free ports found in 20000-60000")

    async def __aenter__(self) -> ImUp:
        b = self.block
        argv = [sys.executable, "-m", "im", "up", "--rooms", str(self.rooms)]
        argv += ["--register-port", str(b), "--center-port", str(b + 10)]
        argv += ["--dispatcher-port", str(b + 11), "--base-port", str(b + 20)]
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        try:
            await self._ready()
        except BaseException:
            self._stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop()

    async def _ready(self) -> None:
        """Until center answers and every room instance is in the node table."""
        deadline = time.monotonic() + START_TIMEOUT_S
        headers = {"Authorization": f"Bearer {DEV_ADMIN_KEY}"}
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
            while True:
                assert self._process is not None
                if self._process.poll() is not None:
                    raise RuntimeError(f"im up exited; see {self.log_path}")
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    url = self.center_url + "/v1/admin/overview"
                    async with http.get(url, headers=headers) as response:
                        if response.status == 200:
                            overview = await response.json()
                            if len(overview["instances"]) == self.rooms:
                                return
                if time.monotonic() > deadline:
                    raise RuntimeError(f"im up did not come up in {START_TIMEOUT_S:g} s")
                await asyncio.sleep(0.2)

    def _stop(self) -> None:
        stop_process(self._process, signal.SIGINT, STOP_TIMEOUT_S)


@contextlib.asynccontextmanager
async def chromium() -> AsyncIterator[Any]:
    """Debian's chromium, headless; no browser is downloaded."""
    if not os.path.exists(CHROMIUM):
        raise SystemExit(f"{CHROMIUM} is missing: apt-get install -y chromium")
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            yield browser
        finally:
            await browser.close()


async def drain(client: Client) -> None:
    """Read a client's pushes, as an application would, so nothing backs up."""
    with contextlib.suppress(Exception):
        async for _ in client:
            pass


async def connect_clients(up: ImUp, count: int) -> list[Client]:
    """`count` clients spread over the instances, each in one room by the scene's shares."""
    product = dev_products()[DEV_PRODUCT]
    names = list(ROOMS)
    weights = list(ROOMS.values())
    rng = random.Random(7)
    slots = asyncio.Semaphore(CONNECT_CONCURRENCY)

    async def one(i: int) -> Client:
        uid = f"viewer-{i}"
        client = Client(
            [up.ws_urls[i % len(up.ws_urls)]],
            product=DEV_PRODUCT,
            uid=uid,
            token=issue_token(product, uid, 3600),
            queue_size=1000,
        )
        async with slots:
            await client.connect()
            await client.join(rng.choices(names, weights)[0])
        return client

    return await asyncio.gather(*(one(i) for i in range(count)))


async def push_load(up: ImUp, rate: float, users: int, stop: asyncio.Event) -> None:
    """Room pushes of the live mix to the scene's rooms and a tenth as many unicasts, paced
    at `rate` calls a second until `stop`."""
    headers = {"Authorization": f"Bearer {dev_products()[DEV_PRODUCT].api_key}"}
    rng = random.Random(11)
    types = [m[:2] for m in MIX]
    shares = [m[2] for m in MIX]
    loop = asyncio.get_running_loop()
    calls: set[asyncio.Task] = set()
    async with aiohttp.ClientSession(
        base_url=up.center_url, headers=headers, timeout=aiohttp.ClientTimeout(total=5)
    ) as http:

        async def post(path: str, body: dict[str, Any]) -> None:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with http.post(path, json=body) as response:
                    await response.read()

        start = loop.time()
        n = 0
        while not stop.is_set():
            n += 1
            if n % 10 == 0:
                uid = f"viewer-{rng.randrange(users)}"
                call = post("/v1/push/users", {"uids": [uid], "body": {"n": n}, "pri": "high"})
            else:
                room = rng.choices(list(ROOMS), list(ROOMS.values()))[0]
                kind, pri = rng.choices(types, shares)[0]
                call = post(f"/v1/push/rooms/{room}", {"type": kind, "pri": pri, "body": {"n": n}})
            task = loop.create_task(call)
            calls.add(task)
            task.add_done_callback(calls.discard)
            await asyncio.sleep(max(0.0, start + n / rate - loop.time()))
        if calls:
            await asyncio.wait(calls)


async def put_switches(up: ImUp, document: dict[str, Any]) -> None:
    headers = {"Authorization": f"Bearer {DEV_ADMIN_KEY}"}
    async with (
        aiohttp.ClientSession() as http,
        http.put(up.center_url + "/v1/admin/switches", json=document, headers=headers) as answer,
    ):
        if answer.status != 200:
            raise RuntimeError(f"switches refused: {await answer.text()}")


async def shoot(args: argparse.Namespace) -> Path:
    out = Path(args.out)
    with tempfile.TemporaryDirectory(prefix="console-shot-") as tmp:
        async with ImUp(args.rooms, Path(tmp)) as up:
            clients = await connect_clients(up, args.clients)
            readers = [asyncio.create_task(drain(c)) for c in clients]
            await put_switches(up, SWITCHES)
            stop = asyncio.Event()
            load = asyncio.create_task(push_load(up, args.rate, args.clients, stop))
            try:
                async with chromium() as browser:
                    page = await browser.new_page(viewport={"width": 1400, "height": 900})
                    await page.goto(up.center_url + "/console")
                    await page.fill("#key", DEV_ADMIN_KEY)
                    await page.click("#login-form button")
                    await page.locator("#rooms tbody tr").first.wait_for(timeout=10_000)
                    await asyncio.sleep(args.seconds)
                    out.parent.mkdir(parents=True, exist_ok=True)
                    await page.screenshot(path=str(out), full_page=True)
            finally:
                stop.set()
                await load
                for client in clients:
                    await client.close()
                for reader in readers:
                    reader.cancel()
    return out


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python3 -m bench.console_shot", description=__doc__)
    parser.add_argument("--out", default="docs/console.png", help="PNG to write")
    parser.add_argument("--rooms", type=int, default=2, help="room instances (default 2)")
    parser.add_argument("--clients", type=int, default=300, help="connected clients")
    parser.add_argument("--rate", type=float, default=200.0, help="pushes per second")
    parser.add_argument(
        "--seconds", type=float, default=20.0, help="load before the shot, for the rate history"
    )
    args = parser.parse_args(argv)
    if args.rooms < 1 or args.clients < 1 or args.rate <= 0 or args.seconds < 0:
        parser.error("--rooms, --clients and --rate must be positive, --seconds not negative")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out = uvloop.run(shoot(args))
    print(f"console screenshot saved to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

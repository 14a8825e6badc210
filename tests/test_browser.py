"""The browser SDK and the operations console, driven in Debian's chromium (headless, through
Playwright) against the real services on loopback; plus the console's routes over plain HTTP
and its pure parts.

The SDK page is served by a tiny aiohttp server of the test, which also forwards
`/v1/route` to a real dispatcher: a page reaches the dispatcher on its own origin, as it
would behind one site's reverse proxy. The SDK itself is imported from center's /sdk/im.js.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web
from prometheus_client import REGISTRY

from center.config import CenterConfig
from center.console.overview import metrics_url
from center.console.routes import parse_test_push
from center.console.samples import Sample, parse_sample, per_second, rates
from center.errors import ApiError
from center.server import CenterServer
from dispatcher.config import DispatcherConfig
from dispatcher.server import DispatcherServer
from im.config import DEV_ADMIN_KEY, DEV_PRODUCT, dev_products
from im.ids import id_time_ms, new_id
from im.register_client import RegisterClient
from im.sessions import Node
from room.server import RoomServer
from tests.fixtures.business import BusinessApi
from tests.fixtures.system import HOST, RawClient, System, at_second_start, eventually

CHROMIUM = "/usr/bin/chromium"
needs_chromium = pytest.mark.skipif(
    not os.path.exists(CHROMIUM),
    reason="Debian's chromium is not installed (apt-get install -y chromium)",
)
#: Room instances look for new switches this often here.
POLL_S = 0.1
#: How long to wait for something the browser should see.
WAIT = 10.0
WAIT_MS = WAIT * 1000

SDK_PAGE = """<!doctype html>
<meta charset="utf-8">
<title>im.js test page</title>
<script type="module">
import { ImClient, State } from "%(center)s/sdk/im.js";
window.ops = []; // the op of every frame the server sent, as the socket saw it
window.WebSocket = class extends WebSocket {
  constructor(url, protocols) {
    super(url, protocols);
    this.addEventListener("message", (e) => window.ops.push(JSON.parse(e.data).op));
  }
};
window.got = [];
window.errors = [];
window.states = [];
window.held = new Map();
window.holding = false;
window.start = async (options) => {
  const client = new ImClient(options);
  client.on("message", (m) => {
    window.got.push({ id: m.id, type: m.type, pri: m.pri, qos: m.qos, room: m.room, body: m.body });
    if (window.holding && m.qos === 1) return new Promise((done) => window.held.set(m.id, done));
  });
  client.on("error", (e) => window.errors.push({ code: e.code, reason: e.reason }));
  client.on("state", (s) => window.states.push(s.state));
  window.client = client;
  await client.connect();
  return client.state === State.ONLINE;
};
window.release = () => {
  for (const resolve of window.held.values()) resolve();
  window.held.clear();
};
window.ready = true;
</script>
"""


# -- fixtures ------------------------------------------------------------------------------


class BrowserThread:
    """One chromium for the whole session, owned by one thread (Playwright's sync API),
    so the tests' event loop keeps serving the system while the browser waits."""

    def __init__(self) -> None:
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chromium")
        self.playwright: Any = None
        self.browser: Any = None

    def start(self) -> None:
        from playwright.sync_api import sync_playwright

        self.playwright = sync_playwright().start()
        self.browser = self.playwright.chromium.launch(executable_path=CHROMIUM, headless=True)

    def stop(self) -> None:
        if self.browser is not None:
            self.browser.close()
        if self.playwright is not None:
            self.playwright.stop()

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)


@pytest.fixture(scope="session")
def chromium() -> Iterator[BrowserThread]:
    thread = BrowserThread()
    try:
        thread.executor.submit(thread.start).result()
        yield thread
    finally:
        thread.executor.submit(thread.stop).result()
        thread.executor.shutdown()


class Tab:
    """One page in a fresh browser context (its own sessionStorage), driven from the tests'
    event loop; every call runs on the browser's thread."""

    def __init__(self, thread: BrowserThread, context: Any, page: Any) -> None:
        self.thread = thread
        self.context = context
        self.page = page

    @classmethod
    async def open(cls, thread: BrowserThread) -> Tab:
        def make() -> tuple[Any, Any]:
            context = thread.browser.new_context(viewport={"width": 1400, "height": 1000})
            context.set_default_timeout(WAIT_MS)
            return context, context.new_page()

        return cls(thread, *await thread.run(make))

    async def close(self) -> None:
        await self.thread.run(self.context.close)

    async def goto(self, url: str) -> None:
        await self.thread.run(self.page.goto, url)

    async def reload(self) -> None:
        await self.thread.run(self.page.reload)

    async def evaluate(self, script: str, arg: Any = None) -> Any:
        return await self.thread.run(self.page.evaluate, script, arg)

    async def until(self, script: str, arg: Any = None) -> None:
        """Wait until the function `script` returns something truthy in the page."""
        await self.thread.run(lambda: self.page.wait_for_function(script, arg=arg))

    async def fill(self, selector: str, value: str) -> None:
        await self.thread.run(self.page.fill, selector, value)

    async def click(self, selector: str) -> None:
        await self.thread.run(self.page.click, selector)

    async def select(self, selector: str, value: str) -> None:
        await self.thread.run(self.page.select_option, selector, value)

    async def text(self, selector: str) -> str:
        return await self.thread.run(self.page.inner_text, selector)

    async def attribute(self, selector: str, name: str) -> str | None:
        return await self.thread.run(self.page.get_attribute, selector, name)

    async def shows(self, selector: str, text: str = "", state: str = "visible") -> None:
        """Wait until an element matching `selector` (and holding `text`) is in `state`."""
        locator = self.page.locator(selector)
        if text:
            locator = locator.filter(has_text=text)
        await self.thread.run(lambda: locator.first.wait_for(state=state))

    async def count(self, selector: str) -> int:
        return await self.thread.run(lambda: self.page.locator(selector).count())

    @property
    def url(self) -> str:
        return self.page.url


@pytest_asyncio.fixture
async def tabs(chromium: BrowserThread) -> AsyncIterator[Callable[[], Awaitable[Tab]]]:
    opened: list[Tab] = []

    async def open_tab() -> Tab:
        tab = await Tab.open(chromium)
        opened.append(tab)
        return tab

    yield open_tab
    for tab in opened:
        await tab.close()


@pytest_asyncio.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT)) as session:
        yield session


class PageServer:
    """Serves the SDK test page and forwards /v1/route to a dispatcher."""

    def __init__(self, center_url: str, dispatcher_url: str | None) -> None:
        self.center_url = center_url
        self.dispatcher_url = dispatcher_url
        self.routes_asked = 0
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self, http: aiohttp.ClientSession) -> None:
        async def page(request: web.Request) -> web.Response:
            html = SDK_PAGE % {"center": self.center_url}
            return web.Response(text=html, content_type="text/html")

        async def route(request: web.Request) -> web.Response:
            assert self.dispatcher_url is not None
            self.routes_asked += 1
            url = self.dispatcher_url + "/v1/route"
            async with http.get(url, params=list(request.query.items())) as answer:
                body = await answer.read()
                return web.Response(
                    body=body, status=answer.status, content_type="application/json"
                )

        app = web.Application()
        app.router.add_get("/", page)
        app.router.add_get("/v1/route", route)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, HOST, 0)
        await site.start()
        self.url = f"http://{HOST}:{self._runner.addresses[0][1]}"

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest_asyncio.fixture
async def serve_page(http: aiohttp.ClientSession) -> AsyncIterator[Callable[..., Awaitable]]:
    servers: list[PageServer] = []

    async def serve(system: System, dispatcher: DispatcherServer | None = None) -> PageServer:
        server = PageServer(system.center_url, dispatcher.url if dispatcher else None)
        servers.append(server)
        await server.start(http)
        return server

    yield serve
    for server in servers:
        await server.close()


@pytest_asyncio.fixture
async def dispatcher_for() -> AsyncIterator[Callable[[System], Awaitable[DispatcherServer]]]:
    started: list[DispatcherServer] = []

    async def start(system: System) -> DispatcherServer:
        config = DispatcherConfig(host=HOST, port=0, register=system.register_address)
        server = DispatcherServer(config, RegisterClient(system.register_address))
        started.append(server)
        await server.start()
        return server

    yield start
    for server in started:
        await server.close()


async def sdk_tab(tabs: Callable[[], Awaitable[Tab]], server: PageServer) -> Tab:
    tab = await tabs()
    await tab.goto(server.url + "/")
    await tab.until("() => window.ready === true")
    return tab


async def start_client(tab: Tab, system: System, uid: str, **options: Any) -> None:
    settings = {
        "product": DEV_PRODUCT,
        "uid": uid,
        "token": system.token(uid),
        "backoffMin": 50,
        "backoffMax": 400,
        **options,
    }
    assert await tab.evaluate("(o) => window.start(o)", settings) is True


async def got(tab: Tab, msg_id: str) -> dict[str, Any]:
    """The message `msg_id` once the page's handler has it."""
    await tab.until("(id) => window.got.some((m) => m.id === id)", msg_id)
    return await tab.evaluate("(id) => window.got.find((m) => m.id === id)", msg_id)


class Business(BusinessApi):
    async def unicast(self, uid: str, body: Any, qos: int = 0) -> str:
        answer = await self.ok("POST", "/v1/push/users", {"uids": [uid], "body": body, "qos": qos})
        return answer["id"]

    async def room(self, room: str, body: Any, pri: str = "normal") -> str:
        return (await self.ok("POST", f"/v1/push/rooms/{room}", {"body": body, "pri": pri}))["id"]

    async def state(self, msg_id: str, uid: str) -> str | None:
        return (await self.states(msg_id)).get(uid)


async def restart_room(system: System, i: int) -> RoomServer:
    """Stop room `i` and start a new instance on the same ports; the caller closes it."""
    old = system.rooms[i]
    rpc_port = int(old.gateway.node.rpc.rsplit(":", 1)[1])
    _, tcp_port = system.tcp_addr(i)
    config = dataclasses.replace(
        old.config, ws_port=system.ws_port(i), tcp_port=tcp_port, rpc_port=rpc_port
    )
    await system.stop_room(i)
    new = RoomServer(config, system.products, RegisterClient(config.register), owns_store=True)
    await new.start()
    return new


# -- the SDK in a browser ------------------------------------------------------------------


@needs_chromium
async def test_a_page_gets_a_unicast_a_room_push_and_a_broadcast_via_the_dispatcher(
    make_system, tabs, serve_page, dispatcher_for, http
) -> None:
    system = await make_system("memory", rooms=2)
    server = await serve_page(system, await dispatcher_for(system))
    business = Business(http, system)
    tab = await sdk_tab(tabs, server)
    await start_client(tab, system, "alice", dispatcher=server.url)
    assert server.routes_asked == 1
    assert await tab.evaluate("() => window.client.url") in {system.ws_url(0), system.ws_url(1)}
    assert await tab.evaluate("() => window.client.join('stage')") == 1

    unicast = await got(tab, await business.unicast("alice", {"text": "hi"}))
    assert unicast["body"] == {"text": "hi"} and unicast["room"] is None and unicast["qos"] == 0
    room = await got(tab, await business.room("stage", {"n": 1}))
    assert room["room"] == "stage" and room["body"] == {"n": 1}
    broadcast = await business.ok("POST", "/v1/push/broadcast", {"body": "all", "spread_s": 0})
    assert (await got(tab, broadcast["id"]))["body"] == "all"

    await tab.evaluate("() => window.client.leave('stage')")
    after = await business.room("stage", {"n": 2})
    last = await got(tab, await business.unicast("alice", "last"))
    assert last["body"] == "last"
    assert after not in await tab.evaluate("() => window.got.map((m) => m.id)")
    assert await tab.evaluate("() => window.errors") == []


@needs_chromium
async def test_batch_frames_are_handed_over_push_by_push(
    make_system, tabs, serve_page, http
) -> None:
    system = await make_system("memory", rooms=1, switches_poll_s=POLL_S)
    business = Business(http, system)
    switches = {"big_rooms": ["stage"], "compress_complex": True, "room_budget": 1000}
    version = (await business.ok("PUT", "/v1/admin/switches", switches, key=DEV_ADMIN_KEY))[
        "version"
    ]
    await eventually(lambda: system.rooms[0].gateway.switches_feed.version == version)
    tab = await sdk_tab(tabs, await serve_page(system))
    await start_client(tab, system, "alice", addresses=[system.ws_url(0)])
    await tab.evaluate("() => window.client.join('stage')")

    ids = await asyncio.gather(*(business.room("stage", n, pri="low") for n in range(5)))
    for msg_id in ids:
        assert (await got(tab, msg_id))["pri"] == "low"
    assert "batch" in await tab.evaluate("() => window.ops")
    assert await tab.evaluate("() => window.got.length") == 5


@needs_chromium
async def test_up_frames_are_answered_by_seq(make_system, tabs, serve_page) -> None:
    system = await make_system("memory", rooms=1)
    tab = await sdk_tab(tabs, await serve_page(system))
    await start_client(tab, system, "alice", addresses=[system.ws_url(0)])
    answers = await tab.evaluate(
        """() => Promise.all([1, 2, 3].map((n) =>
             window.client.up("comment", { n }).then(() => "up_ack", (e) => [e.code, e.seq])))"""
    )
    # Whatever the upstream decides for this product, each frame gets its own answer.
    assert len(answers) == 3
    for seq, answer in enumerate(answers, 1):
        assert answer == "up_ack" or (answer[0] >= 4000 and answer[1] == seq), answers
    refused = await tab.evaluate(
        "() => window.client.up('', 1).then(() => 'sent', (e) => e.constructor.name)"
    )
    assert refused == "TypeError"


@needs_chromium
async def test_qos1_is_acked_after_the_handler_and_caught_up_after_a_room_restart(
    make_system, tabs, serve_page, http
) -> None:
    system = await make_system("memory", rooms=1)
    business = Business(http, system)
    tab = await sdk_tab(tabs, await serve_page(system))
    await start_client(tab, system, "alice", addresses=[system.ws_url(0)])
    assert await tab.evaluate("() => window.client.join('stage')") == 1
    await tab.evaluate("() => { window.holding = true; }")

    held = await business.unicast("alice", "held", qos=1)
    await got(tab, held)
    await asyncio.sleep(0.3)
    assert await business.state(held, "alice") != "acked"  # the handler has not returned

    new = await restart_room(system, 0)
    try:
        offline = await business.unicast("alice", "while the room was down", qos=1)
        await got(tab, offline)  # reconnected with backoff, paged in at login
        await tab.until(
            "() => window.client.stats.connects === 2 && window.client.rooms.includes('stage')"
        )
        # The held message came again at login; the page saw it once.
        await tab.until("() => window.client.stats.duplicates >= 1")
        ids = await tab.evaluate("() => window.got.map((m) => m.id)")
        assert ids.count(held) == 1 and ids.count(offline) == 1
        await tab.evaluate("() => window.release()")
        for msg_id in (held, offline):
            await eventually(lambda msg_id=msg_id: _acked(business, msg_id, "alice"), WAIT)
        room_push = await got(tab, await business.room("stage", "after the restart"))
        assert room_push["room"] == "stage"
        states = await tab.evaluate("() => window.states")
        assert states[:2] == ["connecting", "online"] and states.count("online") == 2
    finally:
        await new.close()


async def _acked(business: Business, msg_id: str, uid: str) -> bool:
    return await business.state(msg_id, uid) == "acked"


@needs_chromium
async def test_a_reconnect_hint_moves_the_page_to_another_instance(
    make_system, tabs, serve_page, http
) -> None:
    system = await make_system("memory", rooms=2)
    business = Business(http, system)
    tab = await sdk_tab(tabs, await serve_page(system))
    addresses = [system.ws_url(0), system.ws_url(1)]
    await start_client(tab, system, "alice", addresses=addresses)
    assert await tab.evaluate("() => window.client.url") == addresses[0]
    await tab.evaluate("() => window.client.join('stage')")

    await system.rooms[0].drain(0.2)
    await tab.until(
        "(url) => window.client.url === url && window.client.state === 'online'", addresses[1]
    )
    assert await tab.evaluate("() => window.client.stats.connects") == 2
    assert (await got(tab, await business.room("stage", "moved")))["room"] == "stage"
    codes = await tab.evaluate("() => window.errors.map((e) => e.code)")
    assert 4010 not in codes  # it left on the hint, before the instance closed it


@needs_chromium
async def test_a_refused_token_stops_the_client(make_system, tabs, serve_page) -> None:
    system = await make_system("memory", rooms=1)
    tab = await sdk_tab(tabs, await serve_page(system))
    settings = {
        "product": DEV_PRODUCT,
        "uid": "alice",
        "token": system.token("mallory"),
        "addresses": [system.ws_url(0)],
    }
    failure = await tab.evaluate(
        "(o) => window.start(o).then(() => null, (e) => [e.code, e.terminal])", settings
    )
    assert failure == [4001, True]
    assert await tab.evaluate("() => window.client.state") == "offline"


# -- the console in a browser --------------------------------------------------------------


class Console:
    """The console page, driven like an operator would."""

    def __init__(self, tab: Tab, system: System) -> None:
        self.tab = tab
        self.system = system

    @classmethod
    async def open(cls, tabs: Callable[[], Awaitable[Tab]], system: System) -> Console:
        tab = await tabs()
        await tab.goto(system.center_url + "/console")
        return cls(tab, system)

    async def log_in(self, key: str) -> None:
        await self.tab.fill("#key", key)
        await self.tab.click("#login-form button")

    async def logged_in(self) -> None:
        await self.tab.shows("#dashboard")

    async def apply(self, **fields: str) -> None:
        for name, value in fields.items():
            await self.tab.fill(f'#switches-form [name="{name}"]', value)
        await self.tab.click('#switches-form button[type="submit"]')

    async def applied(self) -> int:
        """Wait for the page to report a new version; then for every room to have it."""
        await self.tab.shows("#switches-result", "applied")
        version = int((await self.tab.text("#switches-result")).split()[1].rstrip(";"))
        feeds = [room.gateway.switches_feed for room in self.system.rooms]
        await eventually(lambda: all(feed.version == version for feed in feeds))
        return version


async def normal_pushes_in_a_burst(business: Business, client: RawClient, room: str) -> int:
    """Ten normal-priority room pushes within one second, then a high one; how many normal
    ones the client got."""
    await at_second_start()
    await asyncio.gather(*(business.room(room, n) for n in range(10)))
    last = await business.room(room, "end", pri="high")
    normal = 0
    while True:
        frame = await client.recv(WAIT)
        for push in frame["msgs"] if frame.get("op") == "batch" else [frame]:
            if push.get("op") != "push":
                continue
            if push["id"] == last:
                return normal
            normal += push["pri"] == "normal"


@needs_chromium
async def test_the_console_logs_in_with_the_admin_key_only(make_system, tabs) -> None:
    system = await make_system("memory", rooms=2)
    member = await system.online("bob", 1)
    member.send({"op": "join", "room": "stage"})
    assert (await member.recv())["op"] == "joined"
    console = await Console.open(tabs, system)
    tab = console.tab

    await console.log_in(System.api_key)
    await tab.shows("#login-error", "business API key")
    await tab.shows("#dashboard", state="hidden")
    assert await tab.evaluate("() => sessionStorage.length") == 0

    await console.log_in(DEV_ADMIN_KEY)
    for room in system.rooms:
        await tab.shows(f'#instances tr[data-instance="{room.gateway.instance}"]')
    await tab.shows('#rooms tr[data-room="stage"]')
    assert "stage" in await tab.text("#rooms")
    assert await tab.evaluate("() => Object.values(sessionStorage)") == [DEV_ADMIN_KEY]
    assert DEV_ADMIN_KEY not in tab.url
    assert '"room_budget": 20' in await tab.text("#switches-doc")

    await tab.reload()  # entered once: the tab remembers it
    await console.logged_in()
    await tab.click("#logout")
    await tab.shows("#login")
    assert await tab.evaluate("() => sessionStorage.length") == 0


@needs_chromium
async def test_the_console_changes_room_budget_on_a_live_room(make_system, tabs, http) -> None:
    system = await make_system("memory", rooms=1, switches_poll_s=POLL_S)
    business = Business(http, system)
    client = await system.online("bob", 0)
    client.send({"op": "join", "room": "stage"})
    assert (await client.recv())["op"] == "joined"
    console = await Console.open(tabs, system)
    await console.log_in(DEV_ADMIN_KEY)
    await console.logged_in()

    await console.apply(big_rooms="stage", room_budget="2")
    await console.applied()
    changed = await console.tab.text("#switches-changed")
    assert "room_budget" in changed and "big_rooms" in changed
    assert 2 <= await normal_pushes_in_a_burst(business, client, "stage") <= 4

    await console.apply(room_budget="50")
    version = await console.applied()
    assert await console.tab.count("#switches-changed tbody tr") == 1
    row = await console.tab.text("#switches-changed tbody tr")
    assert row.split() == ["room_budget", "2", "50"]
    assert await normal_pushes_in_a_burst(business, client, "stage") == 10
    await console.tab.shows("#switches-version", f"version {version}")
    instance = system.rooms[0].gateway.instance
    await console.tab.shows(f'#instances tr[data-instance="{instance}"]', "room_budget")


@needs_chromium
async def test_the_console_shows_refused_values(make_system, tabs, http) -> None:
    system = await make_system("memory", rooms=1)
    business = Business(http, system)
    console = await Console.open(tabs, system)
    tab = console.tab
    await console.log_in(DEV_ADMIN_KEY)
    await console.logged_in()
    before = await business.ok("GET", "/v1/admin/switches", key=DEV_ADMIN_KEY)

    # Checked in the page: nothing is sent.
    await console.apply(room_budget="-5", st1="1")
    await tab.shows("#switches-error", "Not sent")
    assert "between 0 and" in await tab.text('small[data-for="room_budget"]')
    assert "ascending" in await tab.text('small[data-for="size_thresholds"]')
    assert await tab.attribute('[name="room_budget"]', "aria-invalid") == "true"

    # Left to the server, which names the field.
    await console.apply(room_budget="20", st1="10000", msg_type_ratio='{"chat": 70, "gift": 50}')
    await tab.shows("#switches-error", "Refused (HTTP 400)")
    assert "msg_type_ratio: percents sum to 120, over 100" in await tab.text("#switches-error")
    assert await tab.attribute('[name="msg_type_ratio"]', "aria-invalid") == "true"
    assert await business.ok("GET", "/v1/admin/switches", key=DEV_ADMIN_KEY) == before


@needs_chromium
async def test_the_console_sends_a_test_push(make_system, tabs) -> None:
    system = await make_system("memory", rooms=1)
    user = await system.online("carol", 0)
    member = await system.online("dave", 0)
    member.send({"op": "join", "room": "lobby"})
    assert (await member.recv())["op"] == "joined"
    console = await Console.open(tabs, system)
    tab = console.tab
    await console.log_in(DEV_ADMIN_KEY)
    await tab.shows("#push-product option", state="attached")

    await tab.fill("#push-target", "carol")
    await tab.click('#push-form button[type="submit"]')
    await tab.shows("#push-result", "Sent")
    push = await user.recv(WAIT)
    assert push["type"] == "console_test" and push["pri"] == "high"
    assert push["body"] == {"text": "hello from the console"}

    await tab.select("#push-kind", "room")
    await tab.fill("#push-target", "lobby")
    await tab.fill("#push-body", '{"n": 1}')
    await tab.click('#push-form button[type="submit"]')
    await tab.shows("#push-result", "room lobby")
    push = await member.recv(WAIT)
    assert push["room"] == "lobby" and push["body"] == {"n": 1}

    await tab.fill("#push-body", "{not json")
    await tab.click('#push-form button[type="submit"]')
    await tab.shows("#push-result", "must be JSON")


# -- the console's routes over HTTP --------------------------------------------------------


async def test_console_routes_take_the_admin_key_only(make_system, http) -> None:
    system = await make_system("memory", rooms=1)
    business = Business(http, system)
    for method, path, body in (
        ("GET", "/v1/admin/overview", None),
        ("POST", "/v1/admin/push", {"product": DEV_PRODUCT, "uid": "x"}),
    ):
        status, answer = await business.call(method, path, body, key="")
        assert status == 401 and answer["error"]["code"] == "unauthorized"
        status, answer = await business.call(method, path, body)
        assert status == 403 and answer["error"]["code"] == "forbidden"
        status, answer = await business.call(method, path, body, key="wrong")
        assert status == 401


async def test_the_overview_shows_instances_rates_rooms_and_switches(make_system, http) -> None:
    system = await make_system("memory", rooms=2)
    business = Business(http, system)
    clients = [await system.online(f"u{i}", i % 2) for i in range(3)]
    for client in clients:
        client.send({"op": "join", "room": "big" if client is not clients[2] else "small"})
        assert (await client.recv())["op"] == "joined"
    first = await business.ok("GET", "/v1/admin/overview", key=DEV_ADMIN_KEY)
    for n in range(5):
        await business.room("big", n)
    for client in clients[:2]:
        for _ in range(5):
            assert (await client.recv())["op"] == "push"
    await asyncio.sleep(0.6)  # past the snapshot's max age
    second = await business.ok("GET", "/v1/admin/overview", key=DEV_ADMIN_KEY)

    names = [room.gateway.instance for room in system.rooms]
    assert [row["instance"] for row in second["instances"]] == sorted(names)
    for row in first["instances"]:
        assert row["error"] == "" and row["msgs_per_s"] is None
    for row in second["instances"]:
        assert row["connections"] == (2 if row["instance"] == names[0] else 1)
        assert row["delivered"] == 5 and row["msgs_per_s"] > 0
        assert row["rooms"] >= 1 and row["ws"].startswith("ws://")
    assert [(r["room"], r["members"]) for r in second["rooms"]] == [("big", 2), ("small", 1)]
    assert second["rooms"][0]["instances"] == {names[0]: 1, names[1]: 1}
    assert second["switches"]["version"] == 0
    assert second["switches"]["switches"]["room_budget"] == 20
    assert second["products"] == [DEV_PRODUCT]


async def test_a_test_push_is_checked_and_delivered(make_system, http) -> None:
    system = await make_system("memory", rooms=1)
    business = Business(http, system)
    user = await system.online("erin", 0)
    answer = await business.ok(
        "POST", "/v1/admin/push", {"product": DEV_PRODUCT, "uid": "erin"}, key=DEV_ADMIN_KEY
    )
    push = await user.recv(WAIT)
    assert push["id"] == answer["id"] and push["type"] == "console_test"
    for body, field in (
        ({"product": "nope", "uid": "erin"}, "product"),
        ({"product": DEV_PRODUCT}, "uid"),
        ({"product": DEV_PRODUCT, "uid": "erin", "room": "r"}, "uid"),
        ({"product": DEV_PRODUCT, "uid": "erin", "qos": 1}, "qos"),
        ({"product": DEV_PRODUCT, "uid": "erin", "pri": "urgent"}, "pri"),
        ({"product": DEV_PRODUCT, "room": ""}, "room"),
    ):
        status, refused = await business.call("POST", "/v1/admin/push", body, key=DEV_ADMIN_KEY)
        assert status == 400, refused
        assert f"'{field}'" in refused["error"]["message"], refused


async def test_the_sdk_and_the_console_files_are_served(make_system, http) -> None:
    system = await make_system("memory", rooms=1)
    async with http.get(system.center_url + "/sdk/im.js") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/javascript")
        assert response.headers["Access-Control-Allow-Origin"] == "*"
        assert "export class ImClient" in await response.text()
    async with http.get(system.center_url + "/console") as response:
        assert response.status == 200
        assert "connect-src 'self'" in response.headers["Content-Security-Policy"]
        assert '<script type="module" src="/console/console.js">' in await response.text()
    for name, kind in (("console.js", "text/javascript"), ("console.css", "text/css")):
        async with http.get(f"{system.center_url}/console/{name}") as response:
            assert response.status == 200 and response.headers["Content-Type"].startswith(kind)
    async with http.get(system.center_url + "/console/..%2Fadmin.py") as response:
        assert response.status == 404
        assert (await response.json())["error"]["code"] == "not_found"


async def test_without_an_admin_key_center_serves_the_sdk_but_no_console(make_system, http) -> None:
    system = await make_system("memory", rooms=1, center=False)
    config = CenterConfig(host=HOST, port=0, register=system.register_address)
    center = CenterServer(config, RegisterClient(config.register), dev_products(), owns_store=True)
    await center.start()
    try:
        async with http.get(center.url + "/sdk/im.js") as response:
            assert response.status == 200
        for path in ("/console", "/v1/admin/overview"):
            async with http.get(center.url + path) as response:
                assert response.status == 404
    finally:
        await center.close()


# -- the Grafana dashboard ----------------------------------------------------------------

DASHBOARD = Path(__file__).resolve().parent.parent / "docs" / "grafana-dashboard.json"
SUFFIXES = ("", "_total", "_bucket", "_count", "_sum")


async def test_the_grafana_dashboard_reads_only_exported_metrics(make_system) -> None:
    await make_system("memory", rooms=1)  # every service's families, in this process
    families = {family.name for family in REGISTRY.collect()}
    dashboard = json.loads(DASHBOARD.read_text())
    queried = set()
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            queried |= set(re.findall(r"\bim_[a-z_]+", target["expr"]))
    assert len(queried) > 40
    unknown = {
        name for name in queried if not any(name.removesuffix(s) in families for s in SUFFIXES)
    }
    assert unknown == set()
    services = {name.split("_")[1] for name in queried}
    assert {"room", "center", "worker", "rpc", "saver", "dispatcher", "coordinator"} <= services


# -- the console's pure parts --------------------------------------------------------------

EXPOSITION = """\
# TYPE im_room_connections gauge
im_room_connections{instance="r0",state="handshake"} 1.0
im_room_connections{instance="r0",state="online"} 7.0
im_room_connections{instance="r1",state="online"} 99.0
# TYPE im_room_pushes_total counter
im_room_pushes_total{instance="r0"} 10.0
# TYPE im_room_room_delivered_total counter
im_room_room_delivered_total{instance="r0"} 30.0
# TYPE im_room_drops_total counter
im_room_drops_total{instance="r0",reason="queue_full"} 2.0
# TYPE im_room_room_drops_total counter
im_room_room_drops_total{instance="r0",room="a",type="chat",reason="room_budget"} 3.0
im_room_room_drops_total{instance="r0",room="b",type="like",reason="room_budget"} 4.0
# TYPE im_room_rooms gauge
im_room_rooms{instance="r0"} 2.0
# TYPE im_room_queued_frames gauge
im_room_queued_frames{instance="r0"} 5.0
"""


def test_a_sample_keeps_only_its_instance_and_sums_drops_by_reason() -> None:
    sample = parse_sample(EXPOSITION, "r0")
    assert sample == Sample(
        {"handshake": 1, "online": 7}, 40.0, {"queue_full": 2.0, "room_budget": 7.0}, 2, 5
    )
    assert parse_sample(EXPOSITION, "r9") == Sample()
    with pytest.raises(ValueError, match="Prometheus"):
        parse_sample("im_room_rooms{instance=", "r0")
    with pytest.raises(ValueError, match="larger"):
        parse_sample("#" * (5 * 1024 * 1024), "r0")


def test_rates_come_from_two_scrapes_and_survive_a_restart() -> None:
    before = Sample(delivered=100.0, drops={"room_budget": 10.0})
    after = Sample(delivered=300.0, drops={"room_budget": 30.0, "queue_full": 4.0})
    assert rates(12.0, after, 10.0, before) == {
        "msgs_per_s": 100.0,
        "drops_per_s": {"room_budget": 10.0, "queue_full": 2.0},
    }
    assert per_second(12.0, 50.0, 10.0, 300.0) == 25.0  # the counter started over
    assert per_second(10.0, 50.0, 10.0, 0.0) == 0.0


def test_metrics_are_scraped_on_the_websocket_port() -> None:
    assert (
        metrics_url(Node("r0", "h:1", ws="ws://10.0.0.7:8090/ws")) == "http://10.0.0.7:8090/metrics"
    )
    assert metrics_url(Node("r0", "h:1", ws="wss://gw.example:443/ws")) == (
        "https://gw.example:443/metrics"
    )
    assert metrics_url(Node("r0", "h:1")) is None
    assert metrics_url(Node("r0", "h:1", ws="tcp://h:1")) is None


def test_a_test_push_becomes_a_job_like_a_business_push() -> None:
    products = dev_products()
    msg_id = new_id()
    job = parse_test_push(b'{"product": "demo", "room": "r1", "body": 1}', products, msg_id)
    assert (job.kind, job.product, job.room) == ("room", "demo", "r1")
    assert job.msg == {
        "op": "push",
        "id": msg_id,
        "type": "console_test",
        "pri": "high",
        "qos": 0,
        "ts": id_time_ms(msg_id),
        "body": 1,
        "room": "r1",
    }
    job = parse_test_push(b'{"product": "demo", "uid": "u", "type": "t"}', products, msg_id)
    assert job.kind == "users" and job.uids == ("u",) and job.msg["type"] == "t"
    with pytest.raises(ApiError, match="unknown"):
        parse_test_push(b'{"product": "demo", "uid": "u", "uids": []}', products, msg_id)
    with pytest.raises(ApiError, match="JSON"):
        parse_test_push(b"[]", products, msg_id)
    with pytest.raises(ApiError, match="too large"):
        parse_test_push(
            b'{"product": "demo", "uid": "u", "body": "%s"}' % (b"x" * 70000), products, msg_id
        )

"""The operations console on center: the page and its two files, the browser SDK, and the
admin JSON the page reads (the overview) and writes (a test push).

The page itself holds no data, so it is served to anyone; everything it shows comes from
admin routes that take the admin key exactly as the switch routes do (a business key gets
403), sent by the page in the Authorization header, never in a URL.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from importlib import resources

import orjson
from aiohttp import web

from center.admin import AdminApi, business_key_checker
from center.api import Publisher, json_response
from center.console.overview import Overview
from center.errors import invalid_field
from center.jobs import Job, room_job, users_job
from center.validation import (
    build_push,
    check_frame_size,
    check_room,
    check_uid,
    parse_json_object,
    parse_push,
    parse_room_push,
)
from im.config import Product
from im.ids import id_time_ms, new_id
from im.sessions import SessionStore
from im.switches import SwitchStore

OVERVIEW_PATH = "/v1/admin/overview"
PUSH_PATH = "/v1/admin/push"
PAGE_PATH = "/console"
SDK_PATH = "/sdk/im.js"

#: The page's own files and their types; nothing else is served from the folder.
PAGE_FILES = {"console.js": "text/javascript", "console.css": "text/css"}
#: The page talks to center only, runs only its own script and cannot be framed.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
#: Any page may import the SDK as a module, which takes CORS for a cross-origin script.
SDK_HEADERS = {
    "Access-Control-Allow-Origin": "*",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}

TEST_PUSH_FIELDS = ("product", "uid", "room", "type", "pri", "body")
TEST_PUSH_DEFAULTS = {"type": "console_test", "pri": "high", "body": {"text": "console test"}}


def _static(package: str, path: str) -> bytes:
    return resources.files(package).joinpath(path).read_bytes()


def parse_test_push(raw: bytes, products: Mapping[str, Product], message_id: str) -> Job:
    """The job of a console test push: to one user or one room, at most once (qos 0), high
    priority unless told otherwise; the message is checked as the business API checks it."""
    document = parse_json_object(raw)
    for name in document:
        if name not in TEST_PUSH_FIELDS:
            raise invalid_field(name[:64], f"is unknown; expected {', '.join(TEST_PUSH_FIELDS)}")
    product = document.get("product")
    if product not in products:
        raise invalid_field("product", f"must be one of {', '.join(sorted(products))}")
    if ("uid" in document) == ("room" in document):
        raise invalid_field("uid", "or 'room' is required, not both")
    fields = {k: document[k] for k in ("type", "pri", "body") if k in document}
    body = {**TEST_PUSH_DEFAULTS, **fields}
    ts_ms = id_time_ms(message_id)
    if "uid" in document:
        users = parse_push(orjson.dumps({**body, "uids": [check_uid(document["uid"])]}))
        job = users_job(product, users.uids, build_push(users, message_id, ts_ms))
    else:
        room = check_room(document["room"])
        push = parse_room_push(orjson.dumps(body))
        job = room_job(product, room, build_push(push, message_id, ts_ms))
    check_frame_size(job.msg)
    return job


class ConsoleApi(AdminApi):
    """The console's admin routes; the key check and the switch reads are the admin API's."""

    def __init__(
        self,
        overview: Overview,
        publisher: Publisher,
        products: Mapping[str, Product],
        switch_store: SwitchStore,
        admin_key: str,
    ) -> None:
        super().__init__(switch_store, admin_key, business_key_checker(products))
        self._overview = overview
        self._publisher = publisher
        self._products = dict(products)
        self._page = _static("center.console", "static/index.html")
        self._files = {name: _static("center.console", f"static/{name}") for name in PAGE_FILES}

    async def page(self, request: web.Request) -> web.Response:
        return web.Response(body=self._page, content_type="text/html", headers=PAGE_HEADERS)

    async def page_file(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in self._files:
            raise web.HTTPNotFound()
        return web.Response(
            body=self._files[name], content_type=PAGE_FILES[name], headers=PAGE_HEADERS
        )

    async def overview(self, request: web.Request) -> web.Response:
        self._authorize(request)
        snapshot = await self._overview.snapshot()
        version, document = await self._current()
        return json_response(
            {
                **snapshot,
                "switches": {"version": version, "switches": document},
                "products": sorted(self._products),
            }
        )

    async def test_push(self, request: web.Request) -> web.Response:
        self._authorize(request)
        job = parse_test_push(await request.read(), self._products, new_id())
        await self._publisher.publish(job)
        return json_response({"id": job.id, "product": job.product, "job": job.kind})


def _sdk_handler() -> Callable[[web.Request], Awaitable[web.Response]]:
    sdk = _static("im", "web/im.js")

    async def serve_sdk(request: web.Request) -> web.Response:
        return web.Response(body=sdk, content_type="text/javascript", headers=SDK_HEADERS)

    return serve_sdk


def add_console_routes(
    app: web.Application,
    store: SessionStore,
    switch_store: SwitchStore | None,
    publisher: Publisher,
    products: Mapping[str, Product],
    admin_key: str | None,
) -> None:
    """The browser SDK on center's `app` (which must use center's error middleware), and,
    when there is an admin key and a switch store, the console page and its admin routes;
    the overview's HTTP client closes with the app."""
    app.router.add_get(SDK_PATH, _sdk_handler())
    if admin_key is None or switch_store is None:
        return
    overview = Overview(store)
    api = ConsoleApi(overview, publisher, products, switch_store, admin_key)
    app.router.add_get(PAGE_PATH, api.page)
    app.router.add_get(PAGE_PATH + "/{name}", api.page_file)
    app.router.add_get(OVERVIEW_PATH, api.overview)
    app.router.add_post(PUSH_PATH, api.test_push)

    async def close(_: web.Application) -> None:
        await overview.close()

    app.on_cleanup.append(close)

"""The HTTP routes and the middleware that turns every failure into the JSON error body."""

from __future__ import annotations

import hmac
import logging
from collections.abc import Mapping
from importlib import resources
from typing import Any

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from prometheus_client import CONTENT_TYPE_LATEST, Counter, generate_latest

from center.errors import (
    INTERNAL,
    UNAUTHORIZED,
    UNAVAILABLE,
    ApiError,
    code_for_status,
    error_body,
)
from center.push import PushRouter, RegisterUnavailable
from center.validation import build_push, check_frame_size, check_uid, parse_push
from im.config import Product
from im.ids import id_time_ms, new_id

log = logging.getLogger("center.api")

MAX_BODY = 1024 * 1024
#: The label of requests that matched no route, so random paths cannot grow the metric.
UNMATCHED = "unmatched"
#: Headers of aiohttp's own errors worth keeping on the JSON answer (405 lists the methods).
KEPT_HEADERS = ("Allow",)

HTTP_REQUESTS = Counter(
    "im_center_http_requests_total", "HTTP requests answered", ["route", "status"]
)


def json_response(
    document: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=orjson.dumps(document),
        status=status,
        content_type="application/json",
        headers=headers,
    )


def _route_label(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else UNMATCHED


def _http_error_message(request: web.Request, exc: web.HTTPException, max_body: int) -> str:
    if exc.status == 404:
        return f"no such path: {request.path[:200]}"
    if exc.status == 405:
        allowed = exc.headers.get("Allow", "")
        return f"method {request.method} is not allowed on {request.path[:200]}; use {allowed}"
    if exc.status == 413:
        return f"request body is larger than the limit of {max_body} bytes"
    return exc.reason


def error_middleware(max_body: int) -> Middleware:
    """Every answer of 400 and above is the JSON error body, whoever raised it."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            response = await handler(request)
        except ApiError as exc:
            response = json_response(exc.body(), exc.status, exc.headers)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            kept = {name: exc.headers[name] for name in KEPT_HEADERS if name in exc.headers}
            message = _http_error_message(request, exc, max_body)
            response = json_response(
                error_body(code_for_status(exc.status), message), exc.status, kept
            )
        except Exception:
            log.exception("unexpected error answering %s %s", request.method, request.path)
            response = json_response(error_body(INTERNAL, "internal error; see the log"), 500)
        HTTP_REQUESTS.labels(_route_label(request), str(response.status)).inc()
        return response

    return middleware


class Api:
    """The handlers; the product of a call is the one whose API key it presents."""

    def __init__(self, router: PushRouter, products: Mapping[str, Product]) -> None:
        self._router = router
        self._keys = [(name, product.api_key.encode()) for name, product in products.items()]
        self._openapi = resources.files("center").joinpath("openapi.json").read_bytes()

    def _product(self, request: web.Request) -> str:
        scheme, _, key = request.headers.get("Authorization", "").partition(" ")
        challenge = {"WWW-Authenticate": 'Bearer realm="center"'}
        if scheme.lower() != "bearer" or not key.strip():
            raise ApiError(
                401,
                UNAUTHORIZED,
                "missing API key: send the header 'Authorization: Bearer <api_key>'",
                challenge,
            )
        presented = key.strip().encode()
        found = None
        for name, expected in self._keys:  # no early exit: timing says nothing about keys
            if hmac.compare_digest(presented, expected) and found is None:
                found = name
        if found is None:
            raise ApiError(401, UNAUTHORIZED, "invalid API key", challenge)
        return found

    async def push_users(self, request: web.Request) -> web.Response:
        product = self._product(request)
        push_request = parse_push(await request.read())
        message_id = new_id()
        push = build_push(push_request, message_id, id_time_ms(message_id))
        check_frame_size(push)
        try:
            online = await self._router.push(product, push_request.uids, push)
        except RegisterUnavailable:
            raise _register_down() from None
        return json_response({"id": message_id, "online": online})

    async def user_sessions(self, request: web.Request) -> web.Response:
        product = self._product(request)
        uid = check_uid(request.match_info["uid"])
        try:
            sessions = await self._router.sessions(product, uid)
        except RegisterUnavailable:
            raise _register_down() from None
        listed = [{"conn": s.conn, "instance": s.instance, "device": s.device} for s in sessions]
        return json_response({"uid": uid, "sessions": listed})

    async def healthz(self, request: web.Request) -> web.Response:
        return json_response({"status": "ok"})

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def openapi(self, request: web.Request) -> web.Response:
        return web.Response(body=self._openapi, content_type="application/json")


def _register_down() -> ApiError:
    return ApiError(
        503, UNAVAILABLE, "the session register is unavailable; retry later", {"Retry-After": "1"}
    )


def build_app(
    router: PushRouter, products: Mapping[str, Product], *, max_body: int = MAX_BODY
) -> web.Application:
    api = Api(router, products)
    app = web.Application(middlewares=[error_middleware(max_body)], client_max_size=max_body)
    app.router.add_post("/v1/push/users", api.push_users)
    app.router.add_get("/v1/users/{uid}/sessions", api.user_sessions)
    app.router.add_get("/healthz", api.healthz)
    app.router.add_get("/metrics", api.metrics)
    app.router.add_get("/openapi.json", api.openapi)
    return app

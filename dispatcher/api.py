"""The HTTP routes and the middleware that turns every failure into the JSON error body."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Mapping
from importlib import resources
from typing import Any

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import Counter, Histogram

from dispatcher.config import DispatcherConfig
from dispatcher.errors import INTERNAL, UNAVAILABLE, ApiError, code_for_status, error_body
from dispatcher.nodes import NodeTable, RegisterUnavailable
from dispatcher.query import parse_route_query
from dispatcher.route import NO_NODES, OK, SATURATED, plan, retry_after_ms
from im.metrics import CONTENT_TYPE_LATEST, exposition

log = logging.getLogger("dispatcher.api")

#: Headers of aiohttp's own errors worth keeping on the JSON answer (405 lists the methods).
KEPT_HEADERS = ("Allow",)
#: Route answers depend on the user: no shared cache may keep one.
NO_STORE = {"Cache-Control": "no-store"}

REQUESTS = Counter(
    "im_dispatcher_requests_total",
    "Route requests answered, by result (ok, saturated, exhausted, no_nodes, unavailable, "
    "bad_request, internal)",
    ["result"],
)
SATURATED_ANSWERS = Counter(
    "im_dispatcher_saturated_total",
    "Route answers without addresses because every instance was draining or at a limit",
)
REQUEST_SECONDS = Histogram(
    "im_dispatcher_request_seconds",
    "Time to answer one route request, node table read included",
    buckets=(0.0002, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 2.5),
)


def json_response(
    document: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=orjson.dumps(document), status=status, content_type="application/json", headers=headers
    )


def _error_response(exc: ApiError) -> web.Response:
    return json_response(error_body(exc.code, exc.message), exc.status, exc.headers)


def _unavailable(message: str) -> web.Response:
    return json_response(error_body(UNAVAILABLE, message), 503, {"Retry-After": "1", **NO_STORE})


def _http_error_message(request: web.Request, exc: web.HTTPException) -> str:
    if exc.status == 404:
        return f"no such path: {request.path[:200]}"
    if exc.status == 405:
        allowed = exc.headers.get("Allow", "")
        return f"method {request.method} is not allowed on {request.path[:200]}; use {allowed}"
    return exc.reason


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every answer of 400 and above is the JSON error body, whoever raised it."""
    try:
        return await handler(request)
    except ApiError as exc:
        return _error_response(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        kept = {name: exc.headers[name] for name in KEPT_HEADERS if name in exc.headers}
        message = _http_error_message(request, exc)
        return json_response(error_body(code_for_status(exc.status), message), exc.status, kept)
    except Exception:
        log.exception("unexpected error answering %s %s", request.method, request.path)
        return json_response(error_body(INTERNAL, "internal error; see the log"), 500)


class Api:
    """The handlers over one node table; `rand` draws the retry_after_ms spread."""

    def __init__(
        self,
        table: NodeTable,
        config: DispatcherConfig,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self._table = table
        self._config = config
        self._rand = rand
        self._openapi = resources.files("dispatcher").joinpath("openapi.json").read_bytes()

    async def route(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        result = "internal"
        try:
            result, response = await self._route(request)
        except ApiError as exc:
            result = "bad_request"
            response = _error_response(exc)
        finally:
            REQUESTS.labels(result).inc()
            REQUEST_SECONDS.observe(time.perf_counter() - started)
        # Clients call the route from pages of any site (the browser SDK); it is public and
        # takes no credentials, so any origin may read it. The rest of the API stays closed.
        response.headers["Access-Control-Allow-Origin"] = "*"
        return response

    async def _route(self, request: web.Request) -> tuple[str, web.Response]:
        """The result label and the answer; a bad query raises its 400."""
        query = parse_route_query(request.query)
        try:
            nodes = await self._table.get()
        except RegisterUnavailable:
            return "unavailable", _unavailable("the register is unavailable; retry later")
        config = self._config
        answer = plan(nodes, query, config.max_addresses)
        if answer.outcome == OK:
            document = {"addresses": list(answer.addresses), "ttl_s": config.route_ttl_s}
            return OK, json_response(document, headers=NO_STORE)
        if answer.outcome == NO_NODES:
            message = f"no room instance serves transport {query.transport!r}; retry later"
            return NO_NODES, _unavailable(message)
        if answer.outcome == SATURATED:
            SATURATED_ANSWERS.inc()
        wait = retry_after_ms(
            answer.pressure, self._rand(), config.retry_min_ms, config.retry_max_ms
        )
        document = {"addresses": [], "retry_after_ms": wait}
        return answer.outcome, json_response(document, headers=NO_STORE)

    async def healthz(self, request: web.Request) -> web.Response:
        try:
            nodes = await self._table.get()
        except RegisterUnavailable:
            return _unavailable("the register is unavailable")
        return json_response({"status": "ok", "nodes": len(nodes)})

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def openapi(self, request: web.Request) -> web.Response:
        return web.Response(body=self._openapi, content_type="application/json")


def build_app(table: NodeTable, config: DispatcherConfig) -> web.Application:
    api = Api(table, config)
    app = web.Application(middlewares=[error_middleware])
    app.router.add_get("/v1/route", api.route)
    app.router.add_get("/healthz", api.healthz)
    app.router.add_get("/metrics", api.metrics)
    app.router.add_get("/openapi.json", api.openapi)
    return app

"""The HTTP routes, the middleware that turns every failure into the JSON error body, and
the publisher that puts accepted pushes on the bus."""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable, Mapping
from importlib import resources
from typing import Any

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest

from center.errors import (
    INTERNAL,
    NOT_FOUND,
    UNAUTHORIZED,
    UNAVAILABLE,
    ApiError,
    code_for_status,
    error_body,
    invalid_field,
)
from center.jobs import (
    PIN_PARTITIONS,
    PUSH_TOPIC,
    Job,
    broadcast_job,
    encode_job,
    job_key,
    job_topic,
    room_job,
    users_job,
)
from center.kick import kick_user, parse_kick
from center.push import Directory, RegisterUnavailable, RoomCaller, WarnThrottle
from center.storage import Storage, check_idempotency_key, fingerprint
from center.validation import (
    build_push,
    check_frame_size,
    check_room,
    check_uid,
    parse_broadcast,
    parse_push,
    parse_room_push,
)
from im.bus import Bus, BusError, BusFull
from im.config import Product
from im.ids import id_time_ms, new_id
from im.messages_store import is_id
from im.switches import Switches

log = logging.getLogger("center.api")

MAX_BODY = 1024 * 1024
#: The label of requests that matched no route, so random paths cannot grow the metric.
UNMATCHED = "unmatched"
#: Headers of aiohttp's own errors worth keeping on the JSON answer (405 lists the methods).
KEPT_HEADERS = ("Allow",)

#: Pin topics remembered as created; past this many the memory starts over.
MAX_KNOWN_TOPICS = 1024

HTTP_REQUESTS = Counter(
    "im_center_http_requests_total", "HTTP requests answered", ["route", "status"]
)
PUSH_SECONDS = Histogram(
    "im_center_push_seconds",
    "Time to accept one push: the register read and the publish on the bus",
    ["job"],
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


def _error_response(exc: ApiError) -> web.Response:
    return json_response(exc.body(), exc.status, exc.headers)


def error_middleware(max_body: int) -> Middleware:
    """Every answer of 400 and above is the JSON error body, whoever raised it."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            response = await handler(request)
        except RegisterUnavailable:
            response = _error_response(_unavailable("session register"))
        except BusError as exc:
            response = _error_response(_bus_refused(exc))
        except ApiError as exc:
            response = _error_response(exc)
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


class Publisher:
    """Puts jobs on the bus: a room the switches pin to a worker goes to that worker's
    topic (created on first use), everything else to the shared one."""

    def __init__(self, bus: Bus, switches: Callable[[], Switches | None]) -> None:
        self._bus = bus
        self._switches = switches
        self._topics: set[str] = {PUSH_TOPIC}
        self._warnings = WarnThrottle()

    async def publish(self, job: Job) -> None:
        """Returns once the bus holds the job durably; BusError (503) when it did not."""
        switches = self._switches()
        topic = job_topic(job, switches.room_pin if switches is not None else {})
        try:
            if topic not in self._topics:
                await self._bus.ensure_topic(topic, PIN_PARTITIONS)
                if len(self._topics) >= MAX_KNOWN_TOPICS:
                    self._topics = {PUSH_TOPIC}
                self._topics.add(topic)
            await self._bus.publish(topic, job_key(job), encode_job(job))
        except BusError as exc:
            if self._warnings.ready(topic):
                log.warning("publishing to %s failed: %s: %s", topic, type(exc).__name__, exc)
            raise


class Api:
    """The handlers; the product of a call is the one whose API key it presents.

    Pushes are published on the bus and delivered by the fan-out workers, so an answer
    says what the register knew when the push was accepted, not what was delivered.
    """

    def __init__(
        self,
        directory: Directory,
        publisher: Publisher,
        products: Mapping[str, Product],
        storage: Storage | None,
        caller: RoomCaller,
    ) -> None:
        self._directory = directory
        self._caller = caller
        self._publisher = publisher
        self._storage = storage
        self._products = dict(products)
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

    async def _accept(
        self,
        request: web.Request,
        product: str,
        raw: bytes,
        work: Callable[[str], Awaitable[dict[str, Any]]],
    ) -> web.Response:
        """Runs `work(message_id)` once per Idempotency-Key (or once, without the header)."""
        key = check_idempotency_key(request.headers.get("Idempotency-Key"))
        if key is None:
            return json_response(await work(new_id()))
        print_ = fingerprint(_route_label(request), raw)
        answer, replayed = await self._need_storage().once(product, key, print_, new_id(), work)
        return json_response(answer, headers={"Idempotent-Replayed": "true"} if replayed else None)

    def _need_storage(self) -> Storage:
        if self._storage is None:
            raise ApiError(
                503,
                UNAVAILABLE,
                "no message saver is configured (center --saver): qos 1 and Idempotency-Key "
                "need one",
            )
        return self._storage

    async def push_users(self, request: web.Request) -> web.Response:
        product = self._product(request)
        raw = await request.read()
        push_request = parse_push(raw)

        async def work(message_id: str) -> dict[str, Any]:
            push = build_push(push_request, message_id, id_time_ms(message_id))
            job = users_job(product, push_request.uids, push)
            check_frame_size(job.msg)
            answer: dict[str, Any] = {"id": message_id}
            with PUSH_SECONDS.labels("users").time():
                if push_request.qos == 1:
                    stored = await self._need_storage().store_users(
                        product, push_request.uids, push, push_request.ttl
                    )
                    answer.update(
                        recipients=len(push_request.uids),
                        stored=stored.stored,
                        evicted=stored.evicted,
                    )
                answer["online"] = await self._directory.online(product, push_request.uids)
                await self._publish(job)
            return answer

        return await self._accept(request, product, raw, work)

    async def push_room(self, request: web.Request) -> web.Response:
        product = self._product(request)
        room = check_room(request.match_info["room"])
        raw = await request.read()
        room_request = parse_room_push(raw)

        async def work(message_id: str) -> dict[str, Any]:
            push = build_push(room_request, message_id, id_time_ms(message_id))
            job = room_job(product, room, push, room_request.sender)
            check_frame_size(job.msg)
            with PUSH_SECONDS.labels("room").time():
                members = sum((await self._directory.room_instances(product, room)).values())
                await self._publish(job)
            return {"id": message_id, "members": members}

        return await self._accept(request, product, raw, work)

    async def push_broadcast(self, request: web.Request) -> web.Response:
        product = self._product(request)
        raw = await request.read()
        broadcast = parse_broadcast(raw)
        spread_s = broadcast.spread_s
        if spread_s is None:
            spread_s = self._products[product].broadcast_spread_s

        async def work(message_id: str) -> dict[str, Any]:
            push = build_push(broadcast, message_id, id_time_ms(message_id))
            job = broadcast_job(product, push, spread_s)
            check_frame_size(job.msg)
            answer: dict[str, Any] = {"id": message_id, "spread_s": spread_s}
            with PUSH_SECONDS.labels("broadcast").time():
                if broadcast.qos == 1:
                    stored = await self._need_storage().store_broadcast(
                        product, push, broadcast.ttl
                    )
                    answer["stored"] = stored.stored
                await self._publish(job)
            return answer

        return await self._accept(request, product, raw, work)

    async def _publish(self, job: Job) -> None:
        """A stored (qos 1) message is not lost when the bus refuses it: it waits in the
        saver for the user's next login. The answer says so, and a retry with the same
        Idempotency-Key delivers it live without storing it twice."""
        try:
            await self._publisher.publish(job)
        except BusError as exc:
            if job.msg["qos"] != 1:
                raise
            reason = "full" if isinstance(exc, BusFull) else "unavailable"
            raise ApiError(
                503,
                UNAVAILABLE,
                f"the message {job.id} is stored, but the message bus is {reason}, so online "
                "users did not get it live; retry with the same Idempotency-Key",
                {"Retry-After": "1"},
            ) from None

    async def message(self, request: web.Request) -> web.Response:
        product = self._product(request)
        message_id = request.match_info["id"]
        if not is_id(message_id):
            raise invalid_field("id", "is not a message id")
        found = await self._need_storage().delivery(product, message_id)
        if found is None:
            raise ApiError(
                404,
                NOT_FOUND,
                f"no delivery record for message {message_id}: unknown, qos 0, a room push or "
                "a broadcast (not tracked per user), or past its retention",
            )
        return json_response(
            {
                "id": message_id,
                "recipients": found.recipients,
                "counts": found.counts(),
                "states": found.states,
            }
        )

    async def room_info(self, request: web.Request) -> web.Response:
        product = self._product(request)
        room = check_room(request.match_info["room"])
        instances = await self._directory.room_instances(product, room)
        return json_response(
            {"room": room, "members": sum(instances.values()), "instances": instances}
        )

    async def user_sessions(self, request: web.Request) -> web.Response:
        product = self._product(request)
        uid = check_uid(request.match_info["uid"])
        sessions = (await self._directory.lookup(product, [uid])).get(uid, [])
        listed = [{"conn": s.conn, "instance": s.instance, "device": s.device} for s in sessions]
        return json_response({"uid": uid, "sessions": listed})

    async def kick(self, request: web.Request) -> web.Response:
        product = self._product(request)
        uid = check_uid(request.match_info["uid"])
        reason, device = parse_kick(await request.read())
        return json_response(
            await kick_user(self._directory, self._caller, product, uid, reason, device)
        )

    async def healthz(self, request: web.Request) -> web.Response:
        return json_response({"status": "ok"})

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def openapi(self, request: web.Request) -> web.Response:
        return web.Response(body=self._openapi, content_type="application/json")


def _unavailable(what: str) -> ApiError:
    return ApiError(
        503, UNAVAILABLE, f"the {what} is unavailable; retry later", {"Retry-After": "1"}
    )


def _bus_refused(exc: BusError) -> ApiError:
    reason = "is full" if isinstance(exc, BusFull) else "is unavailable"
    message = f"the message bus {reason}; nothing was pushed; retry later"
    return ApiError(503, UNAVAILABLE, message, {"Retry-After": "1"})


def build_app(
    directory: Directory,
    publisher: Publisher,
    products: Mapping[str, Product],
    storage: Storage | None,
    caller: RoomCaller,
    *,
    max_body: int = MAX_BODY,
) -> web.Application:
    api = Api(directory, publisher, products, storage, caller)
    app = web.Application(middlewares=[error_middleware(max_body)], client_max_size=max_body)
    app.router.add_post("/v1/push/users", api.push_users)
    app.router.add_post("/v1/push/rooms/{room}", api.push_room)
    app.router.add_post("/v1/push/broadcast", api.push_broadcast)
    app.router.add_get("/v1/rooms/{room}", api.room_info)
    app.router.add_get("/v1/users/{uid}/sessions", api.user_sessions)
    app.router.add_get("/v1/messages/{id}", api.message)
    app.router.add_post("/v1/users/{uid}/kick", api.kick)
    app.router.add_get("/healthz", api.healthz)
    app.router.add_get("/metrics", api.metrics)
    app.router.add_get("/openapi.json", api.openapi)
    return app

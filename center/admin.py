"""The operators' routes: read and replace the live switches, with the admin key only.

A business API key is refused with 403 even though it is valid for pushes: one product's
server must not be able to degrade every product's rooms. Errors are raised as ApiError for
center's error middleware (center.api.error_middleware) to answer.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Callable, Mapping
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import Counter

from center.errors import UNAUTHORIZED, UNAVAILABLE, ApiError
from center.validation import parse_json_object
from im.config import Product
from im.switches import SwitchError, Switches, SwitchStore, diff, parse_switches, to_document

log = logging.getLogger("center.admin")

PATH = "/v1/admin/switches"
FORBIDDEN = "forbidden"
INVALID_SWITCH = "invalid_switch"
CHALLENGE = {"WWW-Authenticate": 'Bearer realm="center-admin"'}

SWITCH_UPDATES = Counter(
    "im_center_switch_updates_total",
    "PUTs of the live switches by result: applied, rejected (bad document), failed (store)",
    ["result"],
)


class SwitchRejected(ApiError):
    """A document with a bad value; the body also names the field, for tools to point at."""

    def __init__(self, error: SwitchError) -> None:
        super().__init__(400, INVALID_SWITCH, str(error))
        self.field = error.field

    def body(self) -> dict:
        body = super().body()
        body["error"]["field"] = self.field
        return body


def _json(document: Any) -> web.Response:
    return web.Response(body=orjson.dumps(document), content_type="application/json")


def _store_down() -> ApiError:
    return ApiError(
        503,
        UNAVAILABLE,
        "the switch store did not answer; GET the switches to see whether a change was applied",
        {"Retry-After": "1"},
    )


def _in_force(found: tuple[int, dict] | None) -> tuple[int, dict[str, Any]]:
    """The version in force and its document, with defaults for any field it lacks."""
    version, stored = found if found is not None else (0, {})
    return version, {**to_document(Switches()), **stored}


class AdminApi:
    def __init__(
        self, store: SwitchStore, admin_key: str, is_business_key: Callable[[str], bool]
    ) -> None:
        if not admin_key:
            raise ValueError("the admin key must not be empty")
        if is_business_key(admin_key):  # it would then push too, and be refused here as one
            raise ValueError("the admin key must differ from every product's api_key")
        self._store = store
        self._key = admin_key.encode()
        self._is_business_key = is_business_key
        # One PUT at a time in this process, so `changed` is measured against the version
        # that PUT replaced.
        self._lock = asyncio.Lock()

    def _authorize(self, request: web.Request) -> None:
        scheme, _, key = request.headers.get("Authorization", "").partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            raise ApiError(
                401,
                UNAUTHORIZED,
                "missing admin key: send the header 'Authorization: Bearer <admin_key>'",
                CHALLENGE,
            )
        if hmac.compare_digest(key.encode(), self._key):
            return
        if self._is_business_key(key):
            raise ApiError(
                403, FORBIDDEN, "a business API key cannot read or change switches; use admin_key"
            )
        raise ApiError(401, UNAUTHORIZED, "invalid admin key", CHALLENGE)

    async def _current(self) -> tuple[int, dict[str, Any]]:
        try:
            found = await self._store.get_switches()
        except Exception as exc:  # the store's error type varies (RPC, Redis)
            log.warning("switch store read failed: %s: %s", type(exc).__name__, exc)
            raise _store_down() from exc
        return _in_force(found)

    async def get(self, request: web.Request) -> web.Response:
        self._authorize(request)
        version, document = await self._current()
        return _json({"version": version, "switches": document})

    async def put(self, request: web.Request) -> web.Response:
        self._authorize(request)
        try:
            switches = parse_switches(parse_json_object(await request.read()))
        except SwitchError as exc:
            SWITCH_UPDATES.labels("rejected").inc()
            raise SwitchRejected(exc) from None
        except ApiError:
            SWITCH_UPDATES.labels("rejected").inc()
            raise
        document = to_document(switches)
        async with self._lock:
            try:
                found = await self._store.get_switches()
                version = await self._store.put_switches(document)
            except Exception as exc:
                SWITCH_UPDATES.labels("failed").inc()
                log.warning("switch store write failed: %s: %s", type(exc).__name__, exc)
                raise _store_down() from exc
        _, old = _in_force(found)
        changed = diff(old, document)
        SWITCH_UPDATES.labels("applied").inc()
        log.info("switches version %d applied; changed: %s", version, ", ".join(changed) or "none")
        return _json({"version": version, "switches": document, "changed": changed})


def add_admin_routes(
    app: web.Application,
    store: SwitchStore,
    admin_key: str,
    is_business_key: Callable[[str], bool],
) -> None:
    """GET and PUT /v1/admin/switches on `app`, which must use center's error middleware."""
    api = AdminApi(store, admin_key, is_business_key)
    app.router.add_get(PATH, api.get)
    app.router.add_put(PATH, api.put)


def business_key_checker(products: Mapping[str, Product]) -> Callable[[str], bool]:
    """True for any product's API key, compared in constant time over all of them."""
    keys = [p.api_key.encode() for p in products.values()]

    def is_business_key(token: str) -> bool:
        given = token.encode()
        found = False
        for key in keys:
            found |= hmac.compare_digest(given, key)
        return found

    return is_business_key

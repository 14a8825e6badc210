"""Asking the dispatcher where to connect: one GET /v1/route.

The answer is an ordered address list to try, or, when every instance is saturated, no
addresses and how long to wait before asking again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import aiohttp
import orjson

#: Bytes of an answer read at most: a route lists a few dozen short addresses.
MAX_ANSWER = 64 * 1024


class DispatchError(Exception):
    """The dispatcher could not answer or refused the question; `status` is the HTTP status
    (0 when none came) and `code` the error code of its JSON body, when it had one."""

    def __init__(self, message: str, status: int = 0, code: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.code = code


@dataclass(frozen=True, slots=True)
class Route:
    """Addresses to try in order and how many seconds they may be reused; with no
    addresses, `retry_after_ms` says when to ask again."""

    addresses: list[str]
    ttl_s: float
    retry_after_ms: int | None


async def _read_bounded(response: aiohttp.ClientResponse) -> bytes:
    body = bytearray()
    async for chunk in response.content.iter_any():
        body += chunk
        if len(body) > MAX_ANSWER:
            raise DispatchError(
                f"dispatcher answer is larger than {MAX_ANSWER} bytes", response.status
            )
    return bytes(body)


def _error_of(status: int, body: bytes) -> DispatchError:
    try:
        error = orjson.loads(body)["error"]
        code, message = str(error["code"]), str(error["message"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return DispatchError(f"dispatcher answered HTTP {status}", status)
    return DispatchError(f"dispatcher answered HTTP {status} {code}: {message}", status, code)


def _route_of(body: bytes) -> Route:
    try:
        document = orjson.loads(body)
        addresses = document["addresses"]
        if not isinstance(addresses, list) or not all(isinstance(a, str) for a in addresses):
            raise TypeError("addresses must be a list of strings")
        if addresses:
            return Route(addresses, float(document["ttl_s"]), None)
        return Route([], 0.0, int(document["retry_after_ms"]))
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise DispatchError(f"dispatcher answered a malformed route: {exc}", 200) from None


async def route(
    url: str,
    product: str,
    uid: str,
    *,
    transport: str = "ws",
    idc: str = "",
    retry: Sequence[str] = (),
    timeout: float = 5.0,
) -> Route:
    """The dispatcher at `url` (http://host:port)'s route for this user; DispatchError when
    it cannot be reached within `timeout` seconds or answers anything but 200."""
    params: list[tuple[str, str]] = [("product", product), ("uid", uid), ("transport", transport)]
    if idc:
        params.append(("idc", idc))
    params.extend(("retry", address) for address in retry)
    endpoint = url.rstrip("/") + "/v1/route"
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session,
            session.get(endpoint, params=params) as response,
        ):
            status = response.status
            body = await _read_bounded(response)
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise DispatchError(f"dispatcher {url} unreachable: {type(exc).__name__}: {exc}") from None
    if status != 200:
        raise _error_of(status, body)
    return _route_of(body)

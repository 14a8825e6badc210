"""The query string of GET /v1/route, checked into a RouteQuery; any bad parameter is a 400
that names it."""

from __future__ import annotations

from multidict import MultiMapping

from dispatcher.errors import bad_parameter
from dispatcher.route import TRANSPORTS, RouteQuery

MAX_PRODUCT = 64  # the same limits as the AUTH frame's
MAX_UID = 128
MAX_PLACE = 64  # characters of an IDC or ISP name
MAX_ADDRESS = 256
MAX_TRANSPORT = 16
MAX_RETRY = 32  # retry parameters in one request


def _has_control(text: str) -> bool:
    return any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in text)


def _single(query: MultiMapping[str], name: str, limit: int, *, required: bool) -> str:
    values = query.getall(name, [])
    if len(values) > 1:
        raise bad_parameter(name, "is given more than once")
    value = values[0] if values else ""
    if not value:
        if required:
            raise bad_parameter(name, "is missing")
        return ""
    if len(value) > limit:
        raise bad_parameter(name, f"is longer than {limit} characters")
    if _has_control(value):
        raise bad_parameter(name, "holds control characters")
    return value


def _retry(query: MultiMapping[str]) -> frozenset[str]:
    values = query.getall("retry", [])
    if len(values) > MAX_RETRY:
        raise bad_parameter("retry", f"is given {len(values)} times; at most {MAX_RETRY}")
    for value in values:
        if not value or len(value) > MAX_ADDRESS:
            raise bad_parameter("retry", f"must be an address of 1 to {MAX_ADDRESS} characters")
    return frozenset(values)


def parse_route_query(query: MultiMapping[str]) -> RouteQuery:
    """ApiError (400) naming the first bad parameter; unknown parameters are ignored, so
    newer clients may send more."""
    product = _single(query, "product", MAX_PRODUCT, required=True)
    uid = _single(query, "uid", MAX_UID, required=True)
    transport = _single(query, "transport", MAX_TRANSPORT, required=False) or "ws"
    if transport not in TRANSPORTS:
        raise bad_parameter("transport", f"must be one of {', '.join(TRANSPORTS)}")
    return RouteQuery(
        product=product,
        uid=uid,
        transport=transport,
        idc=_single(query, "idc", MAX_PLACE, required=False),
        isp=_single(query, "isp", MAX_PLACE, required=False),
        retry=_retry(query),
    )

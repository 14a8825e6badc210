"""Request bodies in, checked values or an ApiError out; no I/O.

The push a business server sends becomes one server `push` map (im.protocol.messages),
and that map must fit a client frame in every encoding a client may have chosen, or the
rooms could not deliver it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from center.errors import INVALID_JSON, TOO_LARGE, ApiError, invalid_field
from im.protocol.codec import Encoding, encode
from im.protocol.framing import DEFAULT_MAX_FRAME
from im.protocol.messages import PRIORITIES, integer, one_of, text

MAX_UIDS = 10_000
MAX_UID_LEN = 128
MAX_TYPE_LEN = 64
DEFAULT_TYPE = "chat"
DEFAULT_PRI = "normal"
DEFAULT_QOS = 0
PUSH_FIELDS = ("uids", "type", "pri", "qos", "body")

_uid = text(MAX_UID_LEN)
_type = text(MAX_TYPE_LEN)
_pri = one_of(*PRIORITIES)
_qos = integer(0, 1)


@dataclass(frozen=True, slots=True)
class PushRequest:
    uids: tuple[str, ...]  # duplicates removed, first-seen order kept
    type: str
    pri: str
    qos: int
    body: Any


def parse_json_object(raw: bytes) -> dict[str, Any]:
    try:
        document = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, INVALID_JSON, f"request body is not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise ApiError(400, INVALID_JSON, "request body must be a JSON object")
    return document


def check_uid(uid: Any, field: str = "uid") -> str:
    problem = _uid(uid)
    if problem is not None:
        raise invalid_field(field, problem)
    return uid


def _uids(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise invalid_field("uids", "must be a list of strings")
    if not value:
        raise invalid_field("uids", "must hold at least one uid")
    if len(value) > MAX_UIDS:
        raise invalid_field("uids", f"must hold at most {MAX_UIDS} uids, got {len(value)}")
    for i, uid in enumerate(value):
        check_uid(uid, f"uids[{i}]")
    return tuple(dict.fromkeys(value))


def _optional(document: dict[str, Any], name: str, check: Any, default: Any) -> Any:
    if name not in document:
        return default
    value = document[name]
    problem = check(value)
    if problem is not None:
        raise invalid_field(name, problem)
    return value


def parse_push(raw: bytes) -> PushRequest:
    """The body of POST /v1/push/users; unknown fields are refused so a typo is not ignored."""
    document = parse_json_object(raw)
    for name in document:
        if name not in PUSH_FIELDS:
            raise invalid_field(name[:64], f"is unknown; expected {', '.join(PUSH_FIELDS)}")
    if "uids" not in document:
        raise invalid_field("uids", "is required")
    if "body" not in document:
        raise invalid_field("body", "is required")
    return PushRequest(
        uids=_uids(document["uids"]),
        type=_optional(document, "type", _type, DEFAULT_TYPE),
        pri=_optional(document, "pri", _pri, DEFAULT_PRI),
        qos=_optional(document, "qos", _qos, DEFAULT_QOS),
        body=document["body"],
    )


def build_push(request: PushRequest, message_id: str, ts_ms: int) -> dict[str, Any]:
    """The server `push` map the rooms write to each connection."""
    return {
        "op": "push",
        "id": message_id,
        "type": request.type,
        "pri": request.pri,
        "qos": request.qos,
        "ts": ts_ms,
        "body": request.body,
    }


def check_frame_size(push: dict[str, Any], max_frame: int = DEFAULT_MAX_FRAME) -> None:
    """413 unless the push, encoded as any client may want it, fits one client frame."""
    for encoding in Encoding:
        try:
            size = len(encode(push, encoding))
        except (TypeError, ValueError):
            raise invalid_field("body", "is nested too deeply to encode") from None
        if size > max_frame:
            raise ApiError(
                413,
                TOO_LARGE,
                f"field 'body' is too large: the push encodes to {size} bytes in "
                f"{encoding.value}, over the client frame limit of {max_frame}",
            )

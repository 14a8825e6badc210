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
from im.messages_store import DEFAULT_TTL_S, MAX_TTL_S
from im.protocol.codec import Encoding, encode
from im.protocol.framing import DEFAULT_MAX_FRAME
from im.protocol.messages import MAX_PULL_KEY, PRIORITIES, integer, number, one_of, text

MAX_UIDS = 10_000
MAX_UID_LEN = 128
MAX_ROOM_LEN = 128
MAX_TYPE_LEN = 64
MAX_SPREAD_S = 3600
DEFAULT_TYPE = "chat"
DEFAULT_PRI = "normal"
DEFAULT_QOS = 0
MESSAGE_FIELDS = ("type", "pri", "qos", "body", "pull", "ttl")
PUSH_FIELDS = ("uids", *MESSAGE_FIELDS)
ROOM_FIELDS = (*MESSAGE_FIELDS, "from")
BROADCAST_FIELDS = (*MESSAGE_FIELDS, "spread_s")
#: A body-less push is a notify: the client fetches the body from the business by `pull`.
NO_BODY = object()

_uid = text(MAX_UID_LEN)
_room = text(MAX_ROOM_LEN)
_type = text(MAX_TYPE_LEN)
_pri = one_of(*PRIORITIES)
_qos = integer(0, 1)
_spread = number(0, MAX_SPREAD_S)
_pull = text(MAX_PULL_KEY)
_ttl = number(1, MAX_TTL_S)


@dataclass(frozen=True, slots=True)
class PushRequest:
    uids: tuple[str, ...]  # duplicates removed, first-seen order kept
    type: str
    pri: str
    qos: int
    body: Any  # NO_BODY for a notify that carries only `pull`
    pull: str | None
    ttl: float  # seconds the saver keeps a qos 1 message


@dataclass(frozen=True, slots=True)
class RoomPushRequest:
    type: str
    pri: str
    qos: int
    body: Any  # NO_BODY for a notify that carries only `pull`
    pull: str | None
    ttl: float  # seconds the saver keeps a qos 1 message
    sender: str | None  # "from": the audience member whose chat it is, for virtual sub-rooms


@dataclass(frozen=True, slots=True)
class BroadcastRequest:
    type: str
    pri: str
    qos: int
    body: Any  # NO_BODY for a notify that carries only `pull`
    pull: str | None
    ttl: float  # seconds the saver keeps a qos 1 message
    spread_s: float | None  # None: the product's default


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


def check_room(room: Any) -> str:
    problem = _room(room)
    if problem is not None:
        raise invalid_field("room", problem)
    return room


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


def _document(raw: bytes, fields: tuple[str, ...], required: tuple[str, ...]) -> dict[str, Any]:
    """The JSON object of a body; unknown fields are refused so a typo is not ignored."""
    document = parse_json_object(raw)
    for name in document:
        if name not in fields:
            raise invalid_field(name[:64], f"is unknown; expected {', '.join(fields)}")
    for name in required:
        if name not in document:
            raise invalid_field(name, "is required")
    return document


def _message(document: dict[str, Any]) -> dict[str, Any]:
    qos = _optional(document, "qos", _qos, DEFAULT_QOS)
    pull = _optional(document, "pull", _pull, None)
    if "body" not in document and pull is None:
        raise invalid_field("body", "is required (or 'pull', the key the client fetches)")
    if "ttl" in document and qos != 1:
        raise invalid_field("ttl", "applies to qos 1 only: a qos 0 push is never stored")
    return {
        "type": _optional(document, "type", _type, DEFAULT_TYPE),
        "pri": _optional(document, "pri", _pri, DEFAULT_PRI),
        "qos": qos,
        "body": document.get("body", NO_BODY),
        "pull": pull,
        "ttl": float(_optional(document, "ttl", _ttl, DEFAULT_TTL_S)),
    }


def parse_push(raw: bytes) -> PushRequest:
    """The body of POST /v1/push/users."""
    document = _document(raw, PUSH_FIELDS, ("uids",))
    return PushRequest(uids=_uids(document["uids"]), **_message(document))


def parse_room_push(raw: bytes) -> RoomPushRequest:
    """The body of POST /v1/push/rooms/{room}."""
    document = _document(raw, ROOM_FIELDS, ())
    sender = check_uid(document["from"], "from") if "from" in document else None
    return RoomPushRequest(sender=sender, **_message(document))


def parse_broadcast(raw: bytes) -> BroadcastRequest:
    """The body of POST /v1/push/broadcast."""
    document = _document(raw, BROADCAST_FIELDS, ())
    spread = _optional(document, "spread_s", _spread, None)
    return BroadcastRequest(
        spread_s=None if spread is None else float(spread), **_message(document)
    )


def build_push(
    request: PushRequest | RoomPushRequest | BroadcastRequest, message_id: str, ts_ms: int
) -> dict[str, Any]:
    """The server `push` map the rooms write to each connection (room jobs add "room")."""
    push = {
        "op": "push",
        "id": message_id,
        "type": request.type,
        "pri": request.pri,
        "qos": request.qos,
        "ts": ts_ms,
    }
    if request.body is not NO_BODY:
        push["body"] = request.body
    if request.pull is not None:
        push["pull"] = request.pull
    return push


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

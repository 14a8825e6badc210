"""The message model: which ops each side may send and what their fields must be.

Every message is a map with a string `op`. Unknown extra fields are ignored so that
either side can add fields without breaking older peers; missing or mistyped known
fields are refused with BAD_FIELD, unknown ops with UNKNOWN_OP.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from im.protocol.errors import ErrorCode, ProtocolError

PRIORITIES = ("high", "normal", "low")
PRIORITY_INDEX = {name: i for i, name in enumerate(PRIORITIES)}
MAX_ACK_IDS = 1000
MAX_BATCH = 1000  # pushes in one batch frame
MAX_ROOM = 128  # characters of a room name

Check = Callable[[Any], str | None]


def text(max_len: int, *, allow_empty: bool = False) -> Check:
    def check(value: Any) -> str | None:
        if not isinstance(value, str):
            return "must be a string"
        if not value and not allow_empty:
            return "must not be empty"
        if len(value) > max_len:
            return f"must be at most {max_len} characters"
        return None

    return check


def integer(lo: int, hi: int) -> Check:
    def check(value: Any) -> str | None:
        if not isinstance(value, int) or isinstance(value, bool):
            return "must be an integer"
        if not lo <= value <= hi:
            return f"must be between {lo} and {hi}"
        return None

    return check


def number(lo: float, hi: float) -> Check:
    def check(value: Any) -> str | None:
        if not isinstance(value, int | float) or isinstance(value, bool):
            return "must be a number"
        if not lo <= value <= hi:
            return f"must be between {lo} and {hi}"
        return None

    return check


def one_of(*choices: Any) -> Check:
    def check(value: Any) -> str | None:
        if value not in choices or isinstance(value, bool):
            return f"must be one of {', '.join(map(str, choices))}"
        return None

    return check


def id_list(max_items: int, max_len: int) -> Check:
    item = text(max_len)

    def check(value: Any) -> str | None:
        if not isinstance(value, list):
            return "must be a list of strings"
        if len(value) > max_items:
            return f"must hold at most {max_items} ids"
        for entry in value:
            if item(entry) is not None:
                return f"must hold non-empty strings of at most {max_len} characters"
        return None

    return check


def anything(value: Any) -> str | None:
    return None


#: Longest key of a push-pull notify (`pull`): the client asks the business for the body.
MAX_PULL_KEY = 256

#: op -> {field: (check, required)}
Schema = Mapping[str, Mapping[str, tuple[Check, bool]]]

PUSH: Mapping[str, tuple[Check, bool]] = {
    "id": (text(64), True),
    "type": (text(64), True),
    "pri": (one_of(*PRIORITIES), True),
    "qos": (one_of(0, 1), True),
    "ts": (integer(0, 2**53), True),
    "body": (anything, False),
    "room": (text(MAX_ROOM), False),  # set on pushes to a chat room
    "pull": (text(MAX_PULL_KEY), False),  # push-pull notify: the client fetches the body
    "product": (text(64), False),  # set when the connection carries several products (bind)
}


def push_list(max_items: int) -> Check:
    """A batch's pushes: each one a complete `push` map, checked like a lone push."""
    only_push: Schema = {"push": PUSH}

    def check(value: Any) -> str | None:
        if not isinstance(value, list):
            return "must be a list of push maps"
        if not 0 < len(value) <= max_items:
            return f"must hold 1 to {max_items} pushes"
        for index, entry in enumerate(value):
            if not isinstance(entry, dict) or entry.get("op") != "push":
                return f"item {index} must be a map with op 'push'"
            try:
                validate(entry, only_push)
            except ProtocolError as exc:
                return f"item {index}: {exc.reason}"
        return None

    return check


CLIENT_OPS: Schema = {
    "auth": {
        "product": (text(64), True),
        "uid": (text(128), True),
        "device": (text(128, allow_empty=True), False),
        "token": (text(4096), True),
        "hb": (number(1, 3600), False),  # the heartbeat the client asks for; clamped
    },
    "ping": {},
    "ack": {"ids": (id_list(MAX_ACK_IDS, 64), True)},
    "join": {"room": (text(MAX_ROOM), True)},
    "leave": {"room": (text(MAX_ROOM), True)},
    # One more product on this connection, with its own token (and uid, this one's default).
    "bind": {
        "product": (text(64), True),
        "token": (text(4096), True),
        "uid": (text(128), False),
    },
    "unbind": {"product": (text(64), True)},
    "up": {
        "seq": (integer(0, 2**53 - 1), True),  # echoed in up_ack or the error, for the client
        "type": (text(64), True),
        "body": (anything, True),  # bounded by the frame limit
    },
}

SERVER_OPS: Schema = {
    "auth_ok": {"conn": (text(64), True), "hb": (number(1, 3600), True)},
    "pong": {},
    "push": PUSH,
    "batch": {"msgs": (push_list(MAX_BATCH), True)},
    "joined": {"room": (text(MAX_ROOM), True), "members": (integer(0, 2**53), True)},
    "left": {"room": (text(MAX_ROOM), True)},
    "bound": {"product": (text(64), True)},
    "unbound": {"product": (text(64), True), "reason": (text(200), False)},
    "up_ack": {"seq": (integer(0, 2**53 - 1), True)},
    # The instance is going away: close, wait after_ms, connect elsewhere (the dispatcher).
    "reconnect": {
        "after_ms": (integer(0, 3_600_000), True),
        "reason": (text(64), True),
    },
    "error": {
        "code": (integer(1000, 4999), True),
        "reason": (text(1024, allow_empty=True), True),
        "seq": (integer(0, 2**53 - 1), False),  # the refused `up` frame's seq
    },
}


def validate(message: dict[str, Any], schema: Schema) -> str:
    """Check a decoded map against a schema and return its op."""
    op = message.get("op")
    if not isinstance(op, str):
        raise ProtocolError(ErrorCode.MALFORMED, "message must have a string 'op'")
    fields = schema.get(op)
    if fields is None:
        raise ProtocolError(ErrorCode.UNKNOWN_OP, f"unknown op {op[:64]!r}")
    for name, (check, required) in fields.items():
        if name not in message:
            if required:
                raise ProtocolError(ErrorCode.BAD_FIELD, f"{op}: missing field {name!r}")
            continue
        problem = check(message[name])
        if problem is not None:
            raise ProtocolError(ErrorCode.BAD_FIELD, f"{op}: field {name!r} {problem}")
    return op


def validate_client(message: dict[str, Any]) -> str:
    return validate(message, CLIENT_OPS)


def validate_server(message: dict[str, Any]) -> str:
    return validate(message, SERVER_OPS)

"""Jobs on the bus: what center's API publishes and the fan-out workers consume.

A job is a msgpack map `{"job": "users"|"room"|"broadcast", "product", "msg", ...}`; `msg`
is the server `push` map the clients receive (with `"room"` for room pushes). Keys keep
order where it matters: one user's jobs (keyed by the uid when there is one), one room's
jobs, one product's broadcasts each land on one partition. Pure code: no bus, no sockets.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

from center.validation import MAX_ROOM_LEN, MAX_SPREAD_S, MAX_UID_LEN, MAX_UIDS
from im.protocol.errors import ProtocolError
from im.protocol.messages import number, text, validate_server

PUSH_TOPIC = "im.push"
PUSH_PARTITIONS = 8
PIN_TOPIC_PREFIX = "im.pin."
#: One partition: a pinned room's pushes go through its one worker in order.
PIN_PARTITIONS = 1
USERS, ROOM, BROADCAST = "users", "room", "broadcast"
KINDS = (USERS, ROOM, BROADCAST)
#: Worker names end up in topic names, so they keep to the characters Kafka allows.
WORKER_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")

_product = text(64)
_uid = text(MAX_UID_LEN)
_room = text(MAX_ROOM_LEN)
_spread = number(0, MAX_SPREAD_S)


class JobError(ValueError):
    """A record whose value is not a job; it can never be completed, so it is skipped."""


@dataclass(frozen=True, slots=True)
class Job:
    kind: str
    product: str
    msg: dict[str, Any]
    uids: tuple[str, ...] = ()
    room: str = ""
    sender: str | None = None  # "from": the uid whose chat this is, for virtual sub-rooms
    spread_s: float = 0.0

    @property
    def id(self) -> str:
        return self.msg["id"]


def users_job(product: str, uids: Sequence[str], msg: dict[str, Any]) -> Job:
    return Job(USERS, product, msg, uids=tuple(uids))


def room_job(product: str, room: str, msg: dict[str, Any], sender: str | None = None) -> Job:
    return Job(ROOM, product, {**msg, "room": room}, room=room, sender=sender)


def broadcast_job(product: str, msg: dict[str, Any], spread_s: float) -> Job:
    return Job(BROADCAST, product, msg, spread_s=float(spread_s))


def encode_job(job: Job) -> bytes:
    value: dict[str, Any] = {"job": job.kind, "product": job.product, "msg": job.msg}
    if job.kind == USERS:
        value["uids"] = list(job.uids)
    elif job.kind == ROOM:
        value["room"] = job.room
        if job.sender is not None:
            value["from"] = job.sender
    else:
        value["spread_s"] = job.spread_s
    return msgpack.packb(value)


def _field(value: Mapping[str, Any], name: str, check: Any) -> Any:
    if name not in value:
        raise JobError(f"job has no {name!r}")
    problem = check(value[name])
    if problem is not None:
        raise JobError(f"job field {name!r} {problem}")
    return value[name]


def _uids(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not 0 < len(value) <= MAX_UIDS:
        raise JobError(f"job field 'uids' must be a list of 1 to {MAX_UIDS} uids")
    for uid in value:
        if _uid(uid) is not None:
            raise JobError(f"job field 'uids' must hold strings of 1 to {MAX_UID_LEN} characters")
    return tuple(value)


def _push(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise JobError("job field 'msg' must be a map")
    try:
        op = validate_server(value)
    except ProtocolError as exc:
        raise JobError(f"job field 'msg': {exc.reason}") from None
    if op != "push":
        raise JobError(f"job field 'msg' must be a push, not {op!r}")
    return value


def decode_job(raw: bytes) -> Job:
    """The job in a record's value; JobError says what is wrong with it."""
    try:
        value = msgpack.unpackb(raw)
    except (ValueError, msgpack.UnpackException) as exc:
        raise JobError(f"record is not msgpack: {exc}") from None
    if not isinstance(value, dict):
        raise JobError("record is not a msgpack map")
    kind = value.get("job")
    if kind not in KINDS:
        raise JobError(f"job kind must be one of {', '.join(KINDS)}, got {kind!r:.64}")
    product = _field(value, "product", _product)
    msg = _push(value.get("msg"))
    if kind == USERS:
        return Job(USERS, product, msg, uids=_uids(value.get("uids")))
    if kind == ROOM:
        room = _field(value, "room", _room)
        sender = _field(value, "from", _uid) if "from" in value else None
        return Job(ROOM, product, msg, room=room, sender=sender)
    return Job(BROADCAST, product, msg, spread_s=float(_field(value, "spread_s", _spread)))


def job_key(job: Job) -> str:
    """One user's, one room's, one product's broadcast jobs share a key, so a partition."""
    if job.kind == USERS:
        return job.uids[0] if len(job.uids) == 1 else job.id
    if job.kind == ROOM:
        return job.room
    return job.product


def is_worker_name(name: str) -> bool:
    return WORKER_NAME.fullmatch(name) is not None


def pin_topic(worker: str) -> str:
    """The topic only the worker named `worker` consumes."""
    if not is_worker_name(worker):
        raise ValueError(f"worker name must be 1 to 64 of A-Z a-z 0-9 _ -, got {worker!r:.80}")
    return PIN_TOPIC_PREFIX + worker


def job_topic(job: Job, room_pin: Mapping[str, str]) -> str:
    """`im.pin.<worker>` for a room the switches pin to a worker, else the shared topic.

    A pin naming a worker that cannot be a topic name is ignored rather than failing pushes.
    """
    if job.kind == ROOM:
        worker = room_pin.get(job.room)
        if worker is not None and is_worker_name(worker):
            return PIN_TOPIC_PREFIX + worker
    return PUSH_TOPIC


def shard_of(sender: str | None, members_total: int, shard_size: int) -> list[int] | None:
    """[i, n]: the virtual sub-room of the audience member `sender` among n of at most
    `shard_size` members each; None (every member) without a sender or without shards."""
    if sender is None or shard_size <= 0:
        return None
    n = max(1, -(-members_total // shard_size))
    return [zlib.crc32(sender.encode()) % n, n]

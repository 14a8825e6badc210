"""The saver's data model and the interface every message store implements.

At-least-once (QoS 1) pushes are stored here before center answers, loaded by the room when
their user logs in, and removed when the client ACKs. The saver service holds one engine
(memory or Redis) and serves this same interface over RPC (`im.saver_client.SaverClient`),
so callers never know which. docs/SAVER.md describes the rules and the Redis layout.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple, Protocol

import msgpack

from im.ids import ALPHABET, LENGTH, id_time_ms

DEFAULT_TTL_S = 7 * 86400.0
MAX_TTL_S = 30 * 86400.0
IDEMPOTENCY_TTL_S = 86400.0
#: Messages one pending() call may return; the room pages with `after` for more.
MAX_PENDING_LIMIT = 1000
#: Recipients one store() call may name; center splits bigger multicasts.
MAX_UIDS_PER_CALL = 10_000
MAX_IDEMPOTENCY_KEY = 256
MAX_IDEMPOTENCY_ANSWER = 64 * 1024

# Delivery states of one (message, recipient).
STORED = "stored"
WRITTEN = "written"
ACKED = "acked"
EXPIRED = "expired"
DEAD_LETTERED = "dead_lettered"
EVICTED = "evicted"  # dropped unread to keep the inbox under its cap
STATES = (STORED, WRITTEN, ACKED, EXPIRED, DEAD_LETTERED, EVICTED)

#: (product, uid, message ids): one row of `MessageStore.ack_many`.
AckRow = tuple[str, str, Sequence[str]]

_ID_SHIFT = 52  # bits below the millisecond timestamp in a message id (im.ids)


class StoreResult(NamedTuple):
    """Inbox entries added by one store call, and older entries it pushed out."""

    stored: int
    evicted: int


class Delivery(NamedTuple):
    """Where one unicast message stands with each recipient.

    `states` covers at most the store's state cap (10,000 by default) recipients, the
    first ones stored; `recipients` counts them all."""

    recipients: int
    states: dict[str, str]

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(STATES, 0)
        for state in self.states.values():
            counts[state] += 1
        return counts


class DeadLetter(NamedTuple):
    """A message taken out of a user's delivery after too many attempts without an ACK."""

    uid: str
    msg: dict
    at_ms: int


class MessageStore(Protocol):
    """Per-user inboxes of unicast messages, per-product broadcasts stored once, delivery
    states and idempotency keys. Every method raises ValueError on bad input, before it
    changes anything."""

    async def store(
        self, product: str, uids: Sequence[str], msg: dict, ttl_s: float = DEFAULT_TTL_S
    ) -> StoreResult:
        """Add `msg` (a push map with an "id") to each user's inbox for `ttl_s` seconds.
        Storing an id a user already has (a retried call) adds nothing; a user whose inbox
        passes the cap loses its oldest entries, counted in `evicted`."""

    async def store_broadcast(
        self, product: str, msg: dict, ttl_s: float = DEFAULT_TTL_S
    ) -> StoreResult:
        """Keep `msg` once for the whole product, so every user who asks for pending
        messages before it expires gets it; the oldest broadcast past the cap is evicted."""

    async def pending(
        self, product: str, uid: str, limit: int = MAX_PENDING_LIMIT, after: str = ""
    ) -> list[dict]:
        """The user's unacked, unexpired messages with ids above `after`, unicast and
        broadcast merged in id order, at most `limit` of them and about the store's byte
        budget. Each one returned counts a delivery attempt; one that has used up its
        attempts is dead-lettered instead. Page with `after` set to the last id returned."""

    async def ack(self, product: str, uid: str, ids: Sequence[str]) -> int:
        """Remove the user's messages with these ids (unicast) or mark them done
        (broadcast); returns how many changed. Unknown and malformed ids are ignored."""

    async def ack_many(self, rows: Sequence[AckRow]) -> int:
        """`ack` for many users at once: the room flushes its ACKs in one call."""

    async def mark_written(self, product: str, rows: Sequence[tuple[str, str]]) -> None:
        """Record that each (uid, message id) was written to one of the user's connections."""

    async def delivery(self, product: str, msg_id: str) -> Delivery | None:
        """Per-recipient state of a unicast message, kept until a while after it expires;
        None for an unknown id (or a broadcast, which has no per-user copy)."""

    async def dead_letters(self, product: str, limit: int = 100) -> list[DeadLetter]:
        """The product's most recent dead letters, newest first."""

    async def remember_idempotency(
        self, product: str, key: str, answer: dict, ttl_s: float = IDEMPOTENCY_TTL_S
    ) -> dict | None:
        """Keep `answer` under `key` unless the key is already held: then return the
        answer kept first (and keep nothing). None means this call's answer now stands."""

    async def recall_idempotency(self, product: str, key: str) -> dict | None:
        """The answer held under `key`, or None when the key is unknown or expired."""

    async def ping(self) -> None:
        """Raise if the engine cannot serve (its Redis is down, say)."""

    async def close(self) -> None:
        """Release connections; the store is unusable afterwards."""


# Input checks shared by every engine, so all refuse the same things.


def check_name(value: Any, what: str, max_len: int = 128) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= max_len:
        raise ValueError(f"{what} must be a string of 1-{max_len} characters, got {value!r:.80}")
    return value


def check_product(product: Any) -> str:
    return check_name(product, "product", 64)


def check_uids(uids: Any) -> list[str]:
    """Distinct uids in first-seen order."""
    if isinstance(uids, str | bytes) or not isinstance(uids, Sequence):
        raise ValueError("uids must be a list of strings")
    if len(uids) > MAX_UIDS_PER_CALL:
        raise ValueError(f"at most {MAX_UIDS_PER_CALL} uids per call, got {len(uids)}")
    return list(dict.fromkeys(check_name(uid, "uid") for uid in uids))


def check_id(value: Any, what: str = "id") -> str:
    try:
        id_time_ms(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a message id, got {value!r:.80}") from None
    return value


def is_id(value: Any) -> bool:
    try:
        check_id(value)
    except ValueError:
        return False
    return True


def check_ttl(ttl_s: Any) -> int:
    """The ttl in whole milliseconds (at least 1)."""
    if isinstance(ttl_s, bool) or not isinstance(ttl_s, int | float):
        raise ValueError(f"ttl must be a number of seconds, got {ttl_s!r:.80}")
    if not 0 < ttl_s <= MAX_TTL_S:
        raise ValueError(f"ttl must be more than 0 and at most {MAX_TTL_S:g} s, got {ttl_s!r}")
    return max(1, round(ttl_s * 1000))


def check_count(value: Any, what: str, maximum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= maximum:
        raise ValueError(f"{what} must be an integer from 1 to {maximum}, got {value!r:.80}")
    return value


def check_after(after: Any) -> str:
    return "" if after == "" else check_id(after, "after")


def pack(value: Any, what: str, max_bytes: int) -> bytes:
    """msgpack bytes of `value`, or ValueError if it cannot be encoded or is too big."""
    try:
        packed = msgpack.packb(value, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ValueError(f"{what} cannot be encoded: {exc}") from None
    if len(packed) > max_bytes:
        raise ValueError(f"{what} is {len(packed)} bytes encoded, over the limit of {max_bytes}")
    return packed


def unpack(packed: bytes) -> Any:
    return msgpack.unpackb(packed, raw=False, strict_map_key=False)


def check_message(msg: Any, max_bytes: int) -> tuple[str, bytes]:
    """The message's id and its encoded form."""
    if not isinstance(msg, dict):
        raise ValueError(f"msg must be a map (a push), got {type(msg).__name__}")
    return check_id(msg.get("id")), pack(msg, "msg", max_bytes)


def check_answer(answer: Any) -> bytes:
    if not isinstance(answer, dict):
        raise ValueError(f"answer must be a map, got {type(answer).__name__}")
    return pack(answer, "answer", MAX_IDEMPOTENCY_ANSWER)


def check_ack_rows(rows: Any) -> dict[tuple[str, str], list[str]]:
    """Well-formed ids to ack per (product, uid); ids that are not message ids are dropped,
    since no message can have them, but a row of the wrong shape refuses the whole batch."""
    acks: dict[tuple[str, str], list[str]] = {}
    for row in _rows(rows, "ack rows"):
        try:
            product, uid, ids = row
        except (TypeError, ValueError):
            raise ValueError(f"ack rows are (product, uid, ids), got {row!r:.80}") from None
        user = (check_product(product), check_name(uid, "uid"))
        if isinstance(ids, str | bytes) or not isinstance(ids, Sequence):
            raise ValueError(f"ids must be a list of strings, got {ids!r:.80}")
        acks.setdefault(user, []).extend(i for i in ids if is_id(i))
    return {user: list(dict.fromkeys(ids)) for user, ids in acks.items() if ids}


def check_written(rows: Any) -> dict[str, list[str]]:
    """Recipients per message id of a mark_written call."""
    written: dict[str, list[str]] = {}
    for row in _rows(rows, "written rows"):
        try:
            uid, msg_id = row
        except (TypeError, ValueError):
            raise ValueError(f"written rows are (uid, id), got {row!r:.80}") from None
        check_name(uid, "uid")
        if is_id(msg_id):
            written.setdefault(msg_id, []).append(uid)
    return written


def _rows(rows: Any, what: str) -> Iterable[Any]:
    if isinstance(rows, str | bytes) or not isinstance(rows, Sequence):
        raise ValueError(f"{what} must be a list")
    return rows


def id_floor(ms: int) -> str:
    """The smallest message id minted at `ms` (ms since the epoch): every id made at that
    millisecond or later sorts at or above it."""
    value = max(0, ms) << _ID_SHIFT
    digits = []
    for _ in range(LENGTH):
        digits.append(ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(digits))

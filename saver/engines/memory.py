"""The embedded engine: inboxes, broadcasts and delivery states in process memory, expiries on
the monotonic clock. Messages are kept msgpack-encoded, as Redis keeps them, so what a caller
gets back never shares objects with what it stored."""

from __future__ import annotations

import bisect
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Generic, NamedTuple, TypeVar

from im.messages_store import (
    ACKED,
    DEAD_LETTERED,
    DEFAULT_TTL_S,
    EVICTED,
    EXPIRED,
    IDEMPOTENCY_TTL_S,
    MAX_PENDING_LIMIT,
    STORED,
    WRITTEN,
    AckRow,
    DeadLetter,
    Delivery,
    StoreResult,
    check_ack_rows,
    check_after,
    check_answer,
    check_count,
    check_id,
    check_message,
    check_name,
    check_product,
    check_ttl,
    check_uids,
    check_written,
    id_floor,
    unpack,
)
from saver import engines
from saver.engines import BROADCAST, MAX_DEAD_LETTERS_READ, OLDEST_SWEPT, UNICAST, SaverLimits

# Keys examined by the amortised sweeps per row written, and at least per call: each write
# pays for sweeping more keys than it can add, so expired ones never pile up.
_SWEEP_PER_ROW = 2
_SWEEP_MIN = 64
_OPEN = (STORED, WRITTEN)
_DONE = (ACKED, DEAD_LETTERED)

_User = tuple[str, str]
_K = TypeVar("_K")
_V = TypeVar("_V")


class _Message:
    """One unicast message: its body while any tracked recipient may still need it, and
    the delivery state of up to `state_cap` recipients until `drop_at`."""

    __slots__ = ("body", "expiry", "drop_at", "recipients", "open", "untracked", "states")

    def __init__(self, body: bytes, expiry: float) -> None:
        self.body: bytes | None = body
        self.expiry = expiry
        self.drop_at = expiry
        self.recipients = 0
        self.open = 0  # tracked recipients still stored or written
        self.untracked = 0  # recipients past the state cap: the body stays until expiry
        self.states: dict[str, str] = {}


class _Entry:
    __slots__ = ("expiry", "attempts", "size")

    def __init__(self, expiry: float, size: int) -> None:
        self.expiry = expiry
        self.attempts = 0
        self.size = size


class _Inbox:
    __slots__ = ("ids", "entries")

    def __init__(self) -> None:
        self.ids: list[str] = []  # sorted: id order is time order
        self.entries: dict[str, _Entry] = {}


class _Marks:
    """A user's broadcast progress: every live broadcast up to `mark` is done, and newer
    ones have their attempt count or ACKED / DEAD_LETTERED in `states`."""

    __slots__ = ("mark", "states", "expiry")

    def __init__(self) -> None:
        self.mark = ""
        self.states: dict[str, int | str] = {}
        self.expiry = 0.0


class _Broadcast(NamedTuple):
    expiry: float
    body: bytes


class _Sweep(Generic[_K, _V]):
    """Examines a few keys of a table per call, walking a snapshot of its keys so the
    table may change in between; `drop` removes what has expired under one key."""

    __slots__ = ("_table", "_drop", "_pending")

    def __init__(self, table: dict[_K, _V], drop: Callable[[_K, _V, float], None]) -> None:
        self._table = table
        self._drop = drop
        self._pending: list[_K] = []

    def run(self, budget: int, now: float) -> None:
        if not self._pending:
            self._pending.extend(self._table)
        while budget and self._pending:
            key = self._pending.pop()
            budget -= 1
            value = self._table.get(key)
            if value is not None:
                self._drop(key, value, now)


class MemoryStore:
    """`MessageStore` in memory, for one process (the embedded deployment and tests)."""

    def __init__(self, limits: SaverLimits | None = None) -> None:
        self.limits = limits or SaverLimits()
        self._inboxes: dict[_User, _Inbox] = {}
        self._messages: dict[tuple[str, str], _Message] = {}
        self._broadcasts: dict[str, dict[str, _Broadcast]] = {}
        self._marks: dict[_User, _Marks] = {}
        self._dead: dict[str, deque[tuple[str, bytes, int]]] = {}
        self._idempotency: dict[tuple[str, str], tuple[bytes, float]] = {}
        self._entries = 0
        self._sweeps: list[Any] = [
            _Sweep(self._inboxes, self._drop_expired_entries),
            _Sweep(self._messages, self._drop_old_message),
            _Sweep(self._marks, _drop_if_expired(self._marks, lambda m: m.expiry)),
            _Sweep(self._idempotency, _drop_if_expired(self._idempotency, lambda e: e[1])),
        ]

    def __len__(self) -> int:
        """Inbox entries held, including expired ones not swept yet (bounds memory)."""
        return self._entries

    async def store(
        self, product: str, uids: Sequence[str], msg: dict, ttl_s: float = DEFAULT_TTL_S
    ) -> StoreResult:
        product = check_product(product)
        uids = check_uids(uids)
        msg_id, body = check_message(msg, self.limits.max_message_bytes)
        expiry_ms = check_ttl(ttl_s)
        now = time.monotonic()
        self._sweep(len(uids), now)
        if not uids:
            return StoreResult(0, 0)
        expiry = now + expiry_ms / 1000
        message = self._messages.get((product, msg_id))
        if message is None:
            message = self._messages[(product, msg_id)] = _Message(body, expiry)
        message.body = body
        message.expiry = max(message.expiry, expiry)
        stored = evicted = 0
        grace = self.limits.state_grace_s
        for uid in uids:
            state = message.states.get(uid)
            if state is None:
                message.recipients += 1
                if len(message.states) < self.limits.state_cap:
                    message.states[uid] = STORED
                    message.open += 1
                else:
                    message.untracked += 1
            elif state not in _OPEN:
                continue  # acked, dead-lettered or evicted: a retried store changes nothing
            stored += self._add((product, uid), msg_id, expiry, len(body), now)
            for old in self._evict((product, uid)):
                self._release(product, old, uid, EVICTED, now)
                evicted += 1
        if message.open <= 0 and not message.untracked:
            message.body = None
        else:
            message.drop_at = max(message.drop_at, expiry + grace)
        engines.STORED.labels(UNICAST).inc(stored)
        engines.EVICTED.labels(UNICAST).inc(evicted)
        return StoreResult(stored, evicted)

    async def store_broadcast(
        self, product: str, msg: dict, ttl_s: float = DEFAULT_TTL_S
    ) -> StoreResult:
        product = check_product(product)
        msg_id, body = check_message(msg, self.limits.max_message_bytes)
        expiry_ms = check_ttl(ttl_s)
        now = time.monotonic()
        self._live(product, now)
        casts = self._broadcasts.setdefault(product, {})
        if msg_id in casts:
            return StoreResult(0, 0)
        casts[msg_id] = _Broadcast(now + expiry_ms / 1000, body)
        excess = sorted(casts)[: len(casts) - self.limits.broadcast_cap]
        for old in excess:
            del casts[old]
        engines.STORED.labels(BROADCAST).inc()
        engines.EVICTED.labels(BROADCAST).inc(len(excess))
        return StoreResult(1, len(excess))

    async def pending(
        self, product: str, uid: str, limit: int = MAX_PENDING_LIMIT, after: str = ""
    ) -> list[dict]:
        user = (check_product(product), check_name(uid, "uid"))
        limit = check_count(limit, "limit", MAX_PENDING_LIMIT)
        after = check_after(after)
        now = time.monotonic()
        live = self._live(product, now)
        marks = self._user_marks(user, now)
        casts = [
            (bid, cast)
            for bid, cast in live
            if bid > marks.mark and bid > after and marks.states.get(bid) not in _DONE
        ]
        inbox = self._inboxes.get(user) or _Inbox()
        ids = inbox.ids
        ui = bisect.bisect_right(ids, after) if after else 0
        ci = 0
        out: list[bytes] = []
        dead: list[tuple[str, bytes]] = []
        drop: set[str] = set()
        size_left = self.limits.max_pending_bytes
        max_attempts = self.limits.max_attempts
        delivered = {UNICAST: 0, BROADCAST: 0}
        while len(out) < limit:
            if ci < len(casts) and (ui >= len(ids) or casts[ci][0] < ids[ui]):
                bid, cast = casts[ci]
                ci += 1
                attempts = int(marks.states.get(bid, 0))  # never done: filtered above
                if attempts >= max_attempts:
                    marks.states[bid] = DEAD_LETTERED
                    dead.append((BROADCAST, cast.body))
                    continue
                if out and len(cast.body) > size_left:
                    break
                marks.states[bid] = attempts + 1
                size_left -= len(cast.body)
                out.append(cast.body)
                delivered[BROADCAST] += 1
            elif ui < len(ids):
                msg_id = ids[ui]
                ui += 1
                entry = inbox.entries[msg_id]
                message = self._messages.get((product, msg_id))
                if entry.expiry <= now or message is None or message.body is None:
                    drop.add(msg_id)  # expired, or a leftover whose body is gone
                    if entry.expiry <= now:
                        engines.EXPIRED.inc()
                elif entry.attempts >= max_attempts:
                    drop.add(msg_id)
                    dead.append((UNICAST, message.body))
                    self._release(product, msg_id, uid, DEAD_LETTERED, now)
                elif out and entry.size > size_left:
                    break
                else:
                    entry.attempts += 1
                    size_left -= entry.size
                    out.append(message.body)
                    delivered[UNICAST] += 1
            else:
                break
        self._remove(user, drop)
        self._compact(user, marks, live, now)
        if dead:
            letters = self._dead.setdefault(product, deque(maxlen=self.limits.dead_letter_cap))
            at_ms = time.time_ns() // 1_000_000
            for kind, body in dead:
                letters.appendleft((uid, body, at_ms))
                engines.DEAD_LETTERS.labels(kind).inc()
        for kind, count in delivered.items():
            engines.DELIVERED.labels(kind).inc(count)
        return [unpack(body) for body in out]

    async def ack(self, product: str, uid: str, ids: Sequence[str]) -> int:
        return await self.ack_many([(product, uid, ids)])

    async def ack_many(self, rows: Sequence[AckRow]) -> int:
        acks = check_ack_rows(rows)
        now = time.monotonic()
        self._sweep(len(acks), now)
        unicast = broadcast = 0
        for user, ids in acks.items():
            product, uid = user
            inbox = self._inboxes.get(user)
            removed = {i for i in ids if inbox is not None and i in inbox.entries}
            self._remove(user, removed)
            for msg_id in removed:
                self._release(product, msg_id, uid, ACKED, now)
            unicast += len(removed)
            missing = [i for i in ids if i not in removed]
            if not missing or not self._broadcasts.get(product):
                continue
            live = self._live(product, now)
            live_ids = {bid for bid, _ in live}
            marks = self._user_marks(user, now)
            for bid in missing:
                if bid in live_ids and bid > marks.mark and marks.states.get(bid) != ACKED:
                    marks.states[bid] = ACKED
                    broadcast += 1
            self._compact(user, marks, live, now)
        engines.ACKED.labels(UNICAST).inc(unicast)
        engines.ACKED.labels(BROADCAST).inc(broadcast)
        return unicast + broadcast

    async def mark_written(self, product: str, rows: Sequence[tuple[str, str]]) -> None:
        product = check_product(product)
        for msg_id, uids in check_written(rows).items():
            message = self._messages.get((product, msg_id))
            if message is None:
                continue
            for uid in uids:
                if message.states.get(uid) == STORED:
                    message.states[uid] = WRITTEN

    async def delivery(self, product: str, msg_id: str) -> Delivery | None:
        key = (check_product(product), check_id(msg_id))
        message = self._messages.get(key)
        now = time.monotonic()
        if message is None:
            return None
        if message.drop_at <= now:
            del self._messages[key]
            return None
        ended = message.expiry <= now
        return Delivery(
            message.recipients,
            {
                uid: EXPIRED if ended and state in _OPEN else state
                for uid, state in message.states.items()
            },
        )

    async def dead_letters(self, product: str, limit: int = 100) -> list[DeadLetter]:
        product = check_product(product)
        limit = check_count(limit, "limit", MAX_DEAD_LETTERS_READ)
        letters = self._dead.get(product, ())
        return [DeadLetter(uid, unpack(body), at_ms) for uid, body, at_ms in list(letters)[:limit]]

    async def remember_idempotency(
        self, product: str, key: str, answer: dict, ttl_s: float = IDEMPOTENCY_TTL_S
    ) -> dict | None:
        slot = (check_product(product), check_name(key, "idempotency key", 256))
        packed = check_answer(answer)
        ttl_ms = check_ttl(ttl_s)
        now = time.monotonic()
        self._sweep(1, now)
        held = self._idempotency.get(slot)
        if held is not None and held[1] > now:
            engines.IDEMPOTENCY.labels("repeat").inc()
            return unpack(held[0])
        self._idempotency[slot] = (packed, now + ttl_ms / 1000)
        engines.IDEMPOTENCY.labels("first").inc()
        return None

    async def recall_idempotency(self, product: str, key: str) -> dict | None:
        slot = (check_product(product), check_name(key, "idempotency key", 256))
        held = self._idempotency.get(slot)
        if held is None or held[1] <= time.monotonic():
            return None
        return unpack(held[0])

    async def ping(self) -> None:
        """Always ready: nothing outside the process to reach."""

    async def close(self) -> None:
        for table in (
            self._inboxes,
            self._messages,
            self._broadcasts,
            self._marks,
            self._dead,
            self._idempotency,
        ):
            table.clear()
        self._entries = 0

    def _add(self, user: _User, msg_id: str, expiry: float, size: int, now: float) -> int:
        """Put the id in the user's inbox (1) unless it is there (0); the oldest entries
        are checked for expiry on the way, as the Redis engine does."""
        inbox = self._inboxes.get(user)
        if inbox is None:
            inbox = self._inboxes[user] = _Inbox()
        added = msg_id not in inbox.entries
        if added:
            bisect.insort(inbox.ids, msg_id)
            inbox.entries[msg_id] = _Entry(expiry, size)
            self._entries += 1
        expired = {i for i in inbox.ids[:OLDEST_SWEPT] if inbox.entries[i].expiry <= now}
        engines.EXPIRED.inc(len(expired))
        self._remove(user, expired)
        return int(added)

    def _evict(self, user: _User) -> list[str]:
        inbox = self._inboxes.get(user)
        if inbox is None or len(inbox.ids) <= self.limits.inbox_cap:
            return []
        gone = inbox.ids[: len(inbox.ids) - self.limits.inbox_cap]
        self._remove(user, set(gone))
        return gone

    def _remove(self, user: _User, ids: set[str]) -> None:
        inbox = self._inboxes.get(user)
        if inbox is None or not ids:
            return
        inbox.ids = [i for i in inbox.ids if i not in ids]
        for msg_id in ids:
            del inbox.entries[msg_id]
        self._entries -= len(ids)
        if not inbox.ids:
            del self._inboxes[user]

    def _release(self, product: str, msg_id: str, uid: str, state: str, now: float) -> None:
        """A recipient's entry left the inbox for good: record why. Once no tracked
        recipient waits for the message, the body goes and the states stay for the grace
        time at most, as in the Redis engine."""
        message = self._messages.get((product, msg_id))
        if message is None or message.states.get(uid) not in _OPEN:
            return
        message.states[uid] = state
        message.open -= 1
        if message.open <= 0 and not message.untracked:
            message.body = None
            message.drop_at = min(message.drop_at, now + self.limits.state_grace_s)

    def _live(self, product: str, now: float) -> list[tuple[str, _Broadcast]]:
        """The product's unexpired broadcasts in id order; expired ones are dropped."""
        casts = self._broadcasts.get(product)
        if not casts:
            return []
        for bid in [bid for bid, cast in casts.items() if cast.expiry <= now]:
            del casts[bid]
        if not casts:
            del self._broadcasts[product]
        return sorted(casts.items())

    def _user_marks(self, user: _User, now: float) -> _Marks:
        marks = self._marks.get(user)
        if marks is None or marks.expiry <= now:
            marks = self._marks[user] = _Marks()
        return marks

    def _compact(
        self, user: _User, marks: _Marks, live: list[tuple[str, _Broadcast]], now: float
    ) -> None:
        """Move the watermark over done broadcasts older than the settle time, forget what
        it passed and what has expired, and keep the marks as long as a broadcast lives."""
        settle = self.limits.broadcast_settle_s
        cutoff = id_floor(time.time_ns() // 1_000_000 - round(settle * 1000))
        for bid, _ in live:
            if bid <= marks.mark:
                continue
            if bid >= cutoff or marks.states.get(bid) not in _DONE:
                break
            marks.mark = bid
        live_ids = {bid for bid, _ in live}
        for bid in [
            b for b in marks.states if b <= marks.mark or (b < cutoff and b not in live_ids)
        ]:
            del marks.states[bid]
        latest = max((cast.expiry for _, cast in live), default=now)
        marks.expiry = now + max(latest - now, settle) + 1.0
        if not marks.mark and not marks.states:
            del self._marks[user]

    def _sweep(self, rows: int, now: float) -> None:
        budget = max(_SWEEP_MIN, _SWEEP_PER_ROW * rows)
        for sweep in self._sweeps:
            sweep.run(budget, now)

    def _drop_expired_entries(self, user: _User, inbox: _Inbox, now: float) -> None:
        expired = {i for i, entry in inbox.entries.items() if entry.expiry <= now}
        engines.EXPIRED.inc(len(expired))
        self._remove(user, expired)

    def _drop_old_message(self, key: tuple[str, str], message: _Message, now: float) -> None:
        if message.drop_at <= now:
            del self._messages[key]


def _drop_if_expired(
    table: dict[_K, _V], expiry: Callable[[_V], float]
) -> Callable[[_K, _V, float], None]:
    def drop(key: _K, value: _V, now: float) -> None:
        if expiry(value) <= now:
            del table[key]

    return drop

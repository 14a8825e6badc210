"""The room's side of upstream: clients' `up` frames and online/offline events, batched to
the coordinator, and each frame's answer (`up_ack` or an error with its seq) sent back.

Nothing waits here without bound: a connection over its rate is refused at once, a full
backlog is refused at once, and a coordinator that does not answer costs the waiting frames
an error, not a growing buffer. Events are retried a few times, then dropped and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from prometheus_client import Counter

from im.coordinator_client import BAD_ROW, BUSY, NO_WEBHOOK, OFFLINE, ONLINE, CoordinatorClient
from im.protocol.errors import ErrorCode
from im.rpc import RpcError
from im.rpc.wire import MAX_FRAME
from room.config import RoomConfig
from room.connection import CLOSED, Connection

log = logging.getLogger("im.room")

FLUSH_S = 0.01  # frames and events wait at most this long before they go in one call
MAX_PENDING = 2048  # up frames waiting for the coordinator, all connections together
MAX_EVENTS = 10_000  # online/offline events waiting; more are dropped
EVENT_ROWS = 1000  # events per call
EVENT_ATTEMPTS = 3
EVENT_RETRY_S = 0.2  # pause before the first event retry; doubles
CLOSE_GRACE_S = 1.0  # at stop, the most time left to send the last events
LOG_EVERY_S = 10.0

UP_FRAMES = Counter("im_room_up_frames_total", "Client up frames, by outcome", ["outcome"])
UP_EVENTS = Counter(
    "im_room_up_events_total", "Online/offline events for the coordinator, by outcome", ["outcome"]
)
_ACKED = UP_FRAMES.labels("acked")
_RATE_LIMITED = UP_FRAMES.labels("rate_limited")
_OFF = UP_FRAMES.labels("not_configured")
_UNAVAILABLE = UP_FRAMES.labels("unavailable")
_EVENTS_SENT = UP_EVENTS.labels("accepted")
_EVENTS_REFUSED = UP_EVENTS.labels("refused")
_EVENTS_DROPPED = UP_EVENTS.labels("dropped")

#: The coordinator's refusal reasons -> the error the client gets.
_REFUSALS = {
    BUSY: (ErrorCode.UPSTREAM_BUSY, "the upstream backlog is full, retry later"),
    NO_WEBHOOK: (ErrorCode.UNKNOWN_OP, "up: upstream is not configured for this product"),
    BAD_ROW: (ErrorCode.BAD_FIELD, "up: field 'body' cannot be forwarded as JSON"),
}
_UNREACHABLE = (ErrorCode.UPSTREAM_BUSY, "upstream unavailable, retry later")
_NOT_CONFIGURED = (ErrorCode.UNKNOWN_OP, "up: upstream is not configured")
_OVER_RATE = (ErrorCode.UPSTREAM_RATE, "up frames too fast for this connection")

Encode = Callable[[str, dict], bytes]


class TokenBucket:
    """`rate` tokens a second, holding at most `burst`; one token per up frame."""

    __slots__ = ("tokens", "stamp")

    def __init__(self, burst: float, now: float) -> None:
        self.tokens = burst
        self.stamp = now

    def take(self, rate: float, burst: float, now: float) -> bool:
        self.tokens = min(burst, self.tokens + (now - self.stamp) * rate)
        self.stamp = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


class Upstream:
    """Owned by the gateway: `up` for each valid up frame of an online connection, `online`
    when a connection is answered auth_ok, `offline` whenever one is forgotten; `close` at
    stop."""

    def __init__(self, config: RoomConfig, encode: Encode) -> None:
        self._encode = encode
        self._client = CoordinatorClient(config.coordinator) if config.coordinator else None
        self._rate = config.up_rate
        self._burst = max(1.0, 2 * config.up_rate)
        # Rows of one call stay well inside the RPC frame even if every body is max_frame.
        self._rows_per_call = max(1, min(1000, MAX_FRAME // (2 * config.max_frame)))
        # One per connection announced online: its rate and the mark that its offline is due.
        self._buckets: dict[Connection, TokenBucket] = {}
        self._ups: deque[tuple[Connection, int, list]] = deque()
        self._events: deque[list] = deque()
        self._loop = asyncio.get_running_loop()
        self._tick: asyncio.TimerHandle | None = None
        self._up_task: asyncio.Task[None] | None = None
        self._event_task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()  # cuts retry pauses short: one last try at stop
        self._logged_at: dict[str, float] = {}

    # -- called by the gateway ---------------------------------------------------------

    def up(self, conn: Connection, message: dict[str, Any]) -> None:
        seq = message["seq"]
        if self._client is None:
            _OFF.inc()
            self._answer(conn, seq, _NOT_CONFIGURED)
            return
        bucket = self._buckets.get(conn)
        if bucket is None:  # not announced by the gateway: announce it, so offline pairs up
            self.online(conn)
            bucket = self._buckets[conn]
        if not bucket.take(self._rate, self._burst, self._loop.time()):
            _RATE_LIMITED.inc()
            self._answer(conn, seq, _OVER_RATE)
            return
        if len(self._ups) >= MAX_PENDING:
            UP_FRAMES.labels(BUSY).inc()
            self._warn("pending", "upstream: %d up frames already wait, refusing", MAX_PENDING)
            self._answer(conn, seq, _REFUSALS[BUSY])
            return
        row = [conn.product, conn.uid, conn.conn_id, seq, message["type"], message["body"]]
        self._ups.append((conn, seq, row))
        self._schedule()

    def online(self, conn: Connection) -> None:
        if self._client is not None:
            self._buckets[conn] = TokenBucket(self._burst, self._loop.time())
            self._event(conn, ONLINE)

    def offline(self, conn: Connection) -> None:
        """Safe to call for any connection, any number of times: only a connection announced
        online is announced offline, once."""
        if self._buckets.pop(conn, None) is not None:
            self._event(conn, OFFLINE)

    async def close(self) -> None:
        """Send the last events (the offlines of a drained instance) with one try each and
        no pauses, within CLOSE_GRACE_S; up frames still waiting are dropped with their
        connections."""
        self._stopping.set()
        if self._tick is not None:
            self._tick.cancel()
            self._tick = None
        self._ups.clear()
        if self._up_task is not None:
            self._up_task.cancel()
        self._flush()
        tasks = [t for t in (self._up_task, self._event_task) if t is not None]
        if self._event_task is not None:
            await asyncio.wait([self._event_task], timeout=CLOSE_GRACE_S)
            self._event_task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._events:
            _EVENTS_DROPPED.inc(len(self._events))
            self._events.clear()
        if self._client is not None:
            await self._client.close()

    # -- batching ----------------------------------------------------------------------

    def _event(self, conn: Connection, event: str) -> None:
        if len(self._events) >= MAX_EVENTS:
            _EVENTS_DROPPED.inc()
            self._warn("events", "upstream: %d events already wait, dropping", MAX_EVENTS)
            return
        at_ms = time.time_ns() // 1_000_000
        self._events.append([conn.product, conn.uid, conn.conn_id, event, at_ms, conn.device])
        self._schedule()

    def _schedule(self) -> None:
        if self._tick is None:
            self._tick = self._loop.call_later(FLUSH_S, self._flush)

    def _flush(self) -> None:
        """Start a sender for what waits, unless one runs: it takes the rest when done."""
        self._tick = None
        client = self._client
        if client is None:  # upstream off: nothing was queued
            return
        if self._ups and (self._up_task is None or self._up_task.done()):
            self._up_task = self._loop.create_task(self._send_ups(client))
        if self._events and (self._event_task is None or self._event_task.done()):
            self._event_task = self._loop.create_task(self._send_events(client))

    async def _send_ups(self, client: CoordinatorClient) -> None:
        while self._ups:
            batch = [self._ups.popleft() for _ in range(min(len(self._ups), self._rows_per_call))]
            try:
                result = await client.submit_up([row for _, _, row in batch])
            except (RpcError, ValueError, TypeError) as exc:
                self._warn("unreachable", "upstream: coordinator call failed: %s", exc)
                _UNAVAILABLE.inc(len(batch))
                for conn, seq, _ in batch:
                    self._answer(conn, seq, _UNREACHABLE)
                continue
            refusals = dict(zip(result.refused, result.reasons, strict=True))
            for index, (conn, seq, _) in enumerate(batch):
                reason = refusals.get(index)
                if reason is None:
                    _ACKED.inc()
                    self._send(conn, {"op": "up_ack", "seq": seq})
                else:
                    UP_FRAMES.labels(reason if reason in _REFUSALS else BUSY).inc()
                    self._answer(conn, seq, _REFUSALS.get(reason, _REFUSALS[BUSY]))

    async def _send_events(self, client: CoordinatorClient) -> None:
        while self._events:
            rows = [self._events.popleft() for _ in range(min(len(self._events), EVENT_ROWS))]
            try:
                await self._submit_events(client, rows)
            except asyncio.CancelledError:  # stopped while they were on their way
                _EVENTS_DROPPED.inc(len(rows))
                raise

    async def _submit_events(self, client: CoordinatorClient, rows: list[list]) -> None:
        for attempt in range(EVENT_ATTEMPTS):
            try:
                accepted = await client.submit_events(rows)
            except (RpcError, ValueError, TypeError) as exc:
                if attempt + 1 < EVENT_ATTEMPTS and not self._stopping.is_set():
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(EVENT_RETRY_S * 2**attempt):
                            await self._stopping.wait()
                    continue
                self._warn("events_failed", "upstream: %d events dropped: %s", len(rows), exc)
                _EVENTS_DROPPED.inc(len(rows))
            else:
                _EVENTS_SENT.inc(accepted)
                _EVENTS_REFUSED.inc(len(rows) - accepted)
            return

    # -- answers -----------------------------------------------------------------------

    def _answer(self, conn: Connection, seq: int, error: tuple[ErrorCode, str]) -> None:
        code, reason = error
        self._send(conn, {"op": "error", "code": int(code), "reason": reason, "seq": seq})

    def _send(self, conn: Connection, message: dict[str, Any]) -> None:
        if conn.state != CLOSED:
            conn.send_now(self._encode(conn.kind, message))

    def _warn(self, key: str, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._logged_at.get(key, -LOG_EVERY_S) >= LOG_EVERY_S:
            self._logged_at[key] = now
            log.warning(message, *args)

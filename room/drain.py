"""Graceful drain: an instance leaves without its users noticing.

The instance stops accepting, tells the dispatcher (its node row says `draining`, so no
new user is sent here), and then asks its clients to move: each gets
`{"op":"reconnect","after_ms":n,"reason":"drain"}` at its own moment, spread evenly over the
window, so the other instances see a steady trickle of logins instead of a storm. The hints
end a little before the window does, by the largest `after_ms` and a margin for the move
itself, so every client is back elsewhere within the window. A client that has not gone a
few seconds after its hint is closed with 4010. The drain ends when nobody is left, or at
the window's end plus that grace.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import TYPE_CHECKING

from im.protocol.errors import ErrorCode

if TYPE_CHECKING:
    from room.gateway import Gateway

log = logging.getLogger("im.room.drain")

#: Extra wait a client may add before reconnecting, on top of its moment in the window
#: (at most a tenth of the window).
MAX_AFTER_MS = 1000
#: Time left at the window's end for the last moves themselves (at most a tenth of it).
MOVE_MARGIN_S = 0.5
#: How long a client has to leave after its hint before it is closed.
LEAVE_GRACE_S = 3.0
REASON = "drain"


def jitter_ms(window_s: float) -> int:
    """The largest `after_ms` of a drain over `window_s`."""
    return int(min(MAX_AFTER_MS, window_s * 100))


def hint_span(window_s: float) -> float:
    """The part of the window the hints are spread over: the rest is for the clients'
    `after_ms` and their moves, so all are back elsewhere when the window ends."""
    return max(0.0, window_s - jitter_ms(window_s) / 1000 - min(MOVE_MARGIN_S, window_s / 10))


def schedule(count: int, window_s: float, rng: random.Random) -> list[float]:
    """When each of `count` clients gets its hint: evenly over the window, jittered within
    each client's slot so the order carries no pattern."""
    if count <= 0:
        return []
    slot = window_s / count
    return [i * slot + rng.random() * slot for i in range(count)]


class Drain:
    __slots__ = ("_gateway", "_rng", "task", "window_s")

    def __init__(self, gateway: Gateway, rng: random.Random | None = None) -> None:
        self._gateway = gateway
        self._rng = rng or random.Random()
        self.task: asyncio.Task[None] | None = None
        self.window_s = 0.0

    @property
    def started(self) -> bool:
        return self.task is not None

    def start(self, window_s: float) -> asyncio.Task[None]:
        """Begin (once; a second call returns the drain already running)."""
        if self.task is None:
            self.window_s = window_s
            self.task = asyncio.get_running_loop().create_task(self._run(window_s))
        return self.task

    async def _run(self, window_s: float) -> None:
        gateway = self._gateway
        gateway.accepting = False
        for conn in list(gateway.all):
            if conn.conn_id not in gateway.conns:  # not logged in yet: nothing to move
                gateway.close(conn, ErrorCode.SERVER_SHUTDOWN, "instance is draining")
        await gateway.renew_node()  # draining: the dispatcher stops sending users here
        conns = list(gateway.conns.values())
        self._rng.shuffle(conns)
        log.info("draining %d connections over %g s", len(conns), window_s)
        loop = asyncio.get_running_loop()
        start = loop.time()
        jitter = jitter_ms(window_s)
        moments = schedule(len(conns), hint_span(window_s), self._rng)
        for conn, at in zip(conns, moments, strict=True):
            delay = start + at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if conn.conn_id not in gateway.conns:
                continue
            hint = {"op": "reconnect", "after_ms": self._rng.randint(0, jitter),
                    "reason": REASON}  # fmt: skip
            conn.send_now(gateway.encode_for(conn.kind, hint))
            loop.call_later(LEAVE_GRACE_S, self._close_if_left, conn)
        deadline = start + window_s + LEAVE_GRACE_S + 0.5
        while gateway.conns and loop.time() < deadline:
            await asyncio.sleep(0.05)
        log.info("drain done: %d connections left", len(gateway.conns))

    def _close_if_left(self, conn) -> None:
        if self._gateway.conns.get(conn.conn_id) is conn:
            self._gateway.close(conn, ErrorCode.SERVER_SHUTDOWN, "instance drained")

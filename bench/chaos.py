"""chaos: at-least-once delivery while the servers crash.

Starts its own persistent Redis (append-only file), Tansu broker and
`im up --rooms 2 --redis ... --kafka ... --workers 2` on free private ports; connects SDK
clients (uids c0..cN-1, each given every room instance's address, spread evenly) in worker
processes; then sends QoS 1 pushes through center's HTTP API at a steady rate, each to one
client, retrying a failed call with the same Idempotency-Key. Spread over the run (once 20,
40, 60 and 80 % of the pushes were sent) it SIGKILLs room instance 0, fan-out worker w0 and
the saver (`im up` restarts each) and stops and restarts Redis (the file is reloaded). Once
sending ends it waits until every accepted message reached its client's application, or
--timeout.

Reported: accepted, delivered, lost (accepted, never received), duplicates at the
application (the SDK must drop redeliveries), and per fault the time from it until every
message accepted before it was delivered and the worst latency of the messages sent in the
--window seconds after it. A progress line goes to stderr every second; the result goes to
stdout as a table and JSON (also to --json FILE). Exit code 1 when a message was lost or
duplicated, 2 when the run could not be set up.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import os
import re
import shlex
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import uvloop

if __package__ in (None, ""):  # run as `python3 bench/chaos.py`: make `bench` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import chaos_clients  # noqa: E402
from bench.chaos_clients import Fleet  # noqa: E402
from bench.chaos_events import Chaos, Event, parse_kinds  # noqa: E402
from bench.chaos_ledger import NS, Ledger, percentile  # noqa: E402
from bench.chaos_sender import QosSender  # noqa: E402
from bench.chaos_stack import Broker, Redis, StackError, Up, pick_ports  # noqa: E402
from bench.clients import raise_fd_limit  # noqa: E402
from bench.flood import machine  # noqa: E402
from im.config import DEV_PRODUCT, dev_products  # noqa: E402

WARM_UP_TIMEOUT_S = 90.0
#: After the last delivery, how long to keep listening for repeats.
LINGER_S = 2.0
RESTART_LINE = re.compile(r"im up: (\S+) exited with (-?\d+); restarting")


class SetupError(RuntimeError):
    """The run could not start: a server or the clients did not come up."""


def port_range(text: str) -> tuple[int, int]:
    try:
        low, high = (int(p) for p in text.split("-"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not LOW-HIGH: {text!r}") from None
    if not 1024 <= low < high <= 65536:
        raise argparse.ArgumentTypeError(f"need 1024 <= LOW < HIGH <= 65536: {text!r}")
    return low, high


def kinds(text: str) -> list[str]:
    try:
        return parse_kinds(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="chaos", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--clients", type=int, default=1000, help="SDK clients c0..cN-1 (default 1000)")
    add("--messages", type=int, default=50_000, help="QoS 1 pushes to send (default 50000)")
    add("--rate", type=float, default=500.0, help="pushes per second (default 500)")
    add("--procs", type=int, default=2, help="client worker processes (default 2)")
    add("--rooms", type=int, default=2, help="room instances, at least 2 (default 2)")
    add("--workers", type=int, default=2, help="fan-out worker processes (default 2)")
    add(
        "--kills",
        type=kinds,
        default=["room", "worker", "saver", "redis"],
        metavar="LIST",
        help="faults, in order, spread evenly over the run (fault i once i/(n+1) of the "
        "pushes were sent): room (SIGKILL "
        "room instance 0), worker (SIGKILL worker w0), saver (SIGKILL the saver), redis "
        "(stop and restart Redis); 'none' for a run without faults "
        "(default room,worker,saver,redis)",
    )
    add(
        "--redis-fsync",
        choices=("always", "everysec"),
        default="always",
        help="Redis appendfsync (default always)",
    )
    add(
        "--redis-stop",
        choices=("kill", "shutdown"),
        default="kill",
        help="how the redis fault stops Redis: SIGKILL, or a clean SIGTERM shutdown (default kill)",
    )
    add(
        "--redis-down",
        type=float,
        default=1.0,
        help="seconds Redis stays down before it is started again (default 1)",
    )
    add(
        "--timeout",
        type=float,
        default=120.0,
        help="seconds after sending ends to wait for every accepted message (default 120)",
    )
    add(
        "--window",
        type=float,
        default=10.0,
        help="seconds after a fault whose sends are timed for its latency (default 10)",
    )
    add(
        "--retry-for",
        type=float,
        default=60.0,
        help="seconds a push is retried before it counts as never accepted (default 60)",
    )
    add(
        "--http-concurrency",
        type=int,
        default=64,
        help="most pushes in flight, retries included; past it the sender falls behind the "
        "rate (default 64)",
    )
    add(
        "--connect-timeout",
        type=float,
        default=60.0,
        help="seconds for every client to come online before sending (default 60)",
    )
    add(
        "--backoff",
        type=float,
        nargs=2,
        default=(0.1, 2.0),
        metavar=("MIN", "MAX"),
        help="SDK reconnect backoff in seconds (default 0.1 2)",
    )
    add(
        "--worker-session-timeout",
        type=float,
        default=None,
        help="Kafka group session of the workers (IM_WORKER_SESSION_TIMEOUT_S): how soon a "
        "killed worker's partitions move on; default the worker's own (10 s)",
    )
    add(
        "--ports",
        type=port_range,
        default=(20000, 32000),
        metavar="LOW-HIGH",
        help="range to pick a block of free ports from; keep it below the kernel's ephemeral "
        "range (net.ipv4.ip_local_port_range, usually from 32768), or an outgoing connection "
        "may hold a port a restarted server needs (default 20000-32000)",
    )
    add(
        "--log-level",
        default="WARNING",
        help="IM_LOG_LEVEL of the servers; their log is im-up.log in the work directory "
        "(default WARNING)",
    )
    add("--keep", action="store_true", help="keep the work directory (logs, AOF) afterwards")
    add("--json", default=None, metavar="FILE", help="also write the JSON summary to FILE")
    args = parser.parse_args(argv)
    if args.clients < 1 or args.messages < 1 or args.rate <= 0:
        parser.error("--clients, --messages and --rate must be positive")
    if args.rooms < 2:
        parser.error("--rooms must be at least 2: clients of a killed instance need another")
    if not 1 <= args.workers <= 5:
        parser.error("--workers must be between 1 and 5")
    if args.procs < 1:
        parser.error("--procs must be at least 1")
    if min(args.timeout, args.window, args.retry_for, args.connect_timeout) <= 0:
        parser.error("--timeout, --window, --retry-for and --connect-timeout must be positive")
    if args.redis_down < 0 or not 0 < args.backoff[0] <= args.backoff[1]:
        parser.error("need --redis-down >= 0 and 0 < backoff MIN <= MAX")
    if args.http_concurrency < 1:
        parser.error("--http-concurrency must be at least 1")
    args.procs = min(args.procs, args.clients)
    return args


# -- progress ----------------------------------------------------------------------------


class Progress:
    def __init__(self, fleet: Fleet, ledger: Ledger, clients: int) -> None:
        self.fleet = fleet
        self.ledger = ledger
        self.clients = clients
        self.sender: QosSender | None = None
        self.events: list[Event] = []
        self.start = time.monotonic()

    def line(self) -> str:
        fleet, ledger = self.fleet, self.ledger
        text = (
            f"[{time.monotonic() - self.start:6.1f}s] online {fleet.total('online')}/{self.clients}"
        )
        sender = self.sender
        if sender is not None:
            text += (
                f" | sent {sender.sent} accepted {sender.answered} retrying {sender.retrying}"
                f" never {len(sender.never)} | delivered {ledger.received} waiting "
                f"{ledger.waiting} | app repeats {ledger.repeats} sdk-dropped "
                f"{fleet.total('sdk_repeats')}"
            )
        if self.events:
            last = self.events[-1]
            back = f"back {last.back_s:.1f} s" if last.back_s is not None else "down"
            text += f" | {last.target}: {back}"
        return text

    async def run(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            print(self.line(), file=sys.stderr, flush=True)


# -- the run -----------------------------------------------------------------------------


async def warm_up(center: str, api_key: str, fleet: Fleet, targets: int) -> None:
    """One push to each of the first `targets` clients (each first on its own instance),
    delivered: the workers joined their group."""
    headers = {"Authorization": f"Bearer {api_key}"}
    deadline = time.monotonic() + WARM_UP_TIMEOUT_S
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        for index in range(targets):
            body = {"uids": [f"c{index}"], "qos": 1, "body": {"warm": 1, "to": index}}
            while True:
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    url = center + "/v1/push/users"
                    async with session.post(url, json=body, headers=headers) as response:
                        if response.status == 200:
                            break
                if time.monotonic() > deadline:
                    raise SetupError("center did not accept the warm-up pushes")
                await asyncio.sleep(0.5)
    while fleet.total("warm") < targets:
        if time.monotonic() > deadline:
            raise SetupError("the warm-up pushes were not delivered: are the workers up?")
        await asyncio.sleep(0.1)


async def strike_at(chaos: Chaos, plan: list[tuple[int, str]], sender: QosSender) -> None:
    """Each fault once `sender` has started its share of the pushes, whether or not the
    victims of the earlier ones are back yet: on a box where center falls behind the rate,
    the faults stay spread over the whole run."""
    pending = []
    for count, kind in plan:
        while sender.sent < count:
            await asyncio.sleep(0.01)
        pending.append(asyncio.create_task(asyncio.to_thread(chaos.strike, kind)))
    await asyncio.gather(*pending)


async def drive(
    args: argparse.Namespace,
    fleet: Fleet,
    ledger: Ledger,
    chaos: Chaos,
    center: str,
    api_key: str,
    summary: dict[str, Any],
) -> None:
    loop = asyncio.get_running_loop()
    fleet.attach(loop)
    progress = Progress(fleet, ledger, args.clients)
    ticker = loop.create_task(progress.run())
    try:
        deadline = time.monotonic() + args.connect_timeout
        while fleet.total("online") < args.clients:
            if time.monotonic() > deadline or fleet.total("failed"):
                raise SetupError(
                    f"only {fleet.total('online')} of {args.clients} clients came online "
                    f"({fleet.total('failed')} failed)"
                )
            await asyncio.sleep(0.1)
        summary["online_at_start"] = fleet.total("online")
        await warm_up(center, api_key, fleet, min(args.rooms, args.clients))

        sender = QosSender(
            center,
            api_key,
            args.rate,
            ledger,
            args.clients,
            args.http_concurrency,
            args.retry_for,
            f"chaos-{os.urandom(4).hex()}",
        )
        progress.sender = sender
        shares = len(args.kills) + 1
        plan = [(args.messages * (i + 1) // shares, kind) for i, kind in enumerate(args.kills)]
        started_ns = time.monotonic_ns()
        progress.events = chaos.events
        striking = loop.create_task(strike_at(chaos, plan, sender))
        await sender.run()
        sent_ns = time.monotonic_ns()
        await striking
        deadline = time.monotonic() + args.timeout
        while ledger.waiting and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        settled_ns = time.monotonic_ns()
        await asyncio.sleep(LINGER_S)
        summary["online_at_end"] = fleet.total("online")
        events = sorted(chaos.events, key=lambda e: e.at_ns)
        record(summary, args, sender, ledger, events, started_ns, sent_ns, settled_ns)
    finally:
        ticker.cancel()
        await fleet.stop()
        summary["sdk_dropped_repeats"] = fleet.total("sdk_repeats")
        summary["strays"] = fleet.total("strays")
        summary["client_failures"] = fleet.total("failed")
        summary["client_processes_crashed"] = fleet.crashed
        record_late(summary, ledger)


def record(
    summary: dict[str, Any],
    args: argparse.Namespace,
    sender: QosSender,
    ledger: Ledger,
    events: list[Event],
    started_ns: int,
    sent_ns: int,
    settled_ns: int,
) -> None:
    accepted = ledger.accepted_seqs()
    latencies = ledger.latencies_ns(accepted)
    summary.update(
        sent=sender.sent,
        send_seconds=sender.send_seconds,
        send_rate=sender.sent / sender.send_seconds if sender.send_seconds else 0.0,
        calls_done_s=(sent_ns - started_ns) / NS,
        send_lag_max_s=sender.max_lag_s,
        accepted=len(accepted),
        never_accepted=len(sender.never),
        never_accepted_seqs=sorted(sender.never)[:100],
        retried_messages=sender.retried,
        retries=sender.retries,
        offline_answers=sender.offline,
        evicted=sender.evicted,
        http_errors=dict(sender.errors.most_common()),
        error_samples=sender.samples,
        all_delivered_after_calls_s=None if ledger.waiting else (settled_ns - sent_ns) / NS,
        latency_ms={
            "p50": percentile(latencies, 0.50) / 1e6,
            "p99": percentile(latencies, 0.99) / 1e6,
            "max": (latencies[-1] if latencies else 0) / 1e6,
        },
    )
    for event in events:
        if event.at_ns:
            event.delivery = ledger.after_event(event.at_ns, int(args.window * NS))
    summary["events"] = [
        {
            "kind": e.kind,
            "target": e.target,
            "at_s": (e.at_ns - started_ns) / NS if e.at_ns else None,
            "pid": e.pid,
            "new_pid": e.new_pid,
            "back_s": e.back_s,
            "problem": e.problem,
            **e.delivery,
        }
        for e in events
    ]


def record_late(summary: dict[str, Any], ledger: Ledger) -> None:
    """The counts that receipts up to the clients' last reports may still change."""
    lost = ledger.lost()
    duplicated = ledger.duplicated()
    summary.update(
        delivered=sum(1 for s in range(ledger.total) if ledger.accepted_ns[s] and ledger.count[s]),
        delivered_unaccepted=sum(
            1 for s in range(ledger.total) if ledger.count[s] and not ledger.accepted_ns[s]
        ),
        lost=len(lost),
        lost_seqs=lost[:100],
        duplicates=ledger.repeats,
        duplicated_seqs=duplicated[:100],
        unknown_seqs=ledger.unknown,
    )


def restarts(log: Path) -> dict[str, int]:
    """How often `im up` restarted each child, from its log."""
    found: Counter[str] = Counter()
    with contextlib.suppress(OSError):
        for match in RESTART_LINE.finditer(log.read_text(errors="replace")):
            found[match.group(1)] += 1
    return dict(found)


def _s(value: float | None, unit: str = "s", digits: int = 1) -> str:
    return "never" if value is None else f"{value:.{digits}f} {unit}"


def table(summary: dict[str, Any]) -> str:
    settings = summary["settings"]
    lat = summary.get("latency_ms", {})
    rows = [
        (
            "clients",
            f"{settings['clients']} SDK clients over {settings['rooms']} room instances "
            f"({settings['procs']} processes); online at start "
            f"{summary.get('online_at_start', 0)}, at end {summary.get('online_at_end', 0)}",
        ),
        (
            "sent",
            f"{summary.get('sent', 0)} QoS 1 pushes at {settings['rate']:g}/s asked, "
            f"{summary.get('send_rate', 0):.0f}/s achieved over "
            f"{summary.get('send_seconds', 0):.1f} s",
        ),
        (
            "accepted",
            f"{summary.get('accepted', 0)} ({summary.get('retried_messages', 0)} needed "
            f"retries, {summary.get('retries', 0)} retries in all)",
        ),
        ("never accepted", str(summary.get("never_accepted", 0))),
        ("offline answers", f"{summary.get('offline_answers', 0)} (recipient had no session)"),
        ("delivered", str(summary.get("delivered", 0))),
        ("lost", str(summary.get("lost", 0))),
        (
            "duplicates",
            f"{summary.get('duplicates', 0)} at the application "
            f"(the SDK dropped {summary.get('sdk_dropped_repeats', 0)} redeliveries)",
        ),
        (
            "latency",
            f"p50 {lat.get('p50', 0):.1f} ms  p99 {lat.get('p99', 0):.1f} ms  "
            f"max {lat.get('max', 0):.1f} ms (first attempt to the application)",
        ),
        (
            "all delivered",
            _s(summary.get("all_delivered_after_calls_s")) + " after the last call's answer",
        ),
    ]
    if summary.get("http_errors"):
        errors = "; ".join(f"{k} x{v}" for k, v in summary["http_errors"].items())
        rows.append(("HTTP errors", errors))
    if summary.get("restarts"):
        rows.append(
            ("im up restarts", ", ".join(f"{k} x{v}" for k, v in summary["restarts"].items()))
        )
    if summary.get("error"):
        rows.append(("error", summary["error"]))
    width = max(len(name) for name, _ in rows)
    text = "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
    events = summary.get("events", [])
    if events:
        head = (
            "fault",
            "at",
            "back",
            "in flight",
            "full delivery",
            "sent in window",
            "max latency",
        )
        lines = [head]
        for e in events:
            if e["problem"]:
                lines.append((e["target"], "", "", "", e["problem"], "", ""))
                continue
            lines.append(
                (
                    e["target"],
                    _s(e["at_s"]),
                    _s(e["back_s"]),
                    str(e.get("in_flight", "")),
                    _s(e.get("full_delivery_s")),
                    str(e.get("window_sent", "")),
                    _s(e.get("window_max_ms"), "ms", 0),
                )
            )
        widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
        text += "\n\n" + "\n".join(
            "  ".join(f"{cell:<{w}}" for cell, w in zip(line, widths, strict=True)).rstrip()
            for line in lines
        )
    return text


def _terminated(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # so the servers are stopped on the way out


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminated)
    raise_fd_limit()
    product = dev_products()[DEV_PRODUCT]
    workdir = Path(tempfile.mkdtemp(prefix="im-chaos-"))
    summary: dict[str, Any] = {
        "command": shlex.join(["python3", *sys.argv] if argv is None else ["chaos", *argv]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "settings": {
            "clients": args.clients,
            "messages": args.messages,
            "rate": args.rate,
            "procs": args.procs,
            "rooms": args.rooms,
            "workers": args.workers,
            "kills": args.kills,
            "redis_fsync": args.redis_fsync,
            "redis_stop": args.redis_stop,
            "redis_down_s": args.redis_down,
            "timeout_s": args.timeout,
            "window_s": args.window,
            "retry_for_s": args.retry_for,
            "worker_session_timeout_s": args.worker_session_timeout,
        },
    }
    env = {"IM_LOG_LEVEL": args.log_level}
    if args.worker_session_timeout is not None:
        env["IM_WORKER_SESSION_TIMEOUT_S"] = str(args.worker_session_timeout)
    ledger = Ledger(args.messages)
    redis = broker = up = None
    code = 2
    try:
        ports = pick_ports(*args.ports, args.rooms, args.workers)
        summary["ports"] = {"register": ports.register, "center": ports.center, "base": ports.base}
        redis = Redis(ports.redis, workdir, args.redis_fsync)
        redis.start()
        broker = Broker(ports.kafka, workdir)
        broker.start()
        up = Up(ports, redis.url, broker.brokers, workdir, env)
        up.start()
        addresses = tuple(f"tcp://127.0.0.1:{ports.room_tcp(i)}" for i in range(args.rooms))
        specs = chaos_clients.plan(args.clients, args.procs, addresses, product, args.backoff)
        fleet = Fleet(specs, ledger.arrived)
        chaos = Chaos(up, redis, ports, args.redis_stop, args.redis_down)
        center = f"http://127.0.0.1:{ports.center}"
        uvloop.run(drive(args, fleet, ledger, chaos, center, product.api_key, summary))
        code = 1 if summary["lost"] or summary["duplicates"] else 0
    except (SetupError, StackError, ValueError) as exc:
        summary["error"] = str(exc)
        print(f"chaos: {exc}", file=sys.stderr)
    finally:
        for server in (up, broker):
            if server is not None:
                server.stop()
        if redis is not None:
            redis.shutdown()
        summary["restarts"] = restarts(workdir / "im-up.log")
        summary["result"] = {0: "pass", 1: "fail"}.get(code, "error")
        if args.keep or code:
            summary["workdir"] = str(workdir)
            print(f"chaos: logs and data kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print(table(summary))
    document = orjson.dumps(summary, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS)
    print(document.decode())
    if args.json:
        Path(args.json).write_bytes(document + b"\n")
    return code


if __name__ == "__main__":
    sys.exit(main())

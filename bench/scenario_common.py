"""What the connect, broadcast, churn, drain and upstream scenarios of bench/flood.py share:
the scenario record, the run's context, the clients' routing, CPU samples per process, the
QoS 1 stream with its accounting and report rows, waiting for the clients to be back online
and what their moves came to."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bench import procstat
from bench.latency import Histogram
from bench.poster import PacedPoster
from bench.scenario_clients import Plan

if TYPE_CHECKING:
    from bench.flood import Fleet, Progress, Watched

#: CPU seconds per process, by role (room, center, register, flood).
CpuSample = dict[str, dict[int, float]]
#: Default --grace of the QoS 1 stream scenarios: how long every client and every accepted
#: push get to arrive after the stream.
STREAM_GRACE_S = 15.0


def cpu_sample(watched: Watched) -> CpuSample:
    """User + system CPU seconds of every watched process that is still there."""
    sample: CpuSample = {}
    for role, pids in watched.roles.items():
        sample[role] = {}
        for pid in pids:
            with contextlib.suppress(OSError):
                sample[role][pid] = procstat.cpu_seconds(pid)
    return sample


def cpu_spent(start: CpuSample, end: CpuSample) -> dict[str, float]:
    """CPU seconds per role between two samples, over the processes present in both (a
    drained room exits: its last seconds cannot be read)."""
    return {
        role: sum(end[role][pid] - before for pid, before in pids.items() if pid in end[role])
        for role, pids in start.items()
        if pids
    }


class CpuMarks:
    """CPU samples when the workers start and when every client is online."""

    def __init__(self, watched: Watched) -> None:
        self.watched = watched
        self.start = cpu_sample(watched)
        self.ready: CpuSample = {}

    def mark_ready(self) -> None:
        self.ready = cpu_sample(self.watched)


class ScenarioError(Exception):
    """A scenario cannot start: what it needs is not there."""


@dataclass(frozen=True)
class Scenario:
    """A scenario as bench/flood.py runs it: options, client plan, the run, its rows."""

    name: str
    help: str
    #: The clients' behaviour; may look the system up first (ScenarioError when it cannot).
    plan: Callable[[argparse.Namespace], Plan]
    run: Callable[[Context], Awaitable[None]]
    table_rows: Callable[[dict[str, Any]], list[tuple[str, str]]]
    add_arguments: Callable[[Callable[..., Any]], None] | None = None
    #: Fills the options left at None before the common defaults apply.
    defaults: Callable[[argparse.Namespace], None] | None = None
    check: Callable[[argparse.Namespace, Callable[[str], None]], None] | None = None


@dataclass
class Context:
    """Everything a scenario's run needs from bench/flood.py."""

    args: argparse.Namespace
    fleet: Fleet
    watched: Watched
    api_key: str
    prefix: str
    online: list[int]  # clients online after the connect phase, by index
    summary: dict[str, Any]
    progress: Progress
    cpu: CpuMarks

    def uids(self) -> list[str]:
        return [f"{self.prefix}{i}" for i in self.online]

    def send(self, command: Any) -> None:
        for pipe in self.fleet.pipes:
            with contextlib.suppress(OSError):
                pipe.send(command)


def routed_plan(args: argparse.Namespace, **behaviour: Any) -> Plan:
    """Clients on --transport whose first connects go through --dispatcher when there is one,
    --route-batch clients per route request; `behaviour` sets the rest of the plan."""
    return Plan(
        transport=args.transport,
        dispatcher=args.dispatcher or "",
        route_batch=args.route_batch,
        **behaviour,
    )


def merged(pairs: Iterable[tuple[dict[int, int], int]]) -> Histogram:
    histogram = Histogram()
    for buckets, max_ns in pairs:
        histogram.merge(buckets, max_ns)
    return histogram


def per_unit(spent: dict[str, float], count: int) -> dict[str, float | None]:
    """Microseconds of CPU per unit of work, by role."""
    return {role: seconds / count * 1e6 if count else None for role, seconds in spent.items()}


def record_cpu(summary: dict[str, Any], spent: dict[str, float], delivered: int) -> None:
    """CPU of the phase by role, and per delivered frame (`<role>_cpu_us_per_msg`)."""
    summary["cpu_seconds"] = {role: round(seconds, 3) for role, seconds in spent.items()}
    for role, value in per_unit(spent, delivered).items():
        summary[f"{role}_cpu_us_per_msg"] = value


async def back_online(fleet: Fleet, members: int, timeout: float) -> bool:
    """Wait until no client is between connections and `members` are online."""
    return await fleet.wait(
        lambda: fleet.total("moving") == 0 and fleet.total("online") >= members, timeout
    )


def stream_defaults(args: argparse.Namespace, duration: float) -> None:
    """--duration and --grace of a QoS 1 stream scenario, where they are not given."""
    if args.duration is None:
        args.duration = duration
    if args.grace is None:
        args.grace = STREAM_GRACE_S


class Qos1Stream(PacedPoster):
    """QoS 1 pushes, each to one random client of the run whether it is online or not: the
    saver holds each one accepted until its user ACKs, so every one must arrive."""

    def __init__(self, args: argparse.Namespace, api_key: str, uids: list[str], run: str) -> None:
        total = round(args.rate * args.duration)
        url = args.center.rstrip("/") + "/v1/push/users"
        super().__init__(url, api_key, args.rate, total, args.http_concurrency)
        self.uids = uids
        self.run_tag = run
        self.kind = args.type
        self.pri = args.pri
        self.accepted = bytearray(total)
        self._rng = random.Random()

    def payload(self, seq: int) -> dict[str, Any]:
        body = {"seq": seq, "t": time.time_ns(), "run": self.run_tag}
        uid = self._rng.choice(self.uids)
        return {"uids": [uid], "type": self.kind, "pri": self.pri, "qos": 1, "body": body}

    def answer(self, seq: int, document: Any) -> str | None:
        stored = document.get("stored") if isinstance(document, dict) else None
        if not isinstance(stored, int):
            return f"answer without a 'stored' count: {str(document)[:120]}"
        self.accepted[seq] = 1
        return None

    def missing(self, count: bytearray) -> int:
        """Accepted pushes no client has received (`count`: receipts per sequence number)."""
        return sum(1 for seq, ok in enumerate(self.accepted) if ok and not count[seq])


def stream_progress(stream: Qos1Stream, fleet: Fleet) -> Callable[[], str]:
    def line() -> str:
        return (
            f" | sent {stream.sent} accepted {stream.answered} "
            f"delivered {fleet.arrivals.delivered} redelivered {fleet.total('redelivered')}"
        )

    return line


async def deliveries(fleet: Fleet, stream: Qos1Stream, members: int, grace: float) -> None:
    """After the stream: wait for every client to be back and every accepted push to arrive."""
    deadline = time.monotonic() + grace
    await back_online(fleet, members, grace)
    count = fleet.arrivals.count
    await fleet.wait(lambda: stream.missing(count) == 0, max(0.0, deadline - time.monotonic()))


class Qos1Phase:
    """A scenario's QoS 1 stream from start to accounting: the scenario runs `stream` and
    does its own part meanwhile, then `finish` waits for every client and every accepted push
    and records the stream's figures and the CPU the phase cost."""

    def __init__(self, ctx: Context, progress: Callable[[], str]) -> None:
        self.ctx = ctx
        self.members = len(ctx.online)
        self.stream = Qos1Stream(ctx.args, ctx.api_key, ctx.uids(), ctx.prefix)
        line = stream_progress(self.stream, ctx.fleet)
        ctx.progress.extra = lambda: line() + progress()
        self.start = cpu_sample(ctx.watched)

    async def finish(self) -> list[Any]:
        """The workers' scenario tallies, taken once every client is back."""
        ctx, fleet, summary = self.ctx, self.ctx.fleet, self.ctx.summary
        await deliveries(fleet, self.stream, self.members, ctx.args.grace)
        spent = cpu_spent(self.start, cpu_sample(ctx.watched))
        tallies = await fleet.tallies("scenario")
        account_stream(summary, self.stream, fleet)
        record_cpu(summary, spent, summary["delivered"])
        return tallies


def moves_figures(fleet: Fleet) -> dict[str, int]:
    """Where the clients stand after a phase in which they moved (churn, drain)."""
    return {
        "server_closes": fleet.total("dropped"),
        "gave_up": fleet.total("gave_up"),
        "still_away": fleet.total("moving"),
        "online_end": fleet.total("online"),
        "redelivered": fleet.total("redelivered"),
        "other_runs": fleet.total("foreign"),
    }


def stream_rows(summary: dict[str, Any], redelivered: int) -> list[tuple[str, str]]:
    """The report rows of a QoS 1 stream's figures."""
    return [
        ("sent", f"{summary['sent']} qos 1 ({summary['send_rate']:.0f}/s achieved)"),
        ("accepted", f"{summary['accepted_online']} ({summary['http_errors']} HTTP errors)"),
        ("delivered", str(summary["delivered"])),
        ("lost", str(summary["lost"])),
        ("duplicates", f"{summary['duplicates']} at the application"),
        ("redelivered", f"{redelivered} (repeats the clients dropped)"),
        ("latency ms", latency_text(summary["latency_ms"])),
    ]


def account_stream(summary: dict[str, Any], stream: Qos1Stream, fleet: Fleet) -> None:
    """The standard delivery figures of a QoS 1 stream, as the application saw it."""
    arrivals = fleet.arrivals
    latency = Histogram()
    for seq in range(stream.total):
        if arrivals.count[seq]:
            latency.add(arrivals.latency_ns[seq])
    summary.update(
        sent=stream.sent,
        send_rate=stream.sent / stream.send_seconds if stream.send_seconds else 0.0,
        send_lag_max_ms=stream.max_lag_s * 1000,
        answered=stream.answered,
        accepted_online=sum(stream.accepted),
        http_errors=stream.sent - stream.answered,
        delivered=arrivals.delivered,
        lost=stream.missing(arrivals.count),
        duplicates=sum(max(0, n - 1) for n in arrivals.count),
        stray=arrivals.stray,
        latency_ms=latency.summary_ms(),
    )
    summary["errors"].update(stream.errors)


def latency_text(h: dict[str, float]) -> str:
    return f"p50 {h['p50']:.1f}  p99 {h['p99']:.1f}  max {h['max']:.1f}  (n={h['count']})"


async def sleep_until(moment: float) -> None:
    await asyncio.sleep(max(0.0, moment - time.monotonic()))

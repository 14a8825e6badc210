"""The room scenario of bench/flood.py: every client joins one chat room, the publisher
sends the live-room mix (bench.liveroom) through center's room API, and the report accounts
for each kind of message: sent, delivered, dropped by the switches (read from the rooms'
/metrics), latency from publish to client, and CPU per delivered message.

A delivered message is one push a client application receives: alone, inside a batch
frame, or a merged like (which counts once, whatever its count).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from bench import liveroom, procstat
from bench.clients import Target
from bench.latency import Histogram
from bench.poster import HTTP_TIMEOUT_S, PacedPoster

if TYPE_CHECKING:
    from bench.flood import Fleet, Watched

ADMIN_PATH = "/v1/admin/switches"
SWITCH_SETTLE_S = 2.0  # rooms and workers look for new switches every 0.5 s
MEMBERS_WAIT_S = 20.0  # for the register's room index to count every member
#: No push for this long means deliveries are over: merged likes leave once per second, and
#: one the budget refused waits for the next second.
QUIET_S = 2.5
POLL_S = 0.25


class SwitchesRefused(Exception):
    """The switches could not be put in force; the run would measure something else."""


@dataclass
class Switched:
    """The switches a run applied, and when."""

    source: str  # the preset name or the file
    document: dict[str, Any]
    version: int | None
    at: float = field(default_factory=time.monotonic)


def switch_document(source: str, room: str) -> dict[str, Any]:
    """A preset's document, or the JSON object in the file `source`."""
    if source in liveroom.PRESETS:
        return liveroom.preset(source, room)
    try:
        with open(source, encoding="utf-8") as file:
            document = json.load(file)
    except OSError as exc:
        raise SwitchesRefused(f"cannot read switches file {source}: {exc.strerror}") from None
    except ValueError as exc:
        raise SwitchesRefused(f"switches file {source} is not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise SwitchesRefused(f"switches file {source} does not hold a JSON object")
    return document


def put_switches(center: str, admin_key: str, source: str, room: str) -> Switched:
    """PUT the switches through center's admin API (before the clients start)."""
    document = switch_document(source, room)
    request = urllib.request.Request(
        center.rstrip("/") + ADMIN_PATH,
        data=json.dumps(document).encode(),
        method="PUT",
        headers={"Authorization": f"Bearer {admin_key}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as response:
            answer = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        text = exc.read()[:300].decode(errors="replace")
        raise SwitchesRefused(f"center refused the switches: HTTP {exc.code} {text}") from None
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise SwitchesRefused(f"cannot put switches at {center}: {reason}") from None
    version = answer.get("version") if isinstance(answer, dict) else None
    return Switched(source, document, version if isinstance(version, int) else None)


class RoomPublisher(PacedPoster):
    """The live-room mix into one room, in the order of liveroom.schedule."""

    def __init__(self, args: argparse.Namespace, api_key: str) -> None:
        total = round(args.rate * args.duration)
        url = f"{args.center.rstrip('/')}/v1/push/rooms/{quote(args.room, safe='')}"
        super().__init__(url, api_key, args.rate, total, args.http_concurrency)
        self.kinds = liveroom.schedule(total)
        self.accepted = bytearray(total)
        self.members_seen = 0  # the most members center counted in an answer

    def payload(self, seq: int) -> dict[str, Any]:
        return liveroom.request(liveroom.MIX[self.kinds[seq]], seq, time.time_ns())

    def answer(self, seq: int, document: Any) -> str | None:
        members = document.get("members") if isinstance(document, dict) else None
        if not isinstance(members, int):
            return f"answer without a 'members' count: {str(document)[:120]}"
        self.accepted[seq] = 1
        self.members_seen = max(self.members_seen, members)
        return None

    def accepted_by_kind(self) -> list[int]:
        counts = [0] * len(liveroom.MIX)
        for seq, kind in enumerate(self.kinds):
            counts[kind] += self.accepted[seq]
        return counts


# -- the rooms' own counters -------------------------------------------------------------


@dataclass
class RoomMetrics:
    """One instance's counters for one room, from its /metrics."""

    drops: dict[tuple[str, str], float] = field(default_factory=dict)  # (type, reason)
    queue_drops: dict[str, float] = field(default_factory=dict)  # connection queues, by reason
    delivered: float = 0.0  # im_room_room_delivered_total: all rooms of the instance
    writes: float = 0.0

    def minus(self, before: RoomMetrics) -> RoomMetrics:
        def sub(a: dict, b: dict) -> dict:
            return {k: v - b.get(k, 0.0) for k, v in a.items() if v - b.get(k, 0.0)}

        return RoomMetrics(
            sub(self.drops, before.drops),
            sub(self.queue_drops, before.queue_drops),
            self.delivered - before.delivered,
            self.writes - before.writes,
        )


def parse_room_metrics(text: str, room: str) -> RoomMetrics:
    """The counters of `room` (drops by type and reason) and of the instance."""
    found = RoomMetrics()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if sample.name == "im_room_room_drops_total" and labels.get("room") == room:
                key = (labels.get("type", ""), labels.get("reason", ""))
                found.drops[key] = found.drops.get(key, 0.0) + sample.value
            elif sample.name == "im_room_drops_total":
                reason = labels.get("reason", "")
                found.queue_drops[reason] = found.queue_drops.get(reason, 0.0) + sample.value
            elif sample.name == "im_room_room_delivered_total":
                found.delivered += sample.value
            elif sample.name == "im_room_room_writes_total":
                found.writes += sample.value
    return found


def metrics_url(target: Target) -> str:
    """Rooms serve /metrics on their WebSocket port; `im up` puts TCP on the port after it."""
    port = target.port if target.transport == "ws" else target.port - 1
    return f"http://{target.host}:{port}/metrics"


async def _metrics_text(session: aiohttp.ClientSession, url: str, errors: Counter[str]) -> str:
    """The Prometheus text at `url`; "" (and a counted error) when it cannot be read."""
    try:
        async with session.get(url) as response:
            response.raise_for_status()
            return await response.text()
    except (aiohttp.ClientError, TimeoutError) as exc:
        errors[f"metrics {url}: {type(exc).__name__}: {str(exc)[:120]}"] += 1
        return ""


async def scrape(
    session: aiohttp.ClientSession, targets: Sequence[Target], room: str, errors: Counter[str]
) -> list[RoomMetrics]:
    found = []
    for target in targets:
        text = await _metrics_text(session, metrics_url(target), errors)
        found.append(parse_room_metrics(text, room))
    return found


def parse_rpc_latency(text: str) -> dict[str, tuple[float, float]]:
    """Internal RPC calls as a caller (center) saw them: method -> (calls, seconds)."""
    found: dict[str, tuple[float, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = sample.name
            if name.startswith("im_rpc_client_latency_seconds_") and name[-4:] in ("_sum", "ount"):
                method = sample.labels.get("method", "")
                count, seconds = found.get(method, (0.0, 0.0))
                if name.endswith("_count"):
                    count += sample.value
                else:
                    seconds += sample.value
                found[method] = (count, seconds)
    return found


async def center_rpc(
    session: aiohttp.ClientSession, center: str, errors: Counter[str]
) -> dict[str, tuple[float, float]]:
    text = await _metrics_text(session, center.rstrip("/") + "/metrics", errors)
    return parse_rpc_latency(text)


def rpc_delta(
    after: dict[str, tuple[float, float]], before: dict[str, tuple[float, float]]
) -> dict[str, dict[str, float]]:
    """method -> calls and mean milliseconds between two samples, for methods called."""
    delta = {}
    for method, (count, seconds) in sorted(after.items()):
        count0, seconds0 = before.get(method, (0.0, 0.0))
        if count > count0:
            calls = count - count0
            delta[method] = {"calls": calls, "mean_ms": (seconds - seconds0) / calls * 1000}
    return delta


async def center_members(
    session: aiohttp.ClientSession,
    args: argparse.Namespace,
    api_key: str,
    want: int,
    errors: Counter[str],
) -> int:
    """Wait until center counts `want` members in the room (members_total decides the size
    level); what it counts when it does, or at the deadline."""
    url = f"{args.center.rstrip('/')}/v1/rooms/{quote(args.room, safe='')}"
    headers = {"Authorization": f"Bearer {api_key}"}
    deadline = time.monotonic() + MEMBERS_WAIT_S
    members = 0
    while True:
        try:
            async with session.get(url, headers=headers) as response:
                if response.status == 200:
                    members = (await response.json()).get("members", 0)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            errors[f"GET {url}: {type(exc).__name__}"] += 1
        if members >= want or time.monotonic() >= deadline:
            return members
        await asyncio.sleep(POLL_S)


# -- the run -----------------------------------------------------------------------------


async def run(
    args: argparse.Namespace,
    fleet: Fleet,
    watched: Watched,
    api_key: str,
    online: list[int],
    targets: Sequence[Target],
    switched: Switched | None,
    summary: dict[str, Any],
    set_publisher: Callable[[PacedPoster], None],
) -> None:
    members = len(online)
    placed = Counter(i % len(targets) for i in online)
    by_target = [placed[t] for t in range(len(targets))]
    errors = summary["errors"]
    timeout = aiohttp.ClientTimeout(total=HTTP_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        counted = await center_members(session, args, api_key, members, errors)
        if switched is not None:
            await asyncio.sleep(max(0.0, switched.at + SWITCH_SETTLE_S - time.monotonic()))
        before = await scrape(session, targets, args.room, errors)
        rpc_before = await center_rpc(session, args.center, errors)
        publisher = RoomPublisher(args, api_key)
        set_publisher(publisher)
        cpu_start = watched.cpu()
        box_start = procstat.box_busy_seconds()
        started = time.monotonic()
        summary["live_room"]["push_started"] = time.time()
        await publisher.run()
        await _quiet(fleet, args.grace)
        phase = time.monotonic() - started
        cpu_end = watched.cpu()
        box = procstat.box_busy_seconds() - box_start
        after = await scrape(session, targets, args.room, errors)
        rpc = rpc_delta(await center_rpc(session, args.center, errors), rpc_before)
    tallies = await fleet.tallies()
    deltas = [a.minus(b) for a, b in zip(after, before, strict=True)]
    _account(args, publisher, tallies, deltas, by_target, counted, switched, summary)
    summary["live_room"]["push_phase_s"] = phase
    summary["live_room"]["center_rpc"] = rpc
    _cpu(summary, watched, cpu_start, cpu_end, phase, box)


async def _quiet(fleet: Fleet, grace: float) -> None:
    """Wait for deliveries to stop: no new room push for QUIET_S, at most `grace` seconds."""
    start = last_change = time.monotonic()
    seen = fleet.total("room_pushes")
    while time.monotonic() - start < grace:
        await asyncio.sleep(POLL_S)
        now_seen = fleet.total("room_pushes")
        if now_seen != seen:
            seen, last_change = now_seen, time.monotonic()
        elif time.monotonic() - last_change >= QUIET_S:
            return


def _account(
    args: argparse.Namespace,
    publisher: RoomPublisher,
    tallies: list[dict[str, Any]],
    deltas: list[RoomMetrics],
    by_target: list[int],
    counted: int,
    switched: Switched | None,
    summary: dict[str, Any],
) -> None:
    by_type: Counter[tuple[str, str]] = Counter()
    like_units = stray = 0
    slow: Counter[int] = Counter()
    high, probe_latency, loop_lag = Histogram(), Histogram(), Histogram()
    probes: list[bytes] = []
    for tally in tallies:
        for mtype, pri, n in tally["by_type"]:
            by_type[mtype, pri] += n
        like_units += tally["like_units"]
        high.merge(*tally["high_latency"])
        probe_latency.merge(*tally["probe_latency"])
        loop_lag.merge(*tally["loop_lag"])
        probes += tally["probes"]
        stray += tally["stray"]
        slow.update(tally["slow"])
    members = sum(by_target)
    accepted = publisher.accepted_by_kind()
    rows = liveroom.type_rows(
        liveroom.MIX,
        accepted,
        by_type,
        like_units,
        members,
        [(d.drops, n) for d, n in zip(deltas, by_target, strict=True)],
    )
    drops: Counter[tuple[str, str]] = Counter()
    queue_drops: Counter[str] = Counter()
    for delta in deltas:
        drops.update(delta.drops)
        queue_drops.update(delta.queue_drops)
    allowed = (
        liveroom.allowed_drops(switched.document, args.room, max(members, counted))
        if switched is not None
        else None
    )
    unexpected = liveroom.unexpected_drops(drops, allowed) if allowed is not None else None
    delivered = sum(by_type.values())
    room_delivered = sum(d.delivered for d in deltas)
    room_writes = sum(d.writes for d in deltas)
    high_seqs = [
        seq
        for seq, kind in enumerate(publisher.kinds)
        if liveroom.MIX[kind].pri == "high" and publisher.accepted[seq]
    ]
    summary.update(
        sent=publisher.sent,
        send_rate=publisher.sent / publisher.send_seconds if publisher.send_seconds else 0.0,
        send_lag_max_ms=publisher.max_lag_s * 1000,
        answered=publisher.answered,
        http_errors=publisher.sent - publisher.answered,
        delivered=delivered,
        stray=stray,
        latency_ms=high.summary_ms(),
    )
    summary["errors"].update(publisher.errors)
    summary["live_room"].update(
        room=args.room,
        members=members,
        members_by_instance=by_target,
        center_members=counted,
        center_members_in_answers=publisher.members_seen,
        switches=(
            None
            if switched is None
            else {
                "source": switched.source,
                "document": switched.document,
                "version": switched.version,
            }
        ),
        mix=[
            {"name": k.name, "type": k.type, "pri": k.pri, "percent": k.percent}
            for k in liveroom.MIX
        ],
        kinds=rows,
        delivered_by_type={f"{t}/{p}": n for (t, p), n in sorted(by_type.items())},
        like_units=like_units,
        switch_drops={f"{t}/{r}": n for (t, r), n in sorted(drops.items())},
        allowed_drops=None if allowed is None else {t: sorted(r) for t, r in allowed.items()},
        unexpected_drops=unexpected,
        queue_drops=dict(queue_drops),
        high_shortfall=sum(r["shortfall"] for r in rows if r["pri"] == "high"),
        latency_ms={
            "high": high.summary_ms(),
            "probes_all": probe_latency.summary_ms(),
            "client_loop_lag": loop_lag.summary_ms(),
        },
        probes={
            "count": len(probes),
            "duplicates": sum(max(0, n - 1) for probe in probes for n in probe),
            "high_missing": sum(1 for probe in probes for seq in high_seqs if not probe[seq]),
        },
        room_reported_deliveries=room_delivered,
        room_writes=room_writes,
        messages_per_write=room_delivered / room_writes if room_writes else None,
        high_slow_by_second=slow_seconds(slow, summary["live_room"]["push_started"]),
    )


def slow_seconds(slow: Mapping[int, int], started: float) -> list[int]:
    """High-priority receipts over 100 ms in each second from the first push: whether the
    tail is spread over the run or comes from a few bad seconds."""
    first = int(started)
    last = max(slow, default=first)
    return [slow.get(second, 0) for second in range(first, last + 1)]


def _cpu(
    summary: dict[str, Any],
    watched: Watched,
    start: dict[str, tuple[float, float]],
    end: dict[str, tuple[float, float]],
    phase: float,
    box: float,
) -> None:
    """CPU by role, and of the whole box: `others` is what processes outside the run used
    (a busy neighbour makes every latency figure of the run worse)."""
    delivered = summary["delivered"]
    spent = watched.spent(start, end)
    summary["cpu_seconds"] = {role: {"user": u, "system": s} for role, (u, s) in spent.items()}
    percent = {role: 100 * (u + s) / phase if phase else 0.0 for role, (u, s) in spent.items()}
    ours = sum(percent.values())
    percent["box"] = 100 * box / phase if phase else 0.0
    percent["others"] = max(0.0, percent["box"] - ours)
    summary["live_room"]["cpu_percent"] = percent
    for role, (user, system) in spent.items():
        if delivered:
            summary[f"{role}_cpu_us_per_msg"] = (user + system) / delivered * 1e6


def table_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    live = summary["live_room"]
    high = live["latency_ms"]["high"]
    every = live["latency_ms"]["probes_all"]
    switches = live.get("switches")
    rows = [
        (
            "room",
            f"{live.get('room')}: {live.get('members')} members {live['members_by_instance']}",
        ),
        (
            "switches",
            "unchanged" if not switches else f"{switches['source']} v{switches['version']}",
        ),
        ("sent", f"{summary['sent']} ({summary['send_rate']:.0f}/s achieved)"),
        ("HTTP errors", str(summary["http_errors"])),
        ("delivered", f"{summary['delivered']} pushes (merged like = 1)"),
        ("high latency ms", _latency(high)),
        ("all latency ms", f"{_latency(every)} (probes)"),
        ("client loop lag ms", _latency(live["latency_ms"]["client_loop_lag"])),
        ("high > 100 ms / 10 s", " ".join(str(n) for n in _per_ten(live["high_slow_by_second"]))),
        ("high shortfall", str(live["high_shortfall"])),
        ("unexpected drops", json.dumps(live["unexpected_drops"])),
        ("queue drops", json.dumps(live["queue_drops"])),
        ("msgs per write", f"{live['messages_per_write'] or 0:.2f}"),
    ]
    for method, calls in live["center_rpc"].items():
        rows.append(
            (f"center RPC {method}", f"{calls['calls']:.0f} calls, {calls['mean_ms']:.2f} ms")
        )
    for role, spent in summary["cpu_seconds"].items():
        per_msg = summary.get(f"{role}_cpu_us_per_msg")
        if per_msg is not None:
            busy = live["cpu_percent"][role]
            total = spent["user"] + spent["system"]
            rows.append((f"{role} CPU/msg", f"{per_msg:.2f} us ({total:.1f} s, {busy:.0f} % core)"))
    box = live["cpu_percent"]
    rows.append(("box CPU", f"{box['box']:.0f} % core, {box['others']:.0f} % outside the run"))
    return rows


def _per_ten(counts: list[int]) -> list[int]:
    return [sum(counts[i : i + 10]) for i in range(0, len(counts), 10)]


def _latency(h: dict[str, float]) -> str:
    return f"p50 {h['p50']:.1f}  p99 {h['p99']:.1f}  max {h['max']:.1f}  (n={h['count']})"


def kinds_table(summary: dict[str, Any]) -> str:
    """Per kind: sent, expected, delivered, shortfall and what the switches dropped."""
    head = ("kind", "pri", "sent", "expected", "delivered", "shortfall", "dropped msgs", "unexpl.")
    lines = [head]
    for r in summary["live_room"]["kinds"]:
        dropped = ", ".join(f"{k} {v:.0f}" for k, v in sorted(r["dropped_msgs"].items()))
        lines.append(
            (
                r["name"],
                r["pri"],
                str(r["sent"]),
                str(r["expected"]),
                str(r["delivered"]),
                f"{r['shortfall']} ({r['shortfall_pct']:.1f} %)",
                dropped or "-",
                str(r["unexplained"]),
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in lines
    )

"""The upstream scenario of bench/flood.py: client `up` frames to the business webhook.

The tester serves the webhook itself (aiohttp on 127.0.0.1:--webhook-port, which the
product's `webhook` in the system's products TOML must name). Once the online events of the
logins have been posted (the webhook quiet for a moment), the workers send --rate `up`
frames per second for --duration seconds, each from a random online client, numbered
across workers and stamped with its send time. The report: frames sent, acknowledged
(`up_ack`) and refused (by code), received at the webhook, lost (acknowledged, never
posted), repeats, throughput at the webhook, latency from the client's send to the
webhook's receipt (p50/p99/max), and the room's CPU per frame.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web

from bench.latency import Histogram
from bench.scenario_clients import Plan
from bench.scenario_common import (
    Context,
    Scenario,
    cpu_sample,
    cpu_spent,
    latency_text,
    record_cpu,
)

#: The webhook counts as drained of the logins' events after this long without a POST.
QUIET_S = 1.0
EVENTS_WAIT_S = 30.0
MAX_BODY = 8 * 1024 * 1024


class Webhook:
    """The business end: takes every batch, times this run's messages."""

    def __init__(self, run: str, total: int) -> None:
        self.run = run
        self.count = bytearray(total)
        self.received = 0
        self.repeats = 0
        self.stray = 0
        self.events = 0
        self.batches = 0
        self.latency = Histogram()
        self.first = 0.0
        self.last = 0.0
        self.last_post = time.monotonic()

    def take(self, document: Any) -> None:
        """One posted batch, parsed."""
        self.batches += 1
        self.last_post = time.monotonic()
        if not isinstance(document, dict):
            return
        events = document.get("events")
        self.events += len(events) if isinstance(events, list) else 0
        messages = document.get("messages")
        if not isinstance(messages, list):
            return
        now = time.time_ns()
        for message in messages:
            body = message.get("body") if isinstance(message, dict) else None
            if not isinstance(body, dict) or body.get("run") != self.run:
                continue
            seq, sent = body.get("seq"), body.get("t")
            if type(seq) is not int or type(sent) is not int or not 0 <= seq < len(self.count):
                self.stray += 1
                continue
            if self.count[seq]:
                self.repeats += 1
            else:
                self.received += 1
                self.latency.add(now - sent)
                self.first = self.first or time.monotonic()
                self.last = time.monotonic()
            if self.count[seq] < 255:
                self.count[seq] += 1

    async def handle(self, request: web.Request) -> web.Response:
        try:
            document = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return web.json_response({"error": "not JSON"}, status=400)
        self.take(document)
        return web.json_response({})

    async def serve(self, port: int) -> web.AppRunner:
        app = web.Application(client_max_size=MAX_BODY)
        app.router.add_post("/{tail:.*}", self.handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        return runner


def add_arguments(add: Callable[..., Any]) -> None:
    add(
        "--webhook-port",
        type=int,
        default=None,
        help="upstream: serve the business webhook on 127.0.0.1:PORT (the port the "
        "product's webhook URL names in the system's --config)",
    )


def check(args: argparse.Namespace, error: Callable[[str], None]) -> None:
    if args.webhook_port is None:
        error("upstream needs --webhook-port: the port of the product's webhook URL")
    if args.no_auth or args.rate <= 0 or args.duration <= 0:
        error("upstream needs authenticated clients and a positive --rate and --duration")


def plan(args: argparse.Namespace) -> Plan:
    return Plan(
        transport=args.transport, dispatcher=args.dispatcher or "", route_batch=args.route_batch
    )


async def run(ctx: Context) -> None:
    args, fleet, summary = ctx.args, ctx.fleet, ctx.summary
    total = round(args.rate * args.duration)
    hook = Webhook(ctx.prefix, total)
    runner = await hook.serve(args.webhook_port)
    try:
        ctx.progress.extra = lambda: (
            f" | up sent {fleet.total('up_sent')} acked {fleet.total('up_acked')} "
            f"refused {fleet.total('up_refused')} at webhook {hook.received}"
        )
        deadline = time.monotonic() + EVENTS_WAIT_S
        while time.monotonic() - hook.last_post < QUIET_S and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        events = hook.events
        start = cpu_sample(ctx.watched)
        began = time.monotonic()
        procs = len(fleet.pipes)
        ctx.send(("up", args.rate / procs, total, procs, args.type))

        def settled() -> bool:
            answered = fleet.total("up_acked") + fleet.total("up_refused")
            return answered >= total and hook.received >= fleet.total("up_acked")

        await fleet.wait(settled, args.duration + args.grace)
        spent = cpu_spent(start, cpu_sample(ctx.watched))
        tallies = await fleet.tallies("scenario")
    finally:
        await runner.cleanup()
    refused: Counter[str] = Counter()
    for tally in tallies:
        refused.update(tally["up_refused"])
    acked = fleet.total("up_acked")
    window = hook.last - began if hook.received else 0.0
    summary.update(
        sent=fleet.total("up_sent"),
        delivered=hook.received,
        lost=max(0, acked - hook.received),
        duplicates=hook.repeats,
        stray=hook.stray,
        latency_ms=hook.latency.summary_ms(),
    )
    record_cpu(summary, spent, hook.received)
    summary["upstream"] = {
        "frames": total,
        "acked": acked,
        "refused": dict(refused.most_common()),
        "received": hook.received,
        "throughput_per_s": hook.received / window if window else 0.0,
        "batches": hook.batches,
        "events_before": events,
        "events_during": hook.events - events,
        "webhook_port": args.webhook_port,
    }


def table_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    found = summary.get("upstream")
    if not found:
        return []
    refused = ", ".join(f"{k} x{v}" for k, v in found["refused"].items()) or "none"
    return [
        ("up frames", f"{summary['sent']} sent, {found['acked']} acked"),
        ("refused", refused),
        ("at webhook", f"{found['received']} in {found['batches']} batches"),
        ("lost", f"{summary['lost']} (acked, never posted)"),
        ("duplicates", str(summary["duplicates"])),
        ("throughput", f"{found['throughput_per_s']:.0f} frames/s at the webhook"),
        ("up->webhook ms", latency_text(summary["latency_ms"])),
        ("room CPU/frame", f"{summary.get('room_cpu_us_per_msg') or 0:.1f} us"),
    ]


SCENARIO = Scenario(
    name="upstream",
    help="--rate `up` frames per second from random clients for --duration s to the "
    "product's webhook, served by the tester on --webhook-port: acked, refused, lost, "
    "throughput, up-to-webhook latency",
    plan=plan,
    run=run,
    table_rows=table_rows,
    add_arguments=add_arguments,
    check=check,
)

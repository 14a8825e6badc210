"""The churn scenario of bench/flood.py: clients drop and come back while QoS 1 pushes flow.

While --rate QoS 1 pushes per second go through center for --duration seconds, each to one
random client of the run, the workers drop --churn-rate random online clients per second
(a reset, as when a phone loses its network) and reconnect each after --down seconds, like
the SDK: through the dispatcher when there is one. After the stream every client must be
back, and every accepted push must reach its user's application exactly once: what was
written to a connection that dropped before its ACK is paged again at the next login, and
the client drops the ids it already had (counted as redelivered).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from bench.scenario_clients import Plan
from bench.scenario_common import (
    Context,
    Qos1Stream,
    Scenario,
    account_stream,
    cpu_sample,
    cpu_spent,
    deliveries,
    latency_text,
    merged,
    record_cpu,
    stream_progress,
)

GRACE_S = 15.0
DURATION_S = 20.0


def add_arguments(add: Callable[..., Any]) -> None:
    add(
        "--churn-rate",
        type=float,
        default=20.0,
        help="churn: clients dropped per second, all workers together (default 20)",
    )
    add(
        "--down",
        type=float,
        default=1.0,
        help="churn: seconds a dropped client stays away before reconnecting (default 1)",
    )


def defaults(args: argparse.Namespace) -> None:
    if args.duration is None:
        args.duration = DURATION_S
    if args.grace is None:
        args.grace = GRACE_S


def check(args: argparse.Namespace, error: Callable[[str], None]) -> None:
    if args.churn_rate <= 0 or args.down < 0:
        error("--churn-rate must be positive and --down at least 0")
    if args.no_auth or args.rate <= 0 or args.duration <= 0:
        error("churn needs authenticated clients and a positive --rate and --duration")


def plan(args: argparse.Namespace) -> Plan:
    return Plan(
        transport=args.transport,
        dispatcher=args.dispatcher or "",
        route_batch=args.route_batch,
        qos1=True,
        reconnect=True,
        churn_rate=args.churn_rate / args.procs,
        down_s=args.down,
    )


async def run(ctx: Context) -> None:
    args, fleet, summary = ctx.args, ctx.fleet, ctx.summary
    members = len(ctx.online)
    stream = Qos1Stream(args, ctx.api_key, ctx.uids(), ctx.prefix)
    line = stream_progress(stream, fleet)
    ctx.progress.extra = lambda: (
        f"{line()} dropped {fleet.total('churned')} back {fleet.total('reconnects')} "
        f"away {fleet.total('moving')}"
    )
    start = cpu_sample(ctx.watched)
    ctx.send("churn on")
    await stream.run()
    ctx.send("churn off")
    await deliveries(fleet, stream, members, args.grace)
    spent = cpu_spent(start, cpu_sample(ctx.watched))
    tallies = await fleet.tallies("scenario")
    account_stream(summary, stream, fleet)
    record_cpu(summary, spent, summary["delivered"])
    summary["churn"] = {
        "rate": args.churn_rate,
        "down_s": args.down,
        "drops": fleet.total("churned"),
        "server_closes": fleet.total("dropped"),
        "reconnects": fleet.total("reconnects"),
        "gave_up": fleet.total("gave_up"),
        "still_away": fleet.total("moving"),
        "online_end": fleet.total("online"),
        "members": members,
        "redelivered": fleet.total("redelivered"),
        "other_runs": fleet.total("foreign"),
        "acked": fleet.total("acked"),
        "back_ms": merged(t["reconnect_time"] for t in tallies).summary_ms(),
    }


def table_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    churn = summary.get("churn")
    if not churn:
        return []
    return [
        ("sent", f"{summary['sent']} qos 1 ({summary['send_rate']:.0f}/s achieved)"),
        ("accepted", f"{summary['accepted_online']} ({summary['http_errors']} HTTP errors)"),
        ("delivered", str(summary["delivered"])),
        ("lost", str(summary["lost"])),
        ("duplicates", f"{summary['duplicates']} at the application"),
        ("redelivered", f"{churn['redelivered']} (repeats the clients dropped)"),
        ("latency ms", latency_text(summary["latency_ms"])),
        ("drops", f"{churn['drops']} made, {churn['server_closes']} by the server"),
        ("reconnects", f"{churn['reconnects']} ({churn['gave_up']} gave up)"),
        ("back after ms", f"{latency_text(churn['back_ms'])} (drop to auth_ok, --down incl.)"),
        ("online at end", f"{churn['online_end']} of {churn['members']}"),
    ]


SCENARIO = Scenario(
    name="churn",
    help="--churn-rate clients per second drop and reconnect after --down s while --rate "
    "QoS 1 pushes per second flow for --duration s: lost, duplicates at the application, "
    "redeliveries, reconnect times",
    plan=plan,
    run=run,
    table_rows=table_rows,
    add_arguments=add_arguments,
    defaults=defaults,
    check=check,
)

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
    Qos1Phase,
    Scenario,
    latency_text,
    merged,
    moves_figures,
    routed_plan,
    stream_defaults,
    stream_rows,
)

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
    stream_defaults(args, DURATION_S)


def check(args: argparse.Namespace, error: Callable[[str], None]) -> None:
    if args.churn_rate <= 0 or args.down < 0:
        error("--churn-rate must be positive and --down at least 0")
    if args.no_auth or args.rate <= 0 or args.duration <= 0:
        error("churn needs authenticated clients and a positive --rate and --duration")


def plan(args: argparse.Namespace) -> Plan:
    return routed_plan(
        args, qos1=True, reconnect=True, churn_rate=args.churn_rate / args.procs, down_s=args.down
    )


async def run(ctx: Context) -> None:
    args, fleet = ctx.args, ctx.fleet
    phase = Qos1Phase(
        ctx,
        lambda: (
            f" dropped {fleet.total('churned')} back {fleet.total('reconnects')} "
            f"away {fleet.total('moving')}"
        ),
    )
    ctx.send("churn on")
    await phase.stream.run()
    ctx.send("churn off")
    tallies = await phase.finish()
    ctx.summary["churn"] = {
        "rate": args.churn_rate,
        "down_s": args.down,
        "drops": fleet.total("churned"),
        "reconnects": fleet.total("reconnects"),
        "members": phase.members,
        "acked": fleet.total("acked"),
        "back_ms": merged(t["reconnect_time"] for t in tallies).summary_ms(),
        **moves_figures(fleet),
    }


def table_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    churn = summary.get("churn")
    if not churn:
        return []
    return [
        *stream_rows(summary, churn["redelivered"]),
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

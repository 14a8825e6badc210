"""The connect scenario of bench/flood.py: a connect storm.

Every client connects and authenticates as fast as the workers can open sockets (at most
bench.clients.MAX_PENDING_CONNECTS in flight per worker, or --connect-rate). The report:
new authenticated connections per second over the storm, connect+auth time per client
(p50/p99/max, from the first step of its attempt to auth_ok), the clients that never came
online by reason, and the CPU each process spent per new connection.
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Callable
from typing import Any

from bench.scenario_clients import Plan
from bench.scenario_common import Context, Scenario, cpu_spent, merged, per_unit


def check(args: argparse.Namespace, error: Callable[[str], None]) -> None:
    if args.no_auth:
        error("connect measures authenticated connections; drop --no-auth")


def plan(args: argparse.Namespace) -> Plan:
    return Plan(
        transport=args.transport, dispatcher=args.dispatcher or "", route_batch=args.route_batch
    )


async def run(ctx: Context) -> None:
    tallies = await ctx.fleet.tallies("scenario")
    failures: Counter[str] = Counter()
    by_target: Counter[str] = Counter()
    for tally in tallies:
        failures.update(tally["failures"])
        by_target.update(tally["by_target"])
    spent = cpu_spent(ctx.cpu.start, ctx.cpu.ready)
    ctx.summary["connect"] = {
        "connect_ms": merged(t["connect_time"] for t in tallies).summary_ms(),
        "failures": dict(failures.most_common()),
        "by_target": dict(by_target),
        "route_requests": sum(t["route_requests"] for t in tallies),
        "cpu_seconds": {role: round(s, 3) for role, s in spent.items()},
        "cpu_us_per_conn": per_unit(spent, ctx.summary["connections"]),
    }


def table_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    connect = summary.get("connect")
    if not connect:
        return []
    ms = connect["connect_ms"]
    rows = [
        ("connect+auth ms", f"p50 {ms['p50']:.1f}  p99 {ms['p99']:.1f}  max {ms['max']:.1f}"),
        ("failures", ", ".join(f"{k} x{v}" for k, v in connect["failures"].items()) or "none"),
        ("by target", ", ".join(f"{k} {v}" for k, v in connect["by_target"].items())),
    ]
    if connect["route_requests"]:
        rows.append(("route requests", str(connect["route_requests"])))
    for role, value in connect["cpu_us_per_conn"].items():
        if value is not None:
            rows.append((f"{role} CPU/conn", f"{value:.0f} us"))
    return rows


SCENARIO = Scenario(
    name="connect",
    help="connect storm: every client connects and authenticates as fast as possible; new "
    "authenticated connections/s, connect+auth time p50/p99/max, failures by reason, CPU "
    "per new connection (shape it with --clients, --procs, --sources, --connect-rate)",
    plan=plan,
    run=run,
    table_rows=table_rows,
    check=check,
)

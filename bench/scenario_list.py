"""The scenarios bench/flood.py runs besides idle, unicast and room, and what they add to
it: their options (and the dispatcher's), defaults, checks, --help text and client plan."""

from __future__ import annotations

import argparse
import textwrap
from collections.abc import Callable
from typing import Any

from bench import (
    scenario_broadcast,
    scenario_churn,
    scenario_connect,
    scenario_drain,
    scenario_upstream,
)
from bench.scenario_clients import Plan
from bench.scenario_common import Scenario

SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        scenario_connect.SCENARIO,
        scenario_broadcast.SCENARIO,
        scenario_churn.SCENARIO,
        scenario_drain.SCENARIO,
        scenario_upstream.SCENARIO,
    )
}
#: Scenarios whose pushes are numbered 0 .. rate x duration - 1, one recipient each.
SEQUENCED = ("churn", "drain")
#: The line of flood.py's docstring that --help replaces with these scenarios.
PLACEHOLDER = "  connect, broadcast, churn, drain, upstream: see bench/scenario_*.py (or --help)."
EPILOG = """examples (`im up --rooms 2 --base-port 32090 --center-port 32080 --register-port 32070
--dispatcher-port 32081` running):
  connect storm into one instance, 10,000 TCP clients from 4 processes:
    flood.py --scenario connect --clients 10000 --procs 4 --transport tcp --rooms 1 \\
      --base-port 32090 --center http://127.0.0.1:32080 --register-port 32070
  a broadcast spread over 10 s, addresses from the dispatcher, one route per 100 clients:
    flood.py --scenario broadcast --clients 2000 --spread 10 \\
      --dispatcher http://127.0.0.1:32081 --route-batch 100 --center http://127.0.0.1:32080
  50 drops/s while 200 QoS 1 pushes/s flow for 30 s:
    flood.py --scenario churn --clients 2000 --rate 200 --duration 30 --churn-rate 50 \\
      --rooms 2 --base-port 32090 --center http://127.0.0.1:32080 --register-port 32070
  drain room 0 under 200 QoS 1 pushes/s, clients moving through the dispatcher:
    flood.py --scenario drain --clients 10000 --rate 200 --drain-window 30 \\
      --dispatcher http://127.0.0.1:32081 --base-port 32090 \\
      --center http://127.0.0.1:32080 --register-port 32070
  2,000 up frames/s to the webhook the tester serves on 32099 (the products TOML given to
  `im up --config` has webhook = "http://127.0.0.1:32099/im"; the same --config here):
    flood.py --scenario upstream --clients 2000 --rate 2000 --duration 20 \\
      --webhook-port 32099 --config products.toml --base-port 32090 \\
      --center http://127.0.0.1:32080
"""


def description(doc: str | None) -> str:
    """flood.py's docstring with these scenarios listed in its own layout."""
    listed = "\n".join(
        textwrap.fill(s.help, 89, initial_indent=f"  {name} ".ljust(11), subsequent_indent=" " * 11)
        for name, s in SCENARIOS.items()
    )
    return (doc or "").replace(PLACEHOLDER, listed)


def add_arguments(add: Callable[..., Any]) -> None:
    add(
        "--dispatcher",
        default=None,
        metavar="URL",
        help="ask this dispatcher (GET /v1/route) where each client connects and reconnects, "
        "instead of --targets or computed ports; its list for a probe uid says which room "
        "processes to measure",
    )
    add(
        "--route-batch",
        type=int,
        default=1,
        help="with --dispatcher: first connects share one route request per this many "
        "consecutive clients (default 1: one per client)",
    )
    for scenario in SCENARIOS.values():
        if scenario.add_arguments is not None:
            scenario.add_arguments(add)


def defaults(args: argparse.Namespace) -> None:
    """The scenario's own defaults, before flood.py's common ones."""
    scenario = SCENARIOS.get(args.scenario)
    if scenario is not None and scenario.defaults is not None:
        scenario.defaults(args)


def check(args: argparse.Namespace, error: Callable[[str], None]) -> None:
    if args.route_batch < 1:
        error("--route-batch must be at least 1")
    if args.dispatcher and (args.targets or args.scenario == "room"):
        error("--dispatcher replaces --targets; the room scenario places members by target")
    scenario = SCENARIOS.get(args.scenario)
    if scenario is not None and scenario.check is not None:
        scenario.check(args, error)


def client_plan(args: argparse.Namespace) -> Plan | None:
    """How the clients behave beyond the plain worker's connect and count; None: plain."""
    scenario = SCENARIOS.get(args.scenario)
    if scenario is not None:
        return scenario.plan(args)
    if args.dispatcher:
        return Plan(
            transport=args.transport, dispatcher=args.dispatcher, route_batch=args.route_batch
        )
    return None

"""The drain scenario of bench/flood.py: an instance is drained under a QoS 1 stream.

Every client first connects to the instance to drain (--drain-instance, found in the
register's node table). --rate QoS 1 pushes per second flow for --duration seconds, each to
one random client; --drain-after seconds in, `im drain` starts a drain of --drain-window
seconds. Each client follows its reconnect hint like the SDK: it closes, waits after_ms and
connects elsewhere, through the dispatcher (the old address as `retry`) or to the next
target. The report: lost (0 expected: what was not ACKed stays in the saver and is paged
at the next login), duplicates at the application, each client's time from hint to auth_ok
elsewhere, and whether every client was back before the instance's deadline (the window
plus the grace after which it closes whoever is left).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from bench.clients import Target
from bench.latency import Histogram
from bench.scenario_clients import Plan
from bench.scenario_common import (
    Context,
    Qos1Phase,
    Scenario,
    ScenarioError,
    cpu_sample,
    latency_text,
    moves_figures,
    sleep_until,
    stream_defaults,
    stream_rows,
)
from im.register_client import RegisterClient
from im.rpc import RpcError
from im.sessions import Node

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: The room closes a client still there this long after its hint (room/drain.py).
LEAVE_GRACE_S = 3.0
DRAIN_COMMAND_TIMEOUT_S = 30.0
TAIL_S = 5.0  # default stream time after the window


class DrainFailed(ScenarioError):
    """The instance could not be found or `im drain` refused."""


def register_address(args: argparse.Namespace) -> str:
    return f"{args.host}:{args.register_port}"


async def find_node(register: str, instance: str) -> Node:
    """The live instance named `instance` (or with that RPC address) in the node table."""
    store = RegisterClient(register)
    try:
        nodes = await store.nodes()
    except (RpcError, OSError, TimeoutError) as exc:
        raise DrainFailed(f"register {register}: {exc}") from None
    finally:
        await store.close()
    for node in nodes:
        if instance in (node.instance, node.rpc):
            return node
    live = ", ".join(f"{n.instance} ({n.rpc})" for n in nodes) or "none"
    raise DrainFailed(f"no live room instance {instance!r} in the register (live: {live})")


def client_target(node: Node, transport: str) -> Target:
    address = node.tcp if transport == "tcp" else node.ws
    if not address:
        raise DrainFailed(f"instance {node.instance} has no {transport} address")
    return Target.parse(address, transport)


async def im_drain(register: str, instance: str, window_s: float) -> dict[str, Any]:
    """Run `im drain` as an operator would; its JSON answer."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "im", "drain", instance, "--register", register,
        "--window-s", str(window_s),
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(process.communicate(), DRAIN_COMMAND_TIMEOUT_S)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise DrainFailed("im drain did not answer") from None
    if process.returncode != 0:
        raise DrainFailed(f"im drain failed: {err.decode(errors='replace').strip()[-300:]}")
    return json.loads(out)


def add_arguments(add: Callable[..., Any]) -> None:
    add(
        "--drain-instance",
        default=None,
        metavar="NAME|HOST:PORT",
        help="drain: the room instance to drain, by name or RPC address (default: room 0 of "
        "`im up`, RPC on --host:BASE+100); found in the register at --host:--register-port",
    )
    add(
        "--drain-window",
        type=float,
        default=30.0,
        help="drain: the drain window in seconds: hints are spread over it (default 30)",
    )
    add(
        "--drain-after",
        type=float,
        default=2.0,
        help="drain: seconds of stream before `im drain` starts (default 2)",
    )


def defaults(args: argparse.Namespace) -> None:
    stream_defaults(args, args.drain_after + args.drain_window + TAIL_S)
    if args.drain_instance is None:
        args.drain_instance = f"{args.host}:{args.base_port + 100}"


def check(args: argparse.Namespace, error: Callable[[str], None]) -> None:
    if args.no_auth or args.rate <= 0:
        error("drain needs authenticated clients and a positive --rate")
    if args.drain_window < 0 or args.drain_after < 0:
        error("--drain-window and --drain-after must be at least 0")
    if args.duration < args.drain_after:
        error("--duration must cover --drain-after: the stream starts the drain")
    if not args.dispatcher and not args.targets and args.rooms < 2:
        error("drain needs another instance to move to: --rooms 2 or more, or --dispatcher")


def plan(args: argparse.Namespace) -> Plan:
    node = asyncio.run(find_node(register_address(args), args.drain_instance))
    return Plan(
        transport=args.transport,
        dispatcher=args.dispatcher or "",
        first=client_target(node, args.transport),
        qos1=True,
        reconnect=True,
    )


async def run(ctx: Context) -> None:
    args, fleet, summary = ctx.args, ctx.fleet, ctx.summary
    register = register_address(args)
    node = await find_node(register, args.drain_instance)
    phase = Qos1Phase(
        ctx,
        lambda: (
            f" hinted {fleet.total('hints')} moved {fleet.total('reconnects')} "
            f"away {fleet.total('moving')}"
        ),
    )
    begun = time.monotonic()
    pushing = asyncio.create_task(phase.stream.run())
    await sleep_until(begun + args.drain_after)
    drain_at = time.time()
    try:
        answer = await im_drain(register, node.rpc, args.drain_window)
    except DrainFailed as exc:
        summary["errors"][str(exc)] = 1
        answer = {}
    await pushing
    tallies = await phase.finish()
    moves = [move for tally in tallies for move in tally["moves"]]
    by_target: Counter[str] = Counter()
    for tally in tallies:
        by_target.update(tally["by_target"])
    alive = cpu_sample(ctx.watched)["room"]
    summary["drain"] = drain_figures(args, node, answer, drain_at, moves, phase.members)
    summary["drain"].update(
        hints=fleet.total("hints"),
        by_target=dict(by_target),
        room_pids_exited=[pid for pid in ctx.cpu.start["room"] if pid not in alive],
        **moves_figures(fleet),
    )


def drain_figures(
    args: argparse.Namespace,
    node: Node,
    answer: dict[str, Any],
    drain_at: float,
    moves: list[tuple[float, float, int]],
    members: int,
) -> dict[str, Any]:
    """Reconnect times and the window check from (hint, back online, after_ms) per client."""
    hint_to_back, after_wait = Histogram(), Histogram()
    last_back = 0.0
    for hinted, back, after_ms in moves:
        hint_to_back.add(int((back - hinted) * 1e9))
        after_wait.add(int((back - hinted - after_ms / 1000) * 1e9))
        last_back = max(last_back, back - drain_at)
    deadline = args.drain_window + LEAVE_GRACE_S
    return {
        "instance": node.instance,
        "rpc": node.rpc,
        "answer": answer,
        "window_s": args.drain_window,
        "members": members,
        "reconnected": len(moves),
        "hint_to_back_ms": hint_to_back.summary_ms(),
        "back_after_wait_ms": after_wait.summary_ms(),
        "last_back_s": last_back,
        "deadline_s": deadline,
        "all_back_in_window": len(moves) == members and last_back <= deadline,
    }


def table_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    drain = summary.get("drain")
    if not drain:
        return []
    return [
        ("drained", f"{drain['instance']} ({drain['rpc']}), window {drain['window_s']:g} s"),
        *stream_rows(summary, drain["redelivered"]),
        ("reconnected", f"{drain['reconnected']} of {drain['members']} after a hint"),
        ("hint to back ms", latency_text(drain["hint_to_back_ms"])),
        ("minus after_ms", latency_text(drain["back_after_wait_ms"])),
        (
            "last back",
            f"{drain['last_back_s']:.1f} s after the drain began (deadline "
            f"{drain['deadline_s']:g} s): {'all in' if drain['all_back_in_window'] else 'NOT'}",
        ),
        ("server closes", str(drain["server_closes"])),
        ("now on", ", ".join(f"{k} {v}" for k, v in drain["by_target"].items())),
    ]


SCENARIO = Scenario(
    name="drain",
    help="every client on one instance; --rate QoS 1 pushes/s flow while `im drain` moves "
    "them over --drain-window s: lost (0 expected), duplicates, hint-to-reconnect time per "
    "client, whether all were back in the window",
    plan=plan,
    run=run,
    table_rows=table_rows,
    add_arguments=add_arguments,
    defaults=defaults,
    check=check,
)

"""The broadcast scenario of bench/flood.py: broadcasts to every client, optionally spread.

--broadcasts numbered broadcasts go through center (POST /v1/push/broadcast) at --rate per
second, each with --spread seconds (spread_s: every room instance paces its deliveries over
that window). Each client tallies what it receives per number, so the report has, over
clients x accepted broadcasts: delivered, lost, repeats the application saw, latency from
the API call to receipt, and how evenly the deliveries fell over the spread window (counts
per tenth of it, and the smallest over the largest).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

from bench.latency import BUCKET_NS, MAX_BUCKET, Histogram
from bench.poster import PacedPoster
from bench.scenario_clients import Plan
from bench.scenario_common import (
    Context,
    Scenario,
    cpu_sample,
    cpu_spent,
    latency_text,
    merged,
    record_cpu,
    routed_plan,
)

BINS = 10
#: The latency histogram stops at MAX_BUCKET; a longer spread could not be binned.
MAX_SPREAD_S = MAX_BUCKET * BUCKET_NS / 1e9 / 1.2


def spread_bins(buckets: dict[int, int], spread_s: float, bins: int = BINS) -> list[int]:
    """Deliveries per 1/bins of the spread window, by delay after the API call; later
    ones count in the last bin."""
    counts = [0] * bins
    width_ns = spread_s * 1e9 / bins
    for index, n in buckets.items():
        counts[min(bins - 1, int(index * BUCKET_NS / width_ns))] += n
    return counts


def evenness(counts: list[int]) -> float:
    """Smallest bin over largest: 1.0 is perfectly even."""
    return min(counts) / max(counts) if counts and max(counts) else 0.0


class Broadcaster(PacedPoster):
    def __init__(self, args: argparse.Namespace, api_key: str, run: str) -> None:
        url = args.center.rstrip("/") + "/v1/push/broadcast"
        super().__init__(url, api_key, args.rate, args.broadcasts, args.http_concurrency)
        self.args = args
        self.run_tag = run
        self.accepted = bytearray(args.broadcasts)

    def payload(self, seq: int) -> dict[str, Any]:
        args = self.args
        return {
            "type": args.type,
            "pri": args.pri,
            "qos": args.qos,
            "body": {"seq": seq, "t": time.time_ns(), "run": self.run_tag},
            "spread_s": args.spread,
        }

    def answer(self, seq: int, document: Any) -> str | None:
        if not isinstance(document, dict) or not isinstance(document.get("id"), str):
            return f"answer without an 'id': {str(document)[:120]}"
        self.accepted[seq] = 1
        return None


def add_arguments(add: Callable[..., Any]) -> None:
    add(
        "--broadcasts",
        type=int,
        default=1,
        help="broadcast: how many numbered broadcasts to send, --rate per second (default 1)",
    )
    add(
        "--spread",
        type=float,
        default=0.0,
        help="broadcast: spread_s of each broadcast, seconds over which every room instance "
        f"paces its deliveries (0 to {MAX_SPREAD_S:.0f}; default 0: at once)",
    )
    add(
        "--qos",
        type=int,
        choices=(0, 1),
        default=0,
        help="broadcast: 0 at most once, 1 stored once and ACKed by the clients (default 0)",
    )


def check(args: argparse.Namespace, error: Callable[[str], None]) -> None:
    if args.broadcasts < 1:
        error("--broadcasts must be at least 1")
    if not 0 <= args.spread <= MAX_SPREAD_S:
        error(f"--spread must be between 0 and {MAX_SPREAD_S:.0f}")
    if args.no_auth:
        error("broadcast needs authenticated clients; drop --no-auth")


def plan(args: argparse.Namespace) -> Plan:
    return routed_plan(args, qos1=args.qos == 1, broadcasts=args.broadcasts)


async def run(ctx: Context) -> None:
    args, fleet, summary = ctx.args, ctx.fleet, ctx.summary
    members = len(ctx.online)
    poster = Broadcaster(args, ctx.api_key, ctx.prefix)

    def expected() -> int:
        return sum(poster.accepted) * members

    ctx.progress.extra = lambda: (
        f" | broadcasts sent {poster.sent} accepted {poster.answered} "
        f"received {fleet.total('bcast_first')}/{expected()}"
    )
    start = cpu_sample(ctx.watched)
    begun = time.monotonic()
    await poster.run()
    await fleet.wait(lambda: fleet.total("bcast_first") >= expected(), args.spread + args.grace)
    took = time.monotonic() - begun
    spent = cpu_spent(start, cpu_sample(ctx.watched))
    tallies = await fleet.tallies("scenario")
    receivers = [sum(column) for column in zip(*(t["receivers"] for t in tallies), strict=True)]
    latency = merged(t["bcast_latency"] for t in tallies)
    accepted = [seq for seq in range(args.broadcasts) if poster.accepted[seq]]
    delivered = sum(receivers)
    summary.update(
        sent=poster.sent,
        answered=poster.answered,
        accepted_online=expected(),
        http_errors=poster.sent - poster.answered,
        delivered=delivered,
        lost=sum(members - receivers[seq] for seq in accepted),
        duplicates=sum(t["bcast_repeats"] for t in tallies),
        stray=sum(t["bcast_stray"] for t in tallies),
        latency_ms=latency.summary_ms(),
    )
    summary["errors"].update(poster.errors)
    record_cpu(summary, spent, delivered)
    bins = spread_bins(latency.buckets, args.spread) if args.spread else []
    summary["broadcast"] = {
        "members": members,
        "broadcasts": args.broadcasts,
        "accepted": len(accepted),
        "qos": args.qos,
        "spread_s": args.spread,
        "receivers": receivers,
        "redelivered": fleet.total("redelivered"),
        "other_runs": fleet.total("foreign"),
        "first_ms": _first_ms(latency),
        "phase_s": took,
        "bins": bins,
        "evenness": evenness(bins) if bins else None,
    }


def _first_ms(latency: Histogram) -> float:
    """The earliest delivery's delay, to the bucket."""
    return min(latency.buckets, default=0) * BUCKET_NS / 1e6


def table_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    found = summary.get("broadcast")
    if not found:
        return []
    rows = [
        ("broadcasts", f"{found['accepted']}/{found['broadcasts']} accepted, qos {found['qos']}"),
        ("members", str(found["members"])),
        ("delivered", f"{summary['delivered']} of {summary['accepted_online']}"),
        ("lost", str(summary["lost"])),
        ("duplicates", f"{summary['duplicates']} (redelivered, dropped: {found['redelivered']})"),
        ("latency ms", latency_text(summary["latency_ms"])),
    ]
    if found["bins"]:
        width = found["spread_s"] / len(found["bins"])
        rows.append(
            (
                f"per {width:g} s",
                " ".join(str(n) for n in found["bins"])
                + f"  (evenness {found['evenness']:.2f}, first {found['first_ms']:.0f} ms)",
            )
        )
    per_msg = summary.get("room_cpu_us_per_msg")
    if per_msg is not None:
        rows.append(("room CPU/frame", f"{per_msg:.2f} us"))
    return rows


SCENARIO = Scenario(
    name="broadcast",
    help="--broadcasts broadcasts to every client through center, each spread over --spread "
    "seconds: delivered, lost, duplicates, latency, evenness of the spread, CPU per frame",
    plan=plan,
    run=run,
    table_rows=table_rows,
    add_arguments=add_arguments,
    check=check,
)

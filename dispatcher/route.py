"""Which room instances a client should try, in order: pure rules over the node table.

The first address is sticky per user: rendezvous (highest-random-weight) hashing of
(product, uid) over the usable instances of the client's IDC, so a user lands on the same
instance while it is healthy and only the users of an instance that goes away move. The
rest of the list follows the same per-user scores, so the users of a failed instance spread
evenly over all the others instead of piling onto one neighbour. Instances of other IDCs
come after the client's own.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

from im.sessions import Node

TRANSPORTS = ("ws", "tcp")

#: Outcomes of `plan`.
OK = "ok"
NO_NODES = "no_nodes"  # no instance offers the transport at all
EXHAUSTED = "exhausted"  # the client's retries excluded every instance
SATURATED = "saturated"  # every instance left is draining or at one of its limits


@dataclass(frozen=True, slots=True)
class RouteQuery:
    """A client's question: who it is, how it connects, and what already failed for it."""

    product: str
    uid: str
    transport: str = "ws"
    idc: str = ""
    isp: str = ""
    retry: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Plan:
    """The answer: addresses in order when `outcome` is OK; else `pressure` (0 to 1) says
    how deep the remaining instances are past their limits."""

    outcome: str
    addresses: tuple[str, ...] = ()
    pressure: float = 0.0


def address(node: Node, transport: str) -> str:
    """The URL a client dials for `node` over `transport`; "" when it does not serve it. A
    TLS listener publishes its TCP address with its scheme (tcps://), a plain one without."""
    if transport == "tcp":
        if not node.tcp or "://" in node.tcp:
            return node.tcp
        return f"tcp://{node.tcp}"
    return node.ws


def user_key(product: str, uid: str) -> bytes:
    # Product and uid never hold control characters (the query parser refuses them), so the
    # NUL separator keeps ("a", "b\0c") and ("a\0b", "c") apart.
    return hashlib.blake2b(f"{product}\0{uid}".encode(), digest_size=8).digest()


def score(user: bytes, instance: str) -> int:
    """The user's weight for an instance: stable across processes, releases and restarts."""
    return int.from_bytes(hashlib.blake2b(user + instance.encode(), digest_size=8).digest())


def usable(node: Node) -> bool:
    """Whether an instance takes new connections now."""
    if node.draining:
        return False
    if node.max_conns and node.conns >= node.max_conns:
        return False
    return not (node.max_conn_rate and node.conn_rate >= node.max_conn_rate)


def pressure(node: Node) -> float:
    """How long an instance is likely to stay closed to new connections, 0 to 1: draining or
    full stays so for a while; a connection rate at its limit clears within about a second,
    later the further past the limit it is (twice the limit counts as 1)."""
    if node.draining or (node.max_conns and node.conns >= node.max_conns):
        return 1.0
    if node.max_conn_rate:
        return min(1.0, max(0.0, node.conn_rate / node.max_conn_rate - 1.0))
    return 0.0


def _tier(node: Node, query: RouteQuery) -> int:
    """0 for the client's IDC and ISP, 1 its IDC only, 2 its ISP only, 3 neither; a client
    that names no IDC (or ISP) is at home everywhere."""
    other_idc = bool(query.idc) and node.idc != query.idc
    other_isp = bool(query.isp) and node.isp != query.isp
    return 2 * other_idc + other_isp


def plan(nodes: Iterable[Node], query: RouteQuery, limit: int) -> Plan:
    """At most `limit` addresses for `query` over the live instances `nodes`."""
    offered = [(url, node) for node in nodes if (url := address(node, query.transport))]
    if not offered:
        return Plan(NO_NODES)
    left = [(url, node) for url, node in offered if url not in query.retry]
    if not left:
        return Plan(EXHAUSTED)
    candidates = [(url, node) for url, node in left if usable(node)]
    if not candidates:
        return Plan(SATURATED, pressure=sum(pressure(node) for _, node in left) / len(left))
    user = user_key(query.product, query.uid)
    candidates.sort(key=lambda c: (_tier(c[1], query), -score(user, c[1].instance), c[0]))
    addresses: list[str] = []
    for url, _ in candidates:
        if url not in addresses:  # two instances misconfigured with one address
            addresses.append(url)
            if len(addresses) == limit:
                break
    return Plan(OK, tuple(addresses))


def retry_after_ms(pressure: float, rand: float, low_ms: int, high_ms: int) -> int:
    """A wait drawn from [low_ms, upper] with `rand` in [0, 1), so that clients turned away
    together come back spread out; upper rises from twice low_ms (just saturated) to high_ms
    (pressure 1), spreading a deeper overload over a longer time."""
    upper = max(min(2 * low_ms, high_ms), low_ms + (high_ms - low_ms) * pressure)
    return int(low_ms + (upper - low_ms) * rand)

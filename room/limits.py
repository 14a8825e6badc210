"""The room's defences against hostile clients, as pure rules: no sockets, no event loop.

Per address: an allow/deny list, a cap on open connections and a rate of new ones. Per
connection: a rate of inbound frames, and deadlines for a socket that stays too full to
write to (a client that does not read) and for a frame that stays half-received (a
slowloris). The gateway asks `opened` before it keeps a connection, tells `closed`, and
closes whatever `expired` returns on its once-a-second sweep; connections report their
own transitions (paused, partial) so that the steady path costs nothing.

Rates are GCRA (one "theoretical arrival time" per key instead of a token count and a
stamp): a key may run `2 x rate` ahead of its schedule before it is refused.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from im.protocol.errors import ErrorCode

if TYPE_CHECKING:
    from room.config import RoomConfig

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Refusal = tuple[ErrorCode, str]

#: Addresses whose connection rate is remembered; past this many, new ones go unmetered
#: (and are counted as `address_table_full`) rather than grow memory without bound.
MAX_ADDRESSES = 100_000
#: The per-address limits count IPv6 clients by their /64: one subscriber gets a whole one.
IPV6_PREFIX = 64
BURST = 2.0  # a rate allows this many seconds' worth at once


def networks(text: str, name: str = "networks") -> tuple[Network, ...]:
    """Comma-separated CIDRs (a bare address is one host); ValueError naming the bad one."""
    found: list[Network] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            found.append(ipaddress.ip_network(part, strict=False))
        except ValueError as exc:
            raise ValueError(f"{name}: {part!r} is not a CIDR network: {exc}") from None
    return tuple(found)


def _address(host: object) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if not isinstance(host, str):
        return None
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def address_key(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """What the per-address limits count by: the IPv4 address, or the IPv6 /64."""
    if isinstance(ip, ipaddress.IPv4Address):
        return str(ip)
    return str(ipaddress.IPv6Network((ip, IPV6_PREFIX), strict=False))


def _within(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, nets: Iterable[Network]) -> bool:
    return any(ip in net for net in nets)


class Watched(Protocol):
    """The fields of a connection the limits keep their state in (no object per connection)."""

    ip: str  # the address key counted for it; "" when not counted
    tat: float  # frame rate: when its next frame is due on schedule
    partial_at: float  # when its current half-received frame began; 0 = none


@dataclass(frozen=True, slots=True)
class LimitSettings:
    """Zero turns a count or rate off; the deadlines are in seconds."""

    max_conns_per_ip: int = 0
    conn_rate_per_ip: float = 0.0
    exempt: tuple[Network, ...] = ()
    allow: tuple[Network, ...] = ()
    deny: tuple[Network, ...] = ()
    frame_rate: float = 0.0
    slow_sender_s: float = 15.0
    slow_reader_s: float = 30.0
    max_addresses: int = MAX_ADDRESSES

    @classmethod
    def from_config(cls, config: RoomConfig) -> LimitSettings:
        return cls(
            max_conns_per_ip=config.max_conns_per_ip,
            conn_rate_per_ip=config.conn_rate_per_ip,
            exempt=networks(config.limit_exempt, "limit_exempt"),
            allow=networks(config.ip_allow, "ip_allow"),
            deny=networks(config.ip_deny, "ip_deny"),
            frame_rate=config.frame_rate,
            slow_sender_s=config.slow_sender_s,
            slow_reader_s=config.slow_reader_s,
        )


def _schedule(rate: float) -> tuple[float, float]:
    """(seconds per event, how far ahead of schedule a key may run) for a GCRA rate."""
    if not rate:
        return 0.0, 0.0
    interval = 1.0 / rate
    # The slack keeps float rounding from costing a burst its last event.
    return interval, max(BURST * rate - 1.0, 0.0) * interval + 1e-9


class Limits:
    """One instance's limits; `counts` says how often each one bit, for /metrics."""

    __slots__ = (
        "settings",
        "clock",
        "per_address",
        "counts",
        "_arrivals",
        "_paused",
        "_partial",
        "_conn_interval",
        "_conn_tau",
        "_frame_interval",
        "_frame_tau",
    )

    def __init__(self, settings: LimitSettings, clock: Callable[[], float]) -> None:
        self.settings = settings
        self.clock = clock
        self.per_address: dict[str, int] = {}  # open connections by address key
        self.counts: Counter[str] = Counter()  # times each limit refused or closed one
        self._arrivals: dict[str, float] = {}  # address key -> when its next one is due
        self._paused: dict[Watched, float] = {}  # connections we cannot write to, since
        self._partial: set[Watched] = set()  # connections holding half a frame
        self._conn_interval, self._conn_tau = _schedule(settings.conn_rate_per_ip)
        self._frame_interval, self._frame_tau = _schedule(settings.frame_rate)

    @property
    def tracked_addresses(self) -> int:
        return len(self._arrivals)

    @property
    def paused(self) -> int:
        return len(self._paused)

    def _refuse(self, limit: str, code: ErrorCode, reason: str) -> Refusal:
        self.counts[limit] += 1
        return code, reason

    def opened(self, conn: Watched, host: object) -> Refusal | None:
        """Admit a new connection from `host` (its peer IP) and count it, or say why not.

        A peer without an IP (a Unix socket) passes. The allow/deny list applies to every
        address; the per-address count and rate skip the exempt networks.
        """
        ip = _address(host)
        if ip is None:
            return None
        s = self.settings
        if _within(ip, s.deny) or (s.allow and not _within(ip, s.allow)):
            return self._refuse(
                "address_denied", ErrorCode.ADDRESS_DENIED, "this address may not connect here"
            )
        if _within(ip, s.exempt):
            return None
        key = address_key(ip)
        if self._conn_interval and not self._arrive(key):
            return self._refuse(
                "connection_rate",
                ErrorCode.CONNECTION_RATE,
                f"more than {s.conn_rate_per_ip:g} new connections a second from this address",
            )
        count = self.per_address.get(key, 0)
        if s.max_conns_per_ip and count >= s.max_conns_per_ip:
            return self._refuse(
                "connections_per_address",
                ErrorCode.TOO_MANY_CONNECTIONS,
                f"this address already holds {count} connections, the limit here",
            )
        self.per_address[key] = count + 1
        conn.ip = key
        return None

    def _arrive(self, key: str) -> bool:
        now = self.clock()
        tat = self._arrivals.get(key)
        if tat is None:
            if len(self._arrivals) >= self.settings.max_addresses:
                self.counts["address_table_full"] += 1
                return True
            tat = now
        elif tat < now:
            tat = now
        if tat - now > self._conn_tau:
            return False
        self._arrivals[key] = tat + self._conn_interval
        return True

    def frame_allowed(self, conn: Watched) -> bool:
        """Count one inbound frame against the connection's rate; False when over it."""
        interval = self._frame_interval
        if not interval:
            return True
        now = self.clock()
        tat = conn.tat if conn.tat > now else now
        if tat - now > self._frame_tau:
            self.counts["frame_rate"] += 1
            return False
        conn.tat = tat + interval
        return True

    def writable(self, conn: Watched, ok: bool) -> None:
        """The transport paused (`ok` False) or resumed writing to the connection."""
        if ok:
            self._paused.pop(conn, None)
        else:
            self._paused.setdefault(conn, self.clock())

    def partial(self, conn: Watched, pending: bool) -> None:
        """The connection started holding half a frame (`pending`) or got it whole."""
        if pending:
            if not conn.partial_at:
                conn.partial_at = self.clock()
                self._partial.add(conn)
        elif conn.partial_at:
            conn.partial_at = 0.0
            self._partial.discard(conn)

    def closed(self, conn: Watched) -> None:
        """Forget the connection; safe to call more than once."""
        key = conn.ip
        if key:
            conn.ip = ""
            left = self.per_address[key] - 1
            if left:
                self.per_address[key] = left
            else:
                del self.per_address[key]
        self._paused.pop(conn, None)
        if conn.partial_at:
            conn.partial_at = 0.0
            self._partial.discard(conn)

    def expired(self) -> list[tuple[Watched, ErrorCode, str]]:
        """Connections past the slow-reader or slow-sender deadline, to be closed; also
        forgets the addresses whose rate has fully recovered."""
        now = self.clock()
        s = self.settings
        due: list[tuple[Watched, ErrorCode, str]] = []
        for conn, since in self._paused.items():
            if now - since >= s.slow_reader_s:
                due.append(
                    (
                        conn,
                        ErrorCode.SLOW_CONSUMER,
                        f"the connection did not read for {s.slow_reader_s:g} s",
                    )
                )
        readers = len(due)
        for conn in self._partial:
            if now - conn.partial_at >= s.slow_sender_s:
                due.append(
                    (
                        conn,
                        ErrorCode.SLOW_SENDER,
                        f"a frame took more than {s.slow_sender_s:g} s to arrive",
                    )
                )
        if readers:
            self.counts["slow_reader"] += readers
        if len(due) > readers:
            self.counts["slow_sender"] += len(due) - readers
        if self._arrivals:
            self._arrivals = {k: tat for k, tat in self._arrivals.items() if tat > now}
        return due

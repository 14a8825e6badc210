"""Counters of the room instances in this process, kept as plain integers on the hot path
and turned into Prometheus families only when /metrics is scraped."""

from __future__ import annotations

import weakref
from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from im.metrics import ScrapeCollector

if TYPE_CHECKING:
    from room.gateway import Gateway


class RoomStats:
    __slots__ = (
        "accepted",
        "auth_ok",
        "auth_failed",
        "frames_in",
        "frames_out",
        "pushes",
        "acks",
        "drops",
        "closes",
        "register_errors",
        "register_resyncs",
    )

    def __init__(self) -> None:
        self.accepted = 0
        self.auth_ok = 0
        self.auth_failed = 0
        self.frames_in = 0
        self.frames_out = 0
        self.pushes = 0
        self.acks = 0
        self.drops: Counter[str] = Counter()  # by reason
        self.closes: Counter[int] = Counter()  # by close code
        self.register_errors = 0
        self.register_resyncs = 0


_COUNTERS = (
    ("accepted", "accepted_connections", "Connections accepted"),
    ("auth_ok", "auth_ok", "Successful authentications"),
    ("auth_failed", "auth_failed", "Refused authentications"),
    ("frames_in", "frames_in", "Frames received from clients"),
    ("frames_out", "frames_out", "Frames written to clients"),
    ("pushes", "pushes", "Push frames queued for clients"),
    ("acks", "acks", "Message ids acknowledged by clients"),
    ("register_errors", "register_errors", "Failed register calls"),
    ("register_resyncs", "register_resyncs", "Register data losses noticed (all sessions re-sent)"),
)

_gateways: weakref.WeakSet[Gateway] = weakref.WeakSet()
_collector: ScrapeCollector | None = None


def track(gateway: Gateway) -> None:
    """Expose a gateway's counters; one collector serves every instance in the process."""
    global _collector
    _gateways.add(gateway)
    if _collector is None:
        _collector = ScrapeCollector(_families)


def untrack(gateway: Gateway) -> None:
    _gateways.discard(gateway)


def _families() -> Iterable[Metric]:
    gateways = sorted(_gateways, key=lambda g: g.instance)
    conns = GaugeMetricFamily(
        "im_room_connections", "Open connections by state", labels=["instance", "state"]
    )
    queued = GaugeMetricFamily(
        "im_room_queued_frames", "Frames waiting in connection queues", labels=["instance"]
    )
    counters = {
        attr: CounterMetricFamily(f"im_room_{name}", doc, labels=["instance"])
        for attr, name, doc in _COUNTERS
    }
    drops = CounterMetricFamily(
        "im_room_drops", "Frames dropped, by reason", labels=["instance", "reason"]
    )
    closes = CounterMetricFamily(
        "im_room_closes", "Connections closed by the server, by code", labels=["instance", "code"]
    )
    room_drops = CounterMetricFamily(
        "im_room_room_drops",
        "Room pushes dropped by the big-room switches, by room, type and reason",
        labels=["instance", "room", "type", "reason"],
    )
    room_delivered = CounterMetricFamily(
        "im_room_room_delivered", "Room and batch messages handed to members", labels=["instance"]
    )
    room_writes = CounterMetricFamily(
        "im_room_room_writes", "Shared writes of a room tick to members", labels=["instance"]
    )
    rooms = GaugeMetricFamily("im_room_rooms", "Chat rooms with members here", labels=["instance"])
    limited = CounterMetricFamily(
        "im_room_limited",
        "Connections refused or closed by a limit (room.limits), by limit: address_denied, "
        "connection_rate, connections_per_address, frame_rate, slow_reader, slow_sender, "
        "handshake_timeout; address_table_full counts addresses let in unmetered",
        labels=["instance", "limit"],
    )
    addresses = GaugeMetricFamily(
        "im_room_limit_addresses",
        "Client addresses the limits track: with open connections (open), with a "
        "connection rate being metered (metered)",
        labels=["instance", "table"],
    )
    paused = GaugeMetricFamily(
        "im_room_paused_connections",
        "Connections whose socket is too full to write to (closed past --slow-reader-s)",
        labels=["instance"],
    )
    qos = CounterMetricFamily(
        "im_room_qos",
        "QoS 1 work with the saver, by event: pending_loaded (messages paged at login), held "
        "(live pushes waiting for them), acks_sent, acks_dropped, saver_errors, resyncs",
        labels=["instance", "event"],
    )
    for gateway in gateways:
        name, stats = gateway.instance, gateway.stats
        chat = gateway.rooms
        for (room, type_, reason), count in chat.drops.items():
            room_drops.add_metric([name, room, type_, reason], count)
        room_delivered.add_metric([name], chat.delivered)
        room_writes.add_metric([name], chat.writes)
        rooms.add_metric([name], len(chat.groups))
        for event, count in gateway.qos.counts.items():
            qos.add_metric([name, event], count)
        limits = gateway.limits
        for limit, count in limits.counts.items():
            limited.add_metric([name, limit], count)
        addresses.add_metric([name, "open"], len(limits.per_address))
        addresses.add_metric([name, "metered"], limits.tracked_addresses)
        paused.add_metric([name], limits.paused)
        for state, count in gateway.connection_counts().items():
            conns.add_metric([name, state], count)
        queued.add_metric([name], gateway.queued())
        for attr, family in counters.items():
            family.add_metric([name], getattr(stats, attr))
        for reason, count in stats.drops.items():
            drops.add_metric([name, reason], count)
        for code, count in stats.closes.items():
            closes.add_metric([name, str(code)], count)
    yield conns
    yield queued
    yield from counters.values()
    yield drops
    yield closes
    yield room_drops
    yield room_delivered
    yield room_writes
    yield rooms
    yield qos
    yield limited
    yield addresses
    yield paused

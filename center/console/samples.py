"""A room instance's /metrics text in, the numbers the console shows out (pure: no I/O).

The rooms expose plain counters; rates are the difference between two scrapes, so the
console needs nothing from the rooms beyond what Prometheus already reads.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

#: Largest exposition read from one instance: a room's own families are a few KiB, the
#: per-room drop counters grow with the rooms it drops in.
MAX_EXPOSITION = 4 * 1024 * 1024

_CONNECTIONS = "im_room_connections"
_DELIVERED = ("im_room_pushes_total", "im_room_room_delivered_total")
_DROPS = ("im_room_drops_total", "im_room_room_drops_total")
_ROOMS = "im_room_rooms"
_QUEUED = "im_room_queued_frames"


@dataclass(frozen=True, slots=True)
class Sample:
    """One scrape of one instance: gauges as read, counters as totals since it started."""

    connections: dict[str, int] = field(default_factory=dict)  # by state
    delivered: float = 0.0  # pushes handed to connections, alone or as room members
    drops: dict[str, float] = field(default_factory=dict)  # by reason
    rooms: int = 0
    queued: int = 0


def parse_sample(text: str, instance: str) -> Sample:
    """The numbers of `instance` in an exposition that may hold other instances of the same
    process; ValueError on text that is not Prometheus exposition."""
    if len(text) > MAX_EXPOSITION:
        raise ValueError(f"exposition is larger than {MAX_EXPOSITION} bytes")
    connections: dict[str, int] = defaultdict(int)
    drops: dict[str, float] = defaultdict(float)
    delivered = 0.0
    rooms = queued = 0
    try:
        families = list(text_string_to_metric_families(text))
    except Exception as exc:  # the parser raises several types on bad lines
        raise ValueError(f"not Prometheus exposition: {exc}") from None
    for family in families:
        for sample in family.samples:
            if sample.labels.get("instance") != instance:
                continue
            name, value = sample.name, sample.value
            if name == _CONNECTIONS:
                connections[sample.labels.get("state", "")] += int(value)
            elif name in _DELIVERED:
                delivered += value
            elif name in _DROPS:
                drops[sample.labels.get("reason", "")] += value
            elif name == _ROOMS:
                rooms = int(value)
            elif name == _QUEUED:
                queued = int(value)
    return Sample(dict(connections), delivered, dict(drops), rooms, queued)


def per_second(now: float, value: float, then: float, before: float) -> float:
    """Rate of a counter between two scrapes; a counter that went down restarted from 0."""
    elapsed = now - then
    if elapsed <= 0:
        return 0.0
    grown = value - before if value >= before else value
    return grown / elapsed


def rates(now: float, sample: Sample, then: float, previous: Sample) -> dict[str, object]:
    """Messages and drops per second between two scrapes of one instance."""
    return {
        "msgs_per_s": per_second(now, sample.delivered, then, previous.delivered),
        "drops_per_s": {
            reason: per_second(now, total, then, previous.drops.get(reason, 0.0))
            for reason, total in sample.drops.items()
        },
    }

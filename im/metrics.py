"""Prometheus exposition shared by every service.

Hot paths (a frame written to 10,000 sockets) count into plain integers on their own
objects; a collector turns those into metric families only when /metrics is scraped, so
no lock or label lookup is paid per frame.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

__all__ = ["CONTENT_TYPE_LATEST", "ScrapeCollector", "exposition"]


class ScrapeCollector(Collector):
    """Registers a function that yields metric families at scrape time."""

    def __init__(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self._collect = collect
        REGISTRY.register(self)

    def collect(self) -> Iterable[Metric]:
        return self._collect()

    def unregister(self) -> None:
        REGISTRY.unregister(self)


def exposition() -> bytes:
    return generate_latest(REGISTRY)

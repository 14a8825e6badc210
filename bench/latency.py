"""A latency histogram small enough to keep for millions of deliveries and to send over a
pipe: counts in fixed buckets, merged by adding, percentiles read from the buckets."""

from __future__ import annotations

import math
from collections.abc import Mapping

BUCKET_NS = 50_000  # 50 us: finer than a room tick, coarse enough to stay small
MAX_BUCKET = 2_400_000  # 120 s; slower deliveries share the last bucket (max stays exact)


class Histogram:
    __slots__ = ("buckets", "count", "max_ns")

    def __init__(self) -> None:
        self.buckets: dict[int, int] = {}
        self.count = 0
        self.max_ns = 0

    def add(self, ns: int) -> None:
        """One latency; a negative one (clocks of two processes) counts as zero."""
        if ns > self.max_ns:
            self.max_ns = ns
        index = ns // BUCKET_NS if ns > 0 else 0
        if index > MAX_BUCKET:
            index = MAX_BUCKET
        buckets = self.buckets
        buckets[index] = buckets.get(index, 0) + 1
        self.count += 1

    def merge(self, buckets: Mapping[int, int], max_ns: int) -> None:
        for index, n in buckets.items():
            self.buckets[index] = self.buckets.get(index, 0) + n
            self.count += n
        self.max_ns = max(self.max_ns, max_ns)

    def percentile(self, q: float) -> float:
        """Nearest-rank percentile in ns: the upper edge of its bucket, at most the max."""
        if not self.count:
            return 0.0
        rank = min(self.count, max(1, math.ceil(q * self.count - 1e-9)))
        seen = 0
        for index in sorted(self.buckets):
            seen += self.buckets[index]
            if seen >= rank:
                return float(min((index + 1) * BUCKET_NS, self.max_ns))
        return float(self.max_ns)

    def summary_ms(self) -> dict[str, float]:
        return {
            "count": self.count,
            "p50": self.percentile(0.50) / 1e6,
            "p90": self.percentile(0.90) / 1e6,
            "p99": self.percentile(0.99) / 1e6,
            "max": self.max_ns / 1e6,
        }

"""Deadlines swept in buckets: one timer for the instance, not one per connection.

Each connection sits in the bucket of its deadline, rounded up to the resolution. A
connection that shows activity only moves its own `deadline` number forward (no set
operations on the hot path); when its old bucket comes due the sweep sees the newer
deadline and moves it to the right bucket instead of expiring it.
"""

from __future__ import annotations

import math
from typing import Protocol


class HasDeadline(Protocol):
    deadline: float
    bucket: int


class DeadlineWheel:
    __slots__ = ("_buckets", "resolution")

    def __init__(self, resolution: float = 1.0) -> None:
        self.resolution = resolution
        self._buckets: dict[int, set[HasDeadline]] = {}

    def _slot(self, deadline: float) -> int:
        return math.ceil(deadline / self.resolution)

    def add(self, item: HasDeadline) -> None:
        slot = self._slot(item.deadline)
        item.bucket = slot
        bucket = self._buckets.get(slot)
        if bucket is None:
            bucket = self._buckets[slot] = set()
        bucket.add(item)

    def discard(self, item: HasDeadline) -> None:
        bucket = self._buckets.get(item.bucket)
        if bucket is not None:
            bucket.discard(item)
            if not bucket:
                del self._buckets[item.bucket]

    def expire(self, now: float) -> list[HasDeadline]:
        """Remove and return every item whose deadline has passed; re-file the others."""
        due = [slot for slot in self._buckets if slot * self.resolution <= now]
        expired: list[HasDeadline] = []
        for slot in sorted(due):
            for item in self._buckets.pop(slot):
                if item.deadline <= now:
                    expired.append(item)
                else:
                    self.add(item)
        return expired

    def __len__(self) -> int:
        return sum(len(bucket) for bucket in self._buckets.values())

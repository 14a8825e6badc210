"""One product's backlog and how it is cut into webhook batches; no I/O, no clock of its own.

Items are kept in arrival order, messages and events in one queue, so a batch always holds
the oldest items; its body lists them in two arrays, each in arrival order.
"""

from __future__ import annotations

from collections import deque

import orjson

MESSAGE, EVENT = 0, 1


class Batch:
    __slots__ = ("messages", "events", "size")

    def __init__(self) -> None:
        self.messages: list[bytes] = []
        self.events: list[bytes] = []
        self.size = 0  # bytes of the items

    def __len__(self) -> int:
        return len(self.messages) + len(self.events)

    def body(self, product: str) -> bytes:
        """The POST body: {"product": p, "messages": [...], "events": [...]}."""
        return b"".join(
            (
                b'{"product":',
                orjson.dumps(product),
                b',"messages":[',
                b",".join(self.messages),
                b'],"events":[',
                b",".join(self.events),
                b"]}",
            )
        )


class ProductQueue:
    """Bounded by item count and bytes; `offer` says False instead of growing past either."""

    __slots__ = ("cap", "cap_bytes", "batch_max", "batch_bytes", "_items", "size", "since")

    def __init__(self, cap: int, cap_bytes: int, batch_max: int, batch_bytes: int) -> None:
        self.cap = cap
        self.cap_bytes = cap_bytes
        self.batch_max = batch_max
        self.batch_bytes = batch_bytes
        self._items: deque[tuple[int, bytes]] = deque()
        self.size = 0  # bytes queued
        self.since: float | None = None  # when the oldest queued item arrived

    def __len__(self) -> int:
        return len(self._items)

    def offer(self, kind: int, item: bytes, now: float) -> bool:
        if len(self._items) >= self.cap or self.size + len(item) > self.cap_bytes:
            return False
        if not self._items:
            self.since = now
        self._items.append((kind, item))
        self.size += len(item)
        return True

    @property
    def batch_ready(self) -> bool:
        """A full batch waits: posting it need not wait for the batch window."""
        return len(self._items) >= self.batch_max or self.size >= self.batch_bytes

    def due(self, window: float) -> float | None:
        """When the oldest item's batch window ends (None: nothing queued)."""
        return None if self.since is None else self.since + window

    def take(self) -> Batch:
        """The oldest items, up to batch_max of them and about batch_bytes (at least one)."""
        batch = Batch()
        items = self._items
        while items and len(batch) < self.batch_max:
            kind, item = items[0]
            if batch.size and batch.size + len(item) > self.batch_bytes:
                break
            items.popleft()
            batch.size += len(item)
            (batch.messages if kind == MESSAGE else batch.events).append(item)
        self.size -= batch.size
        if not items:
            self.since = None  # leftovers keep their older `since`: they are due at once
        return batch

    def clear(self) -> int:
        """Drop everything (the service is stopping); how many items were dropped."""
        dropped = len(self._items)
        self._items.clear()
        self.size = 0
        self.since = None
        return dropped

"""Per-connection bounded priority queue of encoded frames (pure, no I/O).

Three priorities share one cap (200 frames by default). When full, the oldest frame of
the lowest queued priority makes room for a newcomer of that priority or a higher one; a
newcomer below everything queued is dropped itself. A high frame facing a queue full of
high frames means the client does not read: the caller closes it as a slow consumer.
"""

from __future__ import annotations

from enum import Enum

HIGH, NORMAL, LOW = 0, 1, 2


class Outcome(Enum):
    QUEUED = "queued"
    QUEUED_DROPPED_OLDER = "queued_dropped_older"  # a lower-priority frame was evicted
    DROPPED = "dropped"  # the newcomer itself was dropped
    OVERFLOW = "overflow"  # full of high frames and another came: close as slow consumer


class FrameQueue:
    """Lists are created lazily: most idle connections never hold a frame."""

    __slots__ = ("_lanes", "size", "cap")

    def __init__(self, cap: int) -> None:
        self._lanes: list[list[bytes] | None] = [None, None, None]
        self.size = 0
        self.cap = cap

    def push(self, priority: int, frame: bytes) -> Outcome:
        outcome = Outcome.QUEUED
        if self.size >= self.cap:
            victim = self._lowest_nonempty()
            if victim < priority:
                return Outcome.DROPPED
            if victim == HIGH:
                return Outcome.OVERFLOW
            lane = self._lanes[victim]
            assert lane
            del lane[0]
            self.size -= 1
            outcome = Outcome.QUEUED_DROPPED_OLDER
        lane = self._lanes[priority]
        if lane is None:
            lane = self._lanes[priority] = []
        lane.append(frame)
        self.size += 1
        return outcome

    def _lowest_nonempty(self) -> int:
        for priority in (LOW, NORMAL, HIGH):
            if self._lanes[priority]:
                return priority
        raise AssertionError("full queue with no frames")

    def drain(self, max_bytes: int) -> list[bytes]:
        """Take frames in priority order until about `max_bytes` (at least one frame)."""
        out: list[bytes] = []
        taken = 0
        for priority in (HIGH, NORMAL, LOW):
            lane = self._lanes[priority]
            if not lane:
                continue
            n = 0
            for frame in lane:
                if taken >= max_bytes and out:
                    break
                out.append(frame)
                taken += len(frame)
                n += 1
            del lane[:n]
            if lane:
                break
            self._lanes[priority] = None
        self.size -= len(out)
        return out

    def __len__(self) -> int:
        return self.size

    def depth(self, priority: int) -> int:
        lane = self._lanes[priority]
        return len(lane) if lane else 0

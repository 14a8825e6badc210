"""The chaos run's books, per message sequence number: when its first HTTP attempt left,
when center accepted it (answered 200), when the application first received it and how
often. Pure: times in, counts out, so the arithmetic is tested without servers.

Times are CLOCK_MONOTONIC nanoseconds; 0 means "not yet".
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Iterable
from typing import Any

NS = 1_000_000_000


def _zeros(total: int) -> array:
    return array("q", bytes(8 * total))


class Ledger:
    __slots__ = (
        "total",
        "first_ns",
        "accepted_ns",
        "received_ns",
        "count",
        "waiting",
        "received",
        "repeats",
        "unknown",
    )

    def __init__(self, total: int) -> None:
        self.total = total
        self.first_ns = _zeros(total)
        self.accepted_ns = _zeros(total)
        self.received_ns = _zeros(total)
        self.count = bytearray(total)
        self.waiting = 0  # accepted, not received yet
        self.received = 0  # distinct sequence numbers received
        self.repeats = 0  # receipts past the first, at the application
        self.unknown = 0  # sequence numbers outside the run

    def sent(self, seq: int, ns: int) -> None:
        if not self.first_ns[seq]:
            self.first_ns[seq] = ns

    def accepted(self, seq: int, ns: int) -> None:
        if self.accepted_ns[seq]:
            return
        self.accepted_ns[seq] = ns
        if not self.count[seq]:
            self.waiting += 1

    def arrived(self, seqs: Iterable[int], times: Iterable[int]) -> None:
        count = self.count
        for seq, ns in zip(seqs, times, strict=True):
            if not 0 <= seq < self.total:
                self.unknown += 1
                continue
            seen = count[seq]
            if seen:
                self.repeats += 1
            else:
                self.received += 1
                self.received_ns[seq] = ns
                if self.accepted_ns[seq]:
                    self.waiting -= 1
            if seen < 255:
                count[seq] = seen + 1

    def accepted_seqs(self) -> list[int]:
        """Sequence numbers center answered 200 for."""
        return [s for s in range(self.total) if self.accepted_ns[s]]

    def lost(self) -> list[int]:
        """Accepted and never received."""
        return [s for s in range(self.total) if self.accepted_ns[s] and not self.count[s]]

    def duplicated(self) -> list[int]:
        """Received more than once by the application."""
        return [s for s in range(self.total) if self.count[s] > 1]

    def latencies_ns(self, seqs: Iterable[int]) -> list[int]:
        """Receipt minus first attempt, sorted, of the received ones among `seqs`."""
        return sorted(
            self.received_ns[s] - self.first_ns[s]
            for s in seqs
            if self.count[s] and self.first_ns[s]
        )

    def after_event(self, at_ns: int, window_ns: int) -> dict[str, Any]:
        """What an event at `at_ns` did to delivery.

        `full_delivery_s`: from the event until every message accepted before it was
        received (0 when all had been; None when one never was). `window_*`: the messages
        whose first attempt left in the `window_ns` after the event, and their worst
        latency from that attempt to receipt."""
        before = [s for s in range(self.total) if 0 < self.accepted_ns[s] <= at_ns]
        in_flight = sum(1 for s in before if not self.count[s] or self.received_ns[s] > at_ns)
        if any(not self.count[s] for s in before):
            full: float | None = None
        else:
            last = max((self.received_ns[s] for s in before), default=at_ns)
            full = max(0, last - at_ns) / NS
        window = [s for s in range(self.total) if at_ns <= self.first_ns[s] < at_ns + window_ns]
        latencies = self.latencies_ns(window)
        return {
            "accepted_before": len(before),
            "in_flight": in_flight,
            "full_delivery_s": full,
            "window_sent": len(window),
            "window_received": len(latencies),
            "window_p99_ms": percentile(latencies, 0.99) / 1e6,
            "window_max_ms": (latencies[-1] if latencies else 0) / 1e6,
        }


def percentile(sorted_values: list[int], q: float) -> int:
    """Nearest-rank percentile of already-sorted values (0 for none)."""
    if not sorted_values:
        return 0
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[rank - 1]

"""What a webhook answer means for its batch, and how long to wait before the next try."""

from __future__ import annotations

import random
from collections.abc import Callable
from enum import Enum

#: 4xx answers that mean "not now" rather than "never": the batch is posted again.
RETRY_4XX = frozenset({408, 429})


class Verdict(Enum):
    DONE = "done"  # 2xx: the business has the batch
    RETRY = "retry"  # 5xx, 408, 429, a timeout or a connection error
    GIVE_UP = "give_up"  # any other answer (4xx, 3xx): posting it again cannot help


def verdict(status: int) -> Verdict:
    if 200 <= status < 300:
        return Verdict.DONE
    if status >= 500 or status in RETRY_4XX:
        return Verdict.RETRY
    return Verdict.GIVE_UP


def backoff_s(
    retry: int, base: float, cap: float, rand: Callable[[], float] = random.random
) -> float:
    """Pause before retry number `retry` (1, 2, ...): exponential, with half of it jittered.

    Keeping half fixed means pauses still grow, while the random half spreads the retries
    of many products that failed together.
    """
    ceiling = min(cap, base * 2 ** (retry - 1))
    return ceiling / 2 + rand() * ceiling / 2


def retry_after_s(header: str | None, cap: float) -> float | None:
    """The seconds form of a Retry-After header, capped; None when absent or a date."""
    if header is None or not header.strip().isdigit():
        return None
    return min(float(header.strip()), cap)

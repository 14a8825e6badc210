"""IDC throttling: a per-second safety limit on big-room traffic leaving an IDC (pure).

`idc_budget[idc]` is the number of deliveries per second (one push written to one client)
that the IDC's room instances may send for normal and low messages of big rooms. Each
instance takes an even part, `budget / instances_in_idc`, multiplied by a factor drawn
uniformly from `[1 - float_range, 1 + float_range]` and drawn again every second, so the
instances of an IDC do not all hit their limits in the same instant. Windows are whole
seconds of `now`. A message is allowed only if all of its deliveries fit in what is left
of the second's allowance (a message is never sent to part of a room); otherwise it is
refused whole and the caller counts it as dropped. An IDC without an entry is unlimited.
High-priority and small-room messages never reach this check.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from typing import Protocol


class IdcSwitches(Protocol):
    """The switch fields this check reads (im.switches.Switches has them)."""

    @property
    def idc_budget(self) -> Mapping[str, float]: ...
    @property
    def float_range(self) -> float: ...


class IdcBudget:
    """The allowance of one room instance; one per instance."""

    __slots__ = ("idc", "_rng", "_second", "_factor", "_used")

    def __init__(self, idc: str, rng: random.Random | None = None) -> None:
        self.idc = idc
        self._rng = rng if rng is not None else random.Random()
        self._second: float = -math.inf
        self._factor = 1.0
        self._used = 0

    def allow(
        self, deliveries: int, switches: IdcSwitches, instances_in_idc: int, now: float
    ) -> bool:
        budget = switches.idc_budget.get(self.idc)
        if budget is None or deliveries <= 0:
            return True
        second = math.floor(now)
        if second > self._second:
            self._second = second
            self._used = 0
            spread = switches.float_range
            self._factor = 1.0 + self._rng.uniform(-spread, spread) if spread else 1.0
        if self._used + deliveries > self.limit(budget, instances_in_idc):
            return False
        self._used += deliveries
        return True

    def limit(self, budget: float, instances_in_idc: int) -> float:
        """This second's allowance of this instance for an IDC budget."""
        return budget * self._factor / max(1, instances_in_idc)

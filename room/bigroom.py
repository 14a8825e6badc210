"""Big-room degradation: what a room instance does with each room push (pure, no I/O).

A room is big when the switches give it a size level of 1 or more (listed in `big_rooms`, or
its member count across instances passed a `size_thresholds` level). Small rooms, and
high-priority messages in any room, are always delivered. In a big room the other messages
go through, in order: `common_msg` (types dropped entirely at the room's level or any lower
one), like merging, the per-second budget, and batching.

Budget. Every member of a room receives the room's whole stream, so a per-member limit of
`room_budget` messages per second is the same thing as a per-room limit on this instance:
the budget is counted once per room, not per member (with virtual sub-rooms a member sees
only part of the stream, so counting per room errs on the strict side). Windows are whole
seconds of `now` (seconds of any clock, e.g. the event loop's; a clock stepping back keeps
counting in the current window).

`msg_type_ratio` splits the budget in percent: a listed type owns `budget * percent // 100`
messages per second; unlisted types share the rest of 100 %; an empty ratio means one
pool for all. Inside its own share a type is always served (while the total lasts). Past
its share a type borrows, and lending follows the previous second's demand: a type reserves
as much of its share as it was asked for in the previous second, and only the rest of its
share is lent. Without that evidence (the room's first big second, or after a second with
no message) every type reserves its whole share and nothing is lent. Between borrowers
priority decides: low messages borrow only what is left after the normal messages that had
to borrow in the previous second, so in a contested second low traffic is refused before
normal traffic. A refused borrower is DROP_TYPE_SHARE when the budget is split,
DROP_BUDGET otherwise; a full total is always DROP_BUDGET.

Likes (`merge_likes`) are counted instead of sent; `tick` emits one low push per room per
second carrying the total, admitted through the same budget (when refused, the count waits
for the next second). With `compress_complex` admitted low messages are held and handed to
the caller once per flush tick by `take_batch`, for one batch frame.

What this policy lets through then passes the IDC budget (room.idc_budget) through
`idc_allows`, with deliveries = members written on this instance (times the pushes in a
batch frame); a refusal there is DROP_IDC.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Collection, Mapping
from enum import Enum
from typing import Any, Protocol

from im.ids import new_id as default_new_id
from room.idc_budget import IdcBudget, IdcSwitches

#: Held low pushes per room between two flush ticks; past it they are delivered alone.
MAX_BATCH = 256
#: Ceiling of a merged like count, so the body stays a JSON-safe integer.
MAX_LIKE_COUNT = 2**53
#: Share key of the types that `msg_type_ratio` does not list.
OTHERS = None


class Decision(Enum):
    DELIVER = "deliver"
    DROP_BUDGET = "room_budget"
    DROP_TYPE_SHARE = "type_share"
    DROP_COMMON = "common_msg"
    MERGED = "merged"
    BATCHED = "batched"
    DROP_IDC = "idc_budget"

    @property
    def dropped(self) -> bool:
        """True for the drops; their value is the metric label of the reason."""
        return self in _DROPS


_DROPS = frozenset(
    {Decision.DROP_BUDGET, Decision.DROP_TYPE_SHARE, Decision.DROP_COMMON, Decision.DROP_IDC}
)


class BigRoomSwitches(Protocol):
    """The switch fields these rules read (im.switches.Switches has them)."""

    @property
    def room_budget(self) -> int: ...
    @property
    def msg_type_ratio(self) -> Mapping[str, float]: ...
    @property
    def common_msg(self) -> Mapping[Any, Collection[str]]: ...
    @property
    def merge_likes(self) -> bool: ...
    @property
    def compress_complex(self) -> bool: ...
    def size_level(self, members: int, room: str) -> int: ...


class _Rules:
    """What one switches object means for the budget, worked out once per switch change."""

    __slots__ = ("budget", "shares", "split", "common")

    def __init__(self, switches: BigRoomSwitches) -> None:
        budget = max(0, switches.room_budget)
        ratio = switches.msg_type_ratio
        self.budget = budget
        self.split = bool(ratio)
        self.shares: dict[str | None, int] = {}
        if ratio:
            self.shares = {t: int(budget * pct / 100) for t, pct in ratio.items()}
            self.shares[OTHERS] = max(0, int(budget * (100 - sum(ratio.values())) / 100))
        by_level: dict[int, frozenset[str]] = {
            int(level): frozenset(types) for level, types in switches.common_msg.items()
        }
        top = max(by_level, default=0)
        dropped: frozenset[str] = frozenset()
        self.common: list[frozenset[str]] = [dropped]
        for level in range(1, top + 1):
            dropped = dropped | by_level.get(level, frozenset())
            self.common.append(dropped)

    def common_at(self, level: int) -> frozenset[str]:
        return self.common[min(level, len(self.common) - 1)]


class RoomPolicy:
    """The rules' state for one (product, room) on one room instance."""

    __slots__ = (
        "room",
        "level",
        "_new_id",
        "_clock_ms",
        "_switches",
        "_rules",
        "_second",
        "_used_total",
        "_used",
        "_offered",
        "_prev_offered",
        "_reserved",
        "_outstanding",
        "_normal_wanted",
        "_prev_normal_wanted",
        "_normal_borrowed",
        "_batch",
        "_likes",
        "_like_count",
        "_like_second",
    )

    def __init__(
        self,
        room: str,
        new_id: Callable[[], str] = default_new_id,
        clock_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
    ) -> None:
        """`new_id` and `clock_ms` (Unix ms) give the merged like its id and "ts"; the
        windows run on the `now` of each call, which may come from another clock."""
        self.room = room
        #: Size level seen by the last `decide`: the caller applies the IDC budget when > 0.
        self.level = 0
        self._new_id = new_id
        self._clock_ms = clock_ms
        self._switches: object = None
        self._rules: _Rules | None = None
        self._second = -math.inf
        self._used_total = 0
        self._used: dict[str | None, int] = {}
        self._offered: dict[str | None, int] = {}
        self._prev_offered: dict[str | None, int] | None = None  # None: no evidence
        self._reserved: dict[str | None, int] = {}
        self._outstanding = 0  # reserved and not yet used, summed over the types
        self._normal_wanted = 0  # normal messages past their share this second
        self._prev_normal_wanted = 0
        self._normal_borrowed = 0
        self._batch: list[Mapping[str, Any]] = []
        self._likes = 0  # like pushes merged and not yet emitted
        self._like_count = 0
        self._like_second = -math.inf

    def decide(
        self, msg: Mapping[str, Any], members_total: int, switches: BigRoomSwitches, now: float
    ) -> Decision:
        level = self.level = switches.size_level(members_total, self.room)
        pri = msg.get("pri")
        if not level or pri == "high":
            return Decision.DELIVER
        rules = self._rules_for(switches)
        mtype = msg.get("type")
        if not isinstance(mtype, str):
            mtype = ""
        if mtype in rules.common_at(level):
            return Decision.DROP_COMMON
        if mtype == "like" and switches.merge_likes:
            self._merge(msg)
            return Decision.MERGED
        low = pri == "low"
        refused = self._admit(mtype, low, now)
        if refused is not None:
            return refused
        if low and switches.compress_complex and len(self._batch) < MAX_BATCH:
            self._batch.append(msg)
            return Decision.BATCHED
        return Decision.DELIVER

    def tick(self, now: float, switches: BigRoomSwitches) -> list[dict[str, Any]]:
        """The merged like push due now, if any: one attempt per room per second."""
        if not self._likes:
            return []
        second = math.floor(now)
        if second <= self._like_second:
            return []
        self._like_second = second
        self._rules_for(switches)
        if self._admit("like", True, now) is not None:
            return []
        push = {
            "op": "push",
            "type": "like",
            "pri": "low",
            "qos": 0,
            "id": self._new_id(),
            "ts": self._clock_ms(),
            "room": self.room,
            "body": {"count": self._like_count, "merged": True, "msgs": self._likes},
        }
        self._likes = self._like_count = 0
        return [push]

    def idc_allows(
        self,
        pri: str,
        deliveries: int,
        idc: IdcBudget,
        switches: IdcSwitches,
        instances_in_idc: int,
        now: float,
    ) -> bool:
        """The IDC check for a push this policy let through (alone, in a batch, or merged):
        only normal and low traffic of a big room counts; DROP_IDC when this is False."""
        if pri == "high" or not self.level:
            return True
        return idc.allow(deliveries, switches, instances_in_idc, now)

    def has_pending(self) -> bool:
        """True while merged likes wait for their push: keep calling `tick`."""
        return self._likes > 0

    def take_batch(self) -> list[Mapping[str, Any]] | None:
        """The low pushes held since the last call, for one batch frame; None when none."""
        if not self._batch:
            return None
        batch, self._batch = self._batch, []
        return batch

    def _merge(self, msg: Mapping[str, Any]) -> None:
        body = msg.get("body")
        count = body.get("count", 1) if isinstance(body, Mapping) else 1
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            count = 1
        self._likes += 1
        self._like_count = min(MAX_LIKE_COUNT, self._like_count + count)

    def _rules_for(self, switches: BigRoomSwitches) -> _Rules:
        rules = self._rules
        if switches is not self._switches or rules is None:
            rules = self._rules = _Rules(switches)
            self._switches = switches
            self._reserve()
        return rules

    def _admit(self, mtype: str, low: bool, now: float) -> Decision | None:
        """Count one message against the second's budget; the drop decision, or None."""
        second = math.floor(now)
        if second > self._second:
            self._roll(second)
        rules = self._rules
        assert rules is not None
        shares = rules.shares
        key = mtype if mtype in shares else OTHERS
        self._offered[key] = self._offered.get(key, 0) + 1
        used = self._used.get(key, 0)
        if used < shares.get(key, 0):
            if self._used_total >= rules.budget:
                return Decision.DROP_BUDGET
            if used < self._reserved.get(key, 0):
                self._outstanding -= 1
        else:
            if not low:
                self._normal_wanted += 1
            if self._used_total >= rules.budget:
                return Decision.DROP_BUDGET
            free = rules.budget - self._used_total - self._outstanding
            if low:
                free -= max(0, self._prev_normal_wanted - self._normal_borrowed)
            if free <= 0:
                return Decision.DROP_TYPE_SHARE if rules.split else Decision.DROP_BUDGET
            if not low:
                self._normal_borrowed += 1
        self._used[key] = used + 1
        self._used_total += 1
        return None

    def _roll(self, second: int) -> None:
        consecutive = second == self._second + 1 and bool(self._offered)
        self._prev_offered = self._offered if consecutive else None
        self._prev_normal_wanted = self._normal_wanted if consecutive else 0
        self._second = second
        self._offered = {}
        self._used = {}
        self._used_total = 0
        self._normal_wanted = 0
        self._normal_borrowed = 0
        self._reserve()

    def _reserve(self) -> None:
        """Hold back the part of each share that its type asked for in the previous second."""
        rules = self._rules
        if rules is None:
            return
        prev = self._prev_offered
        if prev is None:
            self._reserved = {key: share for key, share in rules.shares.items() if share}
        else:
            self._reserved = {
                key: min(share, prev[key]) for key, share in rules.shares.items() if prev.get(key)
            }
        self._outstanding = sum(
            max(0, reserved - self._used.get(key, 0)) for key, reserved in self._reserved.items()
        )

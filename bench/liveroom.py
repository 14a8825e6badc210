"""The live-room load: what a busy streaming room publishes, and the switch presets it runs
under. Pure: no I/O, so the schedule, the presets and the drop rules are testable alone.

The mix (percent of published messages):

| name      | type     | pri    |  % | what it stands for                          |
|-----------|----------|--------|----|---------------------------------------------|
| gift      | gift     | high   |  5 | a viewer's gift, shown to everyone          |
| host_chat | chat     | high   |  5 | the host speaking to the room               |
| chat      | chat     | normal | 30 | audience chat (danmaku)                     |
| enter     | enter    | low    | 10 | "X entered the room" notices                |
| like      | like     | low    | 40 | one tap on the heart                        |
| level_up  | level_up | low    | 10 | "X reached level N" notices                 |

The host's chat shares the type `chat` with the audience's: priority, not type, is what
must carry it through a degraded room. Messages follow a smooth weighted round robin, so
every 20 consecutive messages hold exactly the percentages above and two runs publish the
same sequence.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from math import gcd
from typing import Any

from im.switches import MAX_COUNT, parse_switches


@dataclass(frozen=True, slots=True)
class Kind:
    """One line of the mix; (type, pri) tells kinds apart on the client."""

    name: str
    type: str
    pri: str
    percent: int
    body: Mapping[str, Any] = field(default_factory=dict)  # business fields besides seq and t


MIX: tuple[Kind, ...] = (
    Kind("gift", "gift", "high", 5, {"gift": "rocket", "count": 1, "user": "fan42"}),
    Kind("host_chat", "chat", "high", 5, {"text": "thank you for the rocket!", "host": True}),
    Kind("chat", "chat", "normal", 30, {"text": "what a game", "user": "fan42"}),
    Kind("enter", "enter", "low", 10, {"user": "fan42", "nick": "night owl"}),
    Kind("like", "like", "low", 40, {"user": "fan42"}),
    Kind("level_up", "level_up", "low", 10, {"user": "fan42", "level": 12}),
)

#: Switch fields besides the room that the degraded preset sets.
DEGRADED = {
    "room_budget": 20,
    "msg_type_ratio": {"chat": 60, "level_up": 20},
    "common_msg": {"1": ["enter"]},
    "merge_likes": True,
    "compress_complex": True,
}
#: Size thresholds no room reaches, so that nothing is treated as big.
NEVER_BIG = [MAX_COUNT - 2, MAX_COUNT - 1, MAX_COUNT]
PRESETS = ("degraded", "off")


def check_mix(mix: Sequence[Kind]) -> None:
    """ValueError unless the percents sum to 100 and (type, pri) pairs are distinct."""
    if sum(k.percent for k in mix) != 100 or any(k.percent <= 0 for k in mix):
        raise ValueError("mix percents must be positive and sum to 100")
    if len({(k.type, k.pri) for k in mix}) != len(mix):
        raise ValueError("two kinds of the mix share a (type, pri) pair")


def schedule(count: int, mix: Sequence[Kind] = MIX) -> list[int]:
    """The kind (index into `mix`) of each of `count` messages, by smooth weighted round
    robin: in every run of sum(weights) messages each kind appears exactly its weight."""
    check_mix(mix)
    divisor = 0
    for kind in mix:
        divisor = gcd(divisor, kind.percent)
    weights = [k.percent // divisor for k in mix]
    total = sum(weights)
    current = [0] * len(mix)
    order = []
    for _ in range(count):
        for i, weight in enumerate(weights):
            current[i] += weight
        chosen = max(range(len(mix)), key=current.__getitem__)
        current[chosen] -= total
        order.append(chosen)
    return order


def request(kind: Kind, seq: int, sent_ns: int) -> dict[str, Any]:
    """The body of POST /v1/push/rooms/{room}; the client reads `seq` and `t` back."""
    return {
        "type": kind.type,
        "pri": kind.pri,
        "qos": 0,
        "body": {"seq": seq, "t": sent_ns, **kind.body},
    }


def preset(name: str, room: str) -> dict[str, Any]:
    """The switch document of a preset: `degraded` makes `room` big with every limit on,
    `off` leaves every room small (switch defaults would call 3,000 members big)."""
    if name == "degraded":
        return {"big_rooms": [room], **DEGRADED}
    if name == "off":
        return {"big_rooms": [], "size_thresholds": NEVER_BIG}
    raise ValueError(f"unknown preset {name!r}; expected one of {', '.join(PRESETS)} or a file")


def allowed_drops(
    document: Mapping[str, Any], room: str, members: int, mix: Sequence[Kind] = MIX
) -> dict[str, frozenset[str]]:
    """Per message type of the mix, the drop reasons the switches allow in `room` of
    `members`: none in a small room or for a type sent only as high priority; otherwise the
    budget, `common_msg` where it lists the type, and the IDC limit where one is set."""
    switches = parse_switches(document)
    level = switches.size_level(members, room)
    allowed: dict[str, set[str]] = {k.type: set() for k in mix}
    if not level:
        return {t: frozenset() for t in allowed}
    for kind in mix:
        if kind.pri == "high":
            continue
        reasons = allowed[kind.type]
        reasons.add("room_budget")
        if switches.msg_type_ratio:
            reasons.add("type_share")
        if kind.type in switches.dropped_types(level):
            reasons.add("common_msg")
        if switches.idc_budget:
            reasons.add("idc_budget")
    if switches.idc_budget:
        allowed["batch"] = {"idc_budget"}  # a batch frame is refused whole
    return {t: frozenset(r) for t, r in allowed.items()}


def unexpected_drops(
    drops: Mapping[tuple[str, str], float], allowed: Mapping[str, Iterable[str]]
) -> dict[str, float]:
    """The drops (by type and reason) the switches do not explain, as "type/reason": count."""
    return {
        f"{type_}/{reason}": count
        for (type_, reason), count in sorted(drops.items())
        if count and reason not in allowed.get(type_, ())
    }


def type_rows(
    mix: Sequence[Kind],
    accepted: Sequence[int],
    delivered: Mapping[tuple[str, str], int],
    like_units: int,
    members: int,
    dropped: Sequence[tuple[Mapping[tuple[str, str], float], int]],
) -> list[dict[str, Any]]:
    """The per-kind account of a run. `accepted[i]` messages of mix[i] were accepted by
    center; `delivered` counts pushes received by (type, pri) over all clients; `like_units`
    is likes received, a merged like counting its `count`; `dropped` holds, per room
    instance, its switch drops by (type, reason) and its members.

    expected = accepted x members; shortfall = expected - delivered (for likes in likes, not
    pushes); explained = what the instances' drops cost (drops x members there), charged to
    the non-high kind of the type; unexplained = shortfall - explained."""
    rows = []
    for kind, sent in zip(mix, accepted, strict=True):
        pushes = delivered.get((kind.type, kind.pri), 0)
        received = like_units if kind.type == "like" else pushes
        expected = sent * members
        explained = 0.0
        by_reason: dict[str, float] = {}
        if kind.pri != "high":
            for drops, here in dropped:
                for (type_, reason), count in drops.items():
                    if type_ == kind.type:
                        explained += count * here
                        by_reason[reason] = by_reason.get(reason, 0) + count
        shortfall = expected - received
        rows.append(
            {
                "name": kind.name,
                "type": kind.type,
                "pri": kind.pri,
                "percent": kind.percent,
                "sent": sent,
                "expected": expected,
                "delivered": received,
                "pushes": pushes,
                "shortfall": shortfall,
                "shortfall_pct": 100 * shortfall / expected if expected else 0.0,
                "dropped_msgs": by_reason,
                "explained": int(explained),
                "unexplained": shortfall - int(explained),
            }
        )
    return rows

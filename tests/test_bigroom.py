"""Big-room degradation and IDC throttling, driven by a fake clock."""

from __future__ import annotations

import itertools
import random
from collections import Counter
from dataclasses import dataclass, field, replace

from hypothesis import given, settings
from hypothesis import strategies as st

from im.switches import parse_switches
from room.bigroom import MAX_BATCH, Decision, RoomPolicy
from room.idc_budget import IdcBudget

BIG = 5000  # members: level 1 with the default thresholds
ROOM = "r1"


@dataclass(frozen=True)
class Sw:
    """The switch fields the rules read, with the documented defaults."""

    big_rooms: tuple[str, ...] = ()
    size_thresholds: tuple[int, int, int] = (3000, 10000, 20000)
    room_budget: int = 20
    msg_type_ratio: dict[str, float] = field(default_factory=dict)
    common_msg: dict[str, list[str]] = field(default_factory=dict)
    merge_likes: bool = False
    compress_complex: bool = False
    idc_budget: dict[str, float] = field(default_factory=dict)
    float_range: float = 0.2

    def size_level(self, members: int, room: str) -> int:
        level = sum(members >= t for t in self.size_thresholds)
        return max(level, 1) if room in self.big_rooms else level


_ids = itertools.count()


def push(mtype: str = "chat", pri: str = "normal", **body: int) -> dict:
    return {
        "op": "push",
        "id": f"m{next(_ids)}",
        "type": mtype,
        "pri": pri,
        "qos": 0,
        "ts": 0,
        "room": ROOM,
        "body": body or None,
    }


def policy() -> RoomPolicy:
    counter = itertools.count()
    return RoomPolicy(ROOM, new_id=lambda: f"id{next(counter)}", clock_ms=lambda: 1_700_000_000_000)


def run(p: RoomPolicy, sw: Sw, msgs: list[dict], now: float, members: int = BIG) -> list[Decision]:
    return [p.decide(m, members, sw, now) for m in msgs]


def test_small_room_is_never_degraded():
    sw = Sw(room_budget=0, common_msg={"1": ["chat"]}, merge_likes=True, compress_complex=True)
    p = policy()
    out = run(p, sw, [push("chat"), push("like", "low"), push("x", "low")] * 50, 10.0, members=2999)
    assert set(out) == {Decision.DELIVER}
    assert p.level == 0
    assert p.tick(11.0, sw) == [] and p.take_batch() is None


def test_listed_room_and_thresholds_set_the_level():
    sw = Sw(big_rooms=(ROOM,), room_budget=0)
    p = policy()
    assert p.decide(push(), 10, sw, 1.0) is Decision.DROP_BUDGET
    assert p.level == 1
    other = RoomPolicy("r2")
    assert other.decide(push(), 10, sw, 1.0) is Decision.DELIVER
    for members, level in [(2999, 0), (3000, 1), (10000, 2), (19999, 2), (20000, 3)]:
        p.decide(push(), members, Sw(room_budget=0), 1.0)
        assert p.level == level


def test_high_priority_always_delivered_even_over_budget():
    sw = Sw(
        room_budget=0,
        common_msg={"1": ["gift"]},
        merge_likes=True,
        compress_complex=True,
    )
    p = policy()
    out = run(p, sw, [push("gift", "high"), push("like", "high")] * 100, 3.0, members=50000)
    assert set(out) == {Decision.DELIVER}
    assert p.take_batch() is None and p.tick(4.0, sw) == []


def test_budget_per_second_is_exact_and_resets_next_second():
    sw = Sw(room_budget=7)
    p = policy()
    out = run(p, sw, [push()] * 10, 100.2) + run(p, sw, [push()] * 3, 100.9)
    assert out.count(Decision.DELIVER) == 7
    assert out[7:] == [Decision.DROP_BUDGET] * 6
    assert run(p, sw, [push()] * 8, 101.0).count(Decision.DELIVER) == 7


def test_clock_stepping_back_keeps_counting_in_the_current_window():
    sw = Sw(room_budget=3)
    p = policy()
    assert run(p, sw, [push()] * 3, 50.5).count(Decision.DELIVER) == 3
    assert p.decide(push(), BIG, sw, 49.9) is Decision.DROP_BUDGET


def test_type_ratio_splits_the_budget():
    sw = Sw(room_budget=10, msg_type_ratio={"a": 50, "b": 30})  # others: 20 %
    p = policy()
    # first second: nothing known about demand, so every type keeps to its own share
    msgs = [push(t) for _ in range(10) for t in ("a", "b", "c")]
    got = Counter(
        m["type"] for m, d in zip(msgs, run(p, sw, msgs, 1.0), strict=True) if d is Decision.DELIVER
    )
    assert got == {"a": 5, "b": 3, "c": 2}
    # unlisted types share the others' 20 %; a and b keep what they asked for last second
    assert run(p, sw, [push("c"), push("d"), push("e")] * 3, 2.0).count(Decision.DELIVER) == 2


def test_over_share_is_dropped_as_type_share_when_the_others_will_use_theirs():
    sw = Sw(room_budget=10, msg_type_ratio={"a": 50, "b": 50})
    p = policy()
    run(p, sw, [push("a"), push("b")] * 5, 1.0)  # both used their whole share
    out = run(p, sw, [push("a")] * 8, 2.0)
    assert out == [Decision.DELIVER] * 5 + [Decision.DROP_TYPE_SHARE] * 3
    assert run(p, sw, [push("b")] * 5, 2.5) == [Decision.DELIVER] * 5


def test_unused_share_is_lent():
    sw = Sw(room_budget=10, msg_type_ratio={"a": 50, "b": 50})
    p = policy()
    run(p, sw, [push("a")] * 3 + [push("b")] * 3, 1.0)
    # b asked for 3 last second: 2 of its 5 are lent to a, 3 stay reserved for b
    out = run(p, sw, [push("a")] * 10, 2.0)
    assert out.count(Decision.DELIVER) == 7
    assert out[7:] == [Decision.DROP_TYPE_SHARE] * 3
    assert run(p, sw, [push("b")] * 3, 2.9) == [Decision.DELIVER] * 3
    # b silent in second 3: in second 4 a may borrow all of b's share
    assert run(p, sw, [push("a")], 3.0) == [Decision.DELIVER]
    assert run(p, sw, [push("a")] * 12, 4.0).count(Decision.DELIVER) == 10


def test_low_is_refused_before_normal_when_the_budget_is_contested():
    sw = Sw(room_budget=10)
    p = policy()
    run(p, sw, [push("rank", "normal")] * 6 + [push("level", "low")] * 10, 1.0)
    # the low flood arrives first, but 6 normal messages are expected: low gets 4
    out = run(p, sw, [push("level", "low")] * 10 + [push("rank", "normal")] * 6, 2.0)
    assert out[:10] == [Decision.DELIVER] * 4 + [Decision.DROP_BUDGET] * 6
    assert out[10:] == [Decision.DELIVER] * 6


def test_low_borrowers_yield_to_normal_borrowers_in_a_split_budget():
    sw = Sw(room_budget=10, msg_type_ratio={"a": 30, "b": 30})  # 40 % for unlisted types
    p = policy()
    run(p, sw, [push("a", "normal")] * 6 + [push("b", "low")] * 6, 1.0)
    out = run(p, sw, [push("b", "low")] * 10 + [push("a", "normal")] * 6, 2.0)
    # b: its own 3, then what a's reserved share and a's 3 expected borrowers leave: 1
    assert out[:10] == [Decision.DELIVER] * 4 + [Decision.DROP_TYPE_SHARE] * 6
    assert out[10:] == [Decision.DELIVER] * 6


def test_common_msg_by_level_includes_lower_levels():
    sw = Sw(room_budget=100, common_msg={"1": ["enter"], "2": ["levelup"], "3": ["rank"]})
    msgs = [push("enter", "low"), push("levelup", "low"), push("rank"), push("chat")]
    drop, ok = Decision.DROP_COMMON, Decision.DELIVER
    assert run(policy(), sw, msgs, 1.0, members=3000) == [drop, ok, ok, ok]
    assert run(policy(), sw, msgs, 1.0, members=10000) == [drop, drop, ok, ok]
    assert run(policy(), sw, msgs, 1.0, members=20000) == [drop, drop, drop, ok]
    assert run(policy(), sw, msgs, 1.0, members=100) == [Decision.DELIVER] * 4


def test_likes_merge_into_one_count_per_second():
    sw = Sw(merge_likes=True)
    p = policy()
    likes = [push("like", "low"), push("like", "low", count=5), push("like", "low")]
    assert not p.has_pending()
    assert run(p, sw, likes, 7.1) == [Decision.MERGED] * 3
    assert p.has_pending()
    [merged] = p.tick(7.2, sw)
    assert merged["type"] == "like" and merged["pri"] == "low" and merged["qos"] == 0
    assert merged["room"] == ROOM and merged["op"] == "push" and merged["id"] == "id0"
    assert merged["ts"] == 1_700_000_000_000
    assert merged["body"] == {"count": 7, "merged": True, "msgs": 3}
    assert not p.has_pending()
    run(p, sw, likes, 7.5)
    assert p.tick(7.6, sw) == [] and p.tick(7.99, sw) == []
    [second] = p.tick(8.01, sw)
    assert second["body"]["count"] == 7 and second["id"] == "id1"
    assert p.tick(9.5, sw) == []


def test_merged_like_counts_against_the_budget_and_waits_when_it_is_full():
    sw = Sw(merge_likes=True, room_budget=2)
    p = policy()
    run(p, sw, [push("like", "low")] * 4 + [push("notice", "low")] * 2, 3.0)
    assert p.tick(3.5, sw) == []  # the second's budget went to the notices
    assert p.tick(3.9, sw) == []  # one attempt per second
    assert p.has_pending()
    [merged] = p.tick(4.0, sw)
    assert merged["body"]["count"] == 4
    assert run(p, sw, [push("notice", "low")] * 2, 4.1) == [
        Decision.DELIVER,
        Decision.DROP_BUDGET,
    ]


def test_low_pushes_are_batched_until_take_batch():
    sw = Sw(compress_complex=True, room_budget=100)
    p = policy()
    msgs = [push("level", "low"), push("rank"), push("notice", "low")]
    assert run(p, sw, msgs, 1.0) == [Decision.BATCHED, Decision.DELIVER, Decision.BATCHED]
    assert p.take_batch() == [msgs[0], msgs[2]]
    assert p.take_batch() is None


def test_batch_is_bounded():
    sw = Sw(compress_complex=True, room_budget=MAX_BATCH + 10)
    p = policy()
    out = run(p, sw, [push("level", "low")] * (MAX_BATCH + 5), 1.0)
    assert out.count(Decision.BATCHED) == MAX_BATCH
    assert out[MAX_BATCH:] == [Decision.DELIVER] * 5
    assert len(p.take_batch() or []) == MAX_BATCH


def test_decision_drop_labels():
    labels = {d.value for d in Decision if d.dropped}
    assert labels == {"room_budget", "type_share", "common_msg", "idc_budget"}


def test_idc_allowance_is_exact_for_one_instance():
    sw = Sw(idc_budget={"bj": 100}, float_range=0.0)
    b = IdcBudget("bj")
    assert [b.allow(30, sw, 1, 5.0) for _ in range(4)] == [True, True, True, False]
    assert b.allow(10, sw, 1, 5.9)
    assert not b.allow(1, sw, 1, 5.95)
    assert b.allow(100, sw, 1, 6.0)
    assert not b.allow(101, sw, 1, 7.0)
    # split evenly between the IDC's instances
    assert [IdcBudget("bj").allow(25, sw, 4, 1.0), IdcBudget("bj").allow(26, sw, 4, 1.0)] == [
        True,
        False,
    ]


def test_idc_without_budget_is_unlimited():
    sw = Sw(idc_budget={"bj": 0})
    assert IdcBudget("sh").allow(10**9, sw, 1, 1.0)
    assert not IdcBudget("bj").allow(1, sw, 1, 1.0)


def per_second_allowance(b: IdcBudget, sw: Sw, seconds: int) -> list[int]:
    counts = []
    for s in range(seconds):
        n = 0
        while b.allow(1, sw, 2, s + 0.5):
            n += 1
        counts.append(n)
    return counts


def test_idc_limit_floats_within_range_and_differs_between_instances():
    sw = Sw(idc_budget={"bj": 400}, float_range=0.2)  # 200 per instance, 160..240
    a = per_second_allowance(IdcBudget("bj", random.Random(1)), sw, 300)
    b = per_second_allowance(IdcBudget("bj", random.Random(2)), sw, 300)
    for counts in (a, b):
        assert min(counts) >= 160 and max(counts) <= 240
        assert min(counts) < 175 and max(counts) > 225  # it does float, over the whole range
    assert sum(x != y for x, y in zip(a, b, strict=True)) > 250


def test_idc_throttles_big_room_normal_and_low_but_never_high():
    sw = Sw(idc_budget={"bj": 100}, float_range=0.0)
    idc = IdcBudget("bj")
    p = policy()
    p.decide(push(), 100, sw, 1.0)
    assert p.idc_allows("normal", 1000, idc, sw, 1, 1.0)  # small room: no IDC budget
    p.decide(push(), BIG, sw, 1.0)
    assert p.idc_allows("high", 1000, idc, sw, 1, 1.0)
    assert not p.idc_allows("normal", 101, idc, sw, 1, 1.0)
    assert p.idc_allows("low", 100, idc, sw, 1, 1.0)
    assert not p.idc_allows("low", 1, idc, sw, 1, 1.0)
    assert p.idc_allows("high", 1000, idc, sw, 1, 1.0)


def test_the_real_switches_drive_the_rules():
    sw = parse_switches(
        {
            "big_rooms": [ROOM],
            "room_budget": 4,
            "msg_type_ratio": {"a": 50},
            "common_msg": {"1": ["enter"]},
            "merge_likes": True,
            "compress_complex": True,
            "idc_budget": {"bj": 2},
            "float_range": 0,
        }
    )
    p = policy()
    msgs = [push("enter", "low"), push("like", "low"), push("b", "low")] + [push("a")] * 3
    assert run(p, sw, msgs, 1.0, members=10) == [
        Decision.DROP_COMMON,
        Decision.MERGED,
        Decision.BATCHED,
        Decision.DELIVER,
        Decision.DELIVER,
        Decision.DROP_TYPE_SHARE,
    ]
    assert p.idc_allows("normal", 2, IdcBudget("bj"), sw, 1, 1.0)
    assert not p.idc_allows("normal", 3, IdcBudget("bj"), sw, 1, 1.0)


events = st.lists(
    st.tuples(
        st.floats(0, 0.6),
        st.sampled_from(["a", "b", "c", "like"]),
        st.sampled_from(["high", "normal", "low"]),
        st.booleans(),
    ),
    max_size=300,
)


@settings(max_examples=150, deadline=None)
@given(
    budget=st.integers(0, 15),
    ratio=st.dictionaries(st.sampled_from(["a", "b", "like"]), st.integers(0, 50), max_size=2),
    merge=st.booleans(),
    compress=st.booleans(),
    events=events,
)
def test_delivered_non_high_per_second_never_exceeds_the_budget(
    budget, ratio, merge, compress, events
):
    sw = replace(
        Sw(), room_budget=budget, msg_type_ratio=ratio, merge_likes=merge, compress_complex=compress
    )
    p = policy()
    now = 0.0
    sent: Counter[int] = Counter()
    for dt, mtype, pri, tick in events:
        now += dt
        if tick:
            sent[int(now)] += len(p.tick(now, sw))
        elif p.decide(push(mtype, pri), BIG, sw, now) in (Decision.DELIVER, Decision.BATCHED):
            sent[int(now)] += pri != "high"
    assert max(sent.values(), default=0) <= budget

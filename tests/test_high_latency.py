"""What keeps high-priority room pushes fast, without sockets: flush passes (room.fanout),
what each member is owed, how a pass hands it out a slice at a time and what messages
arriving mid-pass do; and the live-room run's measures of where the time goes
(bench.roomrun)."""

from __future__ import annotations

import msgpack

from bench.procstat import parse_box_busy
from bench.roomrun import slow_seconds
from room.fanout import FlushPass, RoomGroup, shard_of


class Member:
    """What a pass reads of a connection: its uid and wire kind."""

    __slots__ = ("uid", "kind")

    def __init__(self, uid: str, kind: str = "tcp") -> None:
        self.uid = uid
        self.kind = kind


def encode(kind: str, message: dict) -> bytes:
    return msgpack.packb([kind, message.get("id")])


def push(n: int, pri: str = "normal") -> dict:
    return {"op": "push", "id": f"m{n}", "pri": pri, "type": "chat"}


def ids(data: bytes) -> list[str]:
    unpacker = msgpack.Unpacker()
    unpacker.feed(data)
    return [frame[1] for frame in unpacker]


def room(*members: Member) -> RoomGroup:
    group = RoomGroup("demo", "r1")
    for member in members:
        group.join(member)  # type: ignore[arg-type]
    return group


def run(flush: FlushPass, limit: int) -> dict[str, list[str]]:
    """One slice: member uid -> the message ids written to it."""
    group = flush.group
    written = {}
    for conn, mark in flush.take(limit):
        found = group.blob(conn, mark, encode)
        if found is not None:
            written[conn.uid] = ids(found[1])
    return written


def test_a_pass_writes_each_member_once_with_everything_it_is_owed():
    a, b, c = Member("a"), Member("b", "ws_json"), Member("c")
    group = room(a, b, c)
    for n in range(3):
        group.add(push(n), None)
    flush = FlushPass(group)
    assert run(flush, 10) == {
        "a": ["m0", "m1", "m2"],
        "b": ["m0", "m1", "m2"],
        "c": ["m0", "m1", "m2"],
    }
    assert flush.done
    assert flush.finish() is False
    assert group.log == [] and group.base == 3
    assert run(FlushPass(group), 10) == {}  # nothing owed twice


def test_members_with_the_same_key_share_one_bytes_object():
    group = room(Member("a"), Member("b"), Member("c", "ws_json"))
    group.add(push(1, "high"), None)
    group.add({"op": "batch", "msgs": [push(2, "low"), push(3, "low")]}, None)
    blobs = [group.blob(conn, mark, encode) for conn, mark in FlushPass(group).take(10)]
    assert blobs[0] is blobs[1] and blobs[0] is not blobs[2]
    priority, _, messages = blobs[0]
    assert priority == 0  # the highest of the messages in it
    assert messages == 3  # a batch counts what it holds


def test_a_pass_goes_a_slice_at_a_time_and_takes_along_what_arrives_meanwhile():
    members = [Member(f"u{i}") for i in range(5)]
    group = room(*members)
    group.add(push(1, "high"), None)
    flush = FlushPass(group)
    assert run(flush, 2) == {"u0": ["m1"], "u1": ["m1"]}
    group.add(push(2, "high"), None)  # arrives between two slices
    assert run(flush, 2) == {"u2": ["m1", "m2"], "u3": ["m1", "m2"]}
    assert run(flush, 2) == {"u4": ["m1", "m2"]}
    assert flush.done
    assert flush.finish() is True  # u0 and u1 still lack m2
    assert group.base == 1 and len(group.log) == 1
    again = FlushPass(group)
    assert run(again, 10) == {"u0": ["m2"], "u1": ["m2"]}
    assert again.finish() is False and group.log == []


def test_what_arrives_before_the_first_slice_goes_out_in_that_pass():
    group = room(Member("a"), Member("b"))
    group.add(push(1, "high"), None)
    flush = FlushPass(group)
    group.add(push(2), None)
    assert run(flush, 10) == {"a": ["m1", "m2"], "b": ["m1", "m2"]}
    assert flush.finish() is False


def test_a_newcomer_gets_what_arrives_after_it_joined_and_a_leaver_nothing():
    a, b, late = Member("a"), Member("b"), Member("late")
    group = room(a, b)
    group.add(push(1), None)
    flush = FlushPass(group)
    assert run(flush, 1) == {"a": ["m1"]}
    group.members.pop(b)  # type: ignore[call-overload]
    group.join(late)  # type: ignore[arg-type]
    group.add(push(2), None)
    assert run(flush, 10) == {}
    assert flush.finish() is True
    assert run(FlushPass(group), 10) == {"a": ["m2"], "late": ["m2"]}


def test_virtual_sub_rooms_get_their_own_messages_and_every_unsharded_one():
    members = [Member(f"viewer{i}") for i in range(12)]
    group = room(*members)
    target = shard_of("viewer0", 3)
    group.add(push(1), (target, 3))
    group.add(push(2, "high"), None)
    written = run(FlushPass(group), 20)
    for member in members:
        expected = ["m1", "m2"] if shard_of(member.uid, 3) == target else ["m2"]
        assert written[member.uid] == expected


# -- the live-room run's measures ---------------------------------------------------------


def test_box_busy_ticks_leave_out_idle_and_iowait():
    line = "cpu  100 5 50 1000 30 7 3 2 0 0"
    assert parse_box_busy(line) == 100 + 5 + 50 + 7 + 3 + 2


def test_slow_receipts_are_listed_per_second_from_the_first_push():
    assert slow_seconds({1002: 7, 1005: 1}, 1000.6) == [0, 0, 7, 0, 0, 1]
    assert slow_seconds({}, 1000.6) == [0]

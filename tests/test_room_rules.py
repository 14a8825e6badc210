"""The room's pure rules: priority queues and bucketed deadlines."""

from hypothesis import given
from hypothesis import strategies as st

from room.deadlines import DeadlineWheel
from room.queues import HIGH, LOW, NORMAL, FrameQueue, Outcome


def test_drains_in_priority_order_then_fifo():
    q = FrameQueue(10)
    for frame, pri in [(b"l1", LOW), (b"h1", HIGH), (b"n1", NORMAL), (b"h2", HIGH), (b"l2", LOW)]:
        assert q.push(pri, frame) is Outcome.QUEUED
    assert q.drain(1 << 20) == [b"h1", b"h2", b"n1", b"l1", b"l2"]
    assert len(q) == 0


def test_full_queue_drops_oldest_lowest_first():
    q = FrameQueue(3)
    q.push(LOW, b"l1")
    q.push(NORMAL, b"n1")
    q.push(LOW, b"l2")
    assert q.push(HIGH, b"h1") is Outcome.QUEUED_DROPPED_OLDER
    assert q.drain(1 << 20) == [b"h1", b"n1", b"l2"]


def test_newcomer_below_everything_queued_is_dropped():
    q = FrameQueue(2)
    q.push(HIGH, b"h1")
    q.push(NORMAL, b"n1")
    assert q.push(LOW, b"l1") is Outcome.DROPPED
    assert q.push(NORMAL, b"n2") is Outcome.QUEUED_DROPPED_OLDER
    assert q.drain(1 << 20) == [b"h1", b"n2"]


def test_high_overflow_is_reported_for_slow_consumer_close():
    q = FrameQueue(2)
    q.push(HIGH, b"h1")
    q.push(HIGH, b"h2")
    assert q.push(HIGH, b"h3") is Outcome.OVERFLOW
    assert q.push(NORMAL, b"n1") is Outcome.DROPPED
    assert len(q) == 2


def test_drain_respects_byte_budget_but_always_makes_progress():
    q = FrameQueue(10)
    for i in range(5):
        q.push(NORMAL, bytes(100) + bytes([i]))
    first = q.drain(150)
    assert len(first) == 2
    assert len(q) == 3
    assert q.drain(1) == [bytes(100) + bytes([2])]


@given(st.lists(st.tuples(st.sampled_from([HIGH, NORMAL, LOW]), st.binary(max_size=4))))
def test_size_never_exceeds_cap_and_accounting_holds(ops):
    q = FrameQueue(7)
    for pri, frame in ops:
        before = len(q)
        outcome = q.push(pri, frame)
        grew = outcome is Outcome.QUEUED
        assert len(q) == before + (1 if grew else 0)
        assert len(q) <= 7
        assert len(q) == sum(q.depth(p) for p in (HIGH, NORMAL, LOW))
    size = len(q)
    assert len(q.drain(1 << 30)) == size
    assert len(q) == 0


class Item:
    __slots__ = ("deadline", "bucket")

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.bucket = 0


def test_wheel_expires_only_due_items_and_refiles_renewed_ones():
    wheel = DeadlineWheel(1.0)
    a, b, c = Item(1.5), Item(2.5), Item(1.2)
    for item in (a, b, c):
        wheel.add(item)
    c.deadline = 10.0  # activity moved it on; no wheel call needed
    assert wheel.expire(1.9) == []
    assert set(wheel.expire(2.0)) == {a}
    assert wheel.expire(3.0) == [b]
    assert len(wheel) == 1
    assert wheel.expire(10.0) == [c]
    assert len(wheel) == 0


def test_wheel_discard():
    wheel = DeadlineWheel(0.5)
    item = Item(1.0)
    wheel.add(item)
    wheel.discard(item)
    assert wheel.expire(100.0) == []

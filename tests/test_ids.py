import time

import pytest

from im import ids
from im.ids import LENGTH, id_time_ms, new_id


def test_ids_are_strictly_increasing_and_unique_over_100k() -> None:
    made = [new_id() for _ in range(100_000)]
    assert all(a < b for a, b in zip(made, made[1:], strict=False))
    assert len(set(made)) == len(made)


def test_fixed_width_lowercase_base32hex() -> None:
    for message_id in (new_id() for _ in range(1000)):
        assert len(message_id) == LENGTH
        assert set(message_id) <= set("0123456789abcdefghijklmnopqrstuv")


def test_time_is_recoverable() -> None:
    before = time.time_ns() // 1_000_000
    message_id = new_id()
    after = time.time_ns() // 1_000_000
    assert before <= id_time_ms(message_id) <= after + 1


def test_order_holds_when_the_clock_steps_back(monkeypatch: pytest.MonkeyPatch) -> None:
    first = new_id()
    monkeypatch.setattr(ids.time, "time_ns", lambda: 1_000_000_000_000)  # 1970s
    second = new_id()
    assert second > first
    assert id_time_ms(second) >= id_time_ms(first)


def test_counter_overflow_borrows_the_next_millisecond(monkeypatch: pytest.MonkeyPatch) -> None:
    now_ms = time.time_ns() // 1_000_000
    monkeypatch.setattr(ids.time, "time_ns", lambda: now_ms * 1_000_000)
    monkeypatch.setattr(ids, "_last_ms", now_ms)
    monkeypatch.setattr(ids, "_counter", ids._COUNTER_MAX - 1)
    last_in_ms, borrowed, next_one = new_id(), new_id(), new_id()
    assert last_in_ms < borrowed < next_one
    assert id_time_ms(last_in_ms) == now_ms
    assert id_time_ms(borrowed) == id_time_ms(next_one) == now_ms + 1


@pytest.mark.parametrize("bad", ["", "x" * LENGTH, "0" * (LENGTH - 1), "A" * LENGTH, "_" * LENGTH])
def test_time_of_a_foreign_string_is_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="not a message id"):
        id_time_ms(bad)

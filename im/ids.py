"""Message ids that sort as strings in the order they were made.

An id is 100 bits written as 20 lowercase base32hex digits (0-9, a-v), most significant
first, so string order is numeric order:

    48 bits  milliseconds since the Unix epoch
    20 bits  counter within the millisecond (strictly increasing inside one process)
    32 bits  random, so two processes minting in the same millisecond do not collide

Within a process ids are strictly increasing even if the wall clock steps back: the
timestamp never goes below the last one used, and a counter overflow borrows the next
millisecond. Across processes they are ordered to within clock skew.
"""

from __future__ import annotations

import secrets
import threading
import time

ALPHABET = "0123456789abcdefghijklmnopqrstuv"
LENGTH = 20
_COUNTER_BITS = 20
_RANDOM_BITS = 32
_COUNTER_MAX = (1 << _COUNTER_BITS) - 1
_TIME_SHIFT = _COUNTER_BITS + _RANDOM_BITS
_ALLOWED = frozenset(ALPHABET)

_lock = threading.Lock()
_last_ms = 0
_counter = 0


def _encode(value: int) -> str:
    digits = [""] * LENGTH
    for i in range(LENGTH - 1, -1, -1):
        digits[i] = ALPHABET[value & 31]
        value >>= 5
    return "".join(digits)


def new_id() -> str:
    global _last_ms, _counter
    now = time.time_ns() // 1_000_000
    with _lock:
        if now > _last_ms:
            _last_ms, _counter = now, 0
        elif _counter < _COUNTER_MAX:
            _counter += 1
        else:
            _last_ms, _counter = _last_ms + 1, 0
        head = (_last_ms << _COUNTER_BITS | _counter) << _RANDOM_BITS
    return _encode(head | secrets.randbits(_RANDOM_BITS))


def id_time_ms(message_id: str) -> int:
    """When the id was made, in ms since the epoch; ValueError if it is not one of ours."""
    if len(message_id) != LENGTH or not _ALLOWED.issuperset(message_id):
        raise ValueError(f"not a message id: {message_id[:64]!r}")
    return int(message_id, 32) >> _TIME_SHIFT

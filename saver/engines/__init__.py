"""Storage engines behind `im.messages_store.MessageStore`; all pass one contract test suite.

Import the engine module you need (`saver.engines.memory`, `saver.engines.redis`), so the
embedded deployment never loads the Redis client. Both count into the metrics below.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from prometheus_client import Counter

#: Dead-letter entries one `dead_letters` call may return.
MAX_DEAD_LETTERS_READ = 1000
#: Oldest inbox entries examined for expiry whenever an entry is added.
OLDEST_SWEPT = 4

UNICAST = "unicast"
BROADCAST = "broadcast"


@dataclass(frozen=True, slots=True)
class SaverLimits:
    """What bounds the store; both engines apply the same limits."""

    inbox_cap: int = 1000  # entries per user; the oldest go first
    max_attempts: int = 5  # deliveries without an ACK before a message is dead-lettered
    broadcast_cap: int = 100  # live broadcasts per product; the oldest go first
    state_cap: int = 10_000  # recipients per message whose delivery state is tracked
    state_grace_s: float = 3600.0  # states outlive their message this long, showing "expired"
    dead_letter_cap: int = 1000  # dead letters kept per product, newest first
    max_message_bytes: int = 1024 * 1024  # one message, msgpack-encoded
    max_pending_bytes: int = 4 * 1024 * 1024  # one pending() answer, about
    # Broadcast ids younger than this are acked one by one before the watermark passes
    # them, so a broadcast stored a little after a newer one (clock skew between center
    # processes, a slow store) still reaches users who acked the newer one.
    broadcast_settle_s: float = 10.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            minimum = 0 if f.name in ("state_grace_s", "broadcast_settle_s") else 1
            if isinstance(value, bool) or not minimum <= value < 2**53:
                raise ValueError(f"{f.name} must be at least {minimum}, got {value!r}")


STORED = Counter(
    "im_saver_stored_total", "Messages stored: inbox entries added, broadcasts kept", ["kind"]
)
EVICTED = Counter(
    "im_saver_evicted_total",
    "Messages dropped unread to keep an inbox (or a product's broadcasts) under its cap",
    ["kind"],
)
DEAD_LETTERS = Counter(
    "im_saver_dead_letters_total",
    "Messages moved to the dead-letter list after too many deliveries without an ACK",
    ["kind"],
)
DELIVERED = Counter(
    "im_saver_delivered_total", "Messages handed out by pending() (delivery attempts)", ["kind"]
)
ACKED = Counter("im_saver_acked_total", "Messages removed or marked done by an ACK", ["kind"])
EXPIRED = Counter("im_saver_expired_total", "Inbox entries removed after their TTL without an ACK")
IDEMPOTENCY = Counter(
    "im_saver_idempotency_total",
    "Idempotency keys asked for: first use, or repeat (the first answer returned)",
    ["result"],
)

for _counter in (STORED, EVICTED, DEAD_LETTERS, DELIVERED, ACKED):
    for _kind in (UNICAST, BROADCAST):
        _counter.labels(_kind)  # exported as 0 from the start, not from the first event
for _result in ("first", "repeat"):
    IDEMPOTENCY.labels(_result)

"""Saver service settings, from flags and IM_SAVER_* environment variables."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from im import settings
from saver.engines import SaverLimits

ENV_PREFIX = "IM_SAVER_"
_DEFAULTS = SaverLimits()


@dataclass(slots=True)
class SaverConfig:
    host: str = field(default="127.0.0.1", metadata={"help": "RPC listen address"})
    port: int = field(default=8072, metadata={"help": "RPC port (center and room connect here)"})
    metrics_port: int = field(default=8073, metadata={"help": "HTTP port for /metrics, /healthz"})
    redis: str | None = field(default=None, metadata={"help": "redis:// URL; memory if unset"})
    redis_prefix: str = field(default="im", metadata={"help": "prefix of every Redis key"})
    redis_connections: int = field(
        default=64, metadata={"help": "Redis connections at most; further calls wait"}
    )
    inbox_cap: int = field(
        default=_DEFAULTS.inbox_cap, metadata={"help": "messages kept per user; oldest dropped"}
    )
    max_attempts: int = field(
        default=_DEFAULTS.max_attempts,
        metadata={"help": "deliveries without an ACK before a message is dead-lettered"},
    )
    broadcast_cap: int = field(
        default=_DEFAULTS.broadcast_cap, metadata={"help": "live broadcasts kept per product"}
    )
    state_cap: int = field(
        default=_DEFAULTS.state_cap,
        metadata={"help": "recipients per message whose delivery state is tracked"},
    )
    state_grace_s: float = field(
        default=_DEFAULTS.state_grace_s,
        metadata={"help": "seconds delivery states outlive their message"},
    )
    dead_letter_cap: int = field(
        default=_DEFAULTS.dead_letter_cap, metadata={"help": "dead letters kept per product"}
    )
    max_message_bytes: int = field(
        default=_DEFAULTS.max_message_bytes, metadata={"help": "largest message stored"}
    )
    max_pending_bytes: int = field(
        default=_DEFAULTS.max_pending_bytes,
        metadata={"help": "about the most bytes of messages one pending call returns"},
    )
    broadcast_settle_s: float = field(
        default=_DEFAULTS.broadcast_settle_s,
        metadata={"help": "seconds a broadcast is acked one by one before the watermark"},
    )

    def limits(self) -> SaverLimits:
        """ValueError names the first limit out of range."""
        return SaverLimits(
            inbox_cap=self.inbox_cap,
            max_attempts=self.max_attempts,
            broadcast_cap=self.broadcast_cap,
            state_cap=self.state_cap,
            state_grace_s=self.state_grace_s,
            dead_letter_cap=self.dead_letter_cap,
            max_message_bytes=self.max_message_bytes,
            max_pending_bytes=self.max_pending_bytes,
            broadcast_settle_s=self.broadcast_settle_s,
        )


def from_args(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> SaverConfig:
    """Flags win over IM_SAVER_* environment variables, which win over defaults."""
    return settings.parse(SaverConfig, argv, ENV_PREFIX, prog="im saver", environ=environ)

"""Coordinator service settings, from flags and IM_COORDINATOR_* environment variables."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from im import settings

ENV_PREFIX = "IM_COORDINATOR_"


@dataclass(slots=True)
class CoordinatorConfig:
    host: str = field(default="127.0.0.1", metadata={"help": "RPC listen address"})
    port: int = field(default=8074, metadata={"help": "RPC port (room instances connect here)"})
    metrics_port: int = field(default=8079, metadata={"help": "HTTP port for /metrics, /healthz"})
    config: str | None = field(
        default=None, metadata={"help": "products TOML (default: $IM_CONFIG, else the dev product)"}
    )
    queue_cap: int = field(
        default=10_000, metadata={"help": "messages and events waiting per product; more refused"}
    )
    queue_bytes: int = field(
        default=64 * 1024 * 1024, metadata={"help": "bytes waiting per product; more refused"}
    )
    batch_max: int = field(default=100, metadata={"help": "messages and events in one POST"})
    batch_bytes: int = field(
        default=1024 * 1024,
        metadata={"help": "about the largest POST body (a bigger single item goes alone)"},
    )
    batch_ms: float = field(
        default=50.0, metadata={"help": "longest wait for a batch to fill before it is posted"}
    )
    timeout_s: float = field(default=5.0, metadata={"help": "time limit of one POST"})
    attempts: int = field(
        default=5, metadata={"help": "POSTs of one batch before it is dead-lettered"}
    )
    backoff_s: float = field(
        default=0.2, metadata={"help": "pause before the first retry; doubles each time"}
    )
    backoff_max_s: float = field(default=10.0, metadata={"help": "longest pause between retries"})
    close_grace_s: float = field(
        default=5.0, metadata={"help": "on stop, time left to post what is queued"}
    )

    def __post_init__(self) -> None:
        for name in ("queue_cap", "queue_bytes", "batch_max", "batch_bytes", "attempts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        for name in ("batch_ms", "backoff_s", "backoff_max_s", "close_grace_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if not self.timeout_s > 0:
            raise ValueError("timeout_s must be > 0")


def from_args(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> CoordinatorConfig:
    """Flags win over IM_COORDINATOR_* environment variables, which win over defaults."""
    return settings.parse(
        CoordinatorConfig, argv, ENV_PREFIX, prog="im coordinator", environ=environ
    )

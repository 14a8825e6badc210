"""Register service settings, from flags and IM_REGISTER_* environment variables."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from im import settings

ENV_PREFIX = "IM_REGISTER_"


@dataclass(slots=True)
class RegisterConfig:
    host: str = field(default="127.0.0.1", metadata={"help": "RPC listen address"})
    port: int = field(default=8070, metadata={"help": "RPC port (room and center connect here)"})
    metrics_port: int = field(default=8071, metadata={"help": "HTTP port for /metrics, /healthz"})
    redis: str | None = field(default=None, metadata={"help": "redis:// URL; memory if unset"})


def from_args(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> RegisterConfig:
    """Flags win over IM_REGISTER_* environment variables, which win over defaults."""
    return settings.parse(RegisterConfig, argv, ENV_PREFIX, prog="im register", environ=environ)

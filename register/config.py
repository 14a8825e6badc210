"""Register service settings, from flags and IM_REGISTER_* environment variables."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass, field

from im import settings

ENV_PREFIX = "IM_REGISTER_"


@dataclass(slots=True)
class RegisterConfig:
    host: str = field(default="127.0.0.1", metadata={"help": "RPC listen address"})
    port: int = field(default=8070, metadata={"help": "RPC port (room and center connect here)"})
    metrics_port: int = field(default=8071, metadata={"help": "HTTP port for /metrics, /healthz"})
    redis: str | None = field(default=None, metadata={"help": "redis:// URL; memory if unset"})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    settings.add_arguments(parser, RegisterConfig, ENV_PREFIX)


def from_args(
    args: argparse.Namespace | None, environ: Mapping[str, str] | None = None
) -> RegisterConfig:
    return settings.build(RegisterConfig, args, ENV_PREFIX, environ)

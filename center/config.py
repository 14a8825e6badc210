"""Center's settings, from flags and IM_CENTER_* environment variables (flags win)."""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from im import settings

ENV_PREFIX = "IM_CENTER_"


@dataclass(frozen=True, slots=True)
class CenterConfig:
    host: str = field(default="127.0.0.1", metadata={"help": "listen address"})
    port: int = field(default=8080, metadata={"help": "listen port, 0 for any free one"})
    register: str = field(default="127.0.0.1:8070", metadata={"help": "register RPC host:port"})
    config: str | None = field(default=None, metadata={"help": "products TOML file"})
    rpc_timeout: float = field(default=2.0, metadata={"help": "seconds per register/room RPC"})
    max_body: int = field(default=1024 * 1024, metadata={"help": "largest request body, bytes"})

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be between 0 and 65535, got {self.port}")
        if self.rpc_timeout <= 0:
            raise ValueError("rpc_timeout must be positive")
        if self.max_body <= 0:
            raise ValueError("max_body must be positive")


def from_args(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> CenterConfig:
    parser = argparse.ArgumentParser(
        prog="im center", description="The business-facing HTTP push API."
    )
    settings.add_arguments(parser, CenterConfig, ENV_PREFIX)
    args = parser.parse_args(argv)
    try:
        return settings.build(CenterConfig, args, ENV_PREFIX, environ)
    except ValueError as exc:
        parser.error(str(exc))

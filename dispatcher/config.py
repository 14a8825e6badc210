"""Dispatcher settings, from flags and IM_DISPATCHER_* environment variables (flags win)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from im import settings

ENV_PREFIX = "IM_DISPATCHER_"
MAX_ADDRESSES = 64


@dataclass(frozen=True, slots=True)
class DispatcherConfig:
    host: str = field(default="127.0.0.1", metadata={"help": "listen address"})
    port: int = field(default=8081, metadata={"help": "listen port, 0 for any free one"})
    register: str = field(default="127.0.0.1:8070", metadata={"help": "register RPC host:port"})
    rpc_timeout: float = field(default=1.0, metadata={"help": "seconds per register call"})
    node_cache_s: float = field(
        default=1.0,
        metadata={"help": "seconds the node table is reused: one register call per period"},
    )
    stale_s: float = field(
        default=30.0,
        metadata={"help": "seconds an old node table is still served while the register fails"},
    )
    route_ttl_s: float = field(
        default=60.0, metadata={"help": "seconds a client may cache an answer (ttl_s)"}
    )
    max_addresses: int = field(default=8, metadata={"help": "addresses in one answer, at most"})
    retry_min_ms: int = field(
        default=500, metadata={"help": "shortest retry_after_ms of a saturated answer"}
    )
    retry_max_ms: int = field(
        default=5000, metadata={"help": "longest retry_after_ms, when the cluster is overloaded"}
    )

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be between 0 and 65535, got {self.port}")
        if self.rpc_timeout <= 0:
            raise ValueError("rpc_timeout must be positive")
        if not 0 < self.node_cache_s <= 60:
            raise ValueError("node_cache_s must be in (0, 60]")
        if self.stale_s < self.node_cache_s:
            raise ValueError("stale_s must be at least node_cache_s")
        if self.route_ttl_s <= 0:
            raise ValueError("route_ttl_s must be positive")
        if not 1 <= self.max_addresses <= MAX_ADDRESSES:
            raise ValueError(f"max_addresses must be between 1 and {MAX_ADDRESSES}")
        if not 0 < self.retry_min_ms <= self.retry_max_ms:
            raise ValueError("retry_min_ms must be positive and at most retry_max_ms")


def from_args(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> DispatcherConfig:
    return settings.parse(
        DispatcherConfig,
        argv,
        ENV_PREFIX,
        prog="im dispatcher",
        description="Tells clients which room instances to connect to.",
        environ=environ,
    )

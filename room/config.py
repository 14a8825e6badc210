"""Room instance settings: one typed place, filled from CLI flags and IM_ROOM_* env vars."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass

from im import settings

BASE_WS_PORT = 8090


@dataclass(slots=True)
class RoomConfig:
    index: int = 0  # instance i listens on WebSocket 8090+2i and TCP 8091+2i by default
    host: str = "127.0.0.1"
    ws_port: int | None = None
    tcp_port: int | None = None
    rpc_port: int | None = None  # internal RPC; 0 picks a free port, None = 8190+i
    ws_path: str = "/ws"
    advertise_host: str | None = None  # host put in the node table; defaults to host
    idc: str = "default"
    register: str = "127.0.0.1:8070"
    config: str | None = None  # products TOML
    heartbeat_s: float = 25.0
    heartbeat_min_s: float = 5.0
    heartbeat_max_s: float = 300.0
    missed_heartbeats: int = 3
    auth_timeout_s: float = 10.0
    max_frame: int = 64 * 1024
    queue_cap: int = 200
    flush_interval_ms: float = 5.0
    write_buffer_high: int = 64 * 1024
    session_ttl_s: float = 60.0
    node_ttl_s: float = 10.0
    register_batch: int = 1000

    def __post_init__(self) -> None:
        if self.ws_port is None:
            self.ws_port = BASE_WS_PORT + 2 * self.index
        if self.tcp_port is None:
            self.tcp_port = BASE_WS_PORT + 1 + 2 * self.index
        if self.rpc_port is None:
            self.rpc_port = BASE_WS_PORT + 100 + self.index
        if self.flush_interval_ms < 0:
            raise ValueError("flush_interval_ms must be >= 0")
        if self.queue_cap < 1:
            raise ValueError("queue_cap must be >= 1")

    @property
    def idle_timeout_s(self) -> float:
        return self.heartbeat_s * self.missed_heartbeats

    def clamp_heartbeat(self, asked: float | None) -> float:
        if asked is None:
            return self.heartbeat_s
        return min(max(float(asked), self.heartbeat_min_s), self.heartbeat_max_s)


ENV_PREFIX = "IM_ROOM_"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    settings.add_arguments(parser, RoomConfig, ENV_PREFIX)


def from_args(
    args: argparse.Namespace | None, environ: Mapping[str, str] | None = None
) -> RoomConfig:
    """Flags win over IM_ROOM_* environment variables, which win over defaults."""
    return settings.build(RoomConfig, args, ENV_PREFIX, environ)

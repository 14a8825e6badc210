"""Room instance settings: one typed place, filled from CLI flags and IM_ROOM_* env vars."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from im import settings
from im.rpc.client import parse_address
from room.limits import networks

BASE_WS_PORT = 8090


@dataclass(slots=True)
class RoomConfig:
    index: int = field(
        default=0,
        metadata={
            "help": "instance number i: default ports WebSocket 8090+2i, TCP 8091+2i, RPC 8190+i"
        },
    )
    host: str = field(default="127.0.0.1", metadata={"help": "listen address"})
    ws_port: int | None = field(
        default=None, metadata={"help": "WebSocket port (0 = any free port)"}
    )
    tcp_port: int | None = field(default=None, metadata={"help": "TCP port (0 = any free port)"})
    rpc_port: int | None = field(
        default=None, metadata={"help": "internal RPC port for center (0 = any free port)"}
    )
    reuse_port: bool = field(
        default=False,
        metadata={
            "help": "share the ports with other instances (SO_REUSEPORT); off, so a "
            "stale process on the port is an error instead of a silent split"
        },
    )
    ws_path: str = field(default="/ws", metadata={"help": "WebSocket path"})
    advertise_host: str | None = field(
        default=None, metadata={"help": "host published in the node table (default: --host)"}
    )
    idc: str = field(
        default="default", metadata={"help": "data centre tag published in the node table"}
    )
    isp: str = field(
        default="", metadata={"help": "network (carrier) tag published in the node table"}
    )
    max_conns: int = field(
        default=0,
        metadata={"help": "connections the dispatcher may send here (0 = no limit)"},
    )
    max_conn_rate: float = field(
        default=0.0,
        metadata={"help": "new connections per second the dispatcher may send here (0 = no limit)"},
    )
    register: str = field(default="127.0.0.1:8070", metadata={"help": "register RPC host:port"})
    saver: str = field(
        default="127.0.0.1:8072",
        metadata={
            "help": "saver RPC host:port: qos 1 messages pending at login, ACKs; empty: none "
            "(nothing is loaded at login and ACKs are only counted)"
        },
    )
    qos_resync_s: float = field(
        default=5.0,
        metadata={
            "help": "seconds between second looks at the pending qos 1 messages of connections "
            "that dropped frames or could not load them at login"
        },
    )
    config: str | None = field(
        default=None, metadata={"help": "products TOML (default: $IM_CONFIG, else the dev product)"}
    )
    heartbeat_s: float = field(
        default=25.0, metadata={"help": "heartbeat interval offered to clients, seconds"}
    )
    heartbeat_min_s: float = field(
        default=5.0, metadata={"help": "lowest heartbeat a client may ask for"}
    )
    heartbeat_max_s: float = field(
        default=300.0, metadata={"help": "highest heartbeat a client may ask for"}
    )
    missed_heartbeats: int = field(
        default=3, metadata={"help": "silent intervals before a connection is closed (4007)"}
    )
    auth_timeout_s: float = field(
        default=10.0, metadata={"help": "seconds to authenticate before 4002"}
    )
    max_frame: int = field(
        default=64 * 1024, metadata={"help": "largest client frame or message, bytes (4006 above)"}
    )
    queue_cap: int = field(
        default=200, metadata={"help": "frames queued per connection, all priorities together"}
    )
    flush_interval_ms: float = field(
        default=5.0, metadata={"help": "write coalescing tick; 0 = next loop iteration"}
    )
    room_flush_ms: float = field(
        default=200.0,
        metadata={"help": "room write tick: one shared write per member (high flushes at once)"},
    )
    max_rooms_per_conn: int = field(
        default=16, metadata={"help": "chat rooms one connection may join"}
    )
    switches_poll_s: float = field(
        default=0.5, metadata={"help": "how often to look for new switches"}
    )
    write_buffer_high: int = field(
        default=64 * 1024, metadata={"help": "socket buffer bytes above which frames wait queued"}
    )
    session_ttl_s: float = field(
        default=60.0, metadata={"help": "session lease in the register (renewed every third)"}
    )
    node_ttl_s: float = field(
        default=10.0, metadata={"help": "node lease in the register (renewed every third)"}
    )
    register_batch: int = field(default=1000, metadata={"help": "sessions per register call"})
    drain_s: float = field(
        default=30.0,
        metadata={
            "help": "drain window (SIGTERM, `im drain`): reconnect hints spread over it, then exit"
        },
    )
    coordinator: str = field(
        default="127.0.0.1:8074",
        metadata={"help": "coordinator RPC host:port for up frames and events; empty = off"},
    )
    up_rate: float = field(
        default=20.0, metadata={"help": "up frames per second per connection (bursts of 2x)"}
    )
    tls_cert: str | None = field(
        default=None,
        metadata={"help": "PEM certificate chain: TLS on both listeners (wss://, tcps://)"},
    )
    tls_key: str | None = field(default=None, metadata={"help": "PEM key of --tls-cert"})
    tls_reload_s: float = field(
        default=30.0, metadata={"help": "how often to look for a renewed certificate, seconds"}
    )
    secure_key: str | None = field(
        default=None,
        metadata={
            "help": "file with the hex X25519 private key (`im secure-key`): enables the "
            "encrypted channel for clients without TLS"
        },
    )
    max_conns_per_ip: int = field(
        default=1000,
        metadata={"help": "open connections from one address, IPv6 by /64 (4018; 0 = no limit)"},
    )
    conn_rate_per_ip: float = field(
        default=50.0,
        metadata={
            "help": "new connections a second from one address, bursts of 2x (4019; 0 = off)"
        },
    )
    limit_exempt: str = field(
        default="127.0.0.0/8,::1/128",
        metadata={
            "help": "comma-separated CIDRs the per-address limits skip (a local proxy's "
            "clients all share its address)"
        },
    )
    ip_allow: str = field(
        default="",
        metadata={"help": "comma-separated CIDRs allowed to connect; empty = any (4020)"},
    )
    ip_deny: str = field(
        default="",
        metadata={"help": "comma-separated CIDRs refused; wins over --ip-allow (4020)"},
    )
    frame_rate: float = field(
        default=200.0,
        metadata={
            "help": "frames per second one connection may send, bursts of 2x (4021; 0 = no limit)"
        },
    )
    handshake_timeout_s: float = field(
        default=5.0,
        metadata={"help": "seconds for the TLS handshake and the WebSocket request head (4022)"},
    )
    slow_sender_s: float = field(
        default=15.0,
        metadata={"help": "seconds a started frame may take to arrive whole (4022)"},
    )
    slow_reader_s: float = field(
        default=30.0,
        metadata={"help": "seconds a client's socket may stay too full to write to (4008)"},
    )
    max_http_head: int = field(
        default=8192, metadata={"help": "largest WebSocket request head, bytes (HTTP 431)"}
    )

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
        if self.max_conns < 0 or not 0 <= self.max_conn_rate < math.inf:
            raise ValueError("max_conns and max_conn_rate must be >= 0 (0 = no limit)")
        if not self.up_rate > 0:
            raise ValueError("up_rate must be > 0")
        if self.coordinator:
            parse_address(self.coordinator)
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: give both or neither")
        for name in ("tls_reload_s", "handshake_timeout_s", "slow_sender_s", "slow_reader_s"):
            if not 0 < getattr(self, name) < math.inf:
                raise ValueError(f"{name} must be a positive number of seconds")
        if self.max_conns_per_ip < 0 or not 0 <= self.conn_rate_per_ip < math.inf:
            raise ValueError("max_conns_per_ip and conn_rate_per_ip must be >= 0 (0 = no limit)")
        if not 0 <= self.frame_rate < math.inf:
            raise ValueError("frame_rate must be >= 0 (0 = no limit)")
        if self.max_http_head < 256:
            raise ValueError("max_http_head must be at least 256 bytes")
        for name in ("limit_exempt", "ip_allow", "ip_deny"):
            networks(getattr(self, name), name)

    @property
    def idle_timeout_s(self) -> float:
        return self.heartbeat_s * self.missed_heartbeats

    def clamp_heartbeat(self, asked: float | None) -> float:
        if asked is None:
            return self.heartbeat_s
        return min(max(float(asked), self.heartbeat_min_s), self.heartbeat_max_s)


ENV_PREFIX = "IM_ROOM_"


def from_args(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> RoomConfig:
    """Flags win over IM_ROOM_* environment variables, which win over defaults."""
    return settings.parse(RoomConfig, argv, ENV_PREFIX, prog="im room", environ=environ)

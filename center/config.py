"""Center's settings, from flags and IM_CENTER_* environment variables (flags win)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from center.jobs import is_worker_name
from im import settings

ENV_PREFIX = "IM_CENTER_"
WORKER_ENV_PREFIX = "IM_WORKER_"
GROUP = "im-fanout"
MAX_WORKERS = 64


@dataclass(frozen=True, slots=True)
class CenterConfig:
    host: str = field(default="127.0.0.1", metadata={"help": "listen address"})
    port: int = field(default=8080, metadata={"help": "listen port, 0 for any free one"})
    register: str = field(default="127.0.0.1:8070", metadata={"help": "register RPC host:port"})
    saver: str = field(
        default="127.0.0.1:8072",
        metadata={
            "help": "saver RPC host:port, where qos 1 messages are stored before the answer; "
            "empty: none (qos 1 and Idempotency-Key then answer 503)"
        },
    )
    config: str | None = field(default=None, metadata={"help": "products TOML file"})
    rpc_timeout: float = field(default=2.0, metadata={"help": "seconds per register/room RPC"})
    max_body: int = field(default=1024 * 1024, metadata={"help": "largest request body, bytes"})
    brokers: str | None = field(
        default=None,
        metadata={"help": "Kafka bootstrap servers host:port[,...]; the in-process bus if unset"},
    )
    idempotence: bool = field(
        default=False,
        metadata={"help": "idempotent Kafka producer (the broker must support it)"},
    )
    workers: int = field(
        default=1,
        metadata={
            "help": "fan-out workers run inside center (w0, w1, ...); 0 with --brokers when "
            "they run as their own processes (python -m center.worker_main)"
        },
    )

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be between 0 and 65535, got {self.port}")
        if self.rpc_timeout <= 0:
            raise ValueError("rpc_timeout must be positive")
        if self.max_body <= 0:
            raise ValueError("max_body must be positive")
        if not 0 <= self.workers <= MAX_WORKERS:
            raise ValueError(f"workers must be between 0 and {MAX_WORKERS}, got {self.workers}")
        if self.workers == 0 and not self.brokers:
            raise ValueError(
                "workers 0 needs brokers: the in-process bus is only read by workers in center"
            )


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    brokers: str | None = field(
        default=None, metadata={"help": "Kafka bootstrap servers host:port[,...] (required)"}
    )
    register: str = field(default="127.0.0.1:8070", metadata={"help": "register RPC host:port"})
    name: str = field(
        default="w0", metadata={"help": "worker name: room_pin names it; unique per worker"}
    )
    group: str = field(default=GROUP, metadata={"help": "consumer group shared by the workers"})
    rpc_timeout: float = field(default=2.0, metadata={"help": "seconds per register/room RPC"})
    host: str = field(default="127.0.0.1", metadata={"help": "listen address of /metrics"})
    metrics_port: int = field(
        default=8075, metadata={"help": "HTTP port of /metrics and /healthz, 0 for a free one"}
    )
    session_timeout_s: float = field(
        default=10.0,
        metadata={"help": "Kafka group session: how soon a dead worker's partitions move on"},
    )

    def __post_init__(self) -> None:
        if not self.brokers:
            raise ValueError("brokers is required: a worker process reads the Kafka bus")
        if not is_worker_name(self.name):
            raise ValueError(f"name must be 1 to 64 of A-Z a-z 0-9 _ -, got {self.name!r:.80}")
        if not self.group:
            raise ValueError("group must not be empty")
        if self.rpc_timeout <= 0:
            raise ValueError("rpc_timeout must be positive")
        if not 1 <= self.session_timeout_s <= 300:
            raise ValueError("session_timeout_s must be between 1 and 300")
        if not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port must be between 0 and 65535, got {self.metrics_port}")


def from_args(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> CenterConfig:
    return settings.parse(
        CenterConfig,
        argv,
        ENV_PREFIX,
        prog="im center",
        description="The business-facing HTTP push API.",
        environ=environ,
    )


def worker_from_args(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> WorkerConfig:
    return settings.parse(
        WorkerConfig,
        argv,
        WORKER_ENV_PREFIX,
        prog="im worker",
        description="A fan-out worker: jobs from Kafka to the room instances.",
        environ=environ,
    )

"""`im up`: every service as its own process on one machine, supervised.

Each service runs exactly as it would alone on its own host (`python -m room ...`), so
what works under `im up` works split across machines. A child that dies unexpectedly is
restarted after a short pause; Ctrl-C or SIGTERM stops them all cleanly.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

RESTART_PAUSE_S = 1.0
#: Worker i serves /metrics on register port + 5 + i; the coordinator's is register port + 9.
MAX_WORKERS = 4
STOP_GRACE_S = 10.0


@dataclass
class Child:
    name: str
    argv: list[str]
    process: subprocess.Popen | None = None
    restarts: int = 0

    def start(self) -> None:
        self.process = subprocess.Popen([sys.executable, "-m", *self.argv])


def _rpc_service(module: str, host: str, port: int, metrics_port: int, extra: list[str]) -> Child:
    """A service with an RPC port and an HTTP /metrics port."""
    argv = [module, "--host", host, "--port", str(port), "--metrics-port", str(metrics_port)]
    return Child(module, [*argv, *extra])


def plan(args: argparse.Namespace) -> list[Child]:
    host = args.host
    common = ["--config", args.config] if args.config else []
    redis = ["--redis", args.redis] if args.redis else []
    base = args.register_port
    saver_address = f"{host}:{base + 2}"
    coordinator_address = f"{host}:{base + 4}"
    children = [
        _rpc_service("register", host, base, base + 1, redis),
        _rpc_service("saver", host, base + 2, base + 3, redis),
        _rpc_service("coordinator", host, base + 4, base + 9, common),
    ]
    register_address = f"{host}:{args.register_port}"
    for i in range(args.rooms):
        children.append(
            Child(
                f"room-{i}",
                [
                    "room",
                    "--index",
                    str(i),
                    "--host",
                    host,
                    "--register",
                    register_address,
                    "--saver",
                    saver_address,
                    "--coordinator",
                    coordinator_address,
                    "--ws-port",
                    str(args.base_port + 2 * i),
                    "--tcp-port",
                    str(args.base_port + 1 + 2 * i),
                    "--rpc-port",
                    str(args.base_port + 100 + i),
                    "--idc",
                    args.idc,
                    *common,
                ],
            )
        )
    # On Kafka the fan-out workers run as their own processes, as they would across hosts;
    # the in-process bus can only be read by workers inside center.
    bus = ["--brokers", args.kafka, "--workers", "0"] if args.kafka else []
    center = ["center", "--host", host, "--port", str(args.center_port)]
    children.append(
        Child(
            "center",
            [*center, "--register", register_address, "--saver", saver_address, *bus, *common],
        )
    )
    children.append(
        Child(
            "dispatcher",
            [
                "dispatcher",
                "--host",
                host,
                "--port",
                str(args.dispatcher_port),
                "--register",
                register_address,
            ],
        )
    )
    if args.kafka:
        for i in range(args.workers):
            children.append(
                Child(
                    f"worker-{i}",
                    [
                        "center.worker_main",
                        "--brokers",
                        args.kafka,
                        "--register",
                        register_address,
                        "--name",
                        f"w{i}",
                        "--host",
                        host,
                        "--metrics-port",
                        str(args.register_port + 5 + i),
                        "--session-timeout-s",
                        str(args.worker_session_timeout_s),
                    ],
                )
            )
    return children


def banner(args: argparse.Namespace) -> str:
    lines = [
        f"center    http://{args.host}:{args.center_port}  (POST /v1/push/users, /metrics)"
        f"  bus: {'kafka ' + args.kafka if args.kafka else 'in-process'}",
        f"register  {args.host}:{args.register_port} rpc, "
        f"http://{args.host}:{args.register_port + 1}/metrics  "
        f"({'redis ' + args.redis if args.redis else 'memory engine'})",
        f"saver     {args.host}:{args.register_port + 2} rpc, "
        f"http://{args.host}:{args.register_port + 3}/metrics",
        f"coordinator {args.host}:{args.register_port + 4} rpc, "
        f"http://{args.host}:{args.register_port + 9}/metrics  (up frames -> product webhooks)",
        f"dispatcher http://{args.host}:{args.dispatcher_port}/v1/route?product=&uid=",
    ]
    if args.kafka:
        for i in range(args.workers):
            lines.append(f"worker-{i}  http://{args.host}:{args.register_port + 5 + i}/metrics")
    for i in range(args.rooms):
        ws_port, tcp_port = args.base_port + 2 * i, args.base_port + 1 + 2 * i
        lines.append(f"room-{i}    ws://{args.host}:{ws_port}/ws  tcp://{args.host}:{tcp_port}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="im up", description="Start register, center and room instances on this machine."
    )
    parser.add_argument("--rooms", type=int, default=1, help="room instances (default 1)")
    parser.add_argument("--redis", default=None, help="redis:// URL for the register")
    parser.add_argument("--config", default=os.environ.get("IM_CONFIG"), help="products TOML")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--center-port", type=int, default=8080)
    parser.add_argument("--register-port", type=int, default=8070)
    parser.add_argument("--dispatcher-port", type=int, default=8081)
    parser.add_argument(
        "--base-port",
        type=int,
        default=8090,
        help="room i listens on WebSocket BASE+2i, TCP BASE+1+2i, RPC BASE+100+i (default 8090)",
    )
    parser.add_argument("--idc", default="default")
    parser.add_argument(
        "--kafka", default=None, help="Kafka bootstrap HOST:PORT for the bus (default in-process)"
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="fan-out worker processes with --kafka (default 1)"
    )
    parser.add_argument(
        "--worker-session-timeout-s",
        type=float,
        default=3.0,
        help="Kafka group session of the worker processes: how soon a dead worker's "
        "partitions move to the others (default 3 s on one machine)",
    )
    args = parser.parse_args(argv)
    if args.rooms < 1:
        parser.error("--rooms must be at least 1")
    if args.kafka and not 1 <= args.workers <= MAX_WORKERS:
        parser.error(f"--workers must be between 1 and {MAX_WORKERS} with --kafka")

    children = plan(args)
    stopping = False

    def stop(signum, frame) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    for child in children:
        child.start()
        if child.name in ("register", "saver", "coordinator"):
            time.sleep(0.3)  # rooms connect to it at once; spare them a failed first call
    print(banner(args), flush=True)

    while not stopping:
        time.sleep(0.2)
        for child in children:
            if child.process is not None and child.process.poll() is not None and not stopping:
                print(
                    f"im up: {child.name} exited with {child.process.returncode}; restarting",
                    file=sys.stderr,
                    flush=True,
                )
                time.sleep(RESTART_PAUSE_S)
                child.restarts += 1
                child.start()

    for child in reversed(children):  # SIGINT: stop now (SIGTERM would drain the rooms)
        if child.process and child.process.poll() is None:
            child.process.send_signal(signal.SIGINT)
    deadline = time.monotonic() + STOP_GRACE_S
    for child in reversed(children):
        if child.process is None:
            continue
        try:
            child.process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.process.kill()
    return 0

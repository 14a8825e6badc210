"""What TLS and the encrypted channel cost the room: CPU per delivered frame, next to plain.

For each mode (plain TCP, TLS, the encrypted channel) the script starts a register and one
room instance as processes of their own, connects N clients over TCP in this process,
authenticates them, then has the room broadcast a push to all of them R times a second for
D seconds through its RPC, as center's workers would. It counts the frames the clients
receive and reads the room process's CPU time from /proc before and after, so CPU per
delivered frame is the room's alone: the clients' own decryption runs here.

    python3 -m bench.secure_cost --conns 1000 --rate 20 --seconds 10

prints a table and writes the figures as JSON (--out).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from ssl import SSLContext, create_default_context

from bench.procstat import CLOCK_TICKS, parse_stat
from im.auth import issue_token
from im.config import DEV_PRODUCT, dev_products
from im.protocol.codec import Encoding, decode, encode
from im.protocol.framing import FrameDecoder, frame
from im.protocol.secure import ClientHandshake, SecureSession
from im.rpc import RpcClient
from im.tls import make_dev_cert

MODES = ("plain", "tls", "secure")
HOST = "127.0.0.1"
BODY = {"text": "x" * 100}  # a chat-sized push: about 170 bytes on the wire
CONNECT_BATCH = 100  # clients connecting at once
DRAIN_S = 5.0  # after the last broadcast, how long the clients may take to read the rest


@dataclass
class Result:
    mode: str
    conns: int
    broadcasts: int
    frames: int
    room_cpu_s: float
    us_per_frame: float


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    utime, stime = parse_stat(Path(f"/proc/{pid}/stat").read_text())
    return (utime + stime) / CLOCK_TICKS


class Receiver(asyncio.Protocol):
    """One client: counts the frames of pushes it is sent, opening them on the channel."""

    def __init__(self, session: SecureSession | None, decoder: FrameDecoder) -> None:
        self.session = session
        self.decoder = decoder
        self.frames = 0
        self.transport: asyncio.BaseTransport | None = None
        self.writer: asyncio.StreamWriter | None = None  # held: a collected writer closes

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        for payload in self.decoder.feed(data):
            if self.session is not None:
                payload = self.session.open(payload)
            self.frames += 1


async def _next_payload(reader: asyncio.StreamReader, decoder: FrameDecoder) -> bytes:
    while True:
        found = decoder.feed(await reader.read(65536))
        if found:
            assert len(found) == 1, "the room sent more than one frame before auth_ok"
            return found[0]


async def connect(
    port: int, uid: str, token: str, ssl: SSLContext | None, server_key: bytes | None
) -> Receiver:
    """Connect and authenticate with streams, then hand the socket to a lean protocol."""
    reader, writer = await asyncio.open_connection(HOST, port, ssl=ssl)
    decoder = FrameDecoder(1 << 20)
    session = None
    if server_key is not None:
        handshake = ClientHandshake(server_key)
        writer.write(frame(handshake.hello))
        session = handshake.finish(await _next_payload(reader, decoder))
    auth = encode(
        {"op": "auth", "product": DEV_PRODUCT, "uid": uid, "token": token}, Encoding.MSGPACK
    )
    writer.write(frame(session.seal(auth) if session else auth))
    reply = await _next_payload(reader, decoder)
    answer = decode(session.open(reply) if session else reply, Encoding.MSGPACK)
    if answer.get("op") != "auth_ok":
        raise ConnectionError(f"auth refused: {answer}")
    receiver = Receiver(session, decoder)
    receiver.writer = writer
    transport = writer.transport
    transport.set_protocol(receiver)
    receiver.connection_made(transport)
    return receiver


@contextlib.contextmanager
def process(argv: list[str]) -> Iterator[subprocess.Popen]:
    env = {**os.environ, "IM_LOG_LEVEL": "WARNING"}
    child = subprocess.Popen(argv, env=env)
    try:
        yield child
    finally:
        child.terminate()
        try:
            child.wait(5)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


async def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            _, writer = await asyncio.open_connection(HOST, port)
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)
            continue
        writer.close()
        return


async def run_mode(mode: str, args: argparse.Namespace, work: Path) -> Result:
    register_port, tcp_port, ws_port, rpc_port = (free_port() for _ in range(4))
    room_argv = [
        sys.executable, "-m", "room",
        "--host", HOST,
        "--register", f"{HOST}:{register_port}",
        "--saver", "",
        "--coordinator", "",
        "--tcp-port", str(tcp_port),
        "--ws-port", str(ws_port),
        "--rpc-port", str(rpc_port),
    ]  # fmt: skip
    ssl: SSLContext | None = None
    server_key: bytes | None = None
    if mode == "tls":
        make_dev_cert(work / "cert.pem", work / "key.pem")
        room_argv += ["--tls-cert", str(work / "cert.pem"), "--tls-key", str(work / "key.pem")]
        ssl = create_default_context(cafile=str(work / "cert.pem"))
    elif mode == "secure":
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

        from im.protocol.secure import public_bytes

        key = X25519PrivateKey.generate()
        (work / "channel.key").write_text(key.private_bytes_raw().hex())
        room_argv += ["--secure-key", str(work / "channel.key")]
        server_key = public_bytes(key)
    register_argv = [sys.executable, "-m", "register", "--host", HOST, "--port",
                     str(register_port), "--metrics-port", "0"]  # fmt: skip
    with process(register_argv), process(room_argv) as room:
        await wait_port(register_port)
        await wait_port(rpc_port)
        product = dev_products()[DEV_PRODUCT]
        receivers: list[Receiver] = []
        for start in range(0, args.conns, CONNECT_BATCH):
            batch = range(start, min(start + CONNECT_BATCH, args.conns))
            receivers += await asyncio.gather(
                *(
                    connect(tcp_port, f"u{i}", issue_token(product, f"u{i}"), ssl, server_key)
                    for i in batch
                )
            )
        rpc = RpcClient(f"{HOST}:{rpc_port}", timeout=10.0)
        await asyncio.sleep(1.0)  # let the logins' register calls settle
        before = cpu_seconds(room.pid)
        loop = asyncio.get_running_loop()
        started = loop.time()
        broadcasts = int(args.rate * args.seconds)
        for n in range(broadcasts):
            await asyncio.sleep(max(0.0, started + n / args.rate - loop.time()))
            message = {
                "op": "push", "id": f"b{n}", "type": "chat", "pri": "normal",
                "qos": 0, "ts": int(time.time() * 1000), "body": BODY,
            }  # fmt: skip
            await rpc.call("broadcast", {"product": DEV_PRODUCT, "msg": message})
        expected = broadcasts * len(receivers)
        deadline = loop.time() + DRAIN_S
        while sum(r.frames for r in receivers) < expected and loop.time() < deadline:
            await asyncio.sleep(0.05)
        room_cpu = cpu_seconds(room.pid) - before
        frames = sum(r.frames for r in receivers)
        await rpc.close()
        for receiver in receivers:
            if receiver.transport is not None:
                receiver.transport.close()
    return Result(mode, args.conns, broadcasts, frames, room_cpu, room_cpu / max(frames, 1) * 1e6)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conns", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=20.0, help="broadcasts per second")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--modes", default=",".join(MODES), help="comma list of " + "/".join(MODES))
    parser.add_argument("--out", default="bench/results/secure-cost.json")
    args = parser.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    if not modes or set(modes) - set(MODES):
        parser.error(f"--modes takes {', '.join(MODES)}")
    results = []
    for mode in modes:
        with tempfile.TemporaryDirectory() as work:
            results.append(asyncio.run(run_mode(mode, args, Path(work))))
        r = results[-1]
        print(
            f"{r.mode:7} {r.conns} conns, {r.frames} frames delivered "
            f"(of {r.broadcasts * r.conns}), room CPU {r.room_cpu_s:.2f} s, "
            f"{r.us_per_frame:.2f} us/frame",
            flush=True,
        )
    report = {
        "command": "python3 -m bench.secure_cost " + " ".join(argv or sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "results": [asdict(r) for r in results],
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""The load tester's pieces: /proc readers, the client-side frame parser, and whole runs
against `im up` and against the comparison peer on free loopback ports."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench import procstat
from bench.clients import ServerFrameError, ServerFrameParser, Target
from im.protocol import websocket as ws

ROOT = Path(__file__).resolve().parent.parent
FLOOD = ROOT / "bench" / "flood.py"
PEER = ROOT / "bench" / "ws_peer.py"

STAT = (
    "4242 (odd) name)) S 1 4242 4242 0 -1 4194560 1200 0 0 0 "
    "731 215 0 0 20 0 3 0 100 123456789 2500 18446744073709551615"
)
STATUS = "Name:\tpython3\nVmPeak:\t  9000 kB\nVmRSS:\t   12345 kB\nThreads:\t3\n"
NET_TCP = (
    "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  "
    "timeout inode\n"
    "   0: 0100007F:1F9A 00000000:0000 0A 00000000:00000000 00:00000000 00000000  0  0 "
    "55501 1 0000000000000000 100 0 0 10 0\n"
    "   1: 0100007F:1F9A 0200007F:C350 01 00000000:00000000 00:00000000 00000000  0  0 "
    "55502 1 0000000000000000 20 4 30 10 -1\n"
    "   2: 00000000:1F9B 00000000:0000 0A 00000000:00000000 00:00000000 00000000  0  0 "
    "55503 1 0000000000000000 100 0 0 10 0\n"
)


def test_parse_stat_counts_fields_after_the_last_parenthesis() -> None:
    assert procstat.parse_stat(STAT) == (731, 215)


def test_parse_status_rss_in_bytes() -> None:
    assert procstat.parse_status_rss(STATUS) == 12345 * 1024
    with pytest.raises(ValueError):
        procstat.parse_status_rss("Name:\tkthreadd\n")


def test_parse_listening_inodes_only_listeners_on_the_port() -> None:
    assert procstat.parse_listening_inodes(NET_TCP, 0x1F9A) == {55501}
    assert procstat.parse_listening_inodes(NET_TCP, 0x1F9B) == {55503}
    assert procstat.parse_listening_inodes(NET_TCP, 1) == set()


def test_cpu_seconds_of_this_process_grow_with_work() -> None:
    before = procstat.cpu_seconds(os.getpid())
    deadline = time.process_time() + 0.1
    while time.process_time() < deadline:
        pass
    assert procstat.cpu_seconds(os.getpid()) >= before + 0.05


def test_rss_of_this_process_grows_with_touched_memory() -> None:
    before = procstat.rss_bytes(os.getpid())
    block = bytearray(64 * 1024 * 1024)
    block[::4096] = b"\x01" * len(block[::4096])
    assert procstat.rss_bytes(os.getpid()) >= before + 48 * 1024 * 1024
    del block


def test_pids_listening_finds_this_process() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        assert os.getpid() not in procstat.pids_listening(port)
        listener.listen()
        assert procstat.pids_listening(port) == [os.getpid()]


def test_server_frame_parser_any_split() -> None:
    stream = (
        ws.binary_frame(b"a" * 300)
        + ws.encode_frame(ws.OP_PING, b"hi")
        + ws.encode_frame(ws.OP_TEXT, b"he", fin=False)
        + ws.encode_frame(ws.OP_CONT, b"llo")
        + ws.binary_frame(b"b" * 70000)
    )
    expected = [
        (ws.OP_BINARY, b"a" * 300),
        (ws.OP_PING, b"hi"),
        (ws.OP_TEXT, b"hello"),
        (ws.OP_BINARY, b"b" * 70000),
    ]
    for step in (1, 7, 1000, len(stream)):
        parser = ServerFrameParser()
        events = []
        for i in range(0, len(stream), step):
            events += parser.feed(stream[i : i + step])
        assert events == expected


def test_server_frame_parser_refuses_what_a_client_must_not_accept() -> None:
    with pytest.raises(ServerFrameError, match="masked"):
        ServerFrameParser().feed(ws.encode_client_frame(ws.OP_BINARY, b"x"))
    with pytest.raises(ServerFrameError, match="limit"):
        ServerFrameParser(max_size=10).feed(ws.binary_frame(b"x" * 11))
    with pytest.raises(ServerFrameError, match="continuation"):
        ServerFrameParser().feed(ws.encode_frame(ws.OP_CONT, b"x"))


def test_target_parse() -> None:
    assert Target.parse("ws://127.0.0.1:8090/ws", "ws") == Target("ws", "127.0.0.1", 8090, "/ws")
    assert Target.parse("127.0.0.1:8091", "tcp") == Target("tcp", "127.0.0.1", 8091, "/")
    with pytest.raises(ValueError):
        Target.parse("http://127.0.0.1:80", "ws")


# -- whole runs ----------------------------------------------------------------------------


def _free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.2)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def _wait_listening(ports: list[int], process: subprocess.Popen, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if all(_listening(p) for p in ports):
            return True
        time.sleep(0.1)
    return False


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def system() -> Iterator[dict[str, int]]:
    """`im up` with one room, every port picked at random in 20000-30000 until it starts."""
    for _ in range(5):
        base = random.randrange(20000, 29900, 2)
        ports = {"base": base, "center": base + 20, "register": base + 30}
        needed = [base, base + 1, ports["center"], ports["register"], ports["register"] + 1]
        if not all(_free(p) for p in needed):
            continue
        env = dict(
            os.environ,
            IM_LOG_LEVEL="WARNING",
            IM_ROOM_WS_PORT=str(base),
            IM_ROOM_TCP_PORT=str(base + 1),
            IM_ROOM_RPC_PORT="0",
        )
        process = subprocess.Popen(
            [sys.executable, "-m", "im", "up", "--base-port", str(base)]
            + ["--center-port", str(ports["center"]), "--register-port", str(ports["register"])],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        if _wait_listening([base, base + 1, ports["center"]], process, 15):
            try:
                yield ports
            finally:
                _stop(process)
            return
        _stop(process)
    pytest.fail("could not start im up on free ports")


def _flood(args: list[str], out: Path) -> dict:
    done = subprocess.run(
        [sys.executable, str(FLOOD), *args, "--procs", "1", "--settle", "0.3", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(out.read_text())


def test_unicast_run_delivers_everything(system: dict[str, int], tmp_path: Path) -> None:
    summary = _flood(
        [
            "--scenario", "unicast", "--clients", "50", "--rate", "50", "--duration", "2",
            "--base-port", str(system["base"]),
            "--center", f"http://127.0.0.1:{system['center']}",
            "--register-port", str(system["register"]),
        ],
        tmp_path / "unicast.json",
    )  # fmt: skip
    assert summary["connections"] == 50
    assert summary["sent"] == 100
    assert summary["delivered"] == summary["sent"]
    assert summary["lost"] == 0
    assert summary["duplicates"] == 0
    assert summary["http_errors"] == 0
    assert 0 < summary["latency_ms"]["p50"] <= summary["latency_ms"]["max"]
    assert len(summary["room_pids"]) == 1
    assert summary["room_cpu_us_per_msg"] is not None


def test_idle_run_against_the_websockets_peer(tmp_path: Path) -> None:
    port = next(p for p in iter(lambda: random.randrange(20000, 30000), None) if _free(p))
    peer = subprocess.Popen(
        [sys.executable, str(PEER), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert peer.stdout is not None
        banner = peer.stdout.readline()
        assert f"pid {peer.pid} " in banner
        summary = _flood(
            ["--clients", "40", "--duration", "0.5", "--targets", f"ws://127.0.0.1:{port}/ws"],
            tmp_path / "peer.json",
        )
    finally:
        _stop(peer)
    assert summary["connections"] == 40
    assert summary["connect_failed"] == 0
    assert summary["room_pids"] == [peer.pid]
    assert summary["room_rss_bytes_per_conn"] is not None

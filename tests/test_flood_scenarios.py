"""The load tester's connect, broadcast, churn, drain and upstream scenarios: their pure
parts, the clients' QoS 1 and reconnect behaviour fed server bytes, and each scenario run at
tiny scale against `im up` (two room instances, the dispatcher, the coordinator posting to
the webhook the tester serves) on free loopback ports."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest

from bench.clients import CLOSED, ServerFrameParser, Target, WorkerSpec, WsClient
from bench.latency import BUCKET_NS
from bench.ports import accepts, is_free
from bench.scenario_broadcast import evenness, spread_bins
from bench.scenario_clients import Plan, backoff
from bench.scenario_common import cpu_spent
from bench.scenario_drain import drain_figures
from bench.scenario_route import RouteError, parse_route, route_url
from bench.servers import stop_process
from im.config import dev_products
from im.protocol import websocket as ws
from im.sessions import Node

ROOT = Path(__file__).resolve().parent.parent
FLOOD = ROOT / "bench" / "flood.py"

# -- pure parts ----------------------------------------------------------------------------


def test_parse_route_reads_addresses_and_refusals() -> None:
    body = b'{"addresses": ["ws://127.0.0.1:1/ws", "ws://127.0.0.1:2/ws"], "ttl_s": 60}'
    assert [t.port for t in parse_route(200, body, "ws")] == [1, 2]
    assert parse_route(200, b'{"addresses": ["tcp://h:3"], "ttl_s": 1}', "tcp")[0] == Target(
        "tcp", "h", 3, "/"
    )
    with pytest.raises(RouteError) as saturated:
        parse_route(200, b'{"addresses": [], "retry_after_ms": 700}', "ws")
    assert saturated.value.retry_after_ms == 700
    with pytest.raises(RouteError, match="HTTP 400 bad_request"):
        parse_route(400, b'{"error": {"code": "bad_request", "message": "x"}}', "ws")
    with pytest.raises(RouteError, match="without JSON"):
        parse_route(502, b"<html>", "ws")
    with pytest.raises(RouteError, match="bad target"):
        parse_route(200, b'{"addresses": ["http://h:1"], "ttl_s": 1}', "ws")
    url = route_url("http://d:1/", "demo", "u 1", "tcp", ["tcp://h:3"])
    assert url == "http://d:1/v1/route?product=demo&uid=u+1&transport=tcp&retry=tcp%3A%2F%2Fh%3A3"


def test_spread_bins_and_evenness() -> None:
    # One delivery every 10 ms over 1 s: ten even bins of 10.
    buckets: dict[int, int] = {}
    for ms in range(100):
        index = ms * 10_000_000 // BUCKET_NS
        buckets[index] = buckets.get(index, 0) + 1
    buckets[5_000_000_000 // BUCKET_NS] = 1  # 5 s late: counts in the last bin
    bins = spread_bins(buckets, 1.0)
    assert bins == [10] * 9 + [11]
    assert evenness(bins) == pytest.approx(10 / 11)
    assert evenness([0, 4]) == 0.0 and evenness([]) == 0.0


def test_drain_figures_check_every_client_against_the_deadline() -> None:
    args = type("Args", (), {"drain_window": 10.0})()
    node = Node("r0-x", rpc="127.0.0.1:1")
    start = 1000.0
    moves = [(start + 1.0, start + 1.5, 400), (start + 9.0, start + 10.2, 1000)]
    found = drain_figures(args, node, {"connections": 2}, start, moves, members=2)
    assert found["reconnected"] == 2 and found["all_back_in_window"]
    assert found["last_back_s"] == pytest.approx(10.2)
    assert found["hint_to_back_ms"]["max"] == pytest.approx(1200, abs=0.01)
    assert found["back_after_wait_ms"]["max"] == pytest.approx(200, abs=0.01)
    late = drain_figures(args, node, {}, start, [(start + 9, start + 13.5, 0)], members=1)
    assert not late["all_back_in_window"]
    missing = drain_figures(args, node, {}, start, moves[:1], members=2)
    assert not missing["all_back_in_window"]


def test_cpu_spent_skips_processes_that_exited() -> None:
    start = {"room": {1: 1.0, 2: 5.0}, "center": {}}
    end = {"room": {1: 3.5}, "center": {}}
    assert cpu_spent(start, end) == {"room": 2.5}


def test_backoff_grows_with_full_jitter_and_a_cap() -> None:
    rng = random.Random(1)
    assert all(0.05 <= backoff(0, rng) <= 0.05 for _ in range(10))
    assert all(0.05 <= backoff(3, rng) <= 0.4 for _ in range(100))
    assert max(backoff(30, rng) for _ in range(200)) <= 2.0


# -- the clients, fed server bytes ---------------------------------------------------------


class Wire:
    """A transport that keeps what the client wrote."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def close(self) -> None:
        self.closed = True

    abort = close


def _server_frames(*messages: dict[str, Any]) -> bytes:
    return b"".join(ws.binary_frame(msgpack.packb(m)) for m in messages)


def _client_messages(wire: Wire) -> list[dict[str, Any]]:
    """Decode the masked client frames of a test wire (one frame per write)."""
    found = []
    for data in wire.written:
        length = data[1] & 0x7F
        head = 2 if length < 126 else 4
        mask, payload = data[head : head + 4], data[head + 4 :]
        found.append(msgpack.unpackb(bytes(b ^ mask[i % 4] for i, b in enumerate(payload))))
    return found


def _push(msg_id: str, seq: int, run: str = "t") -> dict[str, Any]:
    return {"op": "push", "id": msg_id, "type": "chat", "pri": "high", "qos": 1, "ts": 1,
            "body": {"seq": seq, "t": time.time_ns(), "run": run}}  # fmt: skip


async def test_qos1_pushes_are_acked_and_repeats_dropped_across_reconnects() -> None:
    parent, child = multiprocessing.Pipe()
    target = Target("ws", "127.0.0.1", 1, "/ws")
    spec = WorkerSpec(
        worker=0, indices=range(2), targets=(target, Target("ws", "127.0.0.1", 2, "/ws")),
        sources=(), json=False, auth=True, product=dev_products()["demo"], uid_prefix="t",
        connect_rate=0, connect_timeout=1, ping_interval=None,
        plan=Plan(qos1=True, reconnect=True),
    )  # fmt: skip
    worker = spec.plan.worker(spec, child)
    try:
        client, wire = WsClient(worker, 0), Wire()
        client.transport = wire
        worker.where[0] = target
        client.parser = ServerFrameParser()
        worker.online_now(client)
        client.data_received(_server_frames(_push("m1", 0), _push("m2", 1), _push("o", 0, "x")))
        client.data_received(_server_frames(_push("m1", 0)))  # a redelivery
        assert [m["ids"] for m in _client_messages(wire)] == [["m1", "m2", "o"], ["m1"]]
        assert worker.seqs == [0, 1] and worker.redelivered == 1
        assert worker.foreign == 1  # another run's message: ACKed, not counted

        client.data_received(_server_frames({"op": "reconnect", "after_ms": 250, "reason": "x"}))
        assert wire.closed and client.state == CLOSED
        move = worker.moving[0]
        assert (move.cause, move.after_ms, move.excluded) == ("hint", 250, [target])
        client.connection_lost(None)  # retired on purpose: no drop, no second move
        assert worker.dropped == 0 and worker.counts()["online"] == 0
        assert await worker.reroute(0, move) == spec.targets[1]

        again, wire2 = WsClient(worker, 0), Wire()  # the same user, on its new connection
        again.transport = wire2
        again.parser = ServerFrameParser()
        worker.online_now(again)
        assert 0 not in worker.moving and worker.reconnects == 1 and len(worker.moves) == 1
        again.data_received(_server_frames(_push("m2", 1), _push("m3", 2)))
        assert worker.seqs == [0, 1, 2] and worker.redelivered == 2
        assert _client_messages(wire2)[0]["ids"] == ["m2", "m3"]

        again.connection_lost(None)  # the server closed it: reconnect elsewhere
        assert again.state == CLOSED and worker.dropped == 1
        assert worker.moving[0].cause == "drop" and worker.moving[0].excluded == [target]
        assert worker.counts()["moving"] == 1
    finally:
        worker.stop.set()  # no reconnect attempt after the test
        parent.close()
        child.close()


async def test_broadcast_receipts_are_tallied_per_client_and_number() -> None:
    parent, child = multiprocessing.Pipe()
    spec = WorkerSpec(
        worker=0, indices=range(2), targets=(Target("ws", "127.0.0.1", 1, "/ws"),), sources=(),
        json=False, auth=True, product=dev_products()["demo"], uid_prefix="t", connect_rate=0,
        connect_timeout=1, ping_interval=None, plan=Plan(broadcasts=3),
    )  # fmt: skip
    worker = spec.plan.worker(spec, child)
    try:
        for index in range(2):
            client = WsClient(worker, index)
            client.transport, client.parser = Wire(), ServerFrameParser()
            worker.where[index] = spec.targets[0]
            worker.online_now(client)
            frames = [_push(f"b{seq}", seq) | {"qos": 0} for seq in (0, 2)]
            client.data_received(_server_frames(*frames))
            if index:
                client.data_received(_server_frames(frames[0], _push("x", 7) | {"qos": 0}))
        tally = worker.scenario_tally()
        assert tally["receivers"] == [2, 0, 2]
        assert tally["bcast_repeats"] == 1 and tally["bcast_stray"] == 1
        assert worker.bcast_latency.count == 4
        assert worker.counts()["bcast_first"] == 4
        assert tally["by_target"] == {"ws://127.0.0.1:1/ws": 2}
    finally:
        parent.close()
        child.close()


# -- whole runs against `im up` ------------------------------------------------------------


def _route_count(dispatcher: int) -> int:
    url = f"http://127.0.0.1:{dispatcher}/v1/route?product=demo&uid=probe&transport=ws"
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return len(json.loads(response.read())["addresses"])
    except (OSError, ValueError, KeyError):
        return 0


PRODUCTS = """[products.demo]
secret = "flood-test-secret-0123456789abcdef0123"
api_key = "flood-test-api-key-0123"
webhook = "http://127.0.0.1:{port}/im"
"""


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """`im up --rooms 2` with the dispatcher, every port picked at random until it starts:
    room i on base+2i (WebSocket), base+2i+1 (TCP), base+100+i (RPC); center base+20, the
    register and its neighbours base+30..39, the dispatcher base+40, the product's webhook
    base+50."""
    for _ in range(5):
        base = random.randrange(20000, 29800, 2)
        config = tmp_path_factory.mktemp("flood") / "products.toml"
        config.write_text(PRODUCTS.format(port=base + 50))
        ports = {"base": base, "center": base + 20, "register": base + 30, "dispatcher": base + 40,
                 "webhook": base + 50, "config": str(config)}  # fmt: skip
        needed = [*range(base, base + 4), base + 100, base + 101, base + 20, base + 40]
        if not all(is_free(p) for p in [*needed, *range(base + 30, base + 40), base + 50]):
            continue
        process = subprocess.Popen(
            [sys.executable, "-m", "im", "up", "--rooms", "2", "--base-port", str(base),
             "--center-port", str(ports["center"]), "--register-port", str(ports["register"]),
             "--dispatcher-port", str(ports["dispatcher"]), "--config", str(config)],
            env=dict(os.environ, IM_LOG_LEVEL="WARNING"),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and process.poll() is None:
            if all(accepts(p) for p in needed) and _route_count(ports["dispatcher"]) == 2:
                break
            time.sleep(0.1)
        else:
            stop_process(process)
            continue
        try:
            yield ports
        finally:
            stop_process(process)
        return
    pytest.fail("could not start im up on free ports")


def _flood(system: dict[str, Any], args: list[str], out: Path) -> dict:
    done = subprocess.run(
        [sys.executable, str(FLOOD), *args, "--procs", "1", "--settle", "0.2",
         "--config", system["config"],
         "--base-port", str(system["base"]), "--center", f"http://127.0.0.1:{system['center']}",
         "--register-port", str(system["register"]), "--json", str(out)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "[" in done.stderr and "online" in done.stderr  # the progress line
    return json.loads(out.read_text())


def _dispatcher(system: dict[str, Any]) -> str:
    return f"http://127.0.0.1:{system['dispatcher']}"


def test_connect_storm_through_the_dispatcher(system: dict[str, Any], tmp_path: Path) -> None:
    summary = _flood(
        system,
        ["--scenario", "connect", "--clients", "60", "--transport", "tcp",
         "--dispatcher", _dispatcher(system), "--route-batch", "20"],
        tmp_path / "connect.json",
    )  # fmt: skip
    connect = summary["connect"]
    assert summary["connections"] == 60 and summary["connect_failed"] == 0
    assert summary["new_conn_per_s"] > 0
    assert connect["route_requests"] == 3
    assert sum(connect["by_target"].values()) == 60
    assert all(t.startswith("tcp://127.0.0.1:") for t in connect["by_target"])
    times = connect["connect_ms"]
    assert times["count"] == 60 and 0 < times["p50"] <= times["p99"] <= times["max"]
    assert connect["failures"] == {}
    assert len(summary["room_pids"]) == 2
    assert connect["cpu_us_per_conn"]["room"] is not None


def test_connect_failures_are_counted_by_reason(system: dict[str, Any], tmp_path: Path) -> None:
    closed = next(p for p in iter(lambda: random.randrange(20000, 30000), None) if is_free(p))
    summary = _flood(
        system,
        ["--scenario", "connect", "--clients", "10", "--transport", "tcp",
         "--targets", f"tcp://127.0.0.1:{system['base'] + 1},tcp://127.0.0.1:{closed}"],
        tmp_path / "refused.json",
    )  # fmt: skip
    assert summary["connections"] == 5 and summary["connect_failed"] == 5
    assert summary["connect"]["failures"] == {"connect: Connection refused": 5}


def test_broadcast_spread_reaches_every_client_once(system: dict[str, Any], tmp_path: Path) -> None:
    summary = _flood(
        system,
        ["--scenario", "broadcast", "--clients", "80", "--rooms", "2", "--broadcasts", "2",
         "--spread", "1", "--qos", "1"],
        tmp_path / "broadcast.json",
    )  # fmt: skip
    found = summary["broadcast"]
    assert summary["connections"] == 80
    assert found["accepted"] == 2 and found["receivers"] == [80, 80]
    assert summary["delivered"] == 160 and summary["lost"] == 0 and summary["duplicates"] == 0
    assert sum(found["bins"]) == 160 and len(found["bins"]) == 10
    assert found["evenness"] > 0
    assert summary["latency_ms"]["max"] < 1000 + 500  # within the spread, plus delivery
    assert summary["room_cpu_us_per_msg"] is not None


def test_churn_loses_nothing_and_duplicates_nothing(system: dict[str, Any], tmp_path: Path) -> None:
    summary = _flood(
        system,
        ["--scenario", "churn", "--clients", "40", "--rooms", "2", "--rate", "40",
         "--duration", "2", "--churn-rate", "10", "--down", "0.3", "--grace", "10"],
        tmp_path / "churn.json",
    )  # fmt: skip
    churn = summary["churn"]
    assert summary["sent"] == 80 and summary["accepted_online"] == 80
    assert summary["delivered"] == 80 and summary["lost"] == 0 and summary["duplicates"] == 0
    assert churn["drops"] >= 10
    assert churn["reconnects"] >= churn["drops"] and churn["gave_up"] == 0
    assert churn["online_end"] == 40 and churn["still_away"] == 0
    assert churn["back_ms"]["p50"] >= 300  # --down included


def test_upstream_frames_reach_the_webhook(system: dict[str, Any], tmp_path: Path) -> None:
    summary = _flood(
        system,
        ["--scenario", "upstream", "--clients", "40", "--rooms", "2", "--rate", "100",
         "--duration", "1", "--webhook-port", str(system["webhook"])],
        tmp_path / "upstream.json",
    )  # fmt: skip
    found = summary["upstream"]
    assert summary["sent"] == 100 and found["acked"] == 100 and found["refused"] == {}
    assert found["received"] == 100 and summary["lost"] == 0 and summary["duplicates"] == 0
    # Online events are not counted here: the tester's webhook starts after the logins, so
    # theirs may be retried or dead-lettered first (tests/test_upstream_bind_e2e.py has them).
    assert 0 < summary["latency_ms"]["p50"] <= summary["latency_ms"]["max"]
    assert found["throughput_per_s"] > 0


def test_drain_moves_every_client_through_the_dispatcher_without_loss(
    system: dict[str, Any], tmp_path: Path
) -> None:
    summary = _flood(
        system,
        ["--scenario", "drain", "--clients", "40", "--rate", "40", "--drain-window", "1.5",
         "--drain-after", "0.5", "--duration", "4", "--dispatcher", _dispatcher(system)],
        tmp_path / "drain.json",
    )  # fmt: skip
    drain = summary["drain"]
    assert drain["rpc"] == f"127.0.0.1:{system['base'] + 100}"
    assert drain["answer"]["connections"] == 40
    assert summary["sent"] == 160 and summary["accepted_online"] == 160
    assert summary["lost"] == 0 and summary["duplicates"] == 0
    assert drain["reconnected"] == 40 and drain["all_back_in_window"]
    assert drain["hints"] == 40 and drain["still_away"] == 0
    assert drain["by_target"] == {f"ws://127.0.0.1:{system['base'] + 2}/ws": 40}
    assert drain["back_after_wait_ms"]["max"] < drain["hint_to_back_ms"]["max"] + 1
    assert 0 < drain["last_back_s"] <= drain["deadline_s"]


def test_help_explains_every_option() -> None:
    done = subprocess.run(
        [sys.executable, str(FLOOD), "--help"], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0
    for option in ("--dispatcher", "--route-batch", "--spread", "--churn-rate", "--down",
                   "--drain-window", "--drain-instance", "--broadcasts", "--qos",
                   "--webhook-port"):  # fmt: skip
        assert option in done.stdout
    assert "examples" in done.stdout and "connect storm" in done.stdout
    refused = subprocess.run(
        [sys.executable, str(FLOOD), "--scenario", "drain", "--rooms", "1"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert refused.returncode == 2 and "another instance" in refused.stderr

"""The at-least-once crash run (bench/chaos.py): its books and its process matching, and a
tiny whole run with every fault (room, worker, saver, Redis) that must lose and duplicate
nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.chaos_clients import addresses_for, plan
from bench.chaos_events import parse_kinds
from bench.chaos_ledger import NS, Ledger
from bench.chaos_stack import matches, port_block
from im.config import DEV_PRODUCT, dev_products

ROOT = Path(__file__).resolve().parent.parent
CHAOS = ROOT / "bench" / "chaos.py"


def test_ledger_counts_lost_and_repeated_receipts() -> None:
    ledger = Ledger(4)
    for seq in range(4):
        ledger.sent(seq, 100 + seq)
    for seq in (0, 1, 2):
        ledger.accepted(seq, 200 + seq)
    assert ledger.waiting == 3
    ledger.arrived([0, 1, 1, 3, 9], [300, 310, 320, 330, 340])
    assert (ledger.waiting, ledger.received, ledger.repeats, ledger.unknown) == (1, 3, 1, 1)
    assert ledger.lost() == [2]
    assert ledger.duplicated() == [1]
    assert ledger.accepted_seqs() == [0, 1, 2]
    assert ledger.latencies_ns(range(4)) == [200, 209, 227]


def test_a_message_received_before_its_answer_is_not_waited_for() -> None:
    ledger = Ledger(1)
    ledger.sent(0, 1)
    ledger.arrived([0], [5])
    ledger.accepted(0, 9)
    assert ledger.waiting == 0 and ledger.lost() == []


def test_after_event_times_full_delivery_and_the_window() -> None:
    ledger = Ledger(4)
    for seq, (sent, accepted, received) in enumerate(
        [(1, 2, 3), (2, 3, 50), (20, 21, 40), (70, 71, 90)]
    ):
        ledger.sent(seq, sent * NS)
        ledger.accepted(seq, accepted * NS)
        ledger.arrived([seq], [received * NS])
    stats = ledger.after_event(10 * NS, 30 * NS)
    assert stats["accepted_before"] == 2 and stats["in_flight"] == 1
    assert stats["full_delivery_s"] == 40.0  # seq 1 came at 50 s
    assert stats["window_sent"] == 1 and stats["window_max_ms"] == 20_000.0

    never = Ledger(1)
    never.sent(0, NS)
    never.accepted(0, NS)
    assert never.after_event(2 * NS, NS)["full_delivery_s"] is None
    assert Ledger(0).after_event(NS, NS)["full_delivery_s"] == 0.0


def test_children_are_matched_by_consecutive_arguments() -> None:
    room = ["python3", "-m", "room", "--index", "1", "--host", "127.0.0.1"]
    assert matches(room, [("-m", "room"), ("--index", "1")])
    assert not matches(room, [("-m", "room"), ("--index", "0")])
    assert not matches(room, [("room", "--host")])
    assert matches(["python3", "-m", "saver"], [("-m", "saver")])


def test_port_block_never_overlaps_itself() -> None:
    ports = port_block(30000, rooms=2, workers=5).all()
    assert len(ports) == len(set(ports)) and min(ports) == 30000 and max(ports) < 30130


def test_clients_are_spread_evenly_and_start_on_their_own_instance() -> None:
    product = dev_products()[DEV_PRODUCT]
    specs = plan(7, 2, ("a", "b"), product, (0.1, 1.0))
    assert [list(s.indices) for s in specs] == [[0, 1, 2, 3], [4, 5, 6]]
    assert addresses_for(3, ["a", "b", "c"]) == ["a", "b", "c"]
    assert addresses_for(4, ["a", "b", "c"]) == ["b", "c", "a"]


def test_faults_are_checked() -> None:
    assert parse_kinds("room, redis") == ["room", "redis"]
    assert parse_kinds("none") == []
    with pytest.raises(ValueError, match="unknown fault 'disk'"):
        parse_kinds("room,disk")


@pytest.mark.slow
def test_a_tiny_run_with_every_fault_loses_and_repeats_nothing(tmp_path: Path) -> None:
    result_file = tmp_path / "chaos.json"
    command = [
        sys.executable, str(CHAOS),
        "--clients", "20",
        "--messages", "400",
        "--rate", "100",
        "--procs", "1",
        "--timeout", "30",
        "--worker-session-timeout", "2",
        "--json", str(result_file),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=150, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads(result_file.read_text())
    assert summary["accepted"] == 400 and summary["never_accepted"] == 0
    assert (summary["lost"], summary["duplicates"], summary["strays"]) == (0, 0, 0)
    assert [e["kind"] for e in summary["events"]] == ["room", "worker", "saver", "redis"]
    for event in summary["events"]:
        assert event["problem"] == "" and event["back_s"] is not None, event
    assert set(summary["restarts"]) == {"room-0", "worker-0", "saver"}

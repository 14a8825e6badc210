"""The floor of room fan-out on this machine: what no gateway can beat with the same load.

The room scenario of bench/flood.py measures a 10,000-member room over 2 instances with
the clients on the same box. Every high-priority message costs one socket write per
member in a room process and one read in a client process, and both instances write at
the same moment because the same message reaches both. This script does only that: W
writer processes each accept C loopback connections, and R reader processes hold them;
at RATE bursts per second (on the wall clock, so the writers burst together) each writer
writes one SIZE-byte frame, stamped with the time of the burst, to every connection, in
slices with a loop turn between, as a room pass does. No protocol, no routing, no
encoding: the latency from the burst to each read is what sockets and the scheduler
alone cost. The gateway's figures are read against it.

    python3 -m bench.fanout_floor --conns 5000 --rate 8.4 --seconds 30 --batch-readers

prints the latency and the CPU per write and per read (from /proc), and writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import platform
import sys
import time
from array import array
from multiprocessing.connection import Connection
from typing import Any

import uvloop

from bench.clients import raise_fd_limit, run_as_batch
from bench.latency import Histogram
from bench.ports import free_port
from bench.procstat import box_busy_seconds, cpu_seconds

STAMP = 8  # bytes of the burst's time (ns, big-endian) at the start of each frame
SETTLE_S = 1.0  # after every reader is connected, before the first burst


# -- writers ----------------------------------------------------------------------------


class _Held(asyncio.Protocol):
    """A connection a writer holds; the reader never sends anything."""

    def __init__(self, held: list[asyncio.BaseTransport], wanted: int, full: asyncio.Event):
        self.held, self.wanted, self.full = held, wanted, full

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.held.append(transport)
        if len(self.held) >= self.wanted:
            self.full.set()


async def _write_bursts(port: int, conns: int, args: argparse.Namespace, pipe: Connection):
    loop = asyncio.get_running_loop()
    held: list[Any] = []
    full = asyncio.Event()
    server = await loop.create_server(
        lambda: _Held(held, conns, full), "127.0.0.1", port, backlog=4096
    )
    pipe.send("listening")
    await full.wait()
    start = await loop.run_in_executor(None, pipe.recv)
    padding = bytes(args.size - STAMP)
    for burst in range(round(args.rate * args.seconds)):
        due = start + burst / args.rate
        await asyncio.sleep(max(0.0, due - time.time()))
        frame = time.time_ns().to_bytes(STAMP, "big") + padding
        for first in range(0, len(held), args.slice):
            for transport in held[first : first + args.slice]:
                transport.write(frame)
            await asyncio.sleep(0)
    pipe.send("done")
    await loop.run_in_executor(None, pipe.recv)
    server.close()


def writer_main(port: int, conns: int, args: argparse.Namespace, pipe: Connection) -> None:
    raise_fd_limit()
    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(_write_bursts(port, conns, args, pipe))


# -- readers ----------------------------------------------------------------------------


class _Reader(asyncio.Protocol):
    """Keeps (arrival, stamp) pairs only: the floor's reader does as little as a reader can."""

    __slots__ = ("size", "seen", "rest")

    def __init__(self, size: int, seen: array) -> None:
        self.size, self.seen, self.rest = size, seen, b""

    def data_received(self, data: bytes) -> None:
        now = time.time_ns()
        if self.rest:
            data = self.rest + data
        size = self.size
        whole = len(data) - len(data) % size
        for start in range(0, whole, size):
            self.seen.append(now)
            self.seen.append(int.from_bytes(data[start : start + STAMP], "big"))
        self.rest = data[whole:]


async def _read_bursts(ports: list[int], count: int, size: int, pipe: Connection) -> None:
    loop = asyncio.get_running_loop()
    seen = array("q")
    transports = []
    for i in range(count):
        transport, _ = await loop.create_connection(
            lambda: _Reader(size, seen), "127.0.0.1", ports[i % len(ports)]
        )
        transports.append(transport)
    pipe.send("connected")
    await loop.run_in_executor(None, pipe.recv)  # the writers are done
    latency = Histogram()
    for index in range(0, len(seen), 2):
        latency.add(seen[index] - seen[index + 1])
    pipe.send((latency.buckets, latency.max_ns))
    for transport in transports:
        transport.close()


def reader_main(ports: list[int], count: int, size: int, batch: bool, pipe: Connection) -> None:
    raise_fd_limit()
    if batch:
        run_as_batch()
    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(_read_bursts(ports, count, size, pipe))


# -- the run ----------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    context = multiprocessing.get_context("fork")
    ports = [free_port() for _ in range(args.writers)]
    writers, readers = [], []
    for port in ports:
        mine, theirs = context.Pipe()
        process = context.Process(target=writer_main, args=(port, args.conns, args, theirs))
        process.start()
        writers.append((process, mine))
    for _, pipe in writers:
        pipe.recv()
    total = args.conns * args.writers
    for index in range(args.readers):
        mine, theirs = context.Pipe()
        count = total // args.readers + (index < total % args.readers)
        process = context.Process(
            target=reader_main, args=(ports, count, args.size, args.batch_readers, theirs)
        )
        process.start()
        readers.append((process, mine))
    for _, pipe in readers:
        pipe.recv()
    time.sleep(SETTLE_S)
    cpu0 = {p.pid: cpu_seconds(p.pid) for p, _ in writers + readers}
    box0, wall0 = box_busy_seconds(), time.monotonic()
    start = time.time() + 0.2
    for _, pipe in writers:
        pipe.send(start)
    for _, pipe in writers:
        pipe.recv()
    time.sleep(0.5)  # the last burst's reads
    cpu = {p.pid: cpu_seconds(p.pid) - cpu0[p.pid] for p, _ in writers + readers}
    box, wall = box_busy_seconds() - box0, time.monotonic() - wall0
    latency = Histogram()
    for _, pipe in readers:
        pipe.send("stop")
        buckets, max_ns = pipe.recv()
        latency.merge(buckets, max_ns)
    for _, pipe in writers:
        pipe.send("stop")
    for process, _ in writers + readers:
        process.join(10)
    writes = round(args.rate * args.seconds) * total
    return {
        "writers": args.writers,
        "conns_per_writer": args.conns,
        "readers": args.readers,
        "batch_readers": args.batch_readers,
        "rate": args.rate,
        "seconds": args.seconds,
        "size": args.size,
        "slice": args.slice,
        "writes": writes,
        "reads": latency.count,
        "latency_ms": latency.summary_ms(),
        "writer_us_per_write": sum(cpu[p.pid] for p, _ in writers) / writes * 1e6,
        "reader_us_per_read": sum(cpu[p.pid] for p, _ in readers) / max(1, latency.count) * 1e6,
        "box_cpu_percent": box / wall * 100,
        "machine": {"cpu_count": os.cpu_count(), "python": platform.python_version()},
        "command": "python3 -m bench.fanout_floor " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--writers", type=int, default=2, help="writer processes, as room instances (default 2)")
    add("--conns", type=int, default=5000, help="connections per writer (default 5000)")
    add("--readers", type=int, default=2, help="reader processes (default 2)")
    add("--rate", type=float, default=10.0, help="bursts per second (default 10)")
    add("--seconds", type=float, default=30.0, help="length of the run (default 30)")
    add("--size", type=int, default=350, help="bytes per frame, at least 8 (default 350)")
    add("--slice", type=int, default=64, help="writes per loop turn (default 64, as a room)")
    add("--batch-readers", action="store_true", help="run the readers under SCHED_BATCH")
    add("--json", help="write the figures to this file")
    args = parser.parse_args()
    if args.size < STAMP or min(args.writers, args.conns, args.readers, args.slice) < 1:
        parser.error("--size must be at least 8; counts must be positive")
    if args.rate <= 0 or args.seconds <= 0:
        parser.error("--rate and --seconds must be positive")
    found = run(args)
    lat = found["latency_ms"]
    print(f"bursts          {args.rate:g}/s for {args.seconds:g} s, {found['writes']} writes")
    print(f"reads           {found['reads']}")
    print(f"latency ms      p50 {lat['p50']:.1f}  p99 {lat['p99']:.1f}  max {lat['max']:.1f}")
    print(f"writer CPU      {found['writer_us_per_write']:.2f} us/write")
    print(f"reader CPU      {found['reader_us_per_read']:.2f} us/read")
    print(f"box CPU         {found['box_cpu_percent']:.0f} % core")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as file:
            json.dump(found, file, indent=2)


if __name__ == "__main__":
    main()

"""The chaos run's clients: SDK clients (`im.sdk.Client`, auto-ack on) in worker processes,
each given every room instance's address so that a client whose instance dies reconnects
to another. Every body the application receives is reported to the parent over a pipe with
its receipt time (CLOCK_MONOTONIC, shared by the processes of one host), repeats included:
the SDK is the one that must drop them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
import time
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import uvloop
from prometheus_client import REGISTRY

from bench.chaos_stack import dies_with_parent
from bench.clients import raise_fd_limit
from im.auth import issue_token
from im.config import Product
from im.sdk import Client

REPORT_S = 0.25
CONNECTS_IN_FLIGHT = 100
TOKEN_TTL_S = 24 * 3600
CLOSE_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class ClientSpec:
    worker: int
    indices: range
    addresses: tuple[str, ...]
    product: Product
    backoff_min: float
    backoff_max: float


@dataclass(frozen=True)
class Report:
    """What a worker process says every REPORT_S: its counters and the arrivals since its
    last report; `final` on the last one."""

    worker: int
    online: int
    failed: int
    sdk_repeats: int
    warm: int
    strays: int
    seqs: bytes
    times: bytes
    final: bool = False


def addresses_for(index: int, addresses: Sequence[str]) -> list[str]:
    """Client `index` tries instance index % n first, then the others in turn."""
    start = index % len(addresses)
    return [*addresses[start:], *addresses[:start]]


class ClientProcess:
    """One process's clients and what their applications received."""

    def __init__(self, spec: ClientSpec, pipe: Connection) -> None:
        self.spec = spec
        self.pipe = pipe
        self.clients: list[Client] = []
        self.failed = 0
        self.warm = 0
        self.strays = 0
        self.seqs = array("i")
        self.times = array("q")

    async def run(self) -> None:
        slots = asyncio.Semaphore(CONNECTS_IN_FLIGHT)
        readers = [asyncio.create_task(self._client(i, slots)) for i in self.spec.indices]
        stop = False
        try:
            while not stop:
                await asyncio.sleep(REPORT_S)
                try:
                    while self.pipe.poll():
                        stop = self.pipe.recv() == "stop"
                except (EOFError, OSError):  # the parent is gone
                    stop = True
                self._report(final=False)
        finally:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    asyncio.gather(*(c.close() for c in self.clients), return_exceptions=True),
                    CLOSE_TIMEOUT_S,
                )
            for reader in readers:
                reader.cancel()
            await asyncio.gather(*readers, return_exceptions=True)
            self._report(final=True)

    async def _client(self, index: int, slots: asyncio.Semaphore) -> None:
        spec = self.spec
        uid = f"c{index}"
        client = Client(
            addresses_for(index, spec.addresses),
            product=spec.product.name,
            uid=uid,
            token=issue_token(spec.product, uid, TOKEN_TTL_S),
            backoff_min=spec.backoff_min,
            backoff_max=spec.backoff_max,
        )
        self.clients.append(client)
        try:
            async with slots:
                await client.connect()
        except Exception:
            self.failed += 1
            return
        try:
            async for message in client:
                self._received(index, message.body)
        except Exception:  # the server ended the session for good (refused, replaced)
            self.failed += 1

    def _received(self, index: int, body: Any) -> None:
        if not isinstance(body, dict) or body.get("to") != index:
            self.strays += 1
        elif "warm" in body:
            self.warm += 1
        else:
            self.seqs.append(body["seq"])
            self.times.append(time.monotonic_ns())

    def _report(self, *, final: bool) -> None:
        repeats = REGISTRY.get_sample_value("im_sdk_duplicates_total") or 0
        report = Report(
            worker=self.spec.worker,
            online=sum(1 for c in self.clients if c.connected),
            failed=self.failed,
            sdk_repeats=int(repeats),
            warm=self.warm,
            strays=self.strays,
            seqs=self.seqs.tobytes(),
            times=self.times.tobytes(),
            final=final,
        )
        self.seqs, self.times = array("i"), array("q")
        with contextlib.suppress(OSError):
            self.pipe.send(report)


def worker_main(spec: ClientSpec, pipe: Connection) -> None:
    """Entry point of a client process; it ends with the run even when the run is killed
    outright (every forked client process also holds the run's ends of the pipes)."""
    arrange = dies_with_parent(signal.SIGKILL)
    if arrange is not None:
        arrange()
    raise_fd_limit()
    # Every reconnect attempt would log a warning; the parent reports what matters.
    logging.getLogger("im.sdk").setLevel(logging.ERROR)
    uvloop.run(ClientProcess(spec, pipe).run())


class Fleet:
    """The client processes and the sum of their latest reports."""

    def __init__(self, specs: list[ClientSpec], arrived: Callable[[array, array], None]) -> None:
        context = multiprocessing.get_context("fork")
        self.arrived = arrived
        self.latest: dict[int, Report] = {}
        self.finished: set[int] = set()  # final report received
        self.ended: set[int] = set()  # pipe closed
        self.pipes: list[Connection] = []
        self.processes: list[multiprocessing.process.BaseProcess] = []
        for spec in specs:
            ours, theirs = context.Pipe()
            process = context.Process(
                target=worker_main, args=(spec, theirs), name=f"chaos-clients-{spec.worker}"
            )
            process.daemon = True
            process.start()
            theirs.close()
            self.pipes.append(ours)
            self.processes.append(process)

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        for worker, pipe in enumerate(self.pipes):
            loop.add_reader(pipe.fileno(), self._readable, loop, worker, pipe)
            os.set_blocking(pipe.fileno(), True)  # a report begun is read whole

    def _readable(self, loop: asyncio.AbstractEventLoop, worker: int, pipe: Connection) -> None:
        try:
            while pipe.poll():
                report: Report = pipe.recv()
                self.latest[worker] = report
                seqs, times = array("i"), array("q")
                seqs.frombytes(report.seqs)
                times.frombytes(report.times)
                self.arrived(seqs, times)
                if report.final:
                    self.finished.add(worker)
        except (EOFError, OSError):
            loop.remove_reader(pipe.fileno())
            self.ended.add(worker)

    def total(self, field: str) -> int:
        return sum(getattr(r, field) for r in self.latest.values())

    @property
    def crashed(self) -> int:
        """Client processes that ended without a final report."""
        return len(self.ended - self.finished)

    async def stop(self) -> None:
        for pipe in self.pipes:
            with contextlib.suppress(OSError):
                pipe.send("stop")
        deadline = time.monotonic() + CLOSE_TIMEOUT_S + 5
        while len(self.finished | self.ended) < len(self.pipes) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for process in self.processes:
            process.join(1.0)
            if process.is_alive():
                process.terminate()
                process.join(1.0)


def plan(
    clients: int,
    procs: int,
    addresses: tuple[str, ...],
    product: Product,
    backoff: tuple[float, float],
) -> list[ClientSpec]:
    """Clients 0..n-1 split evenly among `procs` processes."""
    per, extra = divmod(clients, procs)
    specs, first = [], 0
    for worker in range(procs):
        count = per + (worker < extra)
        specs.append(ClientSpec(worker, range(first, first + count), addresses, product, *backoff))
        first += count
    return specs

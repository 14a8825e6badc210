"""Paced HTTP POSTs to center: `rate` calls per second on schedule, a bounded number in
flight. Subclasses say what call `seq` carries and what its answer means."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import aiohttp
import orjson

from bench.clients import MAX_ERROR_KINDS

HTTP_TIMEOUT_S = 10.0


class PacedPoster:
    def __init__(self, url: str, api_key: str, rate: float, total: int, concurrency: int) -> None:
        self.url = url
        self.headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
        self.rate = rate
        self.total = total
        self.concurrency = concurrency
        self.sent = 0
        self.answered = 0
        self.errors: Counter[str] = Counter()
        self.max_lag_s = 0.0  # how late the worst call left against its schedule
        self.send_seconds = 0.0
        self._slots = asyncio.Semaphore(concurrency)

    def payload(self, seq: int) -> Any:
        """The JSON document of call `seq`, built just before it is sent."""
        raise NotImplementedError

    def answer(self, seq: int, document: Any) -> str | None:
        """Take a 200 answer's document; an error text when it is not what was expected."""
        raise NotImplementedError

    async def _one(self, session: aiohttp.ClientSession, seq: int) -> None:
        try:
            async with session.post(
                self.url, data=orjson.dumps(self.payload(seq)), headers=self.headers
            ) as response:
                data = await response.read()
                if response.status != 200:
                    self.error(f"HTTP {response.status}: {data[:120].decode(errors='replace')}")
                    return
                problem = self.answer(seq, orjson.loads(data))
                if problem is not None:
                    self.error(problem)
                    return
                self.answered += 1
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            self.error(f"{type(exc).__name__}: {str(exc)[:120]}")
        finally:
            self._slots.release()

    def error(self, reason: str) -> None:
        if reason in self.errors or len(self.errors) < MAX_ERROR_KINDS:
            self.errors[reason] += 1
        else:
            self.errors["other errors"] += 1

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        timeout = aiohttp.ClientTimeout(total=HTTP_TIMEOUT_S)
        connector = aiohttp.TCPConnector(limit=self.concurrency)
        tasks: set[asyncio.Task] = set()
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            start = loop.time()
            for seq in range(self.total):
                due = start + seq / self.rate
                now = loop.time()
                if due > now:
                    await asyncio.sleep(due - now)
                await self._slots.acquire()
                self.max_lag_s = max(self.max_lag_s, loop.time() - due)
                task = loop.create_task(self._one(session, seq))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                self.sent += 1
            self.send_seconds = loop.time() - start
            if tasks:
                await asyncio.wait(tasks)

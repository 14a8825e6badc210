"""The chaos run's business server: paced QoS 1 unicast pushes through center's HTTP API,
each to one client (round-robin), its body carrying the run's sequence number.

A call that fails (a 5xx such as 503 while the saver or its Redis is down, a refused or
broken connection, a timeout) is sent again with the same body and the same
`Idempotency-Key`, so a message is stored once however often it is tried; it counts as
accepted when center answers 200, and as never accepted when that has not happened
within `retry_for_s` or center refused it (4xx).
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import aiohttp
import orjson

from bench.chaos_ledger import Ledger
from bench.poster import PacedPoster

RETRY_MIN_S = 0.1
RETRY_MAX_S = 2.0
MAX_SAMPLES = 16


class QosSender(PacedPoster):
    def __init__(
        self,
        center: str,
        api_key: str,
        rate: float,
        ledger: Ledger,
        clients: int,
        concurrency: int,
        retry_for_s: float,
        run_id: str,
    ) -> None:
        url = center.rstrip("/") + "/v1/push/users"
        super().__init__(url, api_key, rate, ledger.total, concurrency)
        self.ledger = ledger
        self.clients = clients
        self.retry_for_ns = int(retry_for_s * 1e9)
        self.run_id = run_id
        self.retries = 0  # attempts past the first
        self.retried = 0  # messages that needed more than one attempt
        self.retrying = 0  # messages waiting for their next attempt now
        self.never: dict[int, str] = {}  # never accepted: seq -> last problem
        self.offline = 0  # answers saying the recipient had no session
        self.evicted = 0
        self.samples: dict[str, str] = {}  # an example message per error kind
        self._rng = random.Random()

    def payload(self, seq: int) -> dict[str, Any]:
        to = seq % self.clients
        return {"uids": [f"c{to}"], "qos": 1, "body": {"seq": seq, "to": to}}

    def answer(self, seq: int, document: Any) -> str | None:
        if not isinstance(document, dict) or not isinstance(document.get("id"), str):
            return f"answer without an id: {str(document)[:120]}"
        if document.get("online") == 0:
            self.offline += 1
        self.evicted += document.get("evicted", 0) or 0
        return None

    async def _one(self, session: aiohttp.ClientSession, seq: int) -> None:
        data = orjson.dumps(self.payload(seq))
        headers = {**self.headers, "Idempotency-Key": f"{self.run_id}-{seq}"}
        first = time.monotonic_ns()
        self.ledger.sent(seq, first)
        attempt = 0
        try:
            while True:
                problem, again = await self._attempt(session, seq, data, headers)
                if problem is None:
                    self.answered += 1
                    return
                self.error(problem)
                if not again or time.monotonic_ns() - first > self.retry_for_ns:
                    self.never[seq] = problem
                    return
                if attempt == 0:
                    self.retried += 1
                attempt += 1
                self.retries += 1
                pause = min(RETRY_MAX_S, RETRY_MIN_S * 2 ** min(attempt, 16))
                self.retrying += 1
                try:
                    await asyncio.sleep(self._rng.uniform(pause / 2, pause))
                finally:
                    self.retrying -= 1
        finally:
            self._slots.release()

    async def _attempt(
        self,
        session: aiohttp.ClientSession,
        seq: int,
        data: bytes,
        headers: dict[str, str],
    ) -> tuple[str | None, bool]:
        """(None, _) when accepted; else (the problem, whether to try again)."""
        try:
            async with session.post(self.url, data=data, headers=headers) as response:
                raw = await response.read()
                status = response.status
                if status == 200:
                    problem = self.answer(seq, orjson.loads(raw))
                    if problem is None:
                        self.ledger.accepted(seq, time.monotonic_ns())
                    return problem, True
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            return self._kind(type(exc).__name__, str(exc)), True
        try:
            error = orjson.loads(raw)["error"]
            kind, message = f"HTTP {status} {error['code']}", str(error["message"])
        except (ValueError, KeyError, TypeError):
            kind, message = f"HTTP {status}", raw[:200].decode(errors="replace")
        return self._kind(kind, message), status >= 500 or status == 429

    def _kind(self, kind: str, message: str) -> str:
        """Counted by kind; one example message per kind is kept."""
        if kind not in self.samples and len(self.samples) < MAX_SAMPLES:
            self.samples[kind] = message[:200]
        return kind

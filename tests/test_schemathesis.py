"""center's and the dispatcher's HTTP APIs, tested from their OpenAPI documents.

Schemathesis draws requests from each operation of center/openapi.json and
dispatcher/openapi.json, valid and invalid ones, sends them to a running system (register,
saver, one room, center, dispatcher, in a thread of their own) and checks every answer:
no 5xx, and status, headers, content type and body as the document says. The CI run draws
IM_SCHEMATHESIS_EXAMPLES (default 20) examples per operation; a longer run:

    IM_SCHEMATHESIS_EXAMPLES=1000 python3 -m pytest tests/test_schemathesis.py -q -s

prints how many cases ran and their statuses at the end (-s shows it).
"""

from __future__ import annotations

import asyncio
import os
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from dispatcher.config import DispatcherConfig
from dispatcher.server import DispatcherServer
from im.config import DEV_PRODUCT, dev_products
from im.register_client import RegisterClient
from tests.fixtures.system import HOST, System, start_system

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = int(os.environ.get("IM_SCHEMATHESIS_EXAMPLES", "20"))
API_KEY = dev_products()[DEV_PRODUCT].api_key

CENTER = schemathesis.openapi.from_path(ROOT / "center" / "openapi.json")
DISPATCHER = schemathesis.openapi.from_path(ROOT / "dispatcher" / "openapi.json")

#: Cases sent, by (API, status): the numbers docs/SECURITY.md reports.
SENT: Counter[tuple[str, int]] = Counter()

pytestmark = pytest.mark.timeout(600)


class Stack:
    """The system in its own thread and event loop: schemathesis calls it synchronously."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.system: System | None = None
        self.dispatcher: DispatcherServer | None = None

    def run(self, coro: object) -> object:
        future: Future = asyncio.run_coroutine_threadsafe(coro, self.loop)  # type: ignore[arg-type]
        return future.result(timeout=30)

    async def _start(self) -> tuple[str, str]:
        self.system = await start_system(
            "memory",
            None,
            rooms=1,
            center=True,
            products=dev_products(),
            room_overrides={"coordinator": ""},
        )
        config = DispatcherConfig(host=HOST, port=0, register=self.system.register_address)
        self.dispatcher = DispatcherServer(config, RegisterClient(self.system.register_address))
        await self.dispatcher.start()
        return self.system.center_url, self.dispatcher.url

    async def _stop(self) -> None:
        if self.dispatcher is not None:
            await self.dispatcher.close()
        if self.system is not None:
            await self.system.close()

    def __enter__(self) -> tuple[str, str]:
        self.thread.start()
        return self.run(self._start())  # type: ignore[return-value]

    def __exit__(self, *exc: object) -> None:
        try:
            self.run(self._stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)


@pytest.fixture(scope="module")
def urls() -> Iterator[tuple[str, str]]:
    with Stack() as found:
        yield found
    total = sum(SENT.values())
    by_status = ", ".join(f"{api} {status}: {n}" for (api, status), n in sorted(SENT.items()))
    print(f"\nschemathesis: {total} cases, none 5xx; {by_status}")
    assert not [status for (_, status) in SENT if status >= 500]


CASE_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=EXAMPLES <= 20,  # the short CI run draws the same cases every time
    suppress_health_check=list(HealthCheck),
)


@CENTER.parametrize()
@CASE_SETTINGS
def test_center_answers_as_documented(case: schemathesis.Case, urls: tuple[str, str]) -> None:
    key = (case.headers or {}).get("Idempotency-Key")
    if isinstance(key, str) and 0 < len(key.strip()) <= 200 and key.strip().isprintable():
        # One key per case, as a business server would use: the examples reuse theirs.
        case.headers["Idempotency-Key"] = uuid.uuid4().hex  # type: ignore[index]
    response = case.call_and_validate(
        base_url=urls[0], headers={"Authorization": f"Bearer {API_KEY}"}
    )
    SENT["center", response.status_code] += 1


@DISPATCHER.parametrize()
@CASE_SETTINGS
def test_dispatcher_answers_as_documented(case: schemathesis.Case, urls: tuple[str, str]) -> None:
    response = case.call_and_validate(base_url=urls[1])
    SENT["dispatcher", response.status_code] += 1

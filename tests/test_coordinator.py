"""The coordinator: a real CoordinatorServer over RPC posting to a real aiohttp webhook on
127.0.0.1 that records batches and can be told to fail, hang or refuse; plus its pure
batching and retry rules."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from prometheus_client import REGISTRY

from coordinator.batching import EVENT, MESSAGE, ProductQueue
from coordinator.config import CoordinatorConfig, from_args
from coordinator.retry import Verdict, backoff_s, retry_after_s, verdict
from coordinator.rows import BadRow, event_item, message_item
from coordinator.server import CoordinatorServer
from im.config import Product
from im.coordinator_client import BAD_ROW, BUSY, NO_WEBHOOK, CoordinatorClient, UpResult
from tests.fixtures.system import eventually

S32, K16 = "s" * 32, "k" * 16
HOOK_SECRET = "h" * 24


@dataclass
class Hit:
    at: float
    body: bytes
    headers: dict[str, str]


@dataclass
class Webhook:
    """The business: records every POST; `fail` answers that many with `fail_status` first,
    `status` answers every POST with it, `hang` never answers."""

    url: str = ""
    hits: list[Hit] = field(default_factory=list)
    batches: list[dict[str, Any]] = field(default_factory=list)
    fail: int = 0
    fail_status: int = 503
    status: int = 200
    hang: bool = False
    retry_after: str | None = None

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.hits.append(Hit(time.monotonic(), body, dict(request.headers)))
        if self.hang:
            await asyncio.sleep(30)
        if self.fail:
            self.fail -= 1
            headers = {"Retry-After": self.retry_after} if self.retry_after else None
            return web.Response(status=self.fail_status, headers=headers)
        if self.status != 200:
            return web.Response(status=self.status)
        self.batches.append(orjson.loads(body))
        return web.json_response({"ok": True})

    def messages(self) -> list[dict[str, Any]]:
        return [m for batch in self.batches for m in batch["messages"]]

    def events(self) -> list[dict[str, Any]]:
        return [e for batch in self.batches for e in batch["events"]]


@pytest.fixture
async def hook() -> AsyncIterator[Webhook]:
    recorder = Webhook()
    app = web.Application()
    app.router.add_post("/im", recorder.handle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    recorder.url = f"http://127.0.0.1:{runner.addresses[0][1]}/im"
    yield recorder
    await runner.cleanup()


@dataclass
class Coordinator:
    server: CoordinatorServer
    client: CoordinatorClient


Start = Callable[..., Awaitable[Coordinator]]

FAST = {
    "port": 0,
    "metrics_port": 0,
    "batch_ms": 10.0,
    "timeout_s": 1.0,
    "backoff_s": 0.02,
    "backoff_max_s": 0.5,
    "close_grace_s": 0.5,
}


@pytest.fixture
async def start(hook: Webhook) -> AsyncIterator[Start]:
    """`await start(url=None, **config)`: product `shop` posts to the hook (signed), `plain`
    to `url` or the hook (unsigned), `quiet` has no webhook."""
    made: list[Coordinator] = []

    async def make(url: str | None = None, **overrides: Any) -> Coordinator:
        products = {
            "shop": Product("shop", S32, K16, hook.url, webhook_secret=HOOK_SECRET),
            "plain": Product("plain", S32, K16, url or hook.url),
            "quiet": Product("quiet", S32, K16),
        }
        server = CoordinatorServer(CoordinatorConfig(**{**FAST, **overrides}), products)
        await server.start()
        made.append(Coordinator(server, CoordinatorClient(server.rpc.address)))
        return made[-1]

    yield make
    for coordinator in made:
        await coordinator.client.close()
        await coordinator.server.close()


def up_rows(n: int, product: str = "shop", start: int = 0) -> list[list[Any]]:
    return [[product, "alice", "r0.1", seq, "chat", {"n": seq}] for seq in range(start, start + n)]


def event_row(product: str, event: str, uid: str = "alice") -> list[Any]:
    return [product, uid, f"r0.{uid}", event, 1_700_000_000_000, "phone"]


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# -- through the service ---------------------------------------------------------------


async def test_messages_go_up_in_order_in_batches_of_batch_max(start, hook):
    c = await start(batch_max=100)
    before = time.time_ns() // 1_000_000
    result = await c.client.submit_up(up_rows(250))
    assert result == UpResult(250, [], [])
    await eventually(lambda: len(hook.messages()) == 250)
    assert [len(b["messages"]) for b in hook.batches] == [100, 100, 50]
    assert [m["seq"] for m in hook.messages()] == list(range(250))
    first = hook.batches[0]
    assert first["product"] == "shop" and first["events"] == []
    message = first["messages"][0]
    assert set(message) == {"uid", "conn", "seq", "type", "body", "at_ms"}
    assert (message["uid"], message["conn"], message["type"], message["body"]) == (
        "alice",
        "r0.1",
        "chat",
        {"n": 0},
    )
    assert before <= message["at_ms"] <= time.time_ns() // 1_000_000


async def test_a_batch_waits_batch_ms_to_fill(start, hook):
    c = await start(batch_ms=150.0)
    sent = time.monotonic()
    for seq in range(3):
        await c.client.submit_up(up_rows(1, start=seq))
    await eventually(lambda: hook.batches)
    await asyncio.sleep(0.05)
    assert len(hook.batches) == 1
    assert [m["seq"] for m in hook.messages()] == [0, 1, 2]
    assert hook.hits[0].at - sent >= 0.1


async def test_batch_bytes_splits_big_bodies(start, hook):
    c = await start(batch_bytes=4096)
    rows = [["shop", "alice", "r0.1", seq, "blob", "x" * 1500] for seq in range(6)]
    assert (await c.client.submit_up(rows)).accepted == 6
    await eventually(lambda: len(hook.messages()) == 6)
    assert [len(b["messages"]) for b in hook.batches] == [2, 2, 2]
    assert all(len(hit.body) <= 4096 + 100 for hit in hook.hits)


async def test_events_go_up_with_their_fields(start, hook):
    c = await start()
    rows = [
        event_row("shop", "online"),
        event_row("quiet", "online"),  # no webhook: not accepted
        event_row("shop", "away"),  # not an event we know
        event_row("shop", "offline"),
    ]
    assert await c.client.submit_events(rows) == 2
    await eventually(lambda: len(hook.events()) == 2)
    assert hook.events() == [
        {
            "uid": "alice",
            "conn": "r0.alice",
            "event": e,
            "at_ms": 1_700_000_000_000,
            "device": "phone",
        }
        for e in ("online", "offline")
    ]
    assert hook.messages() == []


async def test_messages_and_events_share_a_batch(start, hook):
    c = await start(batch_ms=100.0)
    await c.client.submit_events([event_row("shop", "online")])
    await c.client.submit_up(up_rows(2))
    await eventually(lambda: hook.batches)
    assert len(hook.batches) == 1
    assert [len(hook.batches[0]["messages"]), len(hook.batches[0]["events"])] == [2, 1]


async def test_each_post_is_signed_with_the_products_secret(start, hook):
    c = await start()
    await c.client.submit_up(up_rows(1, "shop"))
    await c.client.submit_up(up_rows(1, "plain"))
    await eventually(lambda: len(hook.hits) == 2)
    by_product = {orjson.loads(hit.body)["product"]: hit for hit in hook.hits}
    signed, plain = by_product["shop"], by_product["plain"]
    expected = hmac.new(HOOK_SECRET.encode(), signed.body, hashlib.sha256).hexdigest()
    assert signed.headers["X-IM-Signature"] == f"sha256={expected}"
    assert signed.headers["Content-Type"] == "application/json"
    assert len(signed.headers["X-IM-Batch"]) == 20
    assert "X-IM-Signature" not in plain.headers


async def test_5xx_is_retried_with_growing_pauses_and_the_same_batch(start, hook):
    c = await start(backoff_s=0.06, attempts=5)
    hook.fail = 3
    retried, failed = (
        sample("im_coordinator_retried_total", product="shop"),
        sample("im_coordinator_failed_total", product="shop", reason="503"),
    )
    await c.client.submit_up(up_rows(3))
    await eventually(lambda: hook.batches)
    assert len(hook.hits) == 4
    assert len({hit.body for hit in hook.hits}) == 1
    assert len({hit.headers["X-IM-Batch"] for hit in hook.hits}) == 1
    pauses = [b.at - a.at for a, b in zip(hook.hits, hook.hits[1:], strict=False)]
    # Pause n is in [base * 2**(n-1) / 2, base * 2**(n-1)]: 30-60 ms, 60-120, 120-240.
    assert 0.025 <= pauses[0] <= pauses[2]
    assert pauses[2] >= 0.11
    assert [m["seq"] for m in hook.messages()] == [0, 1, 2]
    assert sample("im_coordinator_retried_total", product="shop") - retried == 3
    assert sample("im_coordinator_failed_total", product="shop", reason="503") - failed == 3


async def test_retry_after_is_honoured(start, hook):
    c = await start(backoff_s=0.01, backoff_max_s=2.0)
    hook.fail, hook.fail_status, hook.retry_after = 1, 429, "1"
    await c.client.submit_up(up_rows(1))
    await eventually(lambda: hook.batches)
    assert hook.hits[1].at - hook.hits[0].at >= 0.9


@pytest.mark.parametrize("status", [408, 429, 500, 502])
async def test_transient_answers_are_retried(start, hook, status):
    c = await start()
    hook.fail, hook.fail_status = 2, status
    await c.client.submit_up(up_rows(1))
    await eventually(lambda: hook.batches)
    assert len(hook.hits) == 3


async def test_a_batch_out_of_attempts_is_dead_lettered_and_the_lane_moves_on(start, hook):
    c = await start(attempts=3)
    dead = sample("im_coordinator_dead_letters_total", product="shop")
    items = sample("im_coordinator_dead_letter_items_total", product="shop")
    hook.fail = 3
    await c.client.submit_up(up_rows(2))
    await eventually(lambda: sample("im_coordinator_dead_letters_total", product="shop") > dead)
    assert len(hook.hits) == 3
    assert sample("im_coordinator_dead_letter_items_total", product="shop") - items == 2
    await c.client.submit_up(up_rows(1, start=2))
    await eventually(lambda: hook.batches)
    assert [m["seq"] for m in hook.messages()] == [2]
    await asyncio.sleep(0.1)
    assert len(hook.hits) == 4  # the dead batch was never posted again


@pytest.mark.parametrize("status", [400, 401, 404, 413, 302])
async def test_a_refusing_answer_is_not_retried(start, hook, status):
    c = await start()
    dead = sample("im_coordinator_dead_letters_total", product="shop")
    hook.status = status
    await c.client.submit_up(up_rows(1))
    await eventually(lambda: sample("im_coordinator_dead_letters_total", product="shop") > dead)
    await asyncio.sleep(0.1)
    assert len(hook.hits) == 1
    assert sample("im_coordinator_failed_total", product="shop", reason=str(status)) >= 1


async def test_a_hanging_webhook_times_out_and_is_dead_lettered(start, hook):
    c = await start(timeout_s=0.2, attempts=2)
    timeouts = sample("im_coordinator_failed_total", product="shop", reason="timeout")
    dead = sample("im_coordinator_dead_letters_total", product="shop")
    hook.hang = True
    started = time.monotonic()
    await c.client.submit_up(up_rows(1))
    await eventually(lambda: sample("im_coordinator_dead_letters_total", product="shop") > dead)
    assert 0.4 <= time.monotonic() - started < 2.0
    assert len(hook.hits) == 2
    assert sample("im_coordinator_failed_total", product="shop", reason="timeout") - timeouts == 2


async def test_an_unreachable_webhook_counts_connection_failures(start, unused_tcp_port):
    c = await start(url=f"http://127.0.0.1:{unused_tcp_port}/im", attempts=2)
    failed = sample("im_coordinator_failed_total", product="plain", reason="connection")
    dead = sample("im_coordinator_dead_letters_total", product="plain")
    await c.client.submit_up(up_rows(1, "plain"))
    await eventually(lambda: sample("im_coordinator_dead_letters_total", product="plain") > dead)
    assert sample("im_coordinator_failed_total", product="plain", reason="connection") - failed == 2


async def test_a_full_backlog_refuses_the_rows_beyond_it(start, hook):
    c = await start(queue_cap=5, batch_max=2, timeout_s=5.0)
    hook.hang = True
    await c.client.submit_up(up_rows(2))
    await eventually(lambda: hook.hits)  # two rows in flight, the queue is empty again
    result = await c.client.submit_up(up_rows(8, start=2))
    assert result == UpResult(5, [5, 6, 7], [BUSY] * 3)
    assert await c.client.submit_events([event_row("shop", "online")]) == 0
    assert sample("im_coordinator_queue_depth", product="shop") == 5
    assert sample("im_coordinator_refused_total", product="shop", kind="event", reason=BUSY) >= 1


async def test_rows_that_cannot_go_are_refused_one_by_one(start, hook):
    c = await start()
    rows = [
        up_rows(1, "quiet")[0],  # configured, no webhook
        up_rows(1, "ghost")[0],  # not configured at all
        ["shop", "alice", "r0.1", 1, "chat", b"\x00binary"],  # JSON cannot carry bytes
        ["shop", "alice", "r0.1", -1, "chat", None],
        ["shop", "alice"],
        "not a row",
        up_rows(1, start=9)[0],
    ]
    result = await c.client.submit_up(rows)
    assert result == UpResult(1, [0, 1, 2, 3, 4, 5], [NO_WEBHOOK] * 2 + [BAD_ROW] * 4)
    await eventually(lambda: hook.messages())
    assert [m["seq"] for m in hook.messages()] == [9]
    with pytest.raises(ValueError, match="array of rows"):
        await c.client.submit_events({"not": "a list"})  # type: ignore[arg-type]


async def test_stopping_posts_what_is_queued(start, hook):
    c = await start(batch_ms=10_000.0)
    await c.client.submit_up(up_rows(3))
    await c.client.submit_events([event_row("shop", "offline")])
    await c.client.close()
    await c.server.close()
    assert [m["seq"] for m in hook.messages()] == [0, 1, 2]
    assert len(hook.events()) == 1


async def test_stopping_drops_what_cannot_be_posted_in_the_grace(start, hook):
    c = await start(close_grace_s=0.2, timeout_s=5.0)
    hook.hang = True
    await c.client.submit_up(up_rows(1))
    await eventually(lambda: hook.hits)
    await c.client.submit_up(up_rows(4, start=1))
    dropped = sample("im_coordinator_dropped_on_stop_total", product="shop")
    started = time.monotonic()
    await c.server.close()
    assert time.monotonic() - started < 1.5
    # The batch in flight and the four queued behind it.
    assert sample("im_coordinator_dropped_on_stop_total", product="shop") - dropped == 5
    assert sample("im_coordinator_queue_depth", product="shop") == 0


async def test_health_and_metrics_over_http(start, hook):
    c = await start()
    await c.client.submit_up(up_rows(1))
    await eventually(lambda: hook.batches)
    base = f"http://127.0.0.1:{c.server.metrics_port}"
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/healthz") as response:
            assert response.status == 200
            assert (await response.json())["engine"] == "webhook"
        async with http.get(f"{base}/metrics") as response:
            text = await response.text()
    for name in (
        "im_coordinator_queue_depth",
        "im_coordinator_posted_total",
        "im_coordinator_webhook_latency_seconds_count",
    ):
        assert f'{name}{{product="shop"' in text


# -- settings --------------------------------------------------------------------------


def test_settings_defaults_flags_and_environment():
    config = from_args([], environ={})
    assert (config.host, config.port, config.metrics_port) == ("127.0.0.1", 8074, 8079)
    assert (config.queue_cap, config.batch_ms, config.timeout_s, config.attempts) == (
        10_000,
        50.0,
        5.0,
        5,
    )
    config = from_args(["--attempts", "2"], environ={"IM_COORDINATOR_QUEUE_CAP": "7"})
    assert (config.attempts, config.queue_cap) == (2, 7)
    with pytest.raises(SystemExit):
        from_args(["--batch-max", "0"], environ={})
    with pytest.raises(ValueError, match="timeout_s"):
        CoordinatorConfig(timeout_s=0)


# -- pure rules ------------------------------------------------------------------------


def test_queue_is_bounded_by_count_and_bytes():
    queue = ProductQueue(cap=3, cap_bytes=10, batch_max=10, batch_bytes=100)
    assert queue.offer(MESSAGE, b"aaaa", now=1.0)
    assert queue.offer(EVENT, b"bbbb", now=2.0)
    assert not queue.offer(MESSAGE, b"ccc", now=3.0)  # 11 bytes > 10
    assert queue.offer(MESSAGE, b"cc", now=3.0)
    assert not queue.offer(MESSAGE, b"", now=4.0)  # 3 items
    assert (len(queue), queue.size, queue.due(0.5)) == (3, 10, 1.5)
    batch = queue.take()
    assert (batch.messages, batch.events, len(queue), queue.due(0.5)) == (
        [b"aaaa", b"cc"],
        [b"bbbb"],
        0,
        None,
    )


def test_take_respects_batch_max_and_batch_bytes():
    queue = ProductQueue(cap=100, cap_bytes=10_000, batch_max=3, batch_bytes=10)
    for i in range(5):
        queue.offer(MESSAGE, b"1234" + bytes([48 + i]), now=float(i))
    assert queue.batch_ready
    assert queue.take().messages == [b"12340", b"12341"]  # a third would pass 10 bytes
    assert queue.due(0.0) == 0.0  # leftovers keep the oldest arrival: due at once
    big = ProductQueue(cap=10, cap_bytes=10_000, batch_max=3, batch_bytes=10)
    big.offer(MESSAGE, b"x" * 50, now=0.0)
    assert big.take().messages == [b"x" * 50]  # one item bigger than a batch still goes


def test_batch_body_is_the_webhook_json():
    queue = ProductQueue(cap=10, cap_bytes=10_000, batch_max=10, batch_bytes=10_000)
    queue.offer(MESSAGE, message_item(["p", "u", "c", 1, "t", {"k": [1]}], at_ms=5), now=0.0)
    queue.offer(EVENT, event_item(["p", "u", "c", "online", 4, ""]), now=0.0)
    assert orjson.loads(queue.take().body('p"x')) == {
        "product": 'p"x',
        "messages": [
            {"uid": "u", "conn": "c", "seq": 1, "type": "t", "body": {"k": [1]}, "at_ms": 5}
        ],
        "events": [{"uid": "u", "conn": "c", "event": "online", "at_ms": 4, "device": ""}],
    }


@pytest.mark.parametrize(
    ("row", "mentions"),
    [
        (["p", "", "c", 1, "t", None], "uid"),
        (["p", "u", "c" * 65, 1, "t", None], "conn"),
        (["p", "u", "c", 2**53, "t", None], "seq"),
        (["p", "u", "c", True, "t", None], "seq"),
        (["p", "u", "c", 1, "", None], "type"),
        (["p", "u", "c", 1, "t", {1: "int key"}], "JSON"),
        (["p", "u", "c", 1, "t"], "6 items"),
    ],
)
def test_bad_message_rows_name_the_field(row, mentions):
    with pytest.raises(BadRow, match=mentions):
        message_item(row, at_ms=0)


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (200, Verdict.DONE),
        (204, Verdict.DONE),
        (302, Verdict.GIVE_UP),
        (400, Verdict.GIVE_UP),
        (404, Verdict.GIVE_UP),
        (408, Verdict.RETRY),
        (429, Verdict.RETRY),
        (500, Verdict.RETRY),
        (503, Verdict.RETRY),
    ],
)
def test_verdicts(status, expected):
    assert verdict(status) is expected


def test_backoff_grows_is_jittered_and_capped():
    assert [backoff_s(n, 0.1, 10.0, rand=lambda: 0.0) for n in (1, 2, 3)] == [0.05, 0.1, 0.2]
    assert [backoff_s(n, 0.1, 10.0, rand=lambda: 1.0) for n in (1, 2, 3)] == [0.1, 0.2, 0.4]
    assert backoff_s(20, 0.1, 3.0, rand=lambda: 1.0) == 3.0
    assert len({backoff_s(3, 0.1, 10.0) for _ in range(20)}) > 1
    assert retry_after_s("7", cap=5.0) == 5.0
    assert retry_after_s(" 2 ", cap=5.0) == 2.0
    assert retry_after_s("Wed, 21 Oct 2015 07:28:00 GMT", cap=5.0) is None
    assert retry_after_s(None, cap=5.0) is None

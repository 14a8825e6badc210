"""Upstream frames to the business webhook and several products on one connection, end to
end: clients on real room instances, the coordinator over RPC, a real HTTP webhook, and
center's push and kick APIs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web

from im.config import DEV_PRODUCT, Product, dev_products
from im.protocol.errors import ErrorCode
from im.sdk import BindRefused, Client
from tests.fixtures.system import System, eventually

SECOND = Product("second", "second-secret-0123456789abcdef", "second-key")


class Webhook:
    """The business's webhook: records every batch it is sent."""

    def __init__(self) -> None:
        self.batches: list[dict[str, Any]] = []
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self._hook)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}/hook"

    async def _hook(self, request: web.Request) -> web.Response:
        self.batches.append(await request.json())
        return web.json_response({"ok": True})

    def messages(self) -> list[dict[str, Any]]:
        return [m for batch in self.batches for m in batch.get("messages", [])]

    def events(self) -> list[dict[str, Any]]:
        return [e for batch in self.batches for e in batch.get("events", [])]

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest_asyncio.fixture
async def webhook() -> AsyncIterator[Webhook]:
    hook = Webhook()
    await hook.start()
    yield hook
    await hook.close()


def products(webhook: Webhook) -> dict[str, Product]:
    dev = dev_products()[DEV_PRODUCT]
    return {
        DEV_PRODUCT: Product(dev.name, dev.secret, dev.api_key, webhook=webhook.url),
        SECOND.name: SECOND,
    }


async def test_up_frames_reach_the_webhook_in_order_and_are_acked(make_system, webhook) -> None:
    system = await make_system("memory", rooms=1, products=products(webhook))
    client = await system.online("up1")
    for seq in range(5):
        client.send({"op": "up", "seq": seq, "type": "chat", "body": {"text": f"hi {seq}"}})
    acks = [await client.recv() for _ in range(5)]
    assert sorted(a["seq"] for a in acks) == list(range(5))
    assert all(a["op"] == "up_ack" for a in acks)
    await eventually(lambda: len(webhook.messages()) == 5, timeout=5)
    sent = webhook.messages()
    assert [m["seq"] for m in sent] == list(range(5))
    assert {m["uid"] for m in sent} == {"up1"} and sent[0]["body"] == {"text": "hi 0"}
    await eventually(lambda: any(e["event"] == "online" for e in webhook.events()), timeout=5)
    client.close()
    await eventually(
        lambda: any(e["event"] == "offline" and e["uid"] == "up1" for e in webhook.events()),
        timeout=5,
    )


async def test_up_without_a_webhook_is_refused_with_its_seq(make_system, webhook) -> None:
    system = await make_system("memory", rooms=1, products=products(webhook))
    client = await system.raw(0)
    await client.auth("up2", system.token("up2", SECOND.name), product=SECOND.name)
    client.send({"op": "up", "seq": 7, "type": "chat", "body": 1})
    refused = await client.recv()
    assert refused["op"] == "error" and refused["seq"] == 7
    assert refused["code"] == ErrorCode.UNKNOWN_OP and "not configured" in refused["reason"]
    await client.ping()  # not fatal


async def push(http: aiohttp.ClientSession, system: System, product: Product, uid: str) -> Any:
    async with http.post(
        f"{system.center_url}/v1/push/users",
        json={"uids": [uid], "qos": 1, "body": {"for": product.name}},
        headers={"Authorization": f"Bearer {product.api_key}"},
    ) as response:
        assert response.status == 200
        return await response.json()


async def test_two_products_share_one_connection(make_system, webhook) -> None:
    system = await make_system("memory", rooms=2, products=products(webhook))
    async with aiohttp.ClientSession() as http:
        early = await push(http, system, SECOND, "b1")  # waits in the saver for the bind
        client = await system.online("b1", 0)
        client.send({"op": "bind", "product": SECOND.name, "token": system.token("b1", "second")})
        bound = await client.recv()
        assert bound == {"op": "bound", "product": SECOND.name}
        pending = await client.recv()
        assert (pending["id"], pending["product"]) == (early["id"], SECOND.name)

        for product in (dev_products()[DEV_PRODUCT], SECOND):
            answer = await push(http, system, product, "b1")
            got = await client.recv()
            assert (got["id"], got["product"], got["body"]) == (
                answer["id"], product.name, {"for": product.name},
            )  # fmt: skip
        client.send({"op": "ack", "ids": [pending["id"], answer["id"]]})

        client.send({"op": "bind", "product": SECOND.name, "token": system.token("b1", "second")})
        again = await client.recv()
        assert again["code"] == ErrorCode.BIND_REFUSED and "already" in again["reason"]
        client.send({"op": "bind", "product": SECOND.name, "token": "forged"})
        assert (await client.recv())["code"] == ErrorCode.BIND_REFUSED
        await client.ping()  # a refused bind keeps the connection

        async with http.post(
            f"{system.center_url}/v1/users/b1/kick",
            json={"reason": "second app signed out"},
            headers={"Authorization": f"Bearer {SECOND.api_key}"},
        ) as response:
            assert (await response.json())["kicked"] == 1
        unbound = await client.recv()
        assert unbound == {
            "op": "unbound", "product": SECOND.name, "reason": "second app signed out",
        }  # fmt: skip
        await client.ping()  # the first product keeps the connection
        await asyncio.sleep(0.1)
        register = system.register_client()
        assert await register.lookup(SECOND.name, ["b1"]) == {}
        assert len((await register.lookup(DEV_PRODUCT, ["b1"]))["b1"]) == 1

        client.send({"op": "unbind", "product": SECOND.name})
        assert (await client.recv())["code"] == ErrorCode.BIND_REFUSED
        alone = await push(http, system, dev_products()[DEV_PRODUCT], "b1")
        got = await client.recv()
        assert got["id"] == alone["id"] and "product" not in got  # one product: no tag


async def test_the_sdk_binds_a_second_product_and_keeps_it_across_reconnects(
    make_system, webhook
) -> None:
    system = await make_system("memory", rooms=2, products=products(webhook))
    client = Client(
        [system.tcp_url(0), system.tcp_url(1)],
        product=DEV_PRODUCT,
        uid="s1",
        token=system.token("s1"),
        backoff_min=0.05,
        backoff_max=0.1,
    )
    await client.connect()
    try:
        await client.bind(SECOND.name, system.token("s1", SECOND.name))
        with pytest.raises(BindRefused) as refused:
            await client.bind("nope", "forged")
        assert refused.value.code == ErrorCode.BIND_REFUSED
        async with aiohttp.ClientSession() as http:
            answer = await push(http, system, SECOND, "s1")
            message = await client.recv(timeout=3)
            assert (message.id, message.product) == (answer["id"], SECOND.name)
            await system.stop_room(0)  # the client moves to room 1 and binds again there
            register = system.register_client()
            await eventually(lambda: _bound_on(register, system.rooms[1].gateway.instance))
            again = await push(http, system, SECOND, "s1")
            message = await client.recv(timeout=5)
            assert message.id == again["id"]
    finally:
        await client.close()


async def _bound_on(register: Any, instance: str) -> bool:
    found = await register.lookup(SECOND.name, ["s1"])
    return any(s.instance == instance for s in found.get("s1", []))

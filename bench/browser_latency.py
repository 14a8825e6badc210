"""`python3 -m bench.browser_latency`: unicast latency from center's API call to the
application's handler, in a browser page using im.js and in the Python SDK, in one run.

`im up` runs one room instance; a headless chromium page (Debian's chromium driven by
Playwright) runs im.js as user `web`, and a Python SDK client runs as user `py` on the same
instance, both over WebSocket. Each round POSTs one unicast to `web` and one to `py` (in
alternating order), each carrying the wall-clock time just before its call; each handler
subtracts it from its own wall clock (the page from `performance.timeOrigin + now()`), so
both figures cover the same path: HTTP API, bus, fan-out worker, room, socket, client.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
import uvloop

from bench.console_shot import ImUp, chromium
from bench.latency import Histogram
from im.auth import issue_token
from im.config import DEV_PRODUCT, dev_products
from im.sdk import Client

PAGE = """<!doctype html>
<meta charset="utf-8">
<title>im.js latency</title>
<script type="module">
import { ImClient } from "%(center)s/sdk/im.js";
window.latencies = [];
window.start = async (options) => {
  const client = new ImClient(options);
  client.on("message", (m) => {
    const now = performance.timeOrigin + performance.now();
    window.latencies.push([m.body.seq, now - m.body.t]);
  });
  await client.connect();
};
window.ready = true;
</script>
"""
WEB, PY = "web", "py"
DRAIN_TIMEOUT_S = 10.0


def summary(latencies_ms: list[float]) -> dict[str, float]:
    histogram = Histogram()
    for ms in latencies_ms:
        histogram.add(int(ms * 1e6))
    return histogram.summary_ms()


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    product = dev_products()[DEV_PRODUCT]
    headers = {"Authorization": f"Bearer {product.api_key}"}
    py_latencies: dict[int, float] = {}
    with tempfile.TemporaryDirectory(prefix="browser-latency-") as tmp:
        async with (
            ImUp(1, Path(tmp)) as up,
            chromium() as browser,
            aiohttp.ClientSession(base_url=up.center_url, headers=headers) as http,
        ):
            page = await browser.new_page()
            await page.set_content(PAGE % {"center": up.center_url})
            await page.wait_for_function("() => window.ready === true")
            await page.evaluate(
                "(o) => window.start(o)",
                {
                    "product": DEV_PRODUCT,
                    "uid": WEB,
                    "token": issue_token(product, WEB, 3600),
                    "addresses": up.ws_urls,
                },
            )
            python = Client(
                up.ws_urls,
                product=DEV_PRODUCT,
                uid=PY,
                token=issue_token(product, PY, 3600),
                encoding=args.encoding,
            )
            await python.connect()

            async def read_python() -> None:
                async for message in python:
                    now_ms = time.time() * 1000
                    py_latencies[message.body["seq"]] = now_ms - message.body["t"]

            reader = asyncio.create_task(read_python())

            async def push(uid: str, seq: int) -> None:
                body = {"uids": [uid], "body": {"seq": seq, "t": time.time() * 1000}}
                async with http.post("/v1/push/users", json=body) as answer:
                    if answer.status != 200:
                        raise RuntimeError(f"push refused: {await answer.text()}")

            loop = asyncio.get_running_loop()
            start = loop.time()
            total = args.warmup + args.count
            for seq in range(total):
                order = (WEB, PY) if seq % 2 else (PY, WEB)
                for uid in order:
                    await push(uid, seq)
                await asyncio.sleep(max(0.0, start + (seq + 1) / args.rate - loop.time()))
            deadline = time.monotonic() + DRAIN_TIMEOUT_S
            while len(py_latencies) < total and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            await page.wait_for_function(
                "(n) => window.latencies.length >= n", arg=total, timeout=DRAIN_TIMEOUT_S * 1000
            )
            web_latencies = dict(await page.evaluate("() => window.latencies"))
            reader.cancel()
            await python.close()
    kept = range(args.warmup, total)
    return {
        "count": args.count,
        "rate": args.rate,
        "python_encoding": args.encoding,
        "browser_ms": summary([web_latencies[s] for s in kept if s in web_latencies]),
        "python_ms": summary([py_latencies[s] for s in kept if s in py_latencies]),
    }


def table(result: dict[str, Any]) -> str:
    lines = [
        "| client | received | p50 ms | p90 ms | p99 ms | max ms |",
        "|---|---|---|---|---|---|",
    ]
    rows = (
        ("browser, im.js (json)", result["browser_ms"]),
        (f"Python SDK ({result['python_encoding']})", result["python_ms"]),
    )
    for name, s in rows:
        lines.append(
            f"| {name} | {s['count']} | {s['p50']:.2f} | {s['p90']:.2f} | {s['p99']:.2f} "
            f"| {s['max']:.2f} |"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python3 -m bench.browser_latency", description=__doc__)
    parser.add_argument("--count", type=int, default=2000, help="measured unicasts per client")
    parser.add_argument("--warmup", type=int, default=100, help="unicasts left out first")
    parser.add_argument("--rate", type=float, default=100.0, help="rounds per second")
    parser.add_argument(
        "--encoding", choices=("json", "msgpack"), default="json", help="the Python SDK's"
    )
    args = parser.parse_args(argv)
    if args.count < 1 or args.warmup < 0 or args.rate <= 0:
        parser.error("--count and --rate must be positive, --warmup not negative")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    result = uvloop.run(measure(args))
    print(table(result))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`im drain <instance>`: ask a room instance to move its clients elsewhere and exit.

The instance is found by name (or by its RPC address) in the register's node table; the
drain itself runs on the instance (see room/drain.py), this command only starts it.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

import orjson

from im.register_client import RegisterClient
from im.rpc import RpcClient, RpcError


async def _drain(register: str, instance: str, window_s: float | None) -> dict:
    store = RegisterClient(register)
    try:
        nodes = await store.nodes()
    finally:
        await store.close()
    node = next((n for n in nodes if instance in (n.instance, n.rpc)), None)
    if node is None:
        known = ", ".join(sorted(n.instance for n in nodes)) or "none"
        raise LookupError(f"no live room instance {instance!r} (live: {known})")
    client = RpcClient(node.rpc, timeout=5.0, name="im-drain")
    try:
        params = {} if window_s is None else {"window_s": window_s}
        return await client.call("drain", params)
    finally:
        await client.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="im drain",
        description="Drain a room instance: stop accepting, leave the dispatcher's lists, "
        "send its clients reconnect hints spread over the window, then exit.",
    )
    parser.add_argument("instance", help="instance name (as in the node table) or RPC host:port")
    parser.add_argument("--register", default="127.0.0.1:8070", help="register RPC host:port")
    parser.add_argument(
        "--window-s", type=float, default=None, help="spread (default: the instance's drain_s)"
    )
    args = parser.parse_args(argv)
    try:
        answer = asyncio.run(_drain(args.register, args.instance, args.window_s))
    except (LookupError, RpcError, OSError, TimeoutError) as exc:
        print(f"im drain: {exc}", file=sys.stderr)
        return 1
    print(orjson.dumps(answer).decode())
    return 0

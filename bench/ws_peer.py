"""ws_peer: a plain `websockets` asyncio server on uvloop, the peer the room is compared with.

It accepts any WebSocket connection on any path and holds it with the library's defaults
(keepalive pings included). So that `bench/flood.py` runs against it unchanged, it answers
`auth` with a fixed `auth_ok` and `ping` with `pong`, in the encoding the client used
(binary frames: msgpack, text frames: JSON). Its PID is printed first, for --room-pids.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import resource
import signal
import sys
from collections.abc import Sequence

import msgpack
import orjson
import uvloop
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

SUBPROTOCOLS = ["im.v1.msgpack", "im.v1.json"]
AUTH_OK = {"op": "auth_ok", "conn": "peer", "hb": 25}
PONG = {"op": "pong"}
BACKLOG = 4096


def reply_to(message: str | bytes) -> str | bytes | None:
    """What the peer answers to one message, in the message's own encoding."""
    try:
        decoded = orjson.loads(message) if isinstance(message, str) else msgpack.unpackb(message)
    except (ValueError, msgpack.UnpackException):
        return None
    op = decoded.get("op") if isinstance(decoded, dict) else None
    answer = AUTH_OK if op == "auth" else PONG if op == "ping" else None
    if answer is None:
        return None
    return orjson.dumps(answer).decode() if isinstance(message, str) else msgpack.packb(answer)


async def hold(connection: ServerConnection) -> None:
    try:
        async for message in connection:
            answer = reply_to(message)
            if answer is not None:
                await connection.send(answer)
    except ConnectionClosed:
        pass


async def serve_forever(host: str, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with serve(hold, host, port, subprotocols=SUBPROTOCOLS, backlog=BACKLOG):
        print(f"ws_peer pid {os.getpid()} listening on ws://{host}:{port}/ws", flush=True)
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ws_peer",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8099, help="port to listen on (default 8099)")
    args = parser.parse_args(argv)
    # The library logs every connection at INFO; at 10,000 connections that is only noise.
    logging.basicConfig(level=logging.WARNING)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    uvloop.run(serve_forever(args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())

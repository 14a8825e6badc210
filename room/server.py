"""A room instance's I/O edge: listeners (plain or TLS), the RPC endpoint, the periodic
loops, and the encrypted channel's key."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from im.config import Product
from im.protocol.secure import KEY_SIZE, ServerHandshake
from im.rpc import RpcServer
from im.saver_client import SaverClient
from im.sessions import Node, SessionStore
from im.tls import TlsContextHolder
from room import stats
from room.config import RoomConfig
from room.connection import TcpConnection, WsConnection
from room.gateway import Gateway

log = logging.getLogger("im.room")

BACKLOG = 4096


def load_secure_key(path: str | Path) -> X25519PrivateKey:
    """The channel's static private key: a file of 64 hex digits, as `im secure-key` writes.

    Errors name the file, never its content.
    """
    try:
        text = Path(path).read_text(encoding="ascii").strip()
        raw = bytes.fromhex(text)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not hex digits"
        raise ValueError(f"secure key {path}: {reason}") from None
    if len(raw) != KEY_SIZE:
        raise ValueError(f"secure key {path}: {len(raw)} bytes, expected {KEY_SIZE}")
    return X25519PrivateKey.from_private_bytes(raw)


class RoomServer:
    def __init__(
        self,
        config: RoomConfig,
        products: Mapping[str, Product],
        store: SessionStore,
        *,
        owns_store: bool = False,
    ) -> None:
        self.config = config
        self.store = store
        self.owns_store = owns_store
        self.saver = SaverClient(config.saver) if config.saver else None
        self.gateway = Gateway(config, products, store, saver=self.saver)
        self.tls: TlsContextHolder | None = None
        if config.tls_cert and config.tls_key:
            self.tls = TlsContextHolder(config.tls_cert, config.tls_key)
        if config.secure_key:
            self.gateway.secure = ServerHandshake(load_secure_key(config.secure_key))
        self.rpc = RpcServer(
            {
                "push": self.gateway.rpc_push,
                "room_push": self.gateway.rooms.rpc_room_push,
                "broadcast": self.gateway.rooms.rpc_broadcast,
                "kick": self.gateway.rpc_kick,
                "drain": self._rpc_drain,
            },
            name="room",
        )
        self._servers: list[asyncio.Server] = []
        #: Set when the instance is done on its own (a drain finished): the process exits.
        self.finished = asyncio.Event()
        self._loops: list[asyncio.Task] = []
        self.ws_address = ""
        self.tcp_address = ""

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        cfg = self.config
        gateway = self.gateway
        context = self.tls.context if self.tls is not None else None
        ws_server, tcp_server = [
            await loop.create_server(
                lambda kind=kind: kind(gateway),
                cfg.host,
                port,
                backlog=BACKLOG,
                reuse_port=cfg.reuse_port,
                ssl=context,
                ssl_handshake_timeout=cfg.handshake_timeout_s if context else None,
            )
            for kind, port in ((WsConnection, cfg.ws_port), (TcpConnection, cfg.tcp_port))
        ]
        self._servers = [ws_server, tcp_server]
        ws_port = _bound_port(ws_server)
        tcp_port = _bound_port(tcp_server)
        _, rpc_port = await self.rpc.start(cfg.host, cfg.rpc_port or 0)
        public = cfg.advertise_host or cfg.host
        scheme = "wss" if context else "ws"
        self.ws_address = f"{scheme}://{public}:{ws_port}{cfg.ws_path}"
        self.tcp_address = f"{public}:{tcp_port}"
        gateway.node = Node(
            gateway.instance,
            rpc=f"{public}:{rpc_port}",
            ws=self.ws_address,
            # A TLS listener says so with its scheme; the dispatcher passes it on as is.
            tcp=f"tcps://{self.tcp_address}" if context else self.tcp_address,
            idc=cfg.idc,
        )
        stats.track(gateway)
        await gateway.renew_node()
        await gateway.switches_feed.start()
        self._loops = [
            asyncio.create_task(self._every(1.0, gateway.sweep)),
            asyncio.create_task(self._every(cfg.session_ttl_s / 3, gateway.renew)),
            asyncio.create_task(self._every(cfg.node_ttl_s / 3, gateway.renew_node)),
            asyncio.create_task(self._every(cfg.node_ttl_s / 3, gateway.refresh_idc)),
            asyncio.create_task(self._every(cfg.qos_resync_s, gateway.qos.resync)),
        ]
        if self.tls is not None:
            self._loops.append(asyncio.create_task(self.tls.watch(cfg.tls_reload_s)))
        if gateway.secure is not None:
            log.info(
                "room %s: encrypted channel on, public key %s",
                gateway.instance,
                gateway.secure.public_key.hex(),
            )
        log.info(
            "room %s: websocket %s, tcp %s, rpc %s",
            gateway.instance,
            self.ws_address,
            gateway.node.tcp,
            gateway.node.rpc,
        )

    async def drain(self, window_s: float | None = None) -> None:
        """Stop listening, move every client elsewhere over the window, then return."""
        await self._start_drain(window_s)

    def _start_drain(self, window_s: float | None) -> asyncio.Task[None]:
        for server in self._servers:
            server.close()  # new connection attempts fail fast and go to the next address
        task = self.gateway.drain.start(self.config.drain_s if window_s is None else window_s)
        task.add_done_callback(lambda _: self.finished.set())
        return task

    async def _rpc_drain(self, params: Any) -> dict[str, Any]:
        answer = await self.gateway.rpc_drain(params)
        self._start_drain(answer["window_s"])
        return answer

    @staticmethod
    async def _every(interval: float, fn: Callable[[], Awaitable[None] | None]) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                result = fn()
                if result is not None:
                    await result
            except Exception:
                log.exception("periodic %s failed", getattr(fn, "__name__", fn))

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        for task in self._loops:
            task.cancel()
        self.gateway.shutdown()
        await self.gateway.stop_background()
        if self.saver is not None:
            await self.saver.close()
        await self.gateway.switches_feed.close()
        with contextlib.suppress(Exception):
            await self.store.remove_node(self.gateway.instance)
        await self.rpc.close()
        for server in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 2.0)
        stats.untrack(self.gateway)
        if self.owns_store:
            await self.store.close()


def _bound_port(server: asyncio.Server) -> int:
    sock: socket.socket = server.sockets[0]
    return sock.getsockname()[1]

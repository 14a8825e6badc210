"""The room's half of QoS 1: what the saver holds for a user reaches the user at login,
before live pushes, and what the clients ACK leaves the saver in batches.

At login the session is in the register first (so a message stored from then on is routed
here live), then the user's pending messages are paged from the saver and queued, paced by
the connection's queue; live unicast pushes that arrive meanwhile are held and queued after
them, minus the ids the saver already returned. A connection that dropped frames (a full
queue) or could not read its pending messages (the saver was down) is paged again a little
later, so a message the saver holds is not left behind while its user stays online; the
SDK drops the ids it has already seen.

ACKs and "written" marks of the whole instance go to the saver every few milliseconds in
one call each. ACKs that cannot be sent are kept (bounded) and sent again; a lost ACK only
means one more delivery, which the client drops by id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from typing import TYPE_CHECKING, Any

from im.messages_store import MessageStore
from im.protocol.messages import PRIORITY_INDEX
from im.rpc import RpcError
from room.connection import ONLINE, Connection

if TYPE_CHECKING:
    from room.gateway import Gateway

log = logging.getLogger("im.room.qos")

#: Messages asked of the saver per page: each one returned counts a delivery attempt, so
#: pages stay small enough to be written before the next one is asked for.
PAGE = 100
#: Logins paging their pending messages at once; a reconnect storm waits its turn.
CONCURRENT_LOADS = 64
#: How long ACKs and written marks gather before one call takes them all.
FLUSH_S = 0.02
#: ACK ids kept while the saver cannot take them; past this the oldest are forgotten
#: (their messages are delivered once more and dropped by the client).
MAX_BACKLOG = 100_000
#: Pause after a flush the saver refused, before the kept ACKs are sent again.
RETRY_PAUSE_S = 1.0
#: Live pushes held for one connection while its pending messages load.
MAX_HELD = 1000
#: A connection's queue is refilled from its pending page once it is below this share.
REFILL_SHARE = 0.5


class AtLeastOnce:
    __slots__ = (
        "_gateway",
        "_saver",
        "_acks",
        "_ack_count",
        "_written",
        "_flush_handle",
        "_flush_task",
        "_loads",
        "_resync",
        "_tasks",
        "counts",
    )

    def __init__(self, gateway: Gateway, saver: MessageStore | None) -> None:
        self._gateway = gateway
        self._saver = saver
        self._acks: dict[tuple[str, str], list[str]] = {}
        self._ack_count = 0
        self._written: dict[str, list[tuple[str, str]]] = {}
        self._flush_handle: asyncio.Handle | None = None
        self._flush_task: asyncio.Task[None] | None = None
        self._loads = asyncio.Semaphore(CONCURRENT_LOADS)
        self._resync: set[Connection] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        #: pending_loaded, held, acks_sent, acks_dropped, saver_errors, resyncs
        self.counts: Counter[str] = Counter()

    @property
    def enabled(self) -> bool:
        return self._saver is not None

    # -- login ---------------------------------------------------------------------------

    def online(self, conn: Connection, product: str = "", uid: str = "") -> None:
        """The session is registered: page the user's pending messages onto the socket.

        For the connection's first product live pushes wait until its pending ones are out;
        a product bound later (room.bindings) has its pending ones paged alongside."""
        if self._saver is None:
            return
        if not product:
            conn.held = []
        self._spawn(self._load(conn, product or conn.product, uid or conn.uid))

    def hold(self, conn: Connection, priority: int, frame: bytes, msg_id: str) -> None:
        """A live push for a connection still loading: it goes out after the pending ones."""
        held = conn.held
        assert held is not None
        if len(held) >= MAX_HELD:
            del held[0]
            self._resync.add(conn)  # the saver still has it (qos 1) or it was qos 0
        held.append((priority, frame, msg_id))
        self.counts["held"] += 1

    def dropped(self, conn: Connection) -> None:
        """A frame for `conn` was dropped or evicted: if it may have been a qos 1 one, look
        at the user's pending messages again."""
        if self._saver is not None and conn.qos1 and conn.state == ONLINE:
            self._resync.add(conn)

    async def _load(self, conn: Connection, product: str, uid: str) -> None:
        sent: set[str] = set()
        first = product == conn.product
        try:
            async with self._loads:
                await self._page_all(conn, product, uid, sent)
        except (RpcError, OSError, TimeoutError, ValueError) as exc:
            self.counts["saver_errors"] += 1
            log.warning("pending messages of %s: saver failed: %s", uid, exc)
            self._resync.add(conn)
        finally:
            if first:
                self._release(conn, sent)

    def _release(self, conn: Connection, sent: set[str]) -> None:
        """The live pushes held during the load, minus those the saver returned too."""
        held, conn.held = conn.held or [], None
        if conn.state == ONLINE:
            for priority, frame, msg_id in held:
                if msg_id not in sent:
                    self._gateway.queue_frame(conn, priority, frame)

    async def _page_all(self, conn: Connection, product: str, uid: str, sent: set[str]) -> None:
        assert self._saver is not None
        after = ""
        cap = self._gateway.config.queue_cap
        while conn.state == ONLINE:
            page = await self._saver.pending(product, uid, PAGE, after)
            if not page:
                return
            for message in page:
                while conn.state == ONLINE and conn.queue and conn.queue.size >= cap * REFILL_SHARE:
                    await asyncio.sleep(self._gateway.config.flush_interval_ms / 1000 or 0.005)
                if conn.state != ONLINE:
                    return
                frame = self._gateway.frame_for(conn, message, product, {})
                conn.qos1 = True
                if self._gateway.queue_frame(conn, PRIORITY_INDEX[message["pri"]], frame):
                    sent.add(message["id"])
                    self.written(conn, message["id"], product, uid)
            self.counts["pending_loaded"] += len(page)
            after = page[-1]["id"]

    async def resync(self) -> None:
        """Page again the connections that dropped frames or missed their pending load."""
        flagged, self._resync = self._resync, set()
        for conn in flagged:
            if conn.state == ONLINE and conn.held is None:
                self.counts["resyncs"] += 1
                self.online(conn)
                for product, uid in (conn.binds or {}).items():
                    self.online(conn, product, uid)

    # -- ACKs and written marks ----------------------------------------------------------

    def ack(self, conn: Connection, ids: list[str]) -> None:
        if self._saver is None or not ids:
            return
        # Ids are unique across products and the saver ignores ids a user does not have, so
        # a connection carrying several products ACKs for each of them.
        self._acks.setdefault((conn.product, conn.uid), []).extend(ids)
        self._ack_count += len(ids)
        for product, uid in (conn.binds or {}).items():
            self._acks.setdefault((product, uid), []).extend(ids)
            self._ack_count += len(ids)
        if self._ack_count > MAX_BACKLOG:
            self._forget_oldest_acks()
        self._schedule()

    def written(self, conn: Connection, msg_id: str, product: str = "", uid: str = "") -> None:
        if self._saver is None:
            return
        rows = self._written.setdefault(product or conn.product, [])
        if len(rows) < MAX_BACKLOG:
            rows.append((uid or conn.uid, msg_id))
        self._schedule()

    def _forget_oldest_acks(self) -> None:
        while self._ack_count > MAX_BACKLOG and self._acks:
            user = next(iter(self._acks))
            self._ack_count -= len(self._acks.pop(user))
            self.counts["acks_dropped"] += 1

    def _schedule(self) -> None:
        if self._flush_handle is None and (self._flush_task is None or self._flush_task.done()):
            loop = asyncio.get_running_loop()
            self._flush_handle = loop.call_later(FLUSH_S, self._start_flush)

    def _start_flush(self) -> None:
        self._flush_handle = None
        self._flush_task = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        assert self._saver is not None
        acks, self._acks, self._ack_count = self._acks, {}, 0
        written, self._written = self._written, {}
        rows = [(product, uid, ids) for (product, uid), ids in acks.items()]
        try:
            if rows:
                await self._saver.ack_many(rows)
                self.counts["acks_sent"] += sum(len(ids) for _, _, ids in rows)
            for product, marks in written.items():
                await self._saver.mark_written(product, marks)
        except (RpcError, OSError, TimeoutError, ValueError) as exc:
            self.counts["saver_errors"] += 1
            log.warning("saver refused a flush of %d ack rows: %s", len(rows), exc)
            for product, uid, ids in rows:  # kept for the next flush; marks are only states
                self._acks.setdefault((product, uid), []).extend(ids)
                self._ack_count += len(ids)
            self._forget_oldest_acks()
            await asyncio.sleep(RETRY_PAUSE_S)
        if self._acks or self._written:
            self._flush_handle = asyncio.get_running_loop().call_later(FLUSH_S, self._start_flush)

    async def close(self) -> None:
        """Send what is gathered (briefly) and stop the loads in flight."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if self._saver is not None and (self._acks or self._written):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._flush(), 1.0)
        for task in list(self._tasks):
            task.cancel()
        if self._flush_task is not None:
            self._flush_task.cancel()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

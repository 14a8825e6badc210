"""The switches in force in one process, polled from the register's switch store.

`current` is replaced whole, never edited, so whoever reads it sees one version. Rooms and
fan-out workers each hold one feed; a change PUT by an operator is in force everywhere
within one poll interval.
"""

from __future__ import annotations

import asyncio
import logging
import time

from im.switches import SwitchError, Switches, SwitchStore, parse_switches

log = logging.getLogger("im.switches")

POLL_S = 0.5
WARN_EVERY_S = 5.0


class SwitchesFeed:
    def __init__(self, store: SwitchStore | None, *, interval: float = POLL_S) -> None:
        self._store = store
        self._interval = interval
        self._task: asyncio.Task[None] | None = None
        self._warned_at = -WARN_EVERY_S
        self.version = 0
        self.current = Switches()  # the defaults until a document is found

    def __call__(self) -> Switches:
        return self.current

    async def start(self) -> None:
        if self._store is None:
            return
        await self.poll()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def poll(self) -> None:
        if self._store is None:
            return
        try:
            found = await self._store.get_switches(self.version)
        except Exception as exc:  # the store's own error types vary (RPC, redis, ...)
            now = time.monotonic()
            if now - self._warned_at >= WARN_EVERY_S:
                self._warned_at = now
                log.warning("reading the switches failed: %s: %s", type(exc).__name__, exc)
            return
        if found is None:
            return
        version, document = found
        try:
            self.current = parse_switches(document)
            log.info("switches version %d in force", version)
        except SwitchError as exc:  # stores hold checked documents; keep the ones in force
            log.error("switches version %d refused, keeping the old ones: %s", version, exc)
        self.version = version

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self.poll()

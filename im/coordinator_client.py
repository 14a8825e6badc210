"""The coordinator service, reached over the internal RPC.

Room instances hold one of these and hand it their clients' `up` frames and online/offline
events in batches; the coordinator queues them per product for the business webhook.

    up.submit      [[product, uid, conn, seq, type, body], ...]
                   -> [accepted_count, refused_indexes, refused_reasons]
    events.submit  [[product, uid, conn, "online"|"offline", at_ms, device], ...]
                   -> accepted_count

`refused_reasons[i]` says why row `refused_indexes[i]` was refused: one of the constants
below, so the room can tell the client whether a retry can help.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from im.rpc.service import EngineClient

NAME = "coordinator"

#: The product's backlog is full: the client may retry later.
BUSY = "busy"
#: The product has no webhook configured: retrying will not help.
NO_WEBHOOK = "no_webhook"
#: The row cannot be forwarded (a field of the wrong type, a body JSON cannot carry).
BAD_ROW = "bad_row"
REASONS = (BUSY, NO_WEBHOOK, BAD_ROW)

ONLINE = "online"
OFFLINE = "offline"

#: [product, uid, conn, seq, type, body]
UpRow = Sequence[Any]
#: [product, uid, conn, "online" | "offline", at_ms, device]
EventRow = Sequence[Any]


class UpResult(NamedTuple):
    accepted: int
    refused: list[int]  # indexes into the submitted rows
    reasons: list[str]  # one of REASONS per refused index


class CoordinatorClient(EngineClient):
    def __init__(self, address: str, *, timeout: float = 2.0) -> None:
        super().__init__(address, name=NAME, timeout=timeout)

    async def submit_up(self, rows: Sequence[UpRow]) -> UpResult:
        """Queue `up` frames; RpcError when the coordinator cannot be reached in time."""
        if not rows:
            return UpResult(0, [], [])
        accepted, refused, reasons = await self._call("up.submit", rows)
        if len(refused) != len(reasons):
            raise ValueError("coordinator answered a refused index without its reason")
        return UpResult(accepted, refused, reasons)

    async def submit_events(self, rows: Sequence[EventRow]) -> int:
        """Queue online/offline events; the answer is how many were accepted."""
        if not rows:
            return 0
        return await self._call("events.submit", rows)

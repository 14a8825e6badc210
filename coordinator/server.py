"""The coordinator service: submitted rows checked, encoded and queued for the poster.

Methods and their params (msgpack arrays):

    up.submit      [[product, uid, conn, seq, type, body], ...]
                   -> [accepted_count, refused_indexes, refused_reasons]
    events.submit  [[product, uid, conn, "online"|"offline", at_ms, device], ...]
                   -> accepted_count

A row is refused on its own (never the whole call): `no_webhook` when its product has no
webhook here, `busy` when the product's backlog is full, `bad_row` when it cannot be
forwarded. Params that are not an array answer `bad_request`. Messages are stamped with
the time they arrive (`at_ms`); events carry the room's own.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

from coordinator import metrics
from coordinator.batching import EVENT, MESSAGE
from coordinator.config import CoordinatorConfig
from coordinator.rows import BadRow, event_item, message_item, product_of
from coordinator.webhook import Poster
from im.config import Product
from im.coordinator_client import BAD_ROW, BUSY, NO_WEBHOOK
from im.rpc.service import EngineService

log = logging.getLogger("im.coordinator")

KIND_LABELS = {MESSAGE: "message", EVENT: "event"}


class CoordinatorServer(EngineService):
    def __init__(self, config: CoordinatorConfig, products: Mapping[str, Product]) -> None:
        self.config = config
        self.products = products
        self.poster = Poster(config, products)
        super().__init__(
            "coordinator",
            {"up.submit": self._submit_up, "events.submit": self._submit_events},
            engine="webhook",
            health=self._health,
            address=(config.host, config.port, config.metrics_port),
        )

    async def start(self) -> None:
        await super().start()
        self.poster.start()

    async def close(self) -> None:
        await super().close()  # no new rows from here on
        await self.poster.close()

    async def _health(self) -> None:
        self.poster.check()

    async def _submit_up(self, params: Any) -> list:
        encode = partial(message_item, at_ms=time.time_ns() // 1_000_000)
        refused: list[int] = []
        reasons: list[str] = []
        for index, row in enumerate(_rows(params)):
            reason = self._offer(row, MESSAGE, encode)
            if reason is not None:
                refused.append(index)
                reasons.append(reason)
        return [len(params) - len(refused), refused, reasons]

    async def _submit_events(self, params: Any) -> int:
        return sum(self._offer(row, EVENT, event_item) is None for row in _rows(params))

    def _offer(self, row: Any, kind: int, encode: Callable[[Any], bytes]) -> str | None:
        """Queue one row; the refusal reason, or None when it is queued."""
        product = product_of(row)
        label = KIND_LABELS[kind]
        if product is None:
            metrics.REFUSED.labels(metrics.UNKNOWN_PRODUCT, label, BAD_ROW).inc()
            return BAD_ROW
        if product not in self.poster.lanes:
            known = product if product in self.products else metrics.UNKNOWN_PRODUCT
            metrics.REFUSED.labels(known, label, NO_WEBHOOK).inc()
            return NO_WEBHOOK
        try:
            item = encode(row)
        except BadRow as exc:
            metrics.REFUSED.labels(product, label, BAD_ROW).inc()
            log.debug("product %s: %s row refused: %s", product, label, exc)
            return BAD_ROW
        if not self.poster.offer(product, kind, item):
            metrics.REFUSED.labels(product, label, BUSY).inc()
            return BUSY
        metrics.ACCEPTED.labels(product, label).inc()
        return None


def _rows(params: Any) -> list:
    if not isinstance(params, list):
        raise TypeError("params must be an array of rows")
    return params

"""Warnings at a bounded rate: a webhook that is down must not flood the log."""

from __future__ import annotations

import logging
import time


class Throttled:
    """At most one line per key per `interval`; the next line says how many were held back."""

    __slots__ = ("_log", "_interval", "_last", "_held")

    def __init__(self, log: logging.Logger, interval: float = 10.0) -> None:
        self._log = log
        self._interval = interval
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def warning(self, key: str, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last.get(key, -self._interval) < self._interval:
            self._held[key] = self._held.get(key, 0) + 1
            return
        self._last[key] = now
        held = self._held.pop(key, 0)
        if held:
            self._log.warning(message + " (%d similar held back)", *args, held)
        else:
            self._log.warning(message, *args)

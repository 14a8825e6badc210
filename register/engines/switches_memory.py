"""The embedded switch store: one versioned document in process memory."""

from __future__ import annotations

import orjson


class MemorySwitchStore:
    """`im.switches.SwitchStore` in memory. The document is kept as JSON bytes, so a caller
    mutating what it passed or got back changes nothing stored, and a document Redis could
    not hold is refused here too."""

    def __init__(self) -> None:
        self._version = 0
        self._document = b"{}"

    async def get_switches(self, known_version: int = 0) -> tuple[int, dict] | None:
        if self._version == known_version:
            return None
        return self._version, orjson.loads(self._document)

    async def put_switches(self, document: dict) -> int:
        self._document = orjson.dumps(document)
        self._version += 1
        return self._version

    async def close(self) -> None:
        """Nothing to release; here so both engines close alike."""

"""Closing a user's connections wherever they are: POST /v1/users/{uid}/kick.

The register says where the user's sessions are; each room instance holding some gets one
`kick` RPC and closes them with close code 4016 and the reason, which the client sees.
"""

from __future__ import annotations

import asyncio
from typing import Any

from center.errors import invalid_field
from center.push import Directory, RoomCaller, Unreachable, group_by_instance
from center.validation import parse_json_object

MAX_REASON = 200
DEFAULT_REASON = "kicked by the service"
KICK_FIELDS = ("reason", "device")


def parse_kick(raw: bytes) -> tuple[str, str | None]:
    """(reason, device or None for every device) from an optional JSON body."""
    if not raw.strip():
        return DEFAULT_REASON, None
    document = parse_json_object(raw)
    for name in document:
        if name not in KICK_FIELDS:
            raise invalid_field(name[:64], f"is unknown; expected {', '.join(KICK_FIELDS)}")
    reason = document.get("reason", DEFAULT_REASON)
    if not isinstance(reason, str) or not 0 < len(reason) <= MAX_REASON:
        raise invalid_field("reason", f"must be a string of 1 to {MAX_REASON} characters")
    device = document.get("device")
    if "device" in document and (not isinstance(device, str) or len(device) > 128):
        raise invalid_field("device", "must be a string of at most 128 characters")
    return reason, device


async def kick_user(
    directory: Directory,
    caller: RoomCaller,
    product: str,
    uid: str,
    reason: str,
    device: str | None,
) -> dict[str, Any]:
    """Sessions found and closed; instances that did not answer are listed."""
    sessions = (await directory.lookup(product, [uid])).get(uid, [])
    if device is not None:
        sessions = [s for s in sessions if s.device == device]
    groups = group_by_instance([sessions])

    async def kick(instance: str, conns: list[str]) -> tuple[str, int | None]:
        try:
            params = {"conns": conns, "reason": reason, "product": product}
            reply = await caller.call(instance, "kick", params)
        except Unreachable:
            return instance, None
        closed = reply.get("closed", 0) if isinstance(reply, dict) else 0
        return instance, closed if isinstance(closed, int) else 0

    results = await asyncio.gather(*(kick(i, c) for i, c in groups.items()))
    return {
        "uid": uid,
        "sessions": len(sessions),
        "kicked": sum(n for _, n in results if n),
        "unreachable": sorted(i for i, n in results if n is None),
    }

"""Submitted rows -> the JSON items of a webhook batch, checked and encoded once.

Each item is encoded when it is accepted, so a batch body is a join of bytes and the
queues can be bounded by the bytes they will put on the wire.
"""

from __future__ import annotations

from typing import Any

import orjson

from im.coordinator_client import OFFLINE, ONLINE

MAX_SEQ = 2**53 - 1
EVENTS = (ONLINE, OFFLINE)


class BadRow(ValueError):
    """The row cannot be forwarded; the reason names the field."""


def _text(row: Any, index: int, name: str, max_len: int, *, allow_empty: bool = False) -> str:
    value = row[index]
    if not isinstance(value, str) or len(value) > max_len or not (value or allow_empty):
        raise BadRow(f"{name} must be a string of {0 if allow_empty else 1}-{max_len} characters")
    return value


def _integer(row: Any, index: int, name: str) -> int:
    value = row[index]
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_SEQ:
        raise BadRow(f"{name} must be an integer from 0 to {MAX_SEQ}")
    return value


def _shape(row: Any, fields: int) -> None:
    if not isinstance(row, list | tuple) or len(row) != fields:
        raise BadRow(f"a row must be an array of {fields} items")


def product_of(row: Any) -> str | None:
    """The row's product if it has a plausible one, for routing before the full check."""
    if isinstance(row, list | tuple) and row and isinstance(row[0], str) and 0 < len(row[0]) <= 64:
        return row[0]
    return None


def message_item(row: Any, at_ms: int) -> bytes:
    """[product, uid, conn, seq, type, body] -> {"uid","conn","seq","type","body","at_ms"}."""
    _shape(row, 6)
    item = {
        "uid": _text(row, 1, "uid", 128),
        "conn": _text(row, 2, "conn", 64),
        "seq": _integer(row, 3, "seq"),
        "type": _text(row, 4, "type", 64),
        "body": row[5],
        "at_ms": at_ms,
    }
    try:
        return orjson.dumps(item)
    except orjson.JSONEncodeError:  # binary data, non-string keys, nesting too deep
        raise BadRow("body cannot be carried as JSON") from None


def event_item(row: Any) -> bytes:
    """[product, uid, conn, event, at_ms, device] -> {"uid","conn","event","at_ms","device"}."""
    _shape(row, 6)
    if row[3] not in EVENTS:
        raise BadRow(f"event must be one of {', '.join(EVENTS)}")
    return orjson.dumps(
        {
            "uid": _text(row, 1, "uid", 128),
            "conn": _text(row, 2, "conn", 64),
            "event": row[3],
            "at_ms": _integer(row, 4, "at_ms"),
            "device": _text(row, 5, "device", 128, allow_empty=True),
        }
    )

"""Map <-> bytes for the two payload encodings (msgpack and JSON)."""

from __future__ import annotations

from enum import Enum
from typing import Any

import msgpack
import orjson

from im.protocol.errors import ErrorCode, ProtocolError


class Encoding(Enum):
    MSGPACK = "msgpack"
    JSON = "json"

    @property
    def subprotocol(self) -> str:
        return f"im.v1.{self.value}"

    @classmethod
    def from_subprotocol(cls, name: str) -> Encoding:
        for enc in cls:
            if enc.subprotocol == name:
                return enc
        raise ValueError(f"unknown subprotocol {name!r}")


SUBPROTOCOLS = tuple(enc.subprotocol for enc in Encoding)

_packb = msgpack.Packer(use_bin_type=True).pack


def encode(message: dict, encoding: Encoding) -> bytes:
    if encoding is Encoding.MSGPACK:
        return _packb(message)
    return orjson.dumps(message)


def decode(payload: bytes, encoding: Encoding) -> dict[str, Any]:
    """Decode one payload to a map; anything else is a MALFORMED protocol error."""
    try:
        if encoding is Encoding.MSGPACK:
            message = msgpack.unpackb(payload, raw=False, strict_map_key=True)
        else:
            message = orjson.loads(payload)
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
        raise ProtocolError(ErrorCode.MALFORMED, f"payload is not valid {encoding.value}") from None
    if not isinstance(message, dict):
        raise ProtocolError(ErrorCode.MALFORMED, "payload must be a map")
    return message

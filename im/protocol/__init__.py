"""Sans-I/O wire protocol: bytes in, messages out. No sockets are touched here."""

from im.protocol.errors import ErrorCode, ProtocolError

__all__ = ["ErrorCode", "ProtocolError"]

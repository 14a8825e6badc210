"""TCP framing: a 4-byte big-endian length, then that many payload bytes."""

from __future__ import annotations

from im.protocol.errors import ErrorCode, ProtocolError

HEADER = 4
DEFAULT_MAX_FRAME = 64 * 1024


def frame(payload: bytes) -> bytes:
    return len(payload).to_bytes(HEADER, "big") + payload


class FrameDecoder:
    """Incremental decoder: feed any split of the stream, get whole payloads back.

    A length above `max_frame` is refused as soon as the header is seen, before any of the
    body is buffered, so a hostile peer cannot make us hold more than one frame's worth.
    """

    __slots__ = ("_buf", "max_frame")

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self._buf = bytearray()
        self.max_frame = max_frame

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[bytes]:
        buf = self._buf
        buf += data
        out: list[bytes] = []
        pos = 0
        end = len(buf)
        while end - pos >= HEADER:
            size = int.from_bytes(buf[pos : pos + HEADER], "big")
            if size > self.max_frame:
                raise ProtocolError(
                    ErrorCode.FRAME_TOO_LARGE,
                    f"frame of {size} bytes exceeds the limit of {self.max_frame}",
                )
            if end - pos - HEADER < size:
                break
            start = pos + HEADER
            out.append(bytes(buf[start : start + size]))
            pos = start + size
        if pos:
            del buf[:pos]
        return out

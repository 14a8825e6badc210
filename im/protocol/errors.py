"""Stable numeric error codes shared by every transport.

The codes double as WebSocket close codes (4000-4999 is the range RFC 6455 leaves to
applications), so a client sees the same number whether it reads an `error` frame or a
close frame. They are public API: never renumber, only add.
"""

from enum import IntEnum


class ErrorCode(IntEnum):
    MALFORMED = 4000  # bytes that do not decode to a map, or a map without a string `op`
    AUTH_FAILED = 4001  # bad, expired, forged or mismatched token; unknown product
    AUTH_TIMEOUT = 4002  # no successful auth within the deadline
    NOT_AUTHENTICATED = 4003  # an op other than auth/ping before auth
    UNKNOWN_OP = 4004  # `op` is not one this side accepts
    BAD_FIELD = 4005  # a field is missing or has the wrong type or value
    FRAME_TOO_LARGE = 4006  # frame longer than the negotiated limit
    HEARTBEAT_TIMEOUT = 4007  # nothing received for 3 heartbeat intervals
    SLOW_CONSUMER = 4008  # the high-priority queue overflowed: the client does not read
    PROTOCOL_VIOLATION = 4009  # transport-level rule broken (bad WebSocket framing, ...)
    SERVER_SHUTDOWN = 4010  # the instance is stopping; reconnect elsewhere
    REPLACED = 4011  # the same uid and device logged in on another connection
    ALREADY_AUTHENTICATED = 4012  # a second auth on an authenticated connection
    UPSTREAM_BUSY = 4013  # the upstream backlog is full, retry later
    UPSTREAM_RATE = 4014  # the connection sent `up` frames faster than its rate allows
    SECURE_CHANNEL = 4015  # encrypted channel: bad handshake, or a frame replayed or forged
    KICKED = 4016  # the business closed this user's connections (POST /v1/users/{uid}/kick)
    BIND_REFUSED = 4017  # a bind or unbind was refused (bad token, already bound, too many)
    TOO_MANY_CONNECTIONS = 4018  # the client's address holds as many connections as allowed
    CONNECTION_RATE = 4019  # new connections from the client's address come too fast
    ADDRESS_DENIED = 4020  # the client's address is on the deny list, or off the allow list
    FRAME_RATE = 4021  # the connection sent frames faster than its rate allows
    SLOW_SENDER = 4022  # the request head or a frame did not arrive whole within its deadline


#: Errors after which the server closes the connection. The rest are answered and the
#: connection stays open, so one bad frame from a client does not cost it its session.
FATAL_CODES = frozenset(
    {
        ErrorCode.MALFORMED,
        ErrorCode.AUTH_FAILED,
        ErrorCode.AUTH_TIMEOUT,
        ErrorCode.FRAME_TOO_LARGE,
        ErrorCode.HEARTBEAT_TIMEOUT,
        ErrorCode.SLOW_CONSUMER,
        ErrorCode.PROTOCOL_VIOLATION,
        ErrorCode.SERVER_SHUTDOWN,
        ErrorCode.REPLACED,
        ErrorCode.SECURE_CHANNEL,
        ErrorCode.KICKED,
        ErrorCode.TOO_MANY_CONNECTIONS,
        ErrorCode.CONNECTION_RATE,
        ErrorCode.ADDRESS_DENIED,
        ErrorCode.FRAME_RATE,
        ErrorCode.SLOW_SENDER,
    }
)


class ProtocolError(Exception):
    """A peer broke the protocol; carries the code and a reason fit to send back."""

    def __init__(self, code: ErrorCode, reason: str) -> None:
        super().__init__(f"{int(code)} {reason}")
        self.code = code
        self.reason = reason

    @property
    def fatal(self) -> bool:
        return self.code in FATAL_CODES

    def to_map(self) -> dict:
        return {"op": "error", "code": int(self.code), "reason": self.reason}

"""The JSON error body every failed dispatcher call answers with, and its codes.

Body: {"error": {"code": "<snake_case>", "message": "<text naming the parameter>"}}, the
same shape and code names as center's API, so one client-side handler reads both. The
codes are public API: never rename, only add.
"""

from __future__ import annotations

from im.http_errors import (
    BAD_REQUEST,
    INTERNAL,
    METHOD_NOT_ALLOWED,
    NOT_FOUND,
    UNAVAILABLE,
    ApiError,
    error_body,
)
from im.http_errors import code_for_status as _code_for_status

__all__ = [
    "BAD_REQUEST",
    "CODE_BY_STATUS",
    "INTERNAL",
    "METHOD_NOT_ALLOWED",
    "NOT_FOUND",
    "UNAVAILABLE",
    "ApiError",
    "bad_parameter",
    "code_for_status",
    "error_body",
]

#: Codes for errors that the HTTP layer raises by status alone (routing).
CODE_BY_STATUS = {400: BAD_REQUEST, 404: NOT_FOUND, 405: METHOD_NOT_ALLOWED, 503: UNAVAILABLE}


def code_for_status(status: int) -> str:
    return _code_for_status(status, CODE_BY_STATUS)


def bad_parameter(name: str, problem: str) -> ApiError:
    return ApiError(400, BAD_REQUEST, f"parameter {name!r} {problem}")

"""The one error shape every failed HTTP call answers with, and the codes it may carry.

Body: {"error": {"code": "<snake_case>", "message": "<text naming the field>"}}. The
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
    "INVALID_FIELD",
    "INVALID_JSON",
    "METHOD_NOT_ALLOWED",
    "NOT_FOUND",
    "TOO_LARGE",
    "UNAUTHORIZED",
    "UNAVAILABLE",
    "ApiError",
    "code_for_status",
    "error_body",
    "invalid_field",
]

UNAUTHORIZED = "unauthorized"
INVALID_JSON = "invalid_json"
INVALID_FIELD = "invalid_field"
TOO_LARGE = "too_large"

#: Codes for errors that the HTTP layer raises by status alone (routing, body limit).
CODE_BY_STATUS = {
    400: BAD_REQUEST,
    401: UNAUTHORIZED,
    404: NOT_FOUND,
    405: METHOD_NOT_ALLOWED,
    413: TOO_LARGE,
    500: INTERNAL,
    503: UNAVAILABLE,
}


def code_for_status(status: int) -> str:
    return _code_for_status(status, CODE_BY_STATUS)


def invalid_field(name: str, problem: str) -> ApiError:
    return ApiError(400, INVALID_FIELD, f"field {name!r} {problem}")

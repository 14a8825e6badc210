"""The one error shape every failed HTTP call answers with, and the codes it may carry.

Body: {"error": {"code": "<snake_case>", "message": "<text naming the field>"}}. The
codes are public API: never rename, only add.
"""

from __future__ import annotations

from collections.abc import Mapping
from http import HTTPStatus

UNAUTHORIZED = "unauthorized"
INVALID_JSON = "invalid_json"
INVALID_FIELD = "invalid_field"
NOT_FOUND = "not_found"
METHOD_NOT_ALLOWED = "method_not_allowed"
TOO_LARGE = "too_large"
UNAVAILABLE = "unavailable"
INTERNAL = "internal"
BAD_REQUEST = "bad_request"

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


class ApiError(Exception):
    """A request failed in a way the caller should hear about, with status and code."""

    def __init__(
        self, status: int, code: str, message: str, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers

    def body(self) -> dict:
        return error_body(self.code, self.message)


def error_body(code: str, message: str) -> dict:
    return {"error": {"code": code, "message": message}}


def code_for_status(status: int) -> str:
    """The code of an error known only by its status; unlisted ones get a snake_case name."""
    code = CODE_BY_STATUS.get(status)
    if code is not None:
        return code
    try:
        return HTTPStatus(status).name.lower()
    except ValueError:
        return INTERNAL if status >= 500 else BAD_REQUEST


def invalid_field(name: str, problem: str) -> ApiError:
    return ApiError(400, INVALID_FIELD, f"field {name!r} {problem}")

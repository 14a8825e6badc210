"""The JSON error body every failed dispatcher call answers with, and its codes.

Body: {"error": {"code": "<snake_case>", "message": "<text naming the parameter>"}}, the
same shape and code names as center's API, so one client-side handler reads both. The
codes are public API: never rename, only add.
"""

from __future__ import annotations

from collections.abc import Mapping

BAD_REQUEST = "bad_request"
NOT_FOUND = "not_found"
METHOD_NOT_ALLOWED = "method_not_allowed"
UNAVAILABLE = "unavailable"
INTERNAL = "internal"

#: Codes for errors that the HTTP layer raises by status alone (routing).
CODE_BY_STATUS = {400: BAD_REQUEST, 404: NOT_FOUND, 405: METHOD_NOT_ALLOWED, 503: UNAVAILABLE}


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


def error_body(code: str, message: str) -> dict:
    return {"error": {"code": code, "message": message}}


def code_for_status(status: int) -> str:
    """The code of an error known only by its status."""
    return CODE_BY_STATUS.get(status, INTERNAL if status >= 500 else BAD_REQUEST)


def bad_parameter(name: str, problem: str) -> ApiError:
    return ApiError(400, BAD_REQUEST, f"parameter {name!r} {problem}")

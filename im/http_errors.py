"""The one JSON error shape every HTTP service answers failures with.

Body: {"error": {"code": "<snake_case>", "message": "<text naming the field or parameter>"}},
the same for center and the dispatcher, so one client-side handler reads both. Each
service lists its own codes; the shared ones are here. Codes are public API: never rename,
only add.
"""

from __future__ import annotations

from collections.abc import Mapping
from http import HTTPStatus

BAD_REQUEST = "bad_request"
NOT_FOUND = "not_found"
METHOD_NOT_ALLOWED = "method_not_allowed"
UNAVAILABLE = "unavailable"
INTERNAL = "internal"


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


def code_for_status(status: int, known: Mapping[int, str]) -> str:
    """The code of an error known only by its status (routing, body limits): the service's
    own name for it, else a snake_case name of the status."""
    code = known.get(status)
    if code is not None:
        return code
    try:
        return HTTPStatus(status).name.lower()
    except ValueError:
        return INTERNAL if status >= 500 else BAD_REQUEST

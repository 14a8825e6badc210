"""`im switch get|set`: read or replace the live switches through center's admin API.

Plain HTTP with the standard library, so the command works on any host that can reach
center. Exit status: 0 done, 2 refused (bad usage, or center answered 4xx: bad value, wrong
key), 1 center unreachable or failing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

from im.config import DEV_ADMIN_KEY

CENTER_ENV = "IM_CENTER_URL"
ADMIN_KEY_ENV = "IM_ADMIN_KEY"
DEFAULT_CENTER = "http://127.0.0.1:8080"
DEFAULT_ADMIN_KEY = DEV_ADMIN_KEY
PATH = "/v1/admin/switches"
TIMEOUT_S = 10.0


class Failed(Exception):
    """The command cannot go on; `status` is its exit status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _error_message(exc: urllib.error.HTTPError) -> str:
    try:
        error = json.loads(exc.read())["error"]
        return f"{exc.code} {error['code']}: {error['message']}"
    except (ValueError, KeyError, TypeError):
        return f"{exc.code} {exc.reason}"


def _call(center: str, key: str, method: str, document: Any = None) -> Any:
    body = None if method == "GET" else json.dumps(document).encode()
    request = urllib.request.Request(
        center.rstrip("/") + PATH,
        data=body,
        method=method,
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise Failed(2 if 400 <= exc.code < 500 else 1, _error_message(exc)) from None
    except (OSError, ValueError) as exc:  # URLError and timeouts are OSErrors
        reason = getattr(exc, "reason", exc)
        raise Failed(1, f"cannot get an answer from center at {center}: {reason}") from None


def _read_document(source: str) -> Any:
    try:
        if source == "-":
            return json.load(sys.stdin)
        with open(source, encoding="utf-8") as file:
            return json.load(file)
    except OSError as exc:
        raise Failed(2, f"cannot read {source}: {exc.strerror}") from None
    except ValueError as exc:
        raise Failed(2, f"{source} is not valid JSON: {exc}") from None


def _assign(document: dict[str, Any], assignment: str) -> None:
    """NAME=JSON sets a field; NAME.KEY=JSON sets one entry of a map field (null removes it)."""
    name, sep, raw = assignment.partition("=")
    if not sep or not name:
        raise Failed(2, f"--field {assignment!r}: expected NAME=JSON, e.g. room_budget=10")
    try:
        value = json.loads(raw)
    except ValueError:
        raise Failed(
            2, f"--field {name}: {raw!r} is not JSON (quote strings: {name}='\"text\"')"
        ) from None
    field, dot, key = name.partition(".")
    if not dot:
        document[field] = value
        return
    target = document.setdefault(field, {})
    if not isinstance(target, dict):
        raise Failed(2, f"--field {name}: {field} is not a map")
    if value is None:
        target.pop(key, None)
    else:
        target[key] = value


def _print(document: Any) -> None:
    print(json.dumps(document, indent=2, ensure_ascii=False))


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--center", help=f"center URL (default ${CENTER_ENV} or {DEFAULT_CENTER})")
    common.add_argument(
        "--admin-key", help=f"admin key (default ${ADMIN_KEY_ENV} or {DEFAULT_ADMIN_KEY!r})"
    )
    parser = argparse.ArgumentParser(prog="im switch", description="Read or set live switches.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "get", parents=[common], help="print the switches with their version as JSON"
    )
    setter = commands.add_parser(
        "set",
        parents=[common],
        help="replace the switches",
        description="Replace the whole document with FILE (- for stdin), or change the fields "
        "given with --field in the document in force (or in FILE, when both are given).",
    )
    setter.add_argument("file", nargs="?", metavar="FILE|-", help="the JSON document")
    setter.add_argument(
        "--field",
        action="append",
        default=[],
        metavar="NAME=JSON",
        help="e.g. room_budget=10, merge_likes=true, msg_type_ratio.chat=40; repeatable",
    )
    return parser


def main(argv: Sequence[str]) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    center = args.center or os.environ.get(CENTER_ENV) or DEFAULT_CENTER
    key = args.admin_key or os.environ.get(ADMIN_KEY_ENV) or DEFAULT_ADMIN_KEY
    if args.command == "set" and args.file is None and not args.field:
        parser.error("set needs FILE, - or at least one --field")
    try:
        if args.command == "get":
            _print(_call(center, key, "GET"))
            return 0
        if args.file is not None:
            document = _read_document(args.file)
        else:
            document = _call(center, key, "GET")["switches"]
        if args.field and not isinstance(document, dict):
            raise Failed(2, "--field needs the document to be a JSON object")
        for assignment in args.field:
            _assign(document, assignment)
        _print(_call(center, key, "PUT", document))
        return 0
    except Failed as exc:
        print(f"im switch: {exc}", file=sys.stderr)
        return exc.status

"""Typed service settings from flags and environment: one dataclass per service.

Each field of the dataclass becomes a flag (`--flush-interval-ms`) and an environment
variable (`IM_ROOM_FLUSH_INTERVAL_MS`); a flag wins over the environment, which wins over
the default. Field help comes from `metadata={"help": ...}`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

T = TypeVar("T")


def _scalar(hint: Any) -> type:
    """int, float, str or bool from a hint such as `int | None`."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def _parse_bool(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {raw!r}")


def add_arguments(parser: argparse.ArgumentParser, cls: type, env_prefix: str) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = _scalar(hints[f.name])
        env = f"{env_prefix}{f.name.upper()}"
        default = f.default if f.default is not dataclasses.MISSING else None
        text = f.metadata.get("help", "")
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            type=_parse_bool if kind is bool else kind,
            default=None,
            help=f"{text} (env {env}; default {default})".strip(),
        )


def build(
    cls: type[T],
    args: argparse.Namespace | None,
    env_prefix: str,
    environ: Mapping[str, str] | None = None,
) -> T:
    environ = os.environ if environ is None else environ
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        value = getattr(args, f.name, None) if args is not None else None
        env = f"{env_prefix}{f.name.upper()}"
        if value is None and env in environ:
            kind = _scalar(hints[f.name])
            parse = _parse_bool if kind is bool else kind
            try:
                value = parse(environ[env])
            except ValueError as exc:
                raise ValueError(f"{env}: {exc}") from None
        if value is not None:
            values[f.name] = value
    return cls(**values)


def parse(
    cls: type[T],
    argv: Sequence[str] | None,
    env_prefix: str,
    *,
    prog: str,
    description: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> T:
    """A service's settings from its command line; a bad value exits with the usage."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_arguments(parser, cls, env_prefix)
    args = parser.parse_args(argv)
    try:
        return build(cls, args, env_prefix, environ)
    except ValueError as exc:
        parser.error(str(exc))

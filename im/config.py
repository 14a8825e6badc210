"""Products (the apps that use the gateway) and the operators' key, from a TOML file.

admin_key = "..."     # operators' key for /v1/admin (switches); never a business key

[products.demo]
secret = "..."        # signs client tokens (HS256 JWT)
api_key = "..."       # business servers' Bearer key for center
webhook = "https://..."  # optional: upstream messages and online events
webhook_secret = "..."   # optional: each webhook POST is signed with it (HMAC-SHA256)
broadcast_spread_s = 30  # optional: default pacing window of broadcasts (seconds)
"""

from __future__ import annotations

import logging
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

log = logging.getLogger("im.config")

DEV_PRODUCT = "demo"
DEV_SECRET = "dev"
DEV_ADMIN_KEY = "dev-admin"
#: RFC 7518 3.2: an HS256 key must be at least as long as the hash.
MIN_BYTES = {"secret": 32, "api_key": 16}
MIN_WEBHOOK_SECRET_BYTES = 16
CONFIG_ENV = "IM_CONFIG"


class ConfigError(ValueError):
    """The configuration file is missing, unreadable or has a wrong value; names the key."""


@dataclass(frozen=True, slots=True)
class Product:
    name: str
    secret: str
    api_key: str
    webhook: str | None = None
    broadcast_spread_s: float = 0.0  # default pacing window of this product's broadcasts
    webhook_secret: str | None = None  # signs each webhook POST (X-IM-Signature)

    def __repr__(self) -> str:  # secrets never reach logs through a repr
        return f"Product(name={self.name!r}, webhook={self.webhook!r})"


def dev_products() -> dict[str, Product]:
    return {DEV_PRODUCT: Product(DEV_PRODUCT, DEV_SECRET, DEV_SECRET)}


def _product(name: str, table: Any) -> Product:
    where = f"[products.{name}]"
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table")
    fields = {}
    for key, min_bytes in MIN_BYTES.items():
        value = table.get(key)
        if not isinstance(value, str) or len(value.encode()) < min_bytes:
            raise ConfigError(f"{where} {key} must be a string of at least {min_bytes} bytes")
        fields[key] = value
    webhook = _webhook(where, table.get("webhook"))
    webhook_secret = table.get("webhook_secret")
    if webhook_secret is not None:
        if (
            not isinstance(webhook_secret, str)
            or len(webhook_secret.encode()) < MIN_WEBHOOK_SECRET_BYTES
        ):
            raise ConfigError(
                f"{where} webhook_secret must be a string of at least "
                f"{MIN_WEBHOOK_SECRET_BYTES} bytes"
            )
        if webhook is None:
            raise ConfigError(f"{where} webhook_secret is set but there is no webhook")
    spread = table.get("broadcast_spread_s", 0.0)
    if isinstance(spread, bool) or not isinstance(spread, int | float) or not 0 <= spread <= 3600:
        raise ConfigError(f"{where} broadcast_spread_s must be a number of seconds from 0 to 3600")
    unknown = set(table) - {
        "secret",
        "api_key",
        "webhook",
        "webhook_secret",
        "broadcast_spread_s",
    }
    if unknown:
        raise ConfigError(f"{where} has unknown keys: {', '.join(sorted(unknown))}")
    return Product(
        name,
        fields["secret"],
        fields["api_key"],
        webhook,
        float(spread),
        webhook_secret=webhook_secret,
    )


def _webhook(where: str, value: Any) -> str | None:
    """An absolute http(s) URL with a host, so a typo fails at start, not at the first POST."""
    if value is None:
        return None
    problem = ConfigError(f"{where} webhook must be an http:// or https:// URL with a host")
    if not isinstance(value, str):
        raise problem
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError:  # a port out of range, a malformed IPv6 literal
        raise problem from None
    if parts.scheme not in ("http", "https") or not parts.hostname or port == 0:
        raise problem
    return value


def _read(path: str | os.PathLike) -> dict[str, Any]:
    try:
        return tomllib.loads(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config {path} is not valid TOML: {exc}") from None


def load_admin_key(path: str | os.PathLike | None) -> str | None:
    """The operators' key from the top of the config, the development key without a config,
    None (admin API off) for a config that sets none."""
    path = path or os.environ.get(CONFIG_ENV)
    if not path:
        return DEV_ADMIN_KEY
    key = _read(path).get("admin_key")
    if key is None:
        return None
    if not isinstance(key, str) or len(key.encode()) < MIN_BYTES["api_key"]:
        raise ConfigError(f"admin_key must be a string of at least {MIN_BYTES['api_key']} bytes")
    return key


def parse_products(document: dict[str, Any]) -> dict[str, Product]:
    unknown = set(document) - {"products", "admin_key"}
    if unknown:
        raise ConfigError(f"unknown top-level keys: {', '.join(sorted(unknown))}")
    products = document.get("products")
    if not isinstance(products, dict) or not products:
        raise ConfigError("the config needs at least one [products.NAME] table")
    return {name: _product(name, table) for name, table in products.items()}


def load_products(path: str | os.PathLike | None) -> dict[str, Product]:
    """Products from `path` (or $IM_CONFIG); the development product when neither is set."""
    path = path or os.environ.get(CONFIG_ENV)
    if not path:
        log.warning(
            "NO CONFIG GIVEN: using the development product %r whose token secret and API key "
            "are both %r. Anyone can mint tokens and push. Pass --config FILE in production.",
            DEV_PRODUCT,
            DEV_SECRET,
        )
        return dev_products()
    return parse_products(_read(path))


def products_or_exit(path: str | None, prog: str) -> dict[str, Product]:
    """The products of a service starting up; a bad file ends the process with its reason."""
    try:
        return load_products(path)
    except ConfigError as exc:
        raise SystemExit(f"{prog}: {exc}") from None

"""The `im` command: start the whole system, run one service, or mint a client token.

Service modules are imported lazily: `im/` itself depends on no service package.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path

SERVICES = {
    "room": "room.__main__",
    "worker": "center.worker_main",
    "center": "center.__main__",
    "register": "register.__main__",
    "saver": "saver.__main__",
    "dispatcher": "dispatcher.__main__",
    "coordinator": "coordinator.__main__",
}


def _token(argv: Sequence[str]) -> int:
    from im.auth import issue_token
    from im.config import ConfigError, load_products

    parser = argparse.ArgumentParser(prog="im token", description="Print a client token (JWT).")
    parser.add_argument("--product", required=True)
    parser.add_argument("--uid", required=True)
    parser.add_argument("--ttl", type=float, default=3600.0, help="seconds (default 3600)")
    parser.add_argument("--config", default=None, help="products TOML (default: dev product)")
    args = parser.parse_args(argv)
    try:
        products = load_products(args.config)
    except ConfigError as exc:
        print(f"im token: {exc}", file=sys.stderr)
        return 2
    product = products.get(args.product)
    if product is None:
        print(f"im token: unknown product {args.product!r}", file=sys.stderr)
        return 2
    if args.ttl <= 0:
        print("im token: --ttl must be positive", file=sys.stderr)
        return 2
    print(issue_token(product, args.uid, args.ttl))
    return 0


def _dev_cert(argv: Sequence[str]) -> int:
    from im.tls import make_dev_cert

    parser = argparse.ArgumentParser(
        prog="im dev-cert",
        description="Write a self-signed TLS certificate and key for development.",
    )
    parser.add_argument("--out", default=".", help="directory for cert.pem and key.pem")
    parser.add_argument(
        "--host",
        dest="hosts",
        action="extend",
        nargs="+",
        help="IP address or DNS name to cover, repeatable (default 127.0.0.1 and localhost)",
    )
    parser.add_argument("--days", type=int, default=30, help="validity (default 30)")
    args = parser.parse_args(argv)
    hosts = args.hosts or ["127.0.0.1", "localhost"]
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        make_dev_cert(out / "cert.pem", out / "key.pem", hosts, args.days)
    except (OSError, ValueError) as exc:
        print(f"im dev-cert: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out / 'cert.pem'} and {out / 'key.pem'} for {', '.join(hosts)}")
    return 0


def _secure_key(argv: Sequence[str]) -> int:
    import os

    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from cryptography.hazmat.primitives.serialization import (
        Encoding,
        NoEncryption,
        PrivateFormat,
    )

    from im.protocol.secure import public_bytes

    parser = argparse.ArgumentParser(
        prog="im secure-key",
        description="Write a new static key for the encrypted channel (room --secure-key) "
        "and print its public half, which clients are configured with.",
    )
    parser.add_argument("--out", required=True, help="file for the private key (hex, mode 0600)")
    args = parser.parse_args(argv)
    key = X25519PrivateKey.generate()
    private = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    try:
        # O_EXCL: a gateway's identity is never overwritten by accident.
        fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(private.hex() + "\n")
    except OSError as exc:
        print(f"im secure-key: {args.out}: {exc.strerror}", file=sys.stderr)
        return 2
    print(public_bytes(key).hex())
    return 0


def _up(argv: Sequence[str]) -> int:
    from im.launcher import main as up

    return up(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = ["up", "token", "switch", "drain", "dev-cert", "secure-key", *SERVICES]
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print(
            "usage: im {up,token,switch,drain,dev-cert,secure-key,room,center,worker,register,"
            "saver,dispatcher,coordinator} [options]\n\n"
            "  up        start register, center and room instances (embedded engines by default)\n"
            "  token     print a client token for a product and uid\n"
            "  switch    get or set the live switches (big rooms, budgets, IDC limits)\n"
            "  drain     move a room instance's clients elsewhere, then stop it\n"
            "  dev-cert  write a self-signed TLS certificate and key for development\n"
            "  secure-key write a key for the encrypted channel; prints the clients' public key\n"
            "  room      run one room gateway instance\n"
            "  center    run the business HTTP API (and its fan-out workers)\n"
            "  worker    run a fan-out worker on Kafka (im worker --brokers HOST:PORT)\n"
            "  register  run the session register\n"
            "  saver     run the message store for at-least-once delivery\n"
            "  dispatcher run the route service that hands clients their gateway addresses\n"
            "  coordinator run the upstream service: client up frames and events to webhooks\n\n"
            "Each command takes --help.",
            file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout,
        )
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    command, rest = argv[0], argv[1:]
    if command == "up":
        return _up(rest)
    if command == "token":
        return _token(rest)
    if command == "dev-cert":
        return _dev_cert(rest)
    if command == "secure-key":
        return _secure_key(rest)
    if command == "drain":
        from im.drain_cli import main as drain

        return drain(rest)
    if command == "switch":
        from im.switch_cli import main as switch

        return switch(rest)
    importlib.import_module(SERVICES[command]).main(rest)
    return 0


if __name__ == "__main__":
    sys.exit(main())

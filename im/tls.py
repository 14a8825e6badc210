"""TLS for the gateway's listeners: a server context that follows its certificate files.

asyncio keeps the SSLContext it was given for the life of a listening socket. Loading a new
chain into that same object does reach later handshakes, but a load that fails half-way
(new certificate, key that does not match) leaves it with no usable key. So the context
handed to the listener never changes: each reload builds and checks a fresh context, and
the listener's SNI callback, which OpenSSL runs on every ClientHello, moves the handshake
onto the newest good one. Connections already open keep the certificate they started with.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import ssl
import tempfile
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from prometheus_client import Counter, Gauge

log = logging.getLogger("im.tls")

RELOADS = Counter(
    "im_tls_reloads_total", "Certificate reloads after the files changed, by result", ["result"]
)
CERT_EXPIRY = Gauge(
    "im_tls_cert_expiry_timestamp_seconds",
    "When the certificate being served expires, seconds since the epoch",
    ["cert"],
)

Stamp = tuple[tuple[int, int, int], ...] | None


def server_context(cert_path: str | Path, key_path: str | Path) -> ssl.SSLContext:
    """A server context for one PEM chain and key; raises OSError or ssl.SSLError."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_path, key_path)
    return context


def _stamp(*paths: str) -> Stamp:
    """What changes when a file is rewritten or replaced; None while one is missing."""
    try:
        return tuple((st.st_ino, st.st_mtime_ns, st.st_size) for st in map(os.stat, paths))
    except OSError:
        return None


class TlsContextHolder:
    """Owns the listener's `context` and swaps the certificate behind it when files change."""

    def __init__(self, cert_path: str | Path, key_path: str | Path) -> None:
        self.cert_path = str(cert_path)
        self.key_path = str(key_path)
        self._stamp = _stamp(self.cert_path, self.key_path)
        self.context = server_context(self.cert_path, self.key_path)
        self.context.sni_callback = self._select
        self._current = self.context
        self._record_expiry()

    def _select(
        self, conn: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, context: ssl.SSLContext
    ) -> None:
        if self._current is not context:
            conn.context = self._current

    def maybe_reload(self) -> bool:
        """Load the files if they changed since the last attempt; True if a new one is live.

        A failed attempt keeps the previous certificate and is not retried until the files
        change again, so a broken file logs once, not once per check.
        """
        stamp = _stamp(self.cert_path, self.key_path)
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            fresh = server_context(self.cert_path, self.key_path)
        except OSError as exc:  # ssl.SSLError included
            RELOADS.labels("failed").inc()
            log.warning(
                "tls: keeping the previous certificate, %s did not load: %s", self.cert_path, exc
            )
            return False
        self._current = fresh
        RELOADS.labels("ok").inc()
        self._record_expiry()
        log.info("tls: new connections now get the certificate in %s", self.cert_path)
        return True

    async def watch(self, interval_s: float = 30.0) -> None:
        """Check the files every `interval_s` until cancelled."""
        while True:
            await asyncio.sleep(interval_s)
            self.maybe_reload()

    def _record_expiry(self) -> None:
        try:
            cert = x509.load_pem_x509_certificate(Path(self.cert_path).read_bytes())
        except (OSError, ValueError):
            return
        CERT_EXPIRY.labels(self.cert_path).set(cert.not_valid_after_utc.timestamp())


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write beside `path`, then rename over it: a watcher never reads half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as out:
            os.fchmod(out.fileno(), mode)
            out.write(data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def make_dev_cert(
    cert_path: str | Path,
    key_path: str | Path,
    hosts: Sequence[str] = ("127.0.0.1", "localhost"),
    days: int = 30,
) -> None:
    """Write a self-signed P-256 certificate for `hosts` (IPs and DNS names) and its key.

    For development and tests: a client trusts it by loading the certificate file as its CA.
    """
    if not hosts:
        raise ValueError("a certificate needs at least one host")
    if days <= 0:
        raise ValueError("days must be positive")
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    key = ec.generate_private_key(ec.SECP256R1())
    public = key.public_key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write_atomic(Path(key_path), key_pem, 0o600)
    _write_atomic(Path(cert_path), cert.public_bytes(serialization.Encoding.PEM), 0o644)

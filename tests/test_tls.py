"""TLS listeners pick up a renewed certificate without a restart; a broken one is ignored."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import ssl
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import uvloop
from cryptography import x509
from prometheus_client import REGISTRY

from im.cli import main as im_main
from im.tls import TlsContextHolder, make_dev_cert

HOST = "127.0.0.1"


def der(cert_path: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(cert_path.read_text())


def dev_pair(directory: Path, **kwargs) -> tuple[Path, Path]:
    directory.mkdir(exist_ok=True)
    cert, key = directory / "cert.pem", directory / "key.pem"
    make_dev_cert(cert, key, **kwargs)
    return cert, key


def install(source: tuple[Path, Path], target: tuple[Path, Path]) -> None:
    """Swap a pair into place the way a renewal does: each file renamed over the old one."""
    for src, dst in zip(source, target, strict=True):
        os.replace(src, dst)


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while line := await reader.readline():
            writer.write(line)
            await writer.drain()
    writer.close()


@contextlib.asynccontextmanager
async def echo_server(context: ssl.SSLContext) -> AsyncIterator[int]:
    server = await asyncio.start_server(_echo, HOST, 0, ssl=context)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


@contextlib.asynccontextmanager
async def tls_client(
    port: int, trusted: Path, server_hostname: str = HOST
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    context = ssl.create_default_context(cafile=str(trusted))
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(HOST, port, ssl=context, server_hostname=server_hostname), 5
    )
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()


async def served_cert(port: int, trusted: Path) -> bytes:
    """The DER certificate a new connection is shown, after checking it echoes."""
    async with tls_client(port, trusted) as (reader, writer):
        writer.write(b"ping\n")
        assert await asyncio.wait_for(reader.readline(), 5) == b"ping\n"
        return writer.get_extra_info("ssl_object").getpeercert(binary_form=True)


def reloads(result: str) -> float:
    return REGISTRY.get_sample_value("im_tls_reloads_total", {"result": result}) or 0.0


@pytest.mark.parametrize("run", [asyncio.run, uvloop.run], ids=["asyncio", "uvloop"])
def test_new_connections_get_the_renewed_certificate(tmp_path: Path, run):
    run(renewal(tmp_path))


async def renewal(tmp_path: Path) -> None:
    live = dev_pair(tmp_path / "live")
    first = der(live[0])
    trust_first = tmp_path / "first.pem"
    trust_first.write_bytes(live[0].read_bytes())
    holder = TlsContextHolder(*live)
    async with echo_server(holder.context) as port:
        assert await served_cert(port, trust_first) == first
        async with tls_client(port, live[0]) as (old_reader, old_writer):
            assert holder.maybe_reload() is False  # nothing changed yet

            renewed = dev_pair(tmp_path / "renewed")
            second = der(renewed[0])
            assert second != first
            trust_second = tmp_path / "second.pem"
            trust_second.write_bytes(renewed[0].read_bytes())
            install(renewed, live)
            ok_before = reloads("ok")
            assert holder.maybe_reload() is True
            assert reloads("ok") == ok_before + 1

            assert await served_cert(port, trust_second) == second
            # A connection opened before the swap still works, on its original certificate.
            old_writer.write(b"still here\n")
            assert await asyncio.wait_for(old_reader.readline(), 5) == b"still here\n"
            peer = old_writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
            assert peer == first
            # A client that trusts only the old certificate now fails to connect.
            with pytest.raises(ssl.SSLCertVerificationError):
                async with tls_client(port, trust_first):
                    pass


async def test_broken_files_keep_the_previous_certificate(tmp_path: Path, caplog):
    live = dev_pair(tmp_path / "live")
    first = der(live[0])
    trusted = tmp_path / "trusted.pem"
    trusted.write_bytes(live[0].read_bytes())
    holder = TlsContextHolder(*live)
    caplog.set_level(logging.WARNING, logger="im.tls")
    async with echo_server(holder.context) as port:
        failed_before = reloads("failed")

        live[0].write_text("-----BEGIN CERTIFICATE-----\nnot a certificate\n")
        assert holder.maybe_reload() is False
        assert reloads("failed") == failed_before + 1
        assert "keeping the previous certificate" in caplog.text
        assert await served_cert(port, trusted) == first

        # Unchanged broken files are not retried (and not logged) on every check.
        caplog.clear()
        assert holder.maybe_reload() is False
        assert caplog.text == ""
        assert reloads("failed") == failed_before + 1

        # A valid certificate whose key is another one's is refused as a pair.
        other = dev_pair(tmp_path / "other")
        os.replace(other[0], live[0])
        assert holder.maybe_reload() is False
        assert reloads("failed") == failed_before + 2
        assert await served_cert(port, trusted) == first

        # A missing file is a failure too, not a crash.
        live[1].unlink()
        assert holder.maybe_reload() is False
        assert await served_cert(port, trusted) == first


async def test_watch_picks_up_a_renewal_on_its_own(tmp_path: Path):
    live = dev_pair(tmp_path / "live")
    holder = TlsContextHolder(*live)
    watcher = asyncio.create_task(holder.watch(0.02))
    try:
        async with echo_server(holder.context) as port:
            renewed = dev_pair(tmp_path / "renewed")
            trusted = tmp_path / "renewed.pem"
            trusted.write_bytes(renewed[0].read_bytes())
            install(renewed, live)
            for _ in range(100):
                with contextlib.suppress(ssl.SSLCertVerificationError):
                    if await served_cert(port, trusted) == der(trusted):
                        break
                await asyncio.sleep(0.02)
            else:
                pytest.fail("the watcher never served the renewed certificate")
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher


async def test_dev_cert_covers_every_host(tmp_path: Path):
    cert, key = dev_pair(tmp_path / "c", hosts=("127.0.0.1", "localhost", "::1"), days=3)
    parsed = x509.load_pem_x509_certificate(cert.read_bytes())
    san = parsed.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    lifetime = parsed.not_valid_after_utc - parsed.not_valid_before_utc
    assert 3 * 86400 <= lifetime.total_seconds() <= 3 * 86400 + 600
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    holder = TlsContextHolder(cert, key)
    expiry = REGISTRY.get_sample_value("im_tls_cert_expiry_timestamp_seconds", {"cert": str(cert)})
    assert expiry == parsed.not_valid_after_utc.timestamp()
    async with echo_server(holder.context) as port:
        async with tls_client(port, cert, server_hostname="localhost") as (_, writer):
            assert writer.get_extra_info("ssl_object").version() in ("TLSv1.2", "TLSv1.3")
        with pytest.raises(ssl.SSLCertVerificationError):
            async with tls_client(port, cert, server_hostname="example.com"):
                pass


def test_dev_cert_refuses_bad_arguments(tmp_path: Path):
    with pytest.raises(ValueError, match="at least one host"):
        make_dev_cert(tmp_path / "c.pem", tmp_path / "k.pem", hosts=())
    with pytest.raises(ValueError, match="positive"):
        make_dev_cert(tmp_path / "c.pem", tmp_path / "k.pem", days=0)
    assert list(tmp_path.iterdir()) == []


def test_im_dev_cert_command(tmp_path: Path, capsys):
    out = tmp_path / "certs"
    assert im_main(["dev-cert", "--out", str(out), "--host", "10.1.2.3", "--host", "gw.test"]) == 0
    assert "gw.test" in capsys.readouterr().out
    parsed = x509.load_pem_x509_certificate((out / "cert.pem").read_bytes())
    san = parsed.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["gw.test"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.1.2.3")]
    ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
        out / "cert.pem", out / "key.pem"
    )
    assert im_main(["dev-cert", "--out", str(out), "--days", "0"]) == 2
    assert "positive" in capsys.readouterr().err

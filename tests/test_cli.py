"""The `im` command as an operator runs it: `im token` and `im up` in real child processes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from bench.ports import free_port, is_free
from im.auth import issue_token, verify_token
from im.config import dev_products, load_products
from tests.fixtures.system import RawTcp, eventually

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
STOP_WITHIN_S = 5.0
HTTP_TIMEOUT = aiohttp.ClientTimeout(total=3)
SHOP_TOML = """
[products.shop]
secret = "shop-secret-0123456789abcdef0123456789"
api_key = "shop-api-key-0123456789"
"""


def im(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "im", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "IM_CONFIG": ""},
    )


# -- im token --------------------------------------------------------------------------


def test_token_for_the_dev_product_verifies() -> None:
    result = im("token", "--product", "demo", "--uid", "alice")
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    assert token.count(".") == 2
    verify_token(dev_products(), "demo", "alice", token)
    assert "NO CONFIG GIVEN" in result.stderr


def test_token_with_a_config_file(tmp_path: Path) -> None:
    config = tmp_path / "products.toml"
    config.write_text(SHOP_TOML)
    result = im("token", "--config", str(config), "--product", "shop", "--uid", "bob")
    assert result.returncode == 0, result.stderr
    verify_token(load_products(config), "shop", "bob", result.stdout.strip())
    with pytest.raises(Exception, match="signature"):
        verify_token({"shop": dev_products()["demo"]}, "shop", "bob", result.stdout.strip())
    refused = im("token", "--config", str(config), "--product", "demo", "--uid", "bob")
    assert refused.returncode == 2
    assert "unknown product 'demo'" in refused.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--product", "nosuch", "--uid", "alice"], "unknown product 'nosuch'"),
        (["--product", "demo", "--uid", "alice", "--ttl", "-1"], "--ttl must be positive"),
        (["--product", "demo", "--uid", "alice", "--config", "/nonexistent.toml"], "cannot read"),
        (["--product", "demo"], "--uid"),
    ],
)
def test_token_refuses_bad_input_with_exit_2(args: list[str], message: str) -> None:
    result = im("token", *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert result.stdout == ""


def test_token_refuses_a_config_with_a_short_secret(tmp_path: Path) -> None:
    config = tmp_path / "weak.toml"
    config.write_text('[products.shop]\nsecret = "short"\napi_key = "shop-api-key-0123456789"\n')
    result = im("token", "--config", str(config), "--product", "shop", "--uid", "bob")
    assert result.returncode == 2
    assert "secret" in result.stderr and "32 bytes" in result.stderr


def test_unknown_command_exits_2_with_usage() -> None:
    result = im("launch")
    assert result.returncode == 2
    assert "usage: im" in result.stderr


# -- im up -----------------------------------------------------------------------------


def free_block(offsets: Iterable[int]) -> int:
    """A port p such that p + each offset is free right now."""
    offsets = tuple(offsets)
    for _ in range(100):
        base = free_port()
        if base + max(offsets) < 65536 and all(is_free(base + o) for o in offsets[1:]):
            return base
    raise RuntimeError("no free block of ports")


def children_of(pid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = (entry / "stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.add(int(entry.name))
    return found


@dataclass
class Up:
    process: asyncio.subprocess.Process
    base_port: int
    center_port: int
    register_port: int
    dispatcher_port: int
    banner: str
    log: Path

    @property
    def center_url(self) -> str:
        return f"http://{HOST}:{self.center_port}"


@contextlib.asynccontextmanager
async def running_up(log: Path) -> AsyncIterator[Up]:
    """`im up` on free ports until the block ends; stopped with SIGTERM if still running."""
    base, center, register = (
        free_block((0, 1, 100)),
        free_block((0,)),
        free_block((0, 1, 2, 3, 4, 9)),
    )
    dispatcher = free_block((0,))
    with log.open("wb") as stderr:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "im",
            "up",
            "--base-port",
            str(base),
            "--center-port",
            str(center),
            "--register-port",
            str(register),
            "--dispatcher-port",
            str(dispatcher),
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
            env={**os.environ, "IM_CONFIG": ""},
        )
    try:
        assert process.stdout is not None
        lines: list[str] = []
        async with asyncio.timeout(15):
            while not lines or not lines[-1].startswith("room-0"):
                line = await process.stdout.readline()
                assert line, f"im up exited early:\n{log.read_text()}"
                lines.append(line.decode().rstrip())
        yield Up(process, base, center, register, dispatcher, "\n".join(lines), log)
    finally:
        await stop(process)


async def stop(process: asyncio.subprocess.Process) -> None:
    """SIGTERM and the launcher's own grace; then kill what is left, children first."""
    if process.returncode is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        async with asyncio.timeout(15):
            await process.wait()
    except TimeoutError:
        for pid in children_of(process.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        process.kill()
        await process.wait()


async def healthy(url: str) -> bool:
    try:
        async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as http, http.get(url) as response:
            return response.status == 200
    except (aiohttp.ClientError, TimeoutError):
        return False


async def test_up_serves_a_push_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    async with running_up(tmp_path / "im-up.log") as up:
        await serves_a_push_and_stops_cleanly(up)


async def serves_a_push_and_stops_cleanly(up: Up) -> None:
    ws, tcp = f"ws://{HOST}:{up.base_port}/ws", f"tcp://{HOST}:{up.base_port + 1}"
    assert f"center    http://{HOST}:{up.center_port}" in up.banner
    assert f"register  {HOST}:{up.register_port} rpc" in up.banner
    assert f"room-0    {ws}  {tcp}" in up.banner
    await eventually(lambda: healthy(f"{up.center_url}/healthz"), timeout=15)
    await eventually(lambda: healthy(f"http://{HOST}:{up.base_port}/healthz"), timeout=15)
    await eventually(lambda: healthy(f"http://{HOST}:{up.dispatcher_port}/healthz"), timeout=15)
    children = children_of(up.process.pid)
    assert len(children) == 6, up.banner  # register, saver, coordinator, room, center, dispatcher
    assert f"saver     {HOST}:{up.register_port + 2} rpc" in up.banner
    assert f"coordinator {HOST}:{up.register_port + 4} rpc" in up.banner

    client = await RawTcp.open(HOST, up.base_port + 1)
    try:
        await client.auth("alice", issue_token(dev_products()["demo"], "alice"))
        async with (
            aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as http,
            http.post(
                f"{up.center_url}/v1/push/users",
                json={"uids": ["alice"], "qos": 1, "body": {"text": "from im up"}},
                headers={"Authorization": "Bearer dev"},
            ) as response,
        ):
            assert response.status == 200, await response.text()
            answer = await response.json()
        assert (answer["online"], answer["stored"]) == (1, 1)
        async with (
            aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as http,
            http.get(
                f"http://{HOST}:{up.dispatcher_port}/v1/route",
                params={"product": "demo", "uid": "alice", "transport": "tcp"},
            ) as response,
        ):
            assert (await response.json())["addresses"] == [tcp]
        message = await client.recv()
        assert (message["id"], message["body"]) == (answer["id"], {"text": "from im up"})
    finally:
        client.close()

    started = time.monotonic()
    up.process.send_signal(signal.SIGTERM)
    async with asyncio.timeout(STOP_WITHIN_S):
        code = await up.process.wait()
    assert code == 0, up.log.read_text()
    assert time.monotonic() - started < STOP_WITHIN_S
    assert not [pid for pid in children if Path(f"/proc/{pid}").exists()]
    assert "restarting" not in up.log.read_text()

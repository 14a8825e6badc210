"""The admin switches API and `im switch` over real sockets: aiohttp on a free port."""

from __future__ import annotations

import asyncio
import hmac
import io
import json
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import REGISTRY

from center.admin import add_admin_routes
from center.api import MAX_BODY, error_middleware
from im import switch_cli
from im.switches import Switches, to_document
from register.engines.switches_memory import MemorySwitchStore

ADMIN_KEY = "admin-key-0123456789"
BUSINESS_KEYS = ("demo-api-key-0123456789", "other-api-key-0123456789")
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
DEFAULTS = to_document(Switches())


def is_business_key(token: str) -> bool:
    return any(hmac.compare_digest(token.encode(), key.encode()) for key in BUSINESS_KEYS)


class BrokenStore(MemorySwitchStore):
    """A switch store that cannot be reached."""

    async def get_switches(self, known_version: int = 0) -> tuple[int, dict] | None:
        raise ConnectionError("register at 127.0.0.1:1 is down")


@dataclass
class Center:
    url: str
    store: MemorySwitchStore
    http: aiohttp.ClientSession

    async def get(self, headers: dict[str, str] = ADMIN) -> tuple[int, Any]:
        async with self.http.get(f"{self.url}/v1/admin/switches", headers=headers) as response:
            return response.status, await response.json()

    async def put(self, document: Any, headers: dict[str, str] = ADMIN) -> tuple[int, Any]:
        body = document if isinstance(document, bytes) else json.dumps(document).encode()
        async with self.http.put(
            f"{self.url}/v1/admin/switches", data=body, headers=headers
        ) as response:
            return response.status, await response.json()


async def _serve(store: MemorySwitchStore) -> tuple[web.AppRunner, str]:
    app = web.Application(middlewares=[error_middleware(MAX_BODY)], client_max_size=MAX_BODY)
    add_admin_routes(app, store, ADMIN_KEY, is_business_key)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    return runner, f"http://{host}:{port}"


@pytest.fixture
async def center() -> AsyncIterator[Center]:
    store = MemorySwitchStore()
    runner, url = await _serve(store)
    async with aiohttp.ClientSession() as http:
        yield Center(url, store, http)
    await runner.cleanup()


def _updates(result: str) -> float:
    return REGISTRY.get_sample_value("im_center_switch_updates_total", {"result": result}) or 0.0


# --- the HTTP API ------------------------------------------------------------------------


async def test_get_before_any_put_is_version_zero_with_defaults(center: Center) -> None:
    assert await center.get() == (200, {"version": 0, "switches": DEFAULTS})


async def test_put_replaces_the_document_and_lists_changes(center: Center) -> None:
    applied = _updates("applied")
    status, answer = await center.put({"big_rooms": ["live-1"], "room_budget": 5})
    assert status == 200
    expected = {**DEFAULTS, "big_rooms": ["live-1"], "room_budget": 5}
    assert answer == {
        "version": 1,
        "switches": expected,
        "changed": {
            "big_rooms": {"old": [], "new": ["live-1"]},
            "room_budget": {"old": 20, "new": 5},
        },
    }
    assert await center.get() == (200, {"version": 1, "switches": expected})
    assert await center.store.get_switches() == (1, expected)
    assert _updates("applied") == applied + 1

    # Whole replacement: a field left out goes back to its default.
    status, answer = await center.put({"merge_likes": True})
    assert status == 200
    assert answer["version"] == 2
    assert answer["switches"] == {**DEFAULTS, "merge_likes": True}
    assert set(answer["changed"]) == {"big_rooms", "room_budget", "merge_likes"}


async def test_put_of_the_same_document_changes_nothing(center: Center) -> None:
    await center.put({"shard_size": 100})
    status, answer = await center.put({"shard_size": 100})
    assert (status, answer["version"], answer["changed"]) == (200, 2, {})


BAD: list[tuple[dict[str, Any], str]] = [
    ({"room_budget": "20"}, "room_budget"),
    ({"shard_size": -1}, "shard_size"),
    ({"msg_type_ratio": {"chat": 60, "like": 50}}, "msg_type_ratio"),
    ({"msg_type_ratio": {"chat": 101}}, "msg_type_ratio.chat"),
    ({"size_thresholds": [3000, 2000, 20000]}, "size_thresholds"),
    ({"float_range": 1.5}, "float_range"),
    ({"room_budgets": 10}, "room_budgets"),
    ({"common_msg": {"9": ["enter"]}}, "common_msg.9"),
    ({"idc_budget": {"bj": -5}}, "idc_budget.bj"),
]


@pytest.mark.parametrize(("document", "field"), BAD, ids=[field for _, field in BAD])
async def test_bad_value_is_refused_and_old_switches_stay(
    center: Center, document: dict[str, Any], field: str
) -> None:
    status, answer = await center.put({"merge_likes": True})
    assert status == 200
    rejected = _updates("rejected")
    status, answer = await center.put(document)
    assert status == 400
    assert answer["error"]["code"] == "invalid_switch"
    assert answer["error"]["field"] == field
    assert answer["error"]["message"].startswith(f"{field}: ")
    assert await center.get() == (
        200,
        {"version": 1, "switches": {**DEFAULTS, "merge_likes": True}},
    )
    assert _updates("rejected") == rejected + 1


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]"])
async def test_body_that_is_not_a_json_object_is_refused(center: Center, body: bytes) -> None:
    status, answer = await center.put(body)
    assert status == 400
    assert answer["error"]["code"] == "invalid_json"
    assert await center.get() == (200, {"version": 0, "switches": DEFAULTS})


async def test_business_key_is_forbidden(center: Center) -> None:
    business = {"Authorization": f"Bearer {BUSINESS_KEYS[1]}"}
    status, answer = await center.get(business)
    assert status == 403
    assert answer["error"]["code"] == "forbidden"
    status, answer = await center.put({"merge_likes": True}, business)
    assert status == 403
    assert answer["error"]["code"] == "forbidden"
    assert await center.store.get_switches() is None


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer "}, {"Authorization": f"Basic {ADMIN_KEY}"}],
    ids=["none", "empty", "basic"],
)
async def test_missing_key_is_unauthorized(center: Center, headers: dict[str, str]) -> None:
    async with center.http.put(
        f"{center.url}/v1/admin/switches", json={"merge_likes": True}, headers=headers
    ) as response:
        assert response.status == 401
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        answer = await response.json()
    assert answer["error"]["code"] == "unauthorized"
    assert "missing admin key" in answer["error"]["message"]
    assert await center.store.get_switches() is None


async def test_wrong_key_is_unauthorized(center: Center) -> None:
    status, answer = await center.get({"Authorization": "Bearer not-the-admin-key"})
    assert status == 401
    assert answer["error"] == {"code": "unauthorized", "message": "invalid admin key"}


async def test_store_down_answers_503() -> None:
    runner, url = await _serve(BrokenStore())
    try:
        async with aiohttp.ClientSession() as http:
            for method in ("GET", "PUT"):
                async with http.request(
                    method, f"{url}/v1/admin/switches", json={}, headers=ADMIN
                ) as response:
                    assert response.status == 503
                    assert response.headers["Retry-After"] == "1"
                    assert (await response.json())["error"]["code"] == "unavailable"
    finally:
        await runner.cleanup()


def test_empty_admin_key_is_refused() -> None:
    with pytest.raises(ValueError, match="admin key"):
        add_admin_routes(web.Application(), MemorySwitchStore(), "", is_business_key)


# --- `im switch` against the live app ------------------------------------------------------


async def _cli(*argv: str) -> int:
    return await asyncio.to_thread(switch_cli.main, list(argv))


async def test_cli_get_prints_version_and_switches(
    center: Center, capsys: pytest.CaptureFixture[str]
) -> None:
    await center.put({"room_budget": 7})
    assert await _cli("get", "--center", center.url, "--admin-key", ADMIN_KEY) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == {"version": 1, "switches": {**DEFAULTS, "room_budget": 7}}


async def test_cli_reads_center_and_key_from_the_environment(
    center: Center, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IM_CENTER_URL", center.url)
    monkeypatch.setenv("IM_ADMIN_KEY", ADMIN_KEY)
    assert await _cli("get") == 0
    assert json.loads(capsys.readouterr().out)["version"] == 0


async def test_cli_set_from_a_file(
    center: Center, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "switches.json"
    path.write_text(json.dumps({"big_rooms": ["live-9"], "compress_complex": True}))
    assert await _cli("set", str(path), "--center", center.url, "--admin-key", ADMIN_KEY) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["version"] == 1
    assert set(printed["changed"]) == {"big_rooms", "compress_complex"}
    version, document = await center.store.get_switches()
    assert (version, document["big_rooms"], document["compress_complex"]) == (1, ["live-9"], True)


async def test_cli_set_from_stdin(
    center: Center, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO('{"shard_size": 250}'))
    assert await _cli("set", "-", "--center", center.url, "--admin-key", ADMIN_KEY) == 0
    assert json.loads(capsys.readouterr().out)["switches"]["shard_size"] == 250


async def test_cli_set_fields_keeps_the_others(
    center: Center, capsys: pytest.CaptureFixture[str]
) -> None:
    await center.put({"big_rooms": ["a"], "room_pin": {"a": "w1", "b": "w2"}})
    code = await _cli(
        "set",
        "--field",
        "room_budget=8",
        "--field",
        "msg_type_ratio.chat=40",
        "--field",
        "room_pin.b=null",
        "--field",
        'room_pin.c="w3"',
        "--center",
        center.url,
        "--admin-key",
        ADMIN_KEY,
    )
    assert code == 0
    assert json.loads(capsys.readouterr().out)["version"] == 2
    _, document = await center.store.get_switches()
    assert document == {
        **DEFAULTS,
        "big_rooms": ["a"],
        "room_budget": 8,
        "msg_type_ratio": {"chat": 40},
        "room_pin": {"a": "w1", "c": "w3"},
    }


async def test_cli_bad_value_exits_2_with_the_servers_message(
    center: Center, capsys: pytest.CaptureFixture[str]
) -> None:
    code = await _cli(
        "set", "--field", "float_range=3", "--center", center.url, "--admin-key", ADMIN_KEY
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "400 invalid_switch: float_range: must be between 0 and 1" in err
    assert await center.store.get_switches() is None


async def test_cli_business_key_exits_2(center: Center, capsys: pytest.CaptureFixture[str]) -> None:
    assert await _cli("get", "--center", center.url, "--admin-key", BUSINESS_KEYS[0]) == 2
    assert "403 forbidden" in capsys.readouterr().err


async def test_cli_field_that_is_not_json_exits_2(
    center: Center, capsys: pytest.CaptureFixture[str]
) -> None:
    code = await _cli(
        "set", "--field", "room_pin.a=w1", "--center", center.url, "--admin-key", ADMIN_KEY
    )
    assert code == 2
    assert "is not JSON" in capsys.readouterr().err
    assert await center.store.get_switches() is None


def test_cli_unreachable_center_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    code = switch_cli.main(["get", "--center", f"http://127.0.0.1:{port}", "--admin-key", "k"])
    assert code == 1
    assert "cannot get an answer from center" in capsys.readouterr().err


def test_cli_set_without_a_document_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        switch_cli.main(["set"])
    assert caught.value.code == 2
    assert "set needs FILE" in capsys.readouterr().err

"""Client tokens and the products file."""

import time

import jwt
import pytest

from im.auth import AuthFailure, issue_token, verify_token
from im.config import ConfigError, Product, dev_products, load_products

SECRET = "s" * 32
S32, K16 = "x" * 32, "y" * 16
PRODUCTS = {
    "demo": Product("demo", SECRET, "k" * 16),
    "other": Product("other", "o" * 32, "q" * 16),
}


def claims(**over):
    base = {"sub": "alice", "aud": "demo", "exp": int(time.time()) + 60}
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


def test_issued_token_verifies():
    verify_token(PRODUCTS, "demo", "alice", issue_token(PRODUCTS["demo"], "alice"))


def test_any_jwt_library_token_verifies():
    verify_token(PRODUCTS, "demo", "alice", jwt.encode(claims(), SECRET, algorithm="HS256"))


@pytest.mark.parametrize(
    ("product", "uid", "token", "reason"),
    [
        ("demo", "bob", jwt.encode(claims(), SECRET, algorithm="HS256"), "another uid"),
        ("other", "alice", jwt.encode(claims(), "o" * 32, algorithm="HS256"), "another product"),
        ("nope", "alice", jwt.encode(claims(), SECRET, algorithm="HS256"), "unknown product"),
        ("demo", "alice", jwt.encode(claims(exp=int(time.time()) - 60), SECRET), "expired"),
        ("demo", "alice", jwt.encode(claims(), "f" * 32, algorithm="HS256"), "signature"),
        ("demo", "alice", jwt.encode(claims(), None, algorithm="none"), "algorithm"),
        ("demo", "alice", jwt.encode(claims(), SECRET, algorithm="HS512"), "algorithm"),
        ("demo", "alice", jwt.encode(claims(exp=None), SECRET, algorithm="HS256"), "exp"),
        ("demo", "alice", "not.a.jwt", "invalid"),
    ],
)
def test_refused_tokens_say_why(product, uid, token, reason):
    with pytest.raises(AuthFailure) as info:
        verify_token(PRODUCTS, product, uid, token)
    assert reason in str(info.value)


def test_products_file(tmp_path):
    path = tmp_path / "im.toml"
    path.write_text(
        f'[products.shop]\nsecret = "{S32}"\napi_key = "{K16}"\nwebhook = "https://b.example/h"\n'
    )
    products = load_products(path)
    assert products["shop"].webhook == "https://b.example/h"
    assert S32 not in repr(products["shop"])


@pytest.mark.parametrize(
    ("text", "mentions"),
    [
        ("", "at least one"),
        (f'[products.a]\nsecret = "short"\napi_key = "{K16}"\n', "secret"),
        (f'[products.a]\nsecret = "{S32}"\n', "api_key"),
        (
            f'[products.a]\nsecret = "{S32}"\napi_key = "{K16}"\nwebhook = "ftp://x"\n',
            "webhook",
        ),
        (
            f'[products.a]\nsecret = "{S32}"\napi_key = "{K16}"\ncolour = 1\n',
            "colour",
        ),
        ("not toml [", "TOML"),
    ],
)
def test_bad_products_file_names_the_problem(tmp_path, text, mentions):
    path = tmp_path / "im.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_products(path)
    assert mentions in str(info.value)


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError):
        load_products(tmp_path / "absent.toml")


def test_no_config_means_dev_product_and_a_warning(caplog, monkeypatch):
    monkeypatch.delenv("IM_CONFIG", raising=False)
    assert load_products(None) == dev_products()
    assert "development product" in caplog.text


def test_broadcast_spread_default_per_product(tmp_path):
    path = tmp_path / "im.toml"
    path.write_text(
        f'[products.a]\nsecret = "{S32}"\napi_key = "{K16}"\nbroadcast_spread_s = 30\n'
        f'[products.b]\nsecret = "{S32}"\napi_key = "{"z" * 16}"\n'
    )
    products = load_products(path)
    assert products["a"].broadcast_spread_s == 30.0
    assert products["b"].broadcast_spread_s == 0.0
    path.write_text(
        f'[products.a]\nsecret = "{S32}"\napi_key = "{K16}"\nbroadcast_spread_s = 7200\n'
    )
    with pytest.raises(ConfigError, match="broadcast_spread_s"):
        load_products(path)


def test_admin_key_from_the_config(tmp_path, monkeypatch):
    from im.config import DEV_ADMIN_KEY, load_admin_key

    monkeypatch.delenv("IM_CONFIG", raising=False)
    assert load_admin_key(None) == DEV_ADMIN_KEY
    path = tmp_path / "im.toml"
    path.write_text(
        f'admin_key = "{"a" * 20}"\n[products.a]\nsecret = "{S32}"\napi_key = "{K16}"\n'
    )
    assert load_admin_key(path) == "a" * 20
    path.write_text(f'[products.a]\nsecret = "{S32}"\napi_key = "{K16}"\n')
    assert load_admin_key(path) is None  # no key configured: the admin API is off
    path.write_text(f'admin_key = "short"\n[products.a]\nsecret = "{S32}"\napi_key = "{K16}"\n')
    with pytest.raises(ConfigError, match="admin_key"):
        load_admin_key(path)


def test_webhook_secret_is_read_and_never_shown(tmp_path):
    path = tmp_path / "im.toml"
    path.write_text(
        f'[products.shop]\nsecret = "{S32}"\napi_key = "{K16}"\n'
        f'webhook = "http://127.0.0.1:9000/im"\nwebhook_secret = "{"w" * 16}"\n'
        f'[products.quiet]\nsecret = "{S32}"\napi_key = "{"z" * 16}"\n'
    )
    products = load_products(path)
    assert products["shop"].webhook == "http://127.0.0.1:9000/im"
    assert products["shop"].webhook_secret == "w" * 16
    assert "w" * 16 not in repr(products["shop"])
    assert (products["quiet"].webhook, products["quiet"].webhook_secret) == (None, None)


@pytest.mark.parametrize(
    ("extra", "mentions"),
    [
        ('webhook = "https://"\n', "webhook must be"),
        ('webhook = "https:///path"\n', "webhook must be"),
        ('webhook = "b.example/h"\n', "webhook must be"),
        ('webhook = "http://b.example:99999/h"\n', "webhook must be"),
        ('webhook = "http://[::1/h"\n', "webhook must be"),
        ("webhook = 5\n", "webhook must be"),
        ('webhook = "https://b.example/h"\nwebhook_secret = "short"\n', "webhook_secret"),
        ('webhook = "https://b.example/h"\nwebhook_secret = 12\n', "webhook_secret"),
        (f'webhook_secret = "{"w" * 16}"\n', "no webhook"),
    ],
)
def test_bad_webhook_settings_name_the_problem(tmp_path, extra, mentions):
    path = tmp_path / "im.toml"
    path.write_text(f'[products.a]\nsecret = "{S32}"\napi_key = "{K16}"\n{extra}')
    with pytest.raises(ConfigError) as info:
        load_products(path)
    assert mentions in str(info.value)
    assert "[products.a]" in str(info.value)

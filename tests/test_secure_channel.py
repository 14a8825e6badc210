"""The encrypted channel: the documented vectors, and every way a frame can go wrong."""

from __future__ import annotations

import hashlib
import hmac
import re
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from im.protocol.errors import ErrorCode, ProtocolError
from im.protocol.secure import (
    CONFIRM,
    HELLO_SIZE,
    MAX_COUNTER,
    OVERHEAD,
    REPLY_SIZE,
    ClientHandshake,
    SecureSession,
    ServerHandshake,
)

PROTOCOL_MD = Path(__file__).resolve().parent.parent / "docs" / "PROTOCOL.md"

CLIENT_EPHEMERAL = bytes(range(0x01, 0x21))
SERVER_STATIC = bytes(range(0x21, 0x41))
SERVER_EPHEMERAL = bytes(range(0x41, 0x61))
CLIENT_NONCE = bytes(range(0xA0, 0xB0))
SERVER_NONCE = bytes(range(0xB0, 0xC0))
PING = bytes.fromhex("81a26f70a470696e67")  # {"op":"ping"} in msgpack
PONG = bytes.fromhex("81a26f70a4706f6e67")

V = {
    "server_public": "5869aff450549732cbaaed5e5df9b30a6da31cb0e5742bad5ad4a1a768f1a67b",
    "hello": "0107a37cbc142093c8b755dc1b10e86cb426374ad16aa853ed0bdfc0b2b86d1c7c"
    "a0a1a2a3a4a5a6a7a8a9aaabacadaeaf",
    "reply": "0164b101b1d0be5a8704bd078f9895001fc03e8e9f9522f188dd128d9846d48466"
    "b0b1b2b3b4b5b6b7b8b9babbbcbdbebf"
    "0000000000000000adba43f62f874ff957a041786601df12b4273e02c09f40dcfe304b88"
    "ffd768f96d936a839efdb816e45ffd",
    "dh_static": "a84dc7c3c8f058b1b2dc4cd1e9b5dc0a7987f88b6a9564cde3391fc421159e77",
    "dh_ephemeral": "26c2c17fdb82161cb21ad16e721315355b64d1763119b10bfc962530dc7cc163",
    "key_c2s": "fa479ba8a0ecdea9d99709a4f613bdfa7500df47cf010f20a53a64339b052b76",
    "key_s2c": "95552a97f1977fee0a27d6d494f37ddce78e6a8020859966b3492f59ae5abdf9",
    "ping_c2s_0": "00000000000000005639aaa3371957a73e0f5ed3a3fe51a3241042c761f705dfe1",
    "pong_s2c_1": "000000000000000152bf6a35517701056078a8976e824324e034f77c16889b9185",
}


def key(raw: bytes) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(raw)


def vector_pair() -> tuple[ClientHandshake, bytes, SecureSession]:
    """The documented handshake: (client, server reply, server session)."""
    server = ServerHandshake(key(SERVER_STATIC))
    client = ClientHandshake(server.public_key, ephemeral=key(CLIENT_EPHEMERAL), nonce=CLIENT_NONCE)
    reply, session = server.respond(
        client.hello, ephemeral=key(SERVER_EPHEMERAL), nonce=SERVER_NONCE
    )
    return client, reply, session


def pair() -> tuple[SecureSession, SecureSession]:
    """(client session, server session) over fresh random keys."""
    server = ServerHandshake(X25519PrivateKey.generate())
    client = ClientHandshake(server.public_key)
    reply, server_session = server.respond(client.hello)
    return client.finish(reply), server_session


def hkdf_sha256(secret: bytes, salt: bytes, info: bytes) -> bytes:
    """RFC 5869 for one 32-byte block, written out so the spec is checked independently."""
    prk = hmac.new(salt, secret, hashlib.sha256).digest()
    return hmac.new(prk, info + b"\x01", hashlib.sha256).digest()


def test_vectors_reproduce_exactly():
    client, reply, server_session = vector_pair()
    assert ServerHandshake(key(SERVER_STATIC)).public_key.hex() == V["server_public"]
    assert client.hello.hex() == V["hello"]
    assert reply.hex() == V["reply"]
    client_session = client.finish(reply)
    assert client_session.seal(PING).hex() == V["ping_c2s_0"]
    assert server_session.open(bytes.fromhex(V["ping_c2s_0"])) == PING
    assert server_session.seal(PONG).hex() == V["pong_s2c_1"]
    assert client_session.open(bytes.fromhex(V["pong_s2c_1"])) == PONG


def test_vector_keys_follow_the_documented_derivation():
    client_pub = bytes.fromhex(V["hello"])[1:33]
    server_pub = bytes.fromhex(V["reply"])[1:33]
    assert key(CLIENT_EPHEMERAL).exchange(key(SERVER_STATIC).public_key()).hex() == V["dh_static"]
    assert (
        key(CLIENT_EPHEMERAL).exchange(key(SERVER_EPHEMERAL).public_key()).hex()
        == (V["dh_ephemeral"])
    )
    secret = bytes.fromhex(V["dh_static"] + V["dh_ephemeral"])
    salt = CLIENT_NONCE + SERVER_NONCE
    c2s = hkdf_sha256(secret, salt, b"im.secure.v1 client->server" + client_pub + server_pub)
    s2c = hkdf_sha256(secret, salt, b"im.secure.v1 server->client" + client_pub + server_pub)
    assert c2s.hex() == V["key_c2s"]
    assert s2c.hex() == V["key_s2c"]
    # A session built from the documented keys alone seals the documented frames.
    by_keys = SecureSession(c2s, s2c)
    assert by_keys.open(bytes.fromhex(V["reply"])[HELLO_SIZE:]) == CONFIRM
    assert by_keys.seal(PING).hex() == V["ping_c2s_0"]


def test_protocol_doc_carries_the_same_vectors():
    doc = re.sub(r"\s+", "", PROTOCOL_MD.read_text())
    inputs = [CLIENT_EPHEMERAL, SERVER_STATIC, SERVER_EPHEMERAL, CLIENT_NONCE, SERVER_NONCE]
    for value in [*V.values(), *(raw.hex() for raw in inputs)]:
        assert value in doc


def test_roundtrip_both_directions_with_independent_counters():
    client, server = pair()
    for i in range(5):
        assert server.open(client.seal(b"up %d" % i)) == b"up %d" % i
    # The server already sent its confirm (frame 0), so its next frame is number 1.
    down = [server.seal(b"down %d" % i) for i in range(3)]
    assert [int.from_bytes(frame[:8], "big") for frame in down] == [1, 2, 3]
    assert [client.open(frame) for frame in down] == [b"down 0", b"down 1", b"down 2"]
    frame = client.seal(b"")
    assert int.from_bytes(frame[:8], "big") == 5
    assert len(frame) == OVERHEAD
    assert server.open(frame) == b""


def test_directions_use_different_keys():
    server = ServerHandshake(X25519PrivateKey.generate())
    reply, session = server.respond(ClientHandshake(server.public_key).hello)
    # The server's own frame 0, reflected back at it, carries the counter it expects next
    # but was sealed with the other direction's key.
    expect_refusal(session, reply[HELLO_SIZE:], "frame 0 failed authentication")


def expect_refusal(session: SecureSession, frame: bytes, words: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        session.open(frame)
    assert caught.value.code is ErrorCode.SECURE_CHANNEL == 4015
    assert caught.value.fatal
    assert words in caught.value.reason


def test_replay_is_rejected():
    client, server = pair()
    frame = client.seal(b"pay 10")
    assert server.open(frame) == b"pay 10"
    expect_refusal(server, frame, "frame counter 0, expected 1")


def test_reorder_is_rejected():
    client, server = pair()
    frames = [client.seal(b"%d" % i) for i in range(3)]
    assert server.open(frames[0]) == b"0"
    expect_refusal(server, frames[2], "frame counter 2, expected 1")


def test_drop_is_rejected():
    client, server = pair()
    client.seal(b"lost")
    expect_refusal(server, client.seal(b"next"), "replayed, reordered or dropped")


@pytest.mark.parametrize("position", [8, 12, -1])
def test_tampered_frame_is_rejected(position: int):
    client, server = pair()
    frame = bytearray(client.seal(b"hello there"))
    frame[position] ^= 0x01
    expect_refusal(server, bytes(frame), "frame 0 failed authentication")


def test_short_frame_is_rejected():
    _, server = pair()
    expect_refusal(server, b"\x00" * (OVERHEAD - 1), f"the minimum is {OVERHEAD}")


def test_a_failed_session_refuses_everything_after():
    client, server = pair()
    good = client.seal(b"a")
    bad = bytearray(good)
    bad[-1] ^= 0xFF
    expect_refusal(server, bytes(bad), "failed authentication")
    expect_refusal(server, good, "already failed")


def test_wrong_server_key_fails_the_confirm():
    real = ServerHandshake(X25519PrivateKey.generate())
    impostor = ServerHandshake(X25519PrivateKey.generate())
    client = ClientHandshake(real.public_key)
    reply, _ = impostor.respond(client.hello)
    with pytest.raises(ProtocolError) as caught:
        client.finish(reply)
    assert caught.value.code is ErrorCode.SECURE_CHANNEL
    assert "wrong server public key" in caught.value.reason


def test_client_configured_with_another_key_fails_the_confirm():
    server = ServerHandshake(X25519PrivateKey.generate())
    client = ClientHandshake(ServerHandshake(X25519PrivateKey.generate()).public_key)
    reply, _ = server.respond(client.hello)
    with pytest.raises(ProtocolError, match="wrong server public key"):
        client.finish(reply)


@pytest.mark.parametrize(
    ("mutate", "words"),
    [
        (lambda h: h[:-1], f"client hello of {HELLO_SIZE - 1} bytes"),
        (lambda h: h + b"\x00", f"client hello of {HELLO_SIZE + 1} bytes"),
        (lambda h: b"\x02" + h[1:], "version 2"),
        (lambda h: h[:1] + bytes(32) + h[33:], "invalid X25519 public key"),
    ],
)
def test_bad_hello_is_refused(mutate, words: str):
    server = ServerHandshake(X25519PrivateKey.generate())
    hello = ClientHandshake(server.public_key).hello
    with pytest.raises(ProtocolError) as caught:
        server.respond(mutate(hello))
    assert caught.value.code is ErrorCode.SECURE_CHANNEL
    assert words in caught.value.reason


def test_bad_reply_is_refused():
    server = ServerHandshake(X25519PrivateKey.generate())
    client = ClientHandshake(server.public_key)
    reply, _ = server.respond(client.hello)
    with pytest.raises(ProtocolError, match=f"server reply of {REPLY_SIZE - 1} bytes"):
        client.finish(reply[:-1])
    with pytest.raises(ProtocolError, match="version 9"):
        client.finish(b"\x09" + reply[1:])


def test_bad_configuration_is_a_value_error():
    with pytest.raises(ValueError, match="32 bytes"):
        ClientHandshake(b"short")
    with pytest.raises(ValueError, match="16 bytes"):
        ClientHandshake(bytes(32), nonce=b"short")


def test_send_counter_exhaustion_is_refused():
    client, _ = pair()
    client._send = MAX_COUNTER + 1
    with pytest.raises(ProtocolError, match="counter exhausted"):
        client.seal(b"x")


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=120))
def test_arbitrary_bytes_only_raise_protocol_errors(data: bytes):
    server = ServerHandshake(key(SERVER_STATIC))
    _, session = server.respond(ClientHandshake(server.public_key).hello)
    try:
        server.respond(data)
    except ProtocolError as exc:
        assert exc.code is ErrorCode.SECURE_CHANNEL
    else:
        assert len(data) == HELLO_SIZE and data[0] == 1
    with pytest.raises(ProtocolError) as caught:
        session.open(data)
    assert caught.value.code is ErrorCode.SECURE_CHANNEL


@settings(max_examples=50, deadline=None)
@given(data=st.binary(min_size=HELLO_SIZE - 1, max_size=HELLO_SIZE - 1))
def test_any_well_formed_hello_gets_a_working_session(data: bytes):
    server = ServerHandshake(key(SERVER_STATIC))
    try:
        reply, session = server.respond(b"\x01" + data)
    except ProtocolError as exc:  # a low-order point as the ephemeral key
        assert "invalid X25519 public key" in exc.reason
        return
    assert len(reply) == REPLY_SIZE
    assert int.from_bytes(session.seal(b"x")[:8], "big") == 1

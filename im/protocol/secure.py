"""An encrypted channel for clients that cannot use TLS (`im.secure.v1`), sans-I/O.

The gateway owns a static X25519 key pair whose public half ships with the client. Each
connection runs one exchange: the client's hello carries an ephemeral key and a nonce, the
server's reply carries its own ephemeral key, nonce and a sealed confirm label. Keys come
from HKDF-SHA256 over DH(client eph, server static) || DH(client eph, server eph): only the
holder of the static private key can derive them, which authenticates the server, and the
ephemeral pair gives forward secrecy. Frames are then ChaCha20-Poly1305 with a per-direction
64-bit counter as the nonce, sent in the clear before the ciphertext so a receiver can say
why it refused a frame; anything but exactly the next counter is refused. The layout is
specified, with test vectors, in docs/PROTOCOL.md.
"""

from __future__ import annotations

import os
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from im.protocol.errors import ErrorCode, ProtocolError

#: The WebSocket subprotocol of the encrypted channel (binary frames, msgpack inside).
SECURE_SUBPROTOCOL = "im.v1.msgpack+secure"

VERSION = 1
KEY_SIZE = 32
NONCE_SIZE = 16
HELLO_SIZE = 1 + KEY_SIZE + NONCE_SIZE
COUNTER_SIZE = 8
TAG_SIZE = 16
OVERHEAD = COUNTER_SIZE + TAG_SIZE  # bytes a sealed frame adds to its plaintext
CONFIRM = b"im.secure.v1 server confirm"
REPLY_SIZE = HELLO_SIZE + OVERHEAD + len(CONFIRM)
INFO_CLIENT_TO_SERVER = b"im.secure.v1 client->server"
INFO_SERVER_TO_CLIENT = b"im.secure.v1 server->client"
MAX_COUNTER = 2**64 - 1

_counter = struct.Struct("!Q")
_NONCE_PAD = bytes(4)


def _error(reason: str) -> ProtocolError:
    return ProtocolError(ErrorCode.SECURE_CHANNEL, reason)


def public_bytes(key: X25519PrivateKey) -> bytes:
    """The raw 32-byte public key, the form clients are configured with."""
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _exchange(private: X25519PrivateKey, public: bytes) -> bytes:
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError:
        raise _error("peer sent an invalid X25519 public key") from None


def _hello(ephemeral: X25519PrivateKey, nonce: bytes | None) -> bytes:
    nonce = os.urandom(NONCE_SIZE) if nonce is None else nonce
    if len(nonce) != NONCE_SIZE:
        raise ValueError(f"a handshake nonce is {NONCE_SIZE} bytes")
    return bytes([VERSION]) + public_bytes(ephemeral) + nonce


def _peer_key(data: bytes, size: int, what: str) -> bytes:
    """The ephemeral public key of a hello or a reply, once its size and version check out."""
    if len(data) != size:
        raise _error(f"{what} of {len(data)} bytes, expected {size}")
    if data[0] != VERSION:
        raise _error(f"{what} for version {data[0]}, this side speaks {VERSION}")
    return data[1 : 1 + KEY_SIZE]


def _derive(
    dh_static: bytes, dh_ephemeral: bytes, client_hello: bytes, server_hello: bytes
) -> tuple[bytes, bytes]:
    """(client-to-server key, server-to-client key), bound to both hellos' keys and nonces."""
    salt = client_hello[1 + KEY_SIZE : HELLO_SIZE] + server_hello[1 + KEY_SIZE : HELLO_SIZE]
    keys = client_hello[1 : 1 + KEY_SIZE] + server_hello[1 : 1 + KEY_SIZE]
    secret = dh_static + dh_ephemeral

    def key(label: bytes) -> bytes:
        hkdf = HKDF(algorithm=SHA256(), length=KEY_SIZE, salt=salt, info=label + keys)
        return hkdf.derive(secret)

    return key(INFO_CLIENT_TO_SERVER), key(INFO_SERVER_TO_CLIENT)


class SecureSession:
    """Both directions of an established channel: seal what goes out, open what comes in.

    After one refused frame the session refuses everything: the error is fatal, and a
    peer probing the channel gets no second try.
    """

    __slots__ = ("_broken", "_open_aead", "_recv", "_seal_aead", "_send")

    def __init__(self, send_key: bytes, recv_key: bytes) -> None:
        self._seal_aead = ChaCha20Poly1305(send_key)
        self._open_aead = ChaCha20Poly1305(recv_key)
        self._send = 0
        self._recv = 0
        self._broken = False

    def seal(self, plaintext: bytes) -> bytes:
        counter = self._send
        if counter > MAX_COUNTER:
            raise _error("send counter exhausted; reconnect for new keys")
        self._send = counter + 1
        head = _counter.pack(counter)
        return head + self._seal_aead.encrypt(_NONCE_PAD + head, plaintext, None)

    def open(self, frame: bytes) -> bytes:
        if self._broken:
            raise _error("channel already failed")
        if len(frame) < OVERHEAD:
            self._broken = True
            raise _error(f"sealed frame of {len(frame)} bytes, the minimum is {OVERHEAD}")
        counter = _counter.unpack_from(frame)[0]
        if counter != self._recv:
            self._broken = True
            raise _error(
                f"frame counter {counter}, expected {self._recv}: replayed, reordered or dropped"
            )
        nonce = _NONCE_PAD + frame[:COUNTER_SIZE]
        try:
            plaintext = self._open_aead.decrypt(nonce, frame[COUNTER_SIZE:], None)
        except InvalidTag:
            self._broken = True
            raise _error(f"frame {counter} failed authentication: tampered or wrong keys") from None
        self._recv = counter + 1
        return plaintext


class ClientHandshake:
    """The client's side: `hello` goes out first, `finish(reply)` yields the session.

    `ephemeral` and `nonce` exist to reproduce the documented test vectors; production
    code leaves them out so that each connection gets fresh random ones.
    """

    __slots__ = ("_ephemeral", "_server_static", "hello")

    def __init__(
        self,
        server_public: bytes,
        *,
        ephemeral: X25519PrivateKey | None = None,
        nonce: bytes | None = None,
    ) -> None:
        if len(server_public) != KEY_SIZE:
            raise ValueError(f"the server public key is {KEY_SIZE} bytes")
        self._server_static = bytes(server_public)
        self._ephemeral = X25519PrivateKey.generate() if ephemeral is None else ephemeral
        self.hello = _hello(self._ephemeral, nonce)

    def finish(self, reply: bytes) -> SecureSession:
        """Derive the keys and check the server's confirm, which only the right key opens."""
        reply = bytes(reply)
        server_ephemeral = _peer_key(reply, REPLY_SIZE, "server reply")
        dh_static = _exchange(self._ephemeral, self._server_static)
        dh_ephemeral = _exchange(self._ephemeral, server_ephemeral)
        to_server, to_client = _derive(dh_static, dh_ephemeral, self.hello, reply)
        session = SecureSession(to_server, to_client)
        try:
            confirm = session.open(reply[HELLO_SIZE:])
        except ProtocolError:
            confirm = None
        if confirm != CONFIRM:
            raise _error("server confirm did not open: wrong server public key or tampering")
        return session


class ServerHandshake:
    """The server's side, one object per static key shared by every connection.

    `respond` is called once per connection with the client's hello; `ephemeral` and
    `nonce` exist only to reproduce the documented test vectors.
    """

    __slots__ = ("_static", "public_key")

    def __init__(self, static_key: X25519PrivateKey) -> None:
        self._static = static_key
        self.public_key = public_bytes(static_key)

    def respond(
        self,
        hello: bytes,
        *,
        ephemeral: X25519PrivateKey | None = None,
        nonce: bytes | None = None,
    ) -> tuple[bytes, SecureSession]:
        """(reply to send, session): the reply ends with the sealed confirm, frame 0."""
        hello = bytes(hello)
        client_ephemeral = _peer_key(hello, HELLO_SIZE, "client hello")
        ephemeral = X25519PrivateKey.generate() if ephemeral is None else ephemeral
        server_hello = _hello(ephemeral, nonce)
        dh_static = _exchange(self._static, client_ephemeral)
        dh_ephemeral = _exchange(ephemeral, client_ephemeral)
        to_server, to_client = _derive(dh_static, dh_ephemeral, hello, server_hello)
        session = SecureSession(to_client, to_server)
        return server_hello + session.seal(CONFIRM), session

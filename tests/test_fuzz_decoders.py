"""Fuzzing the decoders a client's bytes reach: hostile input gives a ProtocolError, never
another exception, unbounded output or a hang, and how the stream is split changes nothing.

CI runs 200 examples per test; IM_FUZZ_EXAMPLES raises that for a long run
(see docs/SECURITY.md).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable

import msgpack
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from im.protocol import websocket as ws
from im.protocol.codec import Encoding, decode, encode
from im.protocol.errors import ErrorCode, ProtocolError
from im.protocol.framing import HEADER, FrameDecoder, frame
from im.protocol.messages import (
    CLIENT_OPS,
    SERVER_OPS,
    Schema,
    validate_client,
    validate_server,
)

EXAMPLES = int(os.environ.get("IM_FUZZ_EXAMPLES", "200"))
fuzz = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

MAX_WS_HEADER = 14  # 2 bytes, an 8-byte extended length, a 4-byte mask key
MAX_REASON = 1024  # what an `error` frame may carry back


def ways_to_feed(stream: bytes, cuts: list[int]) -> list[list[bytes]]:
    """The stream whole, cut at the drawn points, and one byte at a time."""
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    split_up = [stream[a:b] for a, b in zip(points, points[1:], strict=False)]
    return [[stream], split_up, [stream[i : i + 1] for i in range(len(stream))]]


Outcome = tuple[list, ErrorCode | None]


def run(feed: Callable[[bytes], list], chunks: list[bytes], check: Callable[[], None]) -> Outcome:
    """Feed chunks until one raises: (outputs so far, the error code or None). `check` runs
    after every feed that returns, so the bounds hold at each step, not only at the end."""
    out: list = []
    for chunk in chunks:
        try:
            out.extend(feed(chunk))
        except ProtocolError as exc:
            return out, exc.code
        check()
    return out, None


def assert_splits_agree(whole: Outcome, split_up: Outcome, bytewise: Outcome) -> None:
    """Any split of a stream reads as the whole does. On a bad stream every way fails with
    the same code; a split one may first deliver what came before the bad part (fed whole,
    the decoder raises before returning it), and byte by byte delivers all of that, so any
    other split's outputs are a prefix of the bytewise ones."""
    assert whole[1] == split_up[1] == bytewise[1]
    if whole[1] is None:
        assert whole[0] == split_up[0] == bytewise[0]
    else:
        assert whole[0] == []
        assert split_up[0] == bytewise[0][: len(split_up[0])]


# --- TCP framing ---------------------------------------------------------------------------

tcp_pieces = st.one_of(
    st.binary(max_size=300).map(frame),  # a well-formed frame
    st.integers(0, 2**32 - 1).map(lambda n: n.to_bytes(HEADER, "big")),  # any header at all
    st.binary(max_size=40),  # junk
)


def reference_tcp(stream: bytes, max_frame: int) -> tuple[list[bytes], bool]:
    """(complete payloads before any oversized header, whether one came)."""
    frames, pos = [], 0
    while len(stream) - pos >= HEADER:
        size = int.from_bytes(stream[pos : pos + HEADER], "big")
        if size > max_frame:
            return frames, True
        if len(stream) - pos - HEADER < size:
            break
        frames.append(stream[pos + HEADER : pos + HEADER + size])
        pos += HEADER + size
    return frames, False


@fuzz
@given(
    pieces=st.lists(tcp_pieces, max_size=12),
    cuts=st.lists(st.integers(0, 10_000), max_size=20),
    max_frame=st.sampled_from([0, 1, 16, 256, 64 * 1024]),
)
def test_tcp_decoder(pieces: list[bytes], cuts: list[int], max_frame: int):
    stream = b"".join(pieces)
    truth, oversized = reference_tcp(stream, max_frame)
    outcomes = []
    for chunks in ways_to_feed(stream, cuts):
        decoder = FrameDecoder(max_frame)

        def bounded(decoder: FrameDecoder = decoder) -> None:
            assert decoder.buffered < HEADER + max_frame

        out, err = run(decoder.feed, chunks, bounded)
        assert all(len(payload) <= max_frame for payload in out)
        assert out == truth[: len(out)]
        assert err is (ErrorCode.FRAME_TOO_LARGE if oversized else None)
        outcomes.append((out, err))
    assert_splits_agree(*outcomes)
    if not oversized:
        assert outcomes[0][0] == truth


# --- WebSocket framing ---------------------------------------------------------------------


Spec = tuple[bool, int, bytes]  # fin, opcode, payload


@st.composite
def ws_messages(draw: st.DrawFn) -> tuple[list[Spec], list[ws.Event]]:
    """The frames of well-formed client messages, and the events they must read as."""
    frames: list[Spec] = []
    events: list[ws.Event] = []
    kinds = ["whole", "fragmented", "ping", "pong", "close"]
    for kind in draw(st.lists(st.sampled_from(kinds), max_size=6)):
        if kind in ("whole", "fragmented"):
            text = draw(st.booleans())
            payload = draw(st.text(max_size=60)).encode() if text else draw(st.binary(max_size=200))
            points = [0, len(payload)]
            if kind == "fragmented":
                cuts = draw(st.lists(st.integers(0, len(payload)), min_size=1, max_size=3))
                points[1:1] = sorted(cuts)
            pieces = [payload[a:b] for a, b in zip(points, points[1:], strict=False)]
            opcode = ws.OP_TEXT if text else ws.OP_BINARY
            for i, piece in enumerate(pieces):
                frames.append((i == len(pieces) - 1, ws.OP_CONT if i else opcode, piece))
                if i == 0 and len(pieces) > 1 and draw(st.booleans()):  # a ping may interleave
                    frames.append((True, ws.OP_PING, b"mid"))
                    events.append(ws.Ping(b"mid"))
            events.append(ws.Message(text, payload))
        elif kind == "close":
            code = draw(st.none() | st.sampled_from([1000, 1001, 1011, 3000, 4015, 4999]))
            reason = "" if code is None else draw(st.text(max_size=20))
            body = b"" if code is None else code.to_bytes(2, "big") + reason.encode()
            frames.append((True, ws.OP_CLOSE, body))
            events.append(ws.Close(code, reason))
        else:
            payload = draw(st.binary(max_size=ws.MAX_CONTROL_PAYLOAD))
            frames.append((True, ws.OP_PING if kind == "ping" else ws.OP_PONG, payload))
            events.append(ws.Ping(payload) if kind == "ping" else ws.Pong(payload))
    return frames, events


@st.composite
def ws_encoded(draw: st.DrawFn, spec: Spec, fault: str | None) -> bytes:
    """One masked client frame, in any length form, with `fault` broken if one is given."""
    fin, opcode, payload = spec
    length = len(payload)
    first = (0x80 if fin else 0) | opcode
    mask_bit = 0x80
    if fault == "rsv":
        first |= draw(st.sampled_from([0x10, 0x20, 0x40]))
    elif fault == "fin":
        first ^= 0x80
    elif fault == "opcode":
        first = (first & 0xF0) | draw(st.sampled_from([3, 4, 5, 6, 7, 11, 12, 13, 14, 15]))
    elif fault == "unmasked":
        mask_bit = 0
    declared = draw(st.integers(0, 2**64 - 1)) if fault == "length" else length
    forms = ["short", "medium", "long"][(declared >= 126) + (declared >= 0x10000) :]
    form = draw(st.sampled_from(forms))
    if form == "short":
        head = bytes([first, mask_bit | declared])
    elif form == "medium":
        head = bytes([first, mask_bit | 126]) + struct.pack("!H", declared)
    else:
        head = bytes([first, mask_bit | 127]) + struct.pack("!Q", declared)
    key = draw(st.binary(min_size=4, max_size=4))
    return head + key + ws.apply_mask(payload, key)


@st.composite
def ws_streams(draw: st.DrawFn) -> tuple[bytes, list[ws.Event] | None]:
    """(stream, the events it must read as), mostly well-formed; None for a damaged one."""
    frames, events = draw(ws_messages())
    damage = draw(st.sampled_from(["none", "none", "fault", "flip", "junk"]))
    broken = draw(st.integers(0, max(len(frames) - 1, 0))) if damage == "fault" else -1
    faults = ["rsv", "fin", "opcode", "unmasked", "length"]
    stream = bytearray()
    for i, spec in enumerate(frames):
        fault = draw(st.sampled_from(faults)) if i == broken else None
        stream += draw(ws_encoded(spec, fault))
    if damage == "flip" and stream:
        stream[draw(st.integers(0, len(stream) - 1))] ^= draw(st.integers(1, 255))
    elif damage == "junk":
        stream += draw(st.binary(min_size=1, max_size=16))
    return bytes(stream), events if damage == "none" else None


def ws_check_event(event: ws.Event, max_size: int) -> None:
    if isinstance(event, ws.Message):
        assert len(event.payload) <= max_size
        if event.text:
            event.payload.decode()
    elif isinstance(event, ws.Ping | ws.Pong):
        assert len(event.payload) <= ws.MAX_CONTROL_PAYLOAD
    else:
        assert isinstance(event, ws.Close)
        assert len(event.reason.encode()) <= ws.MAX_CONTROL_PAYLOAD - 2


@fuzz
@given(
    case=ws_streams(),
    cuts=st.lists(st.integers(0, 10_000), max_size=20),
    max_size=st.sampled_from([0, 10, 125, 300, 64 * 1024]),
)
def test_websocket_parser(
    case: tuple[bytes, list[ws.Event] | None], cuts: list[int], max_size: int
):
    stream, expected = case
    outcomes = []
    for chunks in ways_to_feed(stream, cuts):
        parser = ws.FrameParser(max_size)

        def bounded(parser: ws.FrameParser = parser) -> None:
            assert parser.buffered <= max_size + MAX_WS_HEADER + ws.MAX_CONTROL_PAYLOAD

        events, err = run(parser.feed, chunks, bounded)
        assert err in (None, ErrorCode.PROTOCOL_VIOLATION, ErrorCode.FRAME_TOO_LARGE)
        for event in events:
            ws_check_event(event, max_size)
        closes = [i for i, event in enumerate(events) if isinstance(event, ws.Close)]
        assert closes in ([], [len(events) - 1])  # nothing is read after a Close
        outcomes.append((events, err))
    assert_splits_agree(*outcomes)
    if expected is not None:
        closed = next((i for i, e in enumerate(expected) if isinstance(e, ws.Close)), None)
        expected = expected if closed is None else expected[: closed + 1]
        sizes = [len(e.payload) for e in expected if isinstance(e, ws.Message)]
        events, err = outcomes[2]
        if all(size <= max_size for size in sizes):
            assert (events, err) == (expected, None)
        else:
            assert err is ErrorCode.FRAME_TOO_LARGE
            assert events == expected[: len(events)]


# --- payload codecs ------------------------------------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**64), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
any_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=5)
        | st.dictionaries(st.text(max_size=8) | st.integers() | st.binary(max_size=4), children)
        | st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=12))
    ),
    max_leaves=25,
)


def string_keys(value: object) -> bool:
    """Whether every map in `value`, however deep, has only str or bytes keys."""
    if isinstance(value, dict):
        return all(isinstance(k, str | bytes) and string_keys(v) for k, v in value.items())
    if isinstance(value, list):
        return all(map(string_keys, value))
    return True


def check_decode(payload: bytes, encoding: Encoding) -> dict | None:
    """The decoded map, or None after checking the refusal is a MALFORMED error."""
    try:
        result = decode(payload, encoding)
    except ProtocolError as exc:
        assert exc.code is ErrorCode.MALFORMED
        return None
    assert isinstance(result, dict)
    assert all(isinstance(name, str | bytes) for name in result)
    return result


@fuzz
@given(payload=st.binary(max_size=300), encoding=st.sampled_from(list(Encoding)))
def test_codec_arbitrary_bytes(payload: bytes, encoding: Encoding):
    check_decode(payload, encoding)


@fuzz
@given(value=any_values, cut=st.integers(0, 10_000))
def test_codec_msgpack_structures_and_truncations(value: object, cut: int):
    try:
        payload = msgpack.packb(value, use_bin_type=True)
    except (OverflowError, ValueError):  # an integer msgpack cannot hold
        return
    decoded = check_decode(payload, Encoding.MSGPACK)
    if decoded is not None:
        assert decoded == value
    elif isinstance(value, dict):  # a map is refused only for a key that is not a string
        assert not string_keys(value)
    if payload:
        assert check_decode(payload[: cut % len(payload)], Encoding.MSGPACK) is None


@fuzz
@given(size=st.sampled_from([0, 1, 4, 8, 12, 13]), data=st.binary(min_size=13, max_size=13))
def test_codec_msgpack_timestamps(size: int, data: bytes):
    """Extension type -1 is decoded as a timestamp, which has rules of its own."""
    check_decode(b"\x81\xa1t\xc7" + bytes([size, 0xFF]) + data[:size], Encoding.MSGPACK)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(), children, max_size=3)
    ),
    max_leaves=5,
)
json_atoms = st.sampled_from(
    [
        "null",
        "true",
        "-0",
        "1e400",
        "-1e-400",
        "18446744073709551616",
        "1.5e",
        '"\\ud800"',
        '"\\udfff\\ud800"',
        '"\\u0000"',
        '"\\x"',
        "NaN",
        "",
    ]
) | json_values.map(lambda value: orjson.dumps(value).decode())
json_texts = st.recursive(
    json_atoms,
    lambda children: (
        st.lists(children, max_size=4).map(lambda items: "[" + ",".join(items) + "]")
        | st.lists(st.tuples(children, children), max_size=4).map(
            lambda pairs: "{" + ",".join(f"{k}:{v}" for k, v in pairs) + "}"
        )
    ),
    max_leaves=8,
)


@fuzz
@given(text=json_texts, cut=st.integers(0, 10_000))
def test_codec_json_texts_and_truncations(text: str, cut: int):
    payload = text.encode()
    decoded = check_decode(payload, Encoding.JSON)
    if decoded is not None:
        assert decoded == orjson.loads(payload)
        assert check_decode(payload[: cut % len(payload)], Encoding.JSON) is None


def nesting(depth: int, encoding: Encoding) -> bytes:
    if encoding is Encoding.JSON:
        return b'{"a":' * depth + b"1" + b"}" * depth
    return b"\x81\xa1a" * depth + b"\x01"


@pytest.mark.parametrize("encoding", list(Encoding))
def test_codec_deep_nesting_is_refused_not_a_crash(encoding: Encoding):
    assert check_decode(nesting(100, encoding), encoding) is not None
    assert check_decode(nesting(100_000, encoding), encoding) is None


# --- message validation --------------------------------------------------------------------

FIELD_NAMES = sorted(
    {field for schema in (CLIENT_OPS, SERVER_OPS) for fields in schema.values() for field in fields}
)
OPS = sorted({*CLIENT_OPS, *SERVER_OPS})

small_values = st.recursive(scalars, lambda children: st.lists(children, max_size=3), max_leaves=4)
near_values = st.one_of(
    small_values,
    st.sampled_from(["", "x", "high", "low", "push", "a" * 65, "a" * 4097]),
    st.integers(-1, 4),
    st.sampled_from([0.0, 1.0, 5.0, float("nan"), float("inf"), 2**53, 2**53 + 1]),
    st.lists(st.text(max_size=70), max_size=3),
    st.lists(st.dictionaries(st.sampled_from(FIELD_NAMES), small_values), max_size=3).map(
        lambda items: [{**item, "op": "push"} for item in items]
    ),
)
messages = st.builds(
    lambda fields, op: {**fields, **op},
    st.dictionaries(st.sampled_from(FIELD_NAMES) | st.text(max_size=8), near_values, max_size=8),
    st.fixed_dictionaries({}, optional={"op": st.sampled_from(OPS) | small_values}),
)


def check_validation(message: dict, validate: Callable[[dict], str], schema: Schema) -> None:
    try:
        op = validate(message)
    except ProtocolError as exc:
        assert exc.code in (ErrorCode.MALFORMED, ErrorCode.UNKNOWN_OP, ErrorCode.BAD_FIELD)
        assert len(exc.reason) <= MAX_REASON
        # The answer sent back is itself a valid `error` message, in either encoding.
        for encoding in Encoding:
            assert validate_server(decode(encode(exc.to_map(), encoding), encoding)) == "error"
        return
    assert op == message["op"]
    assert all(name in message for name, (_, required) in schema[op].items() if required)


@fuzz
@given(message=messages)
def test_validate_client(message: dict):
    check_validation(message, validate_client, CLIENT_OPS)


@fuzz
@given(message=messages)
def test_validate_server(message: dict):
    check_validation(message, validate_server, SERVER_OPS)


@fuzz
@given(payload=st.binary(max_size=200), encoding=st.sampled_from(list(Encoding)))
def test_bytes_to_validated_message(payload: bytes, encoding: Encoding):
    message = check_decode(payload, encoding)
    if message is not None:
        check_validation(message, validate_client, CLIENT_OPS)

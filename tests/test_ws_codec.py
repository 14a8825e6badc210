"""The lean WebSocket codec must read and write exactly what `websockets` does."""

from __future__ import annotations

import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.client import ClientProtocol
from websockets.frames import Close as WsClose
from websockets.frames import Frame, Opcode
from websockets.protocol import OPEN
from websockets.server import ServerProtocol
from websockets.speedups import apply_mask as c_apply_mask
from websockets.uri import parse_uri

from im.protocol import websocket
from im.protocol.errors import ErrorCode, ProtocolError
from im.protocol.websocket import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    Close,
    FrameParser,
    Message,
    Ping,
    Pong,
    _py_apply_mask,
    binary_frame,
    close_frame,
    encode_client_frame,
    encode_frame,
    pong_frame,
    text_frame,
)
from im.protocol.ws_handshake import Accepted, Handshake

KEY = b"\x01\x02\x03\x04"
VALID_CLOSE_CODES = [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014]
VALID_CLOSE_CODES += [3000, 4000, 4009, 4999]


def reference_events(stream: bytes, max_size: int | None = None) -> list:
    """What websockets' own server side reads from `stream`, as our events."""
    proto = ServerProtocol(state=OPEN, max_size=max_size)
    proto.receive_data(stream)
    assert proto.parser_exc is None, proto.parser_exc
    events: list = []
    frag = bytearray()
    text = False
    for frame in proto.events_received():
        data = bytes(frame.data)
        if frame.opcode in (Opcode.TEXT, Opcode.BINARY):
            text = frame.opcode is Opcode.TEXT
            if frame.fin:
                events.append(Message(text, data))
            else:
                frag = bytearray(data)
        elif frame.opcode is Opcode.CONT:
            frag += data
            if frame.fin:
                events.append(Message(text, bytes(frag)))
        elif frame.opcode is Opcode.PING:
            events.append(Ping(data))
        elif frame.opcode is Opcode.PONG:
            events.append(Pong(data))
        else:
            close = WsClose.parse(data)
            events.append(Close(None if close.code == 1005 else close.code, close.reason))
    return events


def feed_split(parser: FrameParser, stream: bytes, cuts: list[int]) -> list:
    events: list = []
    start = 0
    for cut in [*sorted(cuts), len(stream)]:
        events += parser.feed(stream[start:cut])
        start = cut
    return events


def masked(frame: Frame) -> bytes:
    return frame.serialize(mask=True)


def raw_client_frame(first: int, payload: bytes, length: int | None = None) -> bytes:
    """A masked frame with no checks at all, to build what a broken client would send."""
    n = len(payload) if length is None else length
    if n < 126:
        head = bytes([first, 0x80 | n])
    elif n < 0x10000:
        head = bytes([first, 0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([first, 0x80 | 127]) + n.to_bytes(8, "big")
    return head + KEY + c_apply_mask(payload, KEY)


control_frames = st.builds(
    lambda op, data: Frame(op, data),
    st.sampled_from([Opcode.PING, Opcode.PONG]),
    st.binary(max_size=125),
)


@st.composite
def conversations(draw: st.DrawFn) -> tuple[bytes, list]:
    """Client frames from websockets: messages in fragments, control frames between them."""
    frames: list[Frame] = []
    expected: list = []
    for _ in range(draw(st.integers(0, 6))):
        if draw(st.booleans()):
            frame = draw(control_frames)
            frames.append(frame)
            expected.append((Ping if frame.opcode is Opcode.PING else Pong)(frame.data))
            continue
        text = draw(st.booleans())
        payload = draw(st.text(max_size=300)).encode() if text else draw(st.binary(max_size=600))
        cuts = sorted(draw(st.lists(st.integers(0, len(payload)), max_size=4)))
        pieces = [payload[a:b] for a, b in zip([0, *cuts], [*cuts, len(payload)], strict=True)]
        for i, piece in enumerate(pieces):
            op = (Opcode.TEXT if text else Opcode.BINARY) if i == 0 else Opcode.CONT
            frames.append(Frame(op, piece, fin=i == len(pieces) - 1))
            if i < len(pieces) - 1 and draw(st.booleans()):
                control = draw(control_frames)
                frames.append(control)
                kind = Ping if control.opcode is Opcode.PING else Pong
                expected.append(kind(control.data))
        expected.append(Message(text, payload))
    if draw(st.booleans()):
        code = draw(st.sampled_from(VALID_CLOSE_CODES))
        reason = draw(st.text(max_size=20))
        frames.append(Frame(Opcode.CLOSE, WsClose(code, reason).serialize()))
        expected.append(Close(code, reason))
    return b"".join(masked(f) for f in frames), expected


@settings(max_examples=150, deadline=None)
@given(conversations(), st.data())
def test_websockets_client_frames_parse_identically_under_any_split(conv, data) -> None:
    stream, expected = conv
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=12))
    parser = FrameParser()
    assert feed_split(parser, stream, cuts) == expected == reference_events(stream)
    assert parser.buffered == 0


def test_byte_at_a_time() -> None:
    stream = masked(Frame(Opcode.TEXT, "héllo".encode(), fin=False))
    stream += masked(Frame(Opcode.PING, b"p"))
    stream += masked(Frame(Opcode.CONT, b" world"))
    parser = FrameParser()
    events = feed_split(parser, stream, list(range(len(stream))))
    assert events == [Ping(b"p"), Message(True, "héllo world".encode())]


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 70000])
def test_length_encodings_agree_both_ways(size: int) -> None:
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    stream = masked(Frame(Opcode.BINARY, payload))
    assert FrameParser(max_size=1 << 20).feed(stream) == [Message(False, payload)]
    assert encode_client_frame(OP_BINARY, payload, mask_key=KEY) == raw_client_frame(0x82, payload)
    client = ClientProtocol(parse_uri("ws://x/ws"), state=OPEN, max_size=None)
    client.receive_data(binary_frame(payload))
    (frame,) = client.events_received()
    assert (frame.opcode, frame.data, frame.fin) == (Opcode.BINARY, payload, True)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from([OP_TEXT, OP_BINARY]), st.binary(max_size=300), st.booleans()),
        max_size=5,
    ),
    st.binary(max_size=125),
)
def test_our_frames_parse_identically_in_websockets_client(messages, ping_data) -> None:
    """Fragmented and whole data frames, pongs and a final close, read by a websockets client."""
    stream = b""
    expected: list[tuple] = []
    for op, payload, fragmented in messages:
        if fragmented:
            half = len(payload) // 2
            stream += encode_frame(op, payload[:half], fin=False)
            stream += pong_frame(ping_data)
            stream += encode_frame(OP_CONT, payload[half:])
            expected += [(op, payload[:half], False), (OP_PONG, ping_data, True)]
            expected.append((OP_CONT, payload[half:], True))
        else:
            stream += encode_frame(op, payload)
            expected.append((op, payload, True))
    stream += close_frame(4009, "bye")
    client = ClientProtocol(parse_uri("ws://x/ws"), state=OPEN)
    client.receive_data(stream)
    assert client.parser_exc is None
    frames = client.events_received()
    assert [(f.opcode, bytes(f.data), f.fin) for f in frames[:-1]] == expected
    assert client.close_rcvd == WsClose(4009, "bye")


def test_convenience_encoders_set_the_right_opcode() -> None:
    client = ClientProtocol(parse_uri("ws://x/ws"), state=OPEN)
    client.receive_data(text_frame(b'{"op":"x"}') + binary_frame(b"\x81") + pong_frame(b"p"))
    frames = client.events_received()
    assert [(f.opcode, f.data) for f in frames] == [
        (Opcode.TEXT, b'{"op":"x"}'),
        (Opcode.BINARY, b"\x81"),
        (Opcode.PONG, b"p"),
    ]


@given(st.text(max_size=200), st.sampled_from(VALID_CLOSE_CODES))
def test_close_reason_is_cut_on_a_character_boundary(reason: str, code: int) -> None:
    frame = close_frame(code, reason)
    assert len(frame) <= 2 + 125
    parsed = FrameParser().feed(raw_client_frame(frame[0], frame[2:]))
    assert len(parsed) == 1
    assert parsed[0].code == code
    assert reason.startswith(parsed[0].reason)
    if len(reason.encode()) <= 123:
        assert parsed[0].reason == reason
    else:
        assert len(parsed[0].reason.encode()) > 119


def test_long_multibyte_close_reason_is_truncated() -> None:
    frame = close_frame(4006, "é" * 100)
    client = ClientProtocol(parse_uri("ws://x/ws"), state=OPEN)
    client.receive_data(frame)
    assert client.close_rcvd == WsClose(4006, "é" * 61)


def test_control_frames_must_be_short_and_whole_when_encoding() -> None:
    with pytest.raises(ValueError):
        encode_frame(OP_PING, bytes(126))
    with pytest.raises(ValueError):
        encode_frame(OP_CLOSE, b"\x03\xe8", fin=False)


def test_client_frames_get_a_fresh_mask_each_time() -> None:
    a = encode_client_frame(OP_TEXT, b"same")
    b = encode_client_frame(OP_TEXT, b"same")
    assert a[2:6] != b[2:6] or a[6:] != b[6:]
    assert FrameParser().feed(a + b) == [Message(True, b"same")] * 2


@given(st.binary(max_size=2000), st.binary(min_size=4, max_size=4))
def test_pure_unmask_matches_the_c_one(data: bytes, key: bytes) -> None:
    assert _py_apply_mask(data, key) == c_apply_mask(data, key)
    assert _py_apply_mask(memoryview(data)[1:], key) == c_apply_mask(data[1:], key)


def flip(frame: bytes, bits: int) -> bytes:
    return bytes([frame[0] | bits]) + frame[1:]


def with_opcode(frame: bytes, opcode: int) -> bytes:
    return bytes([(frame[0] & 0xF0) | opcode]) + frame[1:]


TEXT = encode_client_frame(OP_TEXT, b"hi", mask_key=KEY)
VIOLATIONS = {
    "unmasked": (bytes([0x81, 0x02]) + b"hi", True),
    "rsv1": (flip(TEXT, 0x40), True),
    "rsv2": (flip(TEXT, 0x20), True),
    "rsv3": (flip(TEXT, 0x10), True),
    **{f"opcode {op:#x}": (with_opcode(TEXT, op), True) for op in [3, 4, 5, 6, 7, 11, 12, 15]},
    "long ping": (raw_client_frame(0x89, bytes(126)), True),
    "fragmented ping": (raw_client_frame(0x09, b"p"), True),
    "fragmented close": (raw_client_frame(0x08, b"\x03\xe8"), True),
    "orphan continuation": (raw_client_frame(0x80, b"x"), True),
    "message inside message": (raw_client_frame(0x01, b"a") + raw_client_frame(0x82, b"b"), True),
    "1-byte close": (raw_client_frame(0x88, b"\x03"), True),
    **{
        f"close code {c}": (raw_client_frame(0x88, c.to_bytes(2, "big")), True)
        for c in [0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535]
    },
    "close reason not utf-8": (raw_client_frame(0x88, b"\x03\xe8\xff"), True),
    "64-bit length msb": (bytes([0x82, 0xFF, 0x80]) + bytes(7), True),
    # websockets checks text only when its I/O layer decodes a message, so only we catch these
    "text not utf-8": (raw_client_frame(0x81, b"ok\xc3"), False),
    "fragmented text not utf-8": (
        raw_client_frame(0x01, "é".encode()[:1]) + raw_client_frame(0x80, b"x"),
        False,
    ),
}


@pytest.mark.parametrize("name", list(VIOLATIONS))
def test_violations(name: str) -> None:
    stream, websockets_agrees = VIOLATIONS[name]
    with pytest.raises(ProtocolError) as err:
        FrameParser().feed(stream)
    assert err.value.code is ErrorCode.PROTOCOL_VIOLATION
    assert err.value.fatal
    if websockets_agrees:
        proto = ServerProtocol(state=OPEN)
        proto.receive_data(stream)
        assert proto.parser_exc is not None


def test_violation_found_however_the_stream_is_split() -> None:
    stream = raw_client_frame(0x01, b"ab") + raw_client_frame(0x81, b"c")
    parser = FrameParser()
    assert parser.feed(stream[:7]) == []
    with pytest.raises(ProtocolError) as err:
        for i in range(7, len(stream)):
            parser.feed(stream[i : i + 1])
    assert err.value.code is ErrorCode.PROTOCOL_VIOLATION


def test_split_utf8_across_fragments_is_valid() -> None:
    word = "日本".encode()
    stream = raw_client_frame(0x01, word[:2]) + raw_client_frame(0x80, word[2:])
    assert FrameParser().feed(stream) == [Message(True, word)]


@pytest.mark.parametrize("length_bytes", [b"\x7e\xff\xff", b"\x7f" + (1 << 40).to_bytes(8, "big")])
def test_oversized_length_refused_at_the_header(length_bytes: bytes) -> None:
    parser = FrameParser(max_size=1000)
    with pytest.raises(ProtocolError) as err:
        parser.feed(bytes([0x82, 0x80 | length_bytes[0]]) + length_bytes[1:])
    assert err.value.code is ErrorCode.FRAME_TOO_LARGE
    assert err.value.fatal


def test_max_size_is_inclusive() -> None:
    parser = FrameParser(max_size=1000)
    assert parser.feed(raw_client_frame(0x82, bytes(1000))) == [Message(False, bytes(1000))]
    with pytest.raises(ProtocolError) as err:
        parser.feed(raw_client_frame(0x82, b"", length=1001)[:4])
    assert err.value.code is ErrorCode.FRAME_TOO_LARGE


def test_assembled_message_limit_refused_at_the_continuation_header() -> None:
    parser = FrameParser(max_size=1000)
    assert parser.feed(raw_client_frame(0x02, bytes(600))) == []
    assert parser.buffered == 600
    assert parser.feed(raw_client_frame(0x89, b"ping")) == [Ping(b"ping")]
    with pytest.raises(ProtocolError) as err:
        parser.feed(bytes([0x80, 0x80 | 126]) + (401).to_bytes(2, "big"))
    assert err.value.code is ErrorCode.FRAME_TOO_LARGE
    assert "1001" in err.value.reason


def test_nothing_after_close_is_read() -> None:
    parser = FrameParser()
    stream = raw_client_frame(0x88, b"") + raw_client_frame(0x81, b"late") + b"\xff\xff"
    assert parser.feed(stream) == [Close(None, "")]
    assert parser.feed(raw_client_frame(0x81, b"later")) == []
    assert parser.buffered == 0


def test_close_while_fragmented_ends_the_message() -> None:
    parser = FrameParser()
    stream = raw_client_frame(0x01, b"half") + raw_client_frame(0x88, b"\x03\xe9gone")
    assert parser.feed(stream) == [Close(1001, "gone")]
    assert parser.buffered == 0


def test_idle_parser_is_small_and_holds_no_buffer() -> None:
    parser = FrameParser()
    assert not hasattr(parser, "__dict__")
    assert sys.getsizeof(parser) <= 80
    frame = raw_client_frame(0x81, b"x" * 300)
    assert parser.feed(frame[:100]) == []
    assert parser.buffered == 100
    assert parser.feed(frame[100:]) == [Message(True, b"x" * 300)]
    assert parser.buffered == 0


def test_end_to_end_with_websockets_client_after_our_handshake() -> None:
    client = ClientProtocol(parse_uri("ws://127.0.0.1/ws"), subprotocols=["im.v1.msgpack"])
    client.send_request(client.connect())
    eager = encode_client_frame(OP_TEXT, b'{"op":"auth"}')  # sent before the 101 arrives
    result = Handshake().receive(b"".join(client.data_to_send()) + eager)
    assert isinstance(result, Accepted)
    assert result.subprotocol == "im.v1.msgpack"
    client.receive_data(result.response)
    assert client.state is OPEN
    assert [r.status_code for r in client.events_received()] == [101]

    parser = FrameParser()
    assert parser.feed(result.leftover) == [Message(True, b'{"op":"auth"}')]
    client.send_binary(b"\x81\xa2op", fin=False)
    client.send_ping(b"hb")
    client.send_continuation(b"\xa4ping", fin=True)
    client.send_close(1000, "done")
    events = parser.feed(b"".join(client.data_to_send()))
    assert events == [Ping(b"hb"), Message(False, b"\x81\xa2op\xa4ping"), Close(1000, "done")]

    client.receive_data(pong_frame(b"hb") + binary_frame(b"\x80") + close_frame(1000, "done"))
    frames = client.events_received()
    assert [(f.opcode, bytes(f.data)) for f in frames[:2]] == [
        (Opcode.PONG, b"hb"),
        (Opcode.BINARY, b"\x80"),
    ]
    assert client.close_rcvd == WsClose(1000, "done")


def test_opcodes_match_rfc_6455() -> None:
    ours = [OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG]
    assert ours == [int(op) for op in Opcode]


def test_parser_and_client_encoder_work_with_the_pure_unmask(monkeypatch) -> None:
    monkeypatch.setattr(websocket, "apply_mask", _py_apply_mask)
    frame = encode_client_frame(OP_TEXT, "ünï".encode(), fin=False, mask_key=KEY)
    assert frame == raw_client_frame(0x01, "ünï".encode())
    stream = frame + raw_client_frame(0x89, b"") + raw_client_frame(0x80, b"code" * 40)
    expected = Message(True, "ünï".encode() + b"code" * 40)
    assert FrameParser().feed(stream) == [Ping(b""), expected]

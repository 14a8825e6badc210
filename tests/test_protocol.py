"""The sans-I/O message layer: codecs, TCP framing and the message model."""

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from im.protocol.codec import SUBPROTOCOLS, Encoding, decode, encode
from im.protocol.errors import FATAL_CODES, ErrorCode, ProtocolError
from im.protocol.framing import HEADER, FrameDecoder, frame
from im.protocol.messages import validate_client, validate_server

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**53), max_value=2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
maps = st.dictionaries(st.text(max_size=10), json_values, max_size=6).map(
    lambda m: {**m, "op": "push"}
)


@pytest.mark.parametrize("encoding", list(Encoding))
@given(message=maps)
def test_encode_decode_round_trip(encoding, message):
    assert decode(encode(message, encoding), encoding) == message


@pytest.mark.parametrize("encoding", list(Encoding))
@given(payload=st.binary(max_size=64))
def test_decode_never_raises_anything_but_protocol_error(encoding, payload):
    try:
        result = decode(payload, encoding)
    except ProtocolError as err:
        assert err.code is ErrorCode.MALFORMED
    else:
        assert isinstance(result, dict)


@pytest.mark.parametrize("encoding", list(Encoding))
def test_non_map_payload_is_malformed(encoding):
    with pytest.raises(ProtocolError) as info:
        decode(
            encode([1, 2], encoding) if encoding is Encoding.JSON else msgpack.packb([1]), encoding
        )
    assert info.value.code is ErrorCode.MALFORMED


def test_subprotocol_names_are_public_api():
    assert SUBPROTOCOLS == ("im.v1.msgpack", "im.v1.json")
    assert Encoding.from_subprotocol("im.v1.json") is Encoding.JSON
    with pytest.raises(ValueError):
        Encoding.from_subprotocol("im.v2.json")


@given(
    payloads=st.lists(st.binary(max_size=300), max_size=20),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=30),
)
def test_incremental_decoder_any_split(payloads, cuts):
    stream = b"".join(frame(p) for p in payloads)
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    decoder = FrameDecoder(max_frame=1000)
    out = []
    for start, end in zip(points, points[1:], strict=False):
        out.extend(decoder.feed(stream[start:end]))
    assert out == payloads
    assert decoder.buffered == 0


def test_decoder_refuses_oversized_frame_at_the_header():
    decoder = FrameDecoder(max_frame=1024)
    with pytest.raises(ProtocolError) as info:
        decoder.feed((1025).to_bytes(HEADER, "big"))
    assert info.value.code is ErrorCode.FRAME_TOO_LARGE
    assert decoder.buffered == HEADER  # the body was never waited for


def test_decoder_accepts_frame_of_exactly_the_limit():
    decoder = FrameDecoder(max_frame=10)
    assert decoder.feed(frame(b"x" * 10)) == [b"x" * 10]


AUTH = {"op": "auth", "product": "demo", "uid": "alice", "token": "t"}
PUSH = {"op": "push", "id": "m", "type": "chat", "pri": "high", "qos": 0, "ts": 1}


@pytest.mark.parametrize(
    ("message", "code", "mentions"),
    [
        ({"noop": 1}, ErrorCode.MALFORMED, "op"),
        ({"op": 5}, ErrorCode.MALFORMED, "op"),
        ({"op": "fly"}, ErrorCode.UNKNOWN_OP, "fly"),
        ({"op": "auth", "product": "demo", "token": "t"}, ErrorCode.BAD_FIELD, "uid"),
        ({**AUTH, "uid": 7}, ErrorCode.BAD_FIELD, "uid"),
        ({**AUTH, "uid": ""}, ErrorCode.BAD_FIELD, "uid"),
        ({**AUTH, "uid": "u" * 129}, ErrorCode.BAD_FIELD, "uid"),
        ({**AUTH, "hb": "fast"}, ErrorCode.BAD_FIELD, "hb"),
        ({**AUTH, "hb": True}, ErrorCode.BAD_FIELD, "hb"),
        ({"op": "ack", "ids": "m1"}, ErrorCode.BAD_FIELD, "ids"),
        ({"op": "ack", "ids": ["m"] * 1001}, ErrorCode.BAD_FIELD, "ids"),
        ({"op": "ack", "ids": [""]}, ErrorCode.BAD_FIELD, "ids"),
        ({"op": "join"}, ErrorCode.BAD_FIELD, "room"),
        ({"op": "join", "room": ""}, ErrorCode.BAD_FIELD, "room"),
        ({"op": "join", "room": "r" * 129}, ErrorCode.BAD_FIELD, "room"),
        ({"op": "leave", "room": ["r1"]}, ErrorCode.BAD_FIELD, "room"),
    ],
)
def test_client_message_errors(message, code, mentions):
    with pytest.raises(ProtocolError) as info:
        validate_client(message)
    assert info.value.code is code
    assert mentions in info.value.reason


def test_client_messages_accepted_and_extra_fields_ignored():
    assert validate_client({**AUTH, "device": "", "future": [1]}) == "auth"
    assert validate_client({"op": "ping"}) == "ping"
    assert validate_client({"op": "ack", "ids": ["a", "b"]}) == "ack"
    assert validate_client({"op": "join", "room": "r" * 128}) == "join"
    assert validate_client({"op": "leave", "room": "直播间"}) == "leave"


@given(
    pri=st.sampled_from(["high", "normal", "low"]),
    qos=st.sampled_from([0, 1]),
    body=json_values,
    encoding=st.sampled_from(list(Encoding)),
)
def test_push_survives_every_encoding_and_validates(pri, qos, body, encoding):
    push = {"op": "push", "id": "m1", "type": "chat", "pri": pri, "qos": qos, "ts": 1, "body": body}
    decoded = decode(encode(push, encoding), encoding)
    assert validate_server(decoded) == "push"
    assert decoded == push


@pytest.mark.parametrize(
    "message",
    [
        {"op": "push", "id": "m", "type": "chat", "pri": "urgent", "qos": 0, "ts": 1},
        {"op": "push", "id": "m", "type": "chat", "pri": "high", "qos": 2, "ts": 1},
        {"op": "push", "id": "m", "type": "chat", "pri": "high", "qos": True, "ts": 1},
        {"op": "auth_ok", "conn": "c"},
        {**PUSH, "room": 5},
        {"op": "joined", "room": "r1"},
        {"op": "joined", "room": "r1", "members": -1},
        {"op": "joined", "room": "r1", "members": True},
        {"op": "left"},
        {"op": "batch"},
        {"op": "batch", "msgs": []},
        {"op": "batch", "msgs": PUSH},
        {"op": "batch", "msgs": [PUSH] * 1001},
    ],
)
def test_server_message_errors(message):
    with pytest.raises(ProtocolError) as info:
        validate_server(message)
    assert info.value.code is ErrorCode.BAD_FIELD


@pytest.mark.parametrize(
    ("item", "mentions"),
    [
        ({**PUSH, "pri": "urgent"}, "item 1: push: field 'pri'"),
        ({**PUSH, "room": ""}, "item 1: push: field 'room'"),
        ({k: v for k, v in PUSH.items() if k != "id"}, "item 1: push: missing field 'id'"),
        ({**PUSH, "op": "batch"}, "item 1 must be a map with op 'push'"),
        ({k: v for k, v in PUSH.items() if k != "op"}, "item 1 must be a map with op 'push'"),
        (["push"], "item 1 must be a map"),
    ],
)
def test_batch_checks_every_push(item, mentions):
    with pytest.raises(ProtocolError) as info:
        validate_server({"op": "batch", "msgs": [PUSH, item]})
    assert info.value.code is ErrorCode.BAD_FIELD
    assert info.value.reason.startswith("batch: field 'msgs' ")
    assert mentions in info.value.reason


def test_room_server_messages_accepted():
    assert validate_server({**PUSH, "room": "r1"}) == "push"
    assert validate_server({"op": "joined", "room": "r1", "members": 0}) == "joined"
    assert validate_server({"op": "left", "room": "r1"}) == "left"
    pushes = [{**PUSH, "id": f"m{i}", "room": "r1"} for i in range(1000)]
    assert validate_server({"op": "batch", "msgs": pushes}) == "batch"


def test_error_map_and_fatality():
    err = ProtocolError(ErrorCode.AUTH_FAILED, "token expired")
    assert err.to_map() == {"op": "error", "code": 4001, "reason": "token expired"}
    assert err.fatal
    assert not ProtocolError(ErrorCode.UNKNOWN_OP, "x").fatal
    assert ErrorCode.BAD_FIELD not in FATAL_CODES
    assert validate_server(err.to_map()) == "error"


UP = {"op": "up", "seq": 0, "type": "chat", "body": {"text": "hi"}}


@pytest.mark.parametrize(
    ("message", "mentions"),
    [
        ({k: v for k, v in UP.items() if k != "seq"}, "missing field 'seq'"),
        ({k: v for k, v in UP.items() if k != "type"}, "missing field 'type'"),
        ({k: v for k, v in UP.items() if k != "body"}, "missing field 'body'"),
        ({**UP, "seq": -1}, "'seq'"),
        ({**UP, "seq": 2**53}, "'seq'"),
        ({**UP, "seq": "1"}, "'seq'"),
        ({**UP, "seq": True}, "'seq'"),
        ({**UP, "seq": 1.5}, "'seq'"),
        ({**UP, "type": ""}, "'type'"),
        ({**UP, "type": "t" * 65}, "'type'"),
        ({**UP, "type": 3}, "'type'"),
    ],
)
def test_up_errors(message, mentions):
    with pytest.raises(ProtocolError) as info:
        validate_client(message)
    assert info.value.code is ErrorCode.BAD_FIELD
    assert info.value.reason.startswith("up: ")
    assert mentions in info.value.reason


@pytest.mark.parametrize("body", [None, 0, "", [], {"nested": [1, {"a": None}]}, "x" * 60_000])
def test_up_accepts_any_body_and_the_whole_seq_range(body):
    assert validate_client({**UP, "body": body}) == "up"
    assert validate_client({**UP, "seq": 2**53 - 1, "type": "t" * 64}) == "up"


def test_up_ack_and_error_with_seq():
    assert validate_server({"op": "up_ack", "seq": 7}) == "up_ack"
    refused = {"op": "error", "code": int(ErrorCode.UPSTREAM_BUSY), "reason": "full", "seq": 7}
    assert validate_server(refused) == "error"
    for bad in ({"op": "up_ack"}, {"op": "up_ack", "seq": "7"}, {**refused, "seq": -1}):
        with pytest.raises(ProtocolError) as info:
            validate_server(bad)
        assert info.value.code is ErrorCode.BAD_FIELD


def test_upstream_errors_keep_the_connection():
    assert (int(ErrorCode.UPSTREAM_BUSY), int(ErrorCode.UPSTREAM_RATE)) == (4013, 4014)
    assert ErrorCode.UPSTREAM_BUSY not in FATAL_CODES
    assert ErrorCode.UPSTREAM_RATE not in FATAL_CODES

"""The client SDK against a small in-test room speaking the wire protocol on real sockets."""

from __future__ import annotations

import asyncio
import random
import socket
import time
from collections.abc import Callable
from typing import Any

import pytest
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from im.protocol.codec import SUBPROTOCOLS, Encoding, decode, encode
from im.protocol.errors import ErrorCode
from im.protocol.framing import FrameDecoder, frame
from im.protocol.messages import validate_client
from im.sdk import AuthError, Client, ClientClosed, Message, ServerError, TransportClosed
from im.sdk.client import Backoff, JoinRefused, RecentIds
from im.sdk.transport import Address, WsTransport

FAST = {"backoff_min": 0.01, "backoff_max": 0.05, "connect_timeout": 2.0}


async def eventually(predicate: Callable[[], Any], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


class Peer:
    """One server-side connection, over TCP framing or WebSocket."""

    def __init__(
        self,
        tcp: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None,
        ws: ServerConnection | None = None,
    ) -> None:
        self.tcp = tcp
        self.ws = ws
        self.encoding = Encoding.from_subprotocol(ws.subprotocol) if ws else Encoding.MSGPACK
        self.decoder = FrameDecoder()
        self.ready: list[bytes] = []

    async def recv(self) -> dict:
        if self.ws is not None:
            return decode(await self.ws.recv(decode=False), self.encoding)
        reader = self.tcp[0]
        while not self.ready:
            data = await reader.read(65536)
            if not data:
                raise ConnectionError("peer closed")
            self.ready.extend(self.decoder.feed(data))
        return decode(self.ready.pop(0), Encoding.MSGPACK)

    async def send(self, message: dict) -> None:
        payload = encode(message, self.encoding)
        if self.ws is not None:
            await self.ws.send(payload, text=self.encoding is Encoding.JSON)
        else:
            self.tcp[1].write(frame(payload))
            await self.tcp[1].drain()

    async def close(self, code: int = 1000, reason: str = "") -> None:
        if self.ws is not None:
            await self.ws.close(code, reason)
        else:
            self.tcp[1].close()

    def abort(self) -> None:
        (self.ws.transport if self.ws is not None else self.tcp[1].transport).abort()


def push_map(msg_id: str, *, qos: int = 0, body: Any = None, **extra: Any) -> dict:
    message = {"op": "push", "id": msg_id, "type": "chat", "pri": "normal", "qos": qos}
    return message | {"ts": 1_700_000_000_000, "body": body, **extra}


class Room:
    """Accepts token "good", answers pings (unless `pong` is off), joins and leaves (unless
    `answer_rooms` is off; joins of `refused` rooms with an error), records what it got.
    While `auth_gate` is clear, auth answers wait."""

    def __init__(self, *, hb: float = 30, pong: bool = True, error_frame: bool = True) -> None:
        self.hb = hb
        self.pong = pong
        self.error_frame = error_frame
        self.answer_rooms = True
        self.refused: set[str] = set()
        self.auth_gate = asyncio.Event()
        self.auth_gate.set()
        self.joins: list[tuple[int, str]] = []  # (connection number, room)
        self.leaves: list[str] = []
        self.peers: list[Peer] = []
        self.auths: list[dict] = []
        self.acks: list[str] = []
        self.ack_frames = 0
        self.pings: list[float] = []
        self.subprotocols: list[str | None] = []
        self.server: Any = None
        self.address = ""

    async def start_tcp(self) -> str:
        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await self.serve(Peer(tcp=(reader, writer)))
            writer.close()

        self.server = await asyncio.start_server(accept, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        self.address = f"tcp://127.0.0.1:{port}"
        return self.address

    async def start_ws(self) -> str:
        async def accept(ws: ServerConnection) -> None:
            self.subprotocols.append(ws.subprotocol)
            await self.serve(Peer(ws=ws))

        self.server = await serve(
            accept, "127.0.0.1", 0, subprotocols=list(SUBPROTOCOLS), ping_interval=None
        )
        port = self.server.sockets[0].getsockname()[1]
        self.address = f"ws://127.0.0.1:{port}/ws"
        return self.address

    async def serve(self, peer: Peer) -> None:
        try:
            while True:
                message = await peer.recv()
                op = validate_client(message)
                if op == "auth":
                    self.auths.append(message)
                    if message["token"] != "good":
                        if self.error_frame:
                            await peer.send({"op": "error", "code": 4001, "reason": "bad token"})
                        await peer.close(4001, "bad token")
                        return
                    await self.auth_gate.wait()
                    self.peers.append(peer)
                    await peer.send({"op": "auth_ok", "conn": f"c{len(self.auths)}", "hb": self.hb})
                elif op == "ping":
                    self.pings.append(time.monotonic())
                    if self.pong:
                        await peer.send({"op": "pong"})
                elif op == "ack":
                    self.acks.extend(message["ids"])
                    self.ack_frames += 1
                elif op == "join":
                    await self.on_join(peer, message["room"])
                elif op == "leave":
                    self.leaves.append(message["room"])
                    if self.answer_rooms:
                        await peer.send({"op": "left", "room": message["room"]})
        except (ConnectionError, ConnectionClosed):
            pass

    async def on_join(self, peer: Peer, room: str) -> None:
        self.joins.append((len(self.auths), room))
        if room in self.refused:
            reason = "join: at most 1 rooms per connection"
            await peer.send({"op": "error", "code": int(ErrorCode.BAD_FIELD), "reason": reason})
        elif self.answer_rooms:
            members = sum(1 for _, joined in self.joins if joined == room)
            await peer.send({"op": "joined", "room": room, "members": members})

    async def push(self, msg_id: str, *, qos: int = 0, body: Any = None, **extra: Any) -> None:
        await self.peers[-1].send(push_map(msg_id, qos=qos, body=body, **extra))

    async def batch(self, *pushes: dict) -> None:
        await self.peers[-1].send({"op": "batch", "msgs": list(pushes)})

    def drop(self) -> None:
        for peer in self.peers:
            peer.abort()

    async def stop(self) -> None:
        self.server.close()
        self.drop()
        await self.server.wait_closed()


@pytest.fixture
async def rooms():
    started: list[Room] = []

    async def make(kind: str = "tcp", **options: Any) -> Room:
        room = Room(**options)
        await (room.start_tcp() if kind == "tcp" else room.start_ws())
        started.append(room)
        return room

    yield make
    for room in started:
        await room.stop()


@pytest.fixture
async def clients():
    made: list[Client] = []

    def make(addresses: list[str], **options: Any) -> Client:
        options = {"product": "p1", "uid": "u1", "token": "good", **FAST, **options}
        client = Client(addresses, **options)
        made.append(client)
        return client

    yield make
    for client in made:
        await client.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize(
    ("kind", "encoding"), [("tcp", "msgpack"), ("ws", "msgpack"), ("ws", "json")]
)
async def test_connect_auth_and_receive_push(rooms, clients, kind, encoding):
    room = await rooms(kind)
    client = clients([room.address], device="d1", encoding=encoding)
    assert client.state == "offline"
    await client.connect()
    assert client.connected and client.state == "online"
    assert client.conn_id == "c1"
    assert room.auths == [
        {"op": "auth", "product": "p1", "uid": "u1", "device": "d1", "token": "good"}
    ]
    if kind == "ws":
        assert room.subprotocols == [f"im.v1.{encoding}"]
    await room.push("m1", body={"text": "hi", "n": [1, 2]}, pri="high")
    message = await anext(client)
    assert message == Message("m1", "chat", "high", 0, 1_700_000_000_000, None, {})
    assert message.body == {"text": "hi", "n": [1, 2]}
    assert message.raw["op"] == "push"


@pytest.mark.parametrize("kind", ["tcp", "ws"])
async def test_auth_refused_raises_auth_error(rooms, clients, kind):
    room = await rooms(kind)
    client = clients([room.address], token=lambda: "bad")
    with pytest.raises(AuthError) as caught:
        await client.connect()
    assert caught.value.code == ErrorCode.AUTH_FAILED
    assert client.state == "offline" and not client.connected
    assert len(room.auths) == 1, "an auth refusal is not retried"


async def test_ws_close_code_alone_means_auth_failed(rooms, clients):
    room = await rooms("ws", error_frame=False)
    client = clients([room.address], token="bad")
    with pytest.raises(AuthError) as caught:
        await client.connect()
    assert (caught.value.code, caught.value.reason) == (4001, "bad token")


async def test_ws_transport_reports_server_close_code(rooms):
    room = await rooms("ws")
    transport = await WsTransport.open(room.address, Encoding.MSGPACK)
    await transport.send({"op": "auth", "product": "p", "uid": "u", "token": "bad"})
    assert await transport.recv() == {"op": "error", "code": 4001, "reason": "bad token"}
    with pytest.raises(TransportClosed) as caught:
        await transport.recv()
    assert caught.value.code == 4001
    assert (transport.close_code, transport.close_reason) == (4001, "bad token")
    await transport.close()


async def test_async_token_provider_called_on_each_connect(rooms, clients):
    room = await rooms()
    calls = []

    async def token() -> str:
        calls.append(1)
        return "good"

    client = clients([room.address], token=token)
    await client.connect()
    room.drop()
    await eventually(lambda: len(room.auths) == 2)
    assert len(calls) == 2


async def test_qos1_auto_ack_batched(rooms, clients):
    room = await rooms()
    client = clients([room.address])
    await client.connect()
    await room.push("a1", qos=1)
    assert (await client.recv(timeout=2)).id == "a1"
    await eventually(lambda: room.acks == ["a1"])
    ids = [f"b{i}" for i in range(250)]
    for msg_id in ids:
        await room.push(msg_id, qos=1)
    got = []
    for _ in ids:
        got.append((await client.recv(timeout=2)).id)
        await asyncio.sleep(0)  # let the connection task run between messages
    assert got == ids
    await eventually(lambda: len(room.acks) == 251)
    assert room.acks[1:] == ids
    assert room.ack_frames <= 10, "acks go out in batches, not one frame per message"


async def test_qos0_is_not_acked(rooms, clients):
    room = await rooms()
    client = clients([room.address])
    await client.connect()
    await room.push("z0", qos=0)
    await room.push("z1", qos=1)
    assert [(await client.recv(timeout=2)).id for _ in range(2)] == ["z0", "z1"]
    await eventually(lambda: room.acks == ["z1"])


async def test_manual_ack(rooms, clients):
    room = await rooms()
    client = clients([room.address], auto_ack=False)
    await client.connect()
    await room.push("q1", qos=1)
    message = await client.recv(timeout=2)
    await client.ping()  # a full round trip in which an auto-ack would have gone out
    assert room.acks == []
    await client.ack(message.id)
    await eventually(lambda: room.acks == ["q1"])
    with pytest.raises(ValueError):
        await client.ack("")


async def test_duplicate_qos1_delivered_once_and_reacked(rooms, clients):
    room = await rooms()
    client = clients([room.address])
    await client.connect()
    await room.push("d1", qos=1)
    await room.push("d1", qos=1)  # still queued: dropped, acked once handed out
    assert (await client.recv(timeout=2)).id == "d1"
    await eventually(lambda: room.acks == ["d1"])
    room.drop()
    await eventually(lambda: len(room.auths) == 2 and client.connected)
    await room.push("d1", qos=1)  # redelivery after reconnect
    await room.push("d2", qos=1)
    assert (await client.recv(timeout=2)).id == "d2"
    await eventually(lambda: sorted(room.acks) == ["d1", "d1", "d2"])


async def test_reconnect_to_second_address_when_first_is_down(rooms, clients):
    first = await rooms("tcp")
    second = await rooms("ws")
    client = clients([first.address, second.address])
    await client.connect()
    assert client.conn_id == "c1" and len(first.auths) == 1
    await first.push("before")
    assert (await client.recv(timeout=2)).id == "before"
    await first.stop()
    await eventually(lambda: client.connected and len(second.auths) == 1)
    await second.push("after", qos=1)
    assert (await client.recv(timeout=2)).id == "after"
    await eventually(lambda: second.acks == ["after"])


async def test_connect_tries_every_address_once_then_fails(clients):
    down = [f"tcp://127.0.0.1:{free_port()}", f"ws://127.0.0.1:{free_port()}/ws"]
    client = clients(down)
    with pytest.raises(OSError):
        await client.connect()
    assert client.state == "offline"


async def test_close_while_connecting_fails_connect(clients):
    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # never answers the auth
        writer.close()

    server = await asyncio.start_server(mute, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = clients([f"tcp://127.0.0.1:{port}"])
    connecting = asyncio.create_task(client.connect())
    await asyncio.sleep(0.05)
    await client.close()
    with pytest.raises(ClientClosed):
        await asyncio.wait_for(connecting, 2)
    server.close()
    await server.wait_closed()


async def test_fatal_server_error_reconnects_and_non_fatal_does_not(rooms, clients):
    room = await rooms()
    client = clients([room.address])
    await client.connect()
    await room.peers[-1].send({"op": "error", "code": int(ErrorCode.BAD_FIELD), "reason": "x"})
    await room.push("still")
    assert (await client.recv(timeout=2)).id == "still"
    assert len(room.auths) == 1
    code = int(ErrorCode.SERVER_SHUTDOWN)
    await room.peers[-1].send({"op": "error", "code": code, "reason": "draining"})
    await eventually(lambda: len(room.auths) == 2 and client.connected)


async def test_replaced_stops_the_client(rooms, clients):
    room = await rooms()
    client = clients([room.address])
    await client.connect()
    await room.push("last")
    code = int(ErrorCode.REPLACED)
    await room.peers[-1].send({"op": "error", "code": code, "reason": "replaced"})
    assert (await client.recv(timeout=2)).id == "last"
    with pytest.raises(ServerError) as caught:
        await client.recv(timeout=2)
    assert caught.value.code == ErrorCode.REPLACED
    assert len(room.auths) == 1 and client.state == "offline"


async def test_without_reconnect_a_lost_connection_ends_the_iterator(rooms, clients):
    room = await rooms()
    client = clients([room.address], reconnect=False)
    await client.connect()
    await room.push("only")
    room.drop()
    assert (await client.recv(timeout=2)).id == "only"
    with pytest.raises(ConnectionError):
        await client.recv(timeout=2)
    assert len(room.auths) == 1 and client.state == "offline"


async def test_auth_refused_on_reconnect_reaches_the_iterator(rooms, clients):
    room = await rooms()
    tokens = iter(["good", "bad"])
    client = clients([room.address], token=lambda: next(tokens))
    await client.connect()
    room.drop()
    with pytest.raises(AuthError) as caught:
        async for _ in client:
            pass
    assert caught.value.code == 4001
    assert len(room.auths) == 2


async def test_unknown_ops_and_invalid_frames_are_ignored(rooms, clients):
    room = await rooms("ws", hb=30)
    client = clients([room.address], encoding="json")
    await client.connect()
    peer = room.peers[-1]
    await peer.send({"op": "future_op", "x": 1})
    await peer.send({"op": "push", "id": "bad", "type": "t", "pri": "urgent", "qos": 0, "ts": 1})
    await room.push("ok")
    assert (await client.recv(timeout=2)).id == "ok"
    assert client.connected and len(room.auths) == 1


async def test_full_queue_drops_qos0_and_leaves_qos1_unacked(rooms, clients):
    room = await rooms()
    client = clients([room.address], queue_size=2)
    await client.connect()
    for msg_id, qos in [("f1", 0), ("f2", 0), ("f3", 0), ("f4", 1)]:
        await room.push(msg_id, qos=qos)
    await client.ping()  # every push above has been read by now
    assert client.dropped == 1
    assert [(await client.recv(timeout=2)).id for _ in range(2)] == ["f1", "f2"]
    await room.push("f4", qos=1)  # the redelivery is not a duplicate: it was never queued
    assert (await client.recv(timeout=2)).id == "f4"
    await eventually(lambda: room.acks == ["f4"])


async def test_ping_round_trip(rooms, clients):
    room = await rooms()
    client = clients([room.address])
    with pytest.raises(ConnectionError):
        await client.ping()
    await client.connect()
    rtt = await client.ping()
    assert 0 < rtt < 1
    assert len(room.pings) == 1


async def test_heartbeat_pings_keep_the_connection(rooms, clients):
    room = await rooms(hb=1)
    client = clients([room.address])
    await client.connect()
    await eventually(lambda: len(room.pings) >= 3, timeout=4)
    gaps = [b - a for a, b in zip(room.pings, room.pings[1:], strict=False)]
    assert all(0.8 < gap < 1.5 for gap in gaps), gaps
    assert client.connected and len(room.auths) == 1


async def test_silent_server_triggers_reconnect(rooms, clients):
    room = await rooms(hb=1, pong=False)
    client = clients([room.address])
    await client.connect()
    start = time.monotonic()
    await eventually(lambda: len(room.auths) == 2, timeout=5)
    assert 2.8 < time.monotonic() - start < 4.5
    assert len(room.pings) >= 2


async def test_close_ends_the_iterator(rooms, clients):
    room = await rooms()
    client = clients([room.address])
    await client.connect()
    await room.push("c1")
    got = []

    async def consume() -> None:
        async for message in client:
            got.append(message.id)

    task = asyncio.create_task(consume())
    await eventually(lambda: got == ["c1"])
    await client.close()
    await asyncio.wait_for(task, 2)
    assert client.state == "closed" and not client.connected and client.conn_id is None
    with pytest.raises(ClientClosed):
        await client.recv()
    with pytest.raises(RuntimeError):
        await client.connect()
    await eventually(lambda: room.peers[-1].tcp[1].is_closing())


async def test_recv_timeout(rooms, clients):
    room = await rooms()
    client = clients([room.address])
    await client.connect()
    with pytest.raises(TimeoutError):
        await client.recv(timeout=0.05)


@pytest.mark.parametrize(("kind", "encoding"), [("tcp", "msgpack"), ("ws", "json")])
async def test_join_push_and_leave(rooms, clients, kind, encoding):
    room = await rooms(kind)
    client = clients([room.address], encoding=encoding)
    await client.connect()
    assert await client.join("r1") == 1
    assert await client.join("r1") == 2, "a repeated join is answered again"
    assert await client.join("r2") == 1
    assert room.joins == [(1, "r1"), (1, "r1"), (1, "r2")]
    assert client.rooms == ["r1", "r2"]
    await room.push("m1", room="r1")
    await room.push("m2")
    first, second = await client.recv(timeout=2), await client.recv(timeout=2)
    assert (first.id, first.room, second.id, second.room) == ("m1", "r1", "m2", None)
    await client.leave("r1")
    assert room.leaves == ["r1"] and client.rooms == ["r2"]


async def test_rooms_are_joined_again_after_a_reconnect(rooms, clients):
    room = await rooms()
    client = clients([room.address])
    await client.connect()
    for name in ("r1", "r2", "r3"):
        await client.join(name)
    await client.leave("r2")
    room.drop()
    await eventually(lambda: len(room.joins) == 5)
    assert room.joins[3:] == [(2, "r1"), (2, "r3")]
    assert client.rooms == ["r1", "r3"]


async def test_join_while_reconnecting_completes_after_auth(rooms, clients):
    room = await rooms()
    client = clients([room.address])
    await client.connect()
    room.auth_gate.clear()
    room.drop()
    await eventually(lambda: len(room.auths) == 2)
    joining = asyncio.create_task(client.join("r1", timeout=3))
    gone = asyncio.create_task(client.join("gone", timeout=3))
    await asyncio.sleep(0.05)
    assert not joining.done() and not client.connected
    await client.leave("gone")  # offline: never sent, and its pending join fails
    with pytest.raises(ConnectionError):
        await gone
    room.auth_gate.set()
    assert await joining == 1
    assert room.joins == [(2, "r1")], "joined once, by the join or by the re-join"
    assert room.leaves == []


async def test_refused_join_raises_and_is_forgotten(rooms, clients):
    room = await rooms()
    room.refused = {"big"}
    client = clients([room.address])
    await client.connect()
    with pytest.raises(JoinRefused) as caught:
        await client.join("big")
    assert (caught.value.room, caught.value.code) == ("big", ErrorCode.BAD_FIELD)
    assert "at most" in caught.value.reason
    assert await client.join("small") == 1, "the next answer goes to the next join"
    assert client.rooms == ["small"] and client.connected


async def test_unanswered_join_and_leave_time_out(rooms, clients):
    room = await rooms()
    room.answer_rooms = False
    client = clients([room.address])
    await client.connect()
    with pytest.raises(TimeoutError):
        await client.join("r1", timeout=0.1)
    assert client.rooms == []
    with pytest.raises(TimeoutError):
        await client.leave("r1", timeout=0.1)
    assert room.joins == [(1, "r1")] and room.leaves == ["r1"]


async def test_pending_room_calls_end_with_the_connection(rooms, clients):
    room = await rooms()
    room.answer_rooms = False
    client = clients([room.address], reconnect=False)
    await client.connect()
    leaving = asyncio.create_task(client.leave("r0"))
    joining = asyncio.create_task(client.join("r1"))
    await eventually(lambda: len(room.joins) == 1 and len(room.leaves) == 1)
    room.drop()
    assert await asyncio.wait_for(leaving, 2) is None, "the membership ended with the connection"
    with pytest.raises(ConnectionError, match="client stopped"):
        await asyncio.wait_for(joining, 2)
    with pytest.raises(ConnectionError):
        await client.join("r2")


async def test_room_argument_errors(rooms, clients):
    room = await rooms()
    client = clients([room.address])
    with pytest.raises(ConnectionError):
        await client.join("r1")
    await client.leave("r1")  # nothing to leave: no error
    await client.connect()
    for bad in ("", "r" * 129, 7):
        with pytest.raises(ValueError):
            await client.join(bad)
    await client.close()
    with pytest.raises(ClientClosed):
        await client.join("r1")
    assert room.joins == [] and room.leaves == []


async def test_batch_frame_delivers_each_push_like_a_lone_one(rooms, clients):
    room = await rooms()
    client = clients([room.address])
    await client.connect()
    await room.batch(
        push_map("b1", room="r1"),
        push_map("b2", qos=1, room="r1"),
        push_map("b2", qos=1, room="r1"),
        push_map("b3", qos=1, body={"n": 3}),
    )
    got = [await client.recv(timeout=2) for _ in range(3)]
    assert [(m.id, m.qos, m.room) for m in got] == [
        ("b1", 0, "r1"),
        ("b2", 1, "r1"),
        ("b3", 1, None),
    ]
    assert got[2].body == {"n": 3} and got[0].raw["op"] == "push"
    await eventually(lambda: sorted(room.acks) == ["b2", "b3"])
    await room.push("b3", qos=1)  # already delivered inside the batch: acked, not delivered
    await room.batch(push_map("x1"), push_map("x2", pri="urgent"))  # invalid: dropped whole
    await room.batch(push_map("b4"))
    assert (await client.recv(timeout=2)).id == "b4"
    await eventually(lambda: sorted(room.acks) == ["b2", "b3", "b3"])
    assert client.connected and len(room.auths) == 1


@pytest.mark.parametrize(
    ("addresses", "options"),
    [
        (["http://h:1"], {}),
        (["tcp://h"], {}),
        ([], {}),
        (["tcp://h:1"], {"encoding": "json"}),
        (["ws://h:1/ws"], {"encoding": "xml"}),
        (["ws://h:1/ws"], {"uid": ""}),
        (["ws://h:1/ws"], {"backoff_min": 0}),
    ],
)
def test_bad_arguments_are_refused(addresses, options):
    with pytest.raises(ValueError):
        Client(addresses, **{"product": "p", "uid": "u", "token": "t", **options})


def test_address_parse():
    assert Address.parse("wss://gw.example:8443/ws").port == 8443
    assert Address.parse("ws://gw.example/ws").port == 80
    assert Address.parse("tcp://127.0.0.1:9000") == Address(
        "tcp", "127.0.0.1", 9000, "tcp://127.0.0.1:9000"
    )


def test_backoff_full_jitter_within_bounds():
    backoff = Backoff(0.2, 10.0, random.Random(7))
    for attempt in range(40):
        cap = min(10.0, 0.2 * 2 ** (attempt + 1))
        delays = [backoff.delay(attempt) for _ in range(50)]
        assert all(0.2 <= d <= cap for d in delays)
    assert max(backoff.delay(30) for _ in range(200)) > 5


def test_recent_ids_are_bounded_lru():
    seen = RecentIds(size=3)
    for msg_id in "abc":
        seen.put(msg_id, 0)
    assert seen.get("a") == 0  # refreshes "a"
    seen.put("d", 0)
    assert seen.get("b") is None
    assert [seen.get(x) for x in "acd"] == [0, 0, 0]

"""room.limits without sockets: a fake clock and plain objects stand in for connections."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import pytest

from im.protocol.errors import ErrorCode
from room.config import RoomConfig
from room.limits import Limits, LimitSettings, address_key, networks


@dataclass(eq=False)
class Conn:
    ip: str = ""
    tat: float = 0.0
    partial_at: float = 0.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(**settings: object) -> tuple[Limits, Clock]:
    clock = Clock()
    return Limits(LimitSettings(**settings), clock), clock  # type: ignore[arg-type]


# -- addresses -------------------------------------------------------------------------


def test_networks_parse_cidrs_and_bare_addresses() -> None:
    found = networks(" 10.0.0.0/8, 192.0.2.7 ,2001:db8::/32,")
    assert found == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("192.0.2.7/32"),
        ipaddress.ip_network("2001:db8::/32"),
    )
    assert networks("") == ()


def test_a_bad_network_names_the_setting() -> None:
    with pytest.raises(ValueError, match=r"ip_deny: '10\.0\.0\.300/8'"):
        networks("10.0.0.0/8,10.0.0.300/8", "ip_deny")


def test_ipv6_clients_are_counted_by_their_64() -> None:
    a = ipaddress.ip_address("2001:db8:1:2::1")
    b = ipaddress.ip_address("2001:db8:1:2:ffff::9")
    c = ipaddress.ip_address("2001:db8:1:3::1")
    assert address_key(a) == address_key(b) == "2001:db8:1:2::/64"
    assert address_key(c) != address_key(a)
    assert address_key(ipaddress.ip_address("198.51.100.4")) == "198.51.100.4"


def test_room_config_checks_the_limit_settings() -> None:
    with pytest.raises(ValueError, match="ip_allow"):
        RoomConfig(ip_allow="not-a-network")
    with pytest.raises(ValueError, match="tls_cert and tls_key"):
        RoomConfig(tls_cert="cert.pem")
    with pytest.raises(ValueError, match="frame_rate"):
        RoomConfig(frame_rate=-1)
    with pytest.raises(ValueError, match="slow_reader_s"):
        RoomConfig(slow_reader_s=0)
    settings = LimitSettings.from_config(RoomConfig(ip_deny="203.0.113.0/24", frame_rate=5))
    assert settings.deny == (ipaddress.ip_network("203.0.113.0/24"),)
    assert settings.frame_rate == 5
    assert settings.exempt == networks("127.0.0.0/8,::1/128")  # the default


# -- allow and deny ----------------------------------------------------------------------


def test_deny_wins_over_allow() -> None:
    limits, _ = make(allow=networks("10.0.0.0/8"), deny=networks("10.1.0.0/16"))
    assert limits.opened(Conn(), "10.2.3.4") is None
    code, reason = limits.opened(Conn(), "10.1.9.9") or (None, "")
    assert code is ErrorCode.ADDRESS_DENIED and "may not connect" in reason
    assert limits.opened(Conn(), "192.0.2.1") == limits.opened(Conn(), "192.0.2.2")
    assert limits.opened(Conn(), "192.0.2.1") is not None  # off the allow list
    assert limits.counts["address_denied"] == 4


def test_the_deny_list_applies_to_exempt_and_mapped_addresses() -> None:
    limits, _ = make(exempt=networks("127.0.0.0/8"), deny=networks("127.0.0.2"))
    assert limits.opened(Conn(), "127.0.0.2") is not None
    assert limits.opened(Conn(), "::ffff:127.0.0.2") is not None  # IPv4 over an IPv6 socket
    assert limits.opened(Conn(), "127.0.0.1") is None


def test_a_peer_without_an_ip_is_let_in_uncounted() -> None:
    limits, _ = make(max_conns_per_ip=1, deny=networks("0.0.0.0/0"))
    conn = Conn()
    assert limits.opened(conn, None) is None
    assert limits.opened(conn, "") is None
    assert conn.ip == "" and limits.per_address == {}


# -- connections per address -------------------------------------------------------------


def test_connections_per_address_are_capped_and_released() -> None:
    limits, _ = make(max_conns_per_ip=2)
    first, second, third = Conn(), Conn(), Conn()
    assert limits.opened(first, "198.51.100.1") is None
    assert limits.opened(second, "198.51.100.1") is None
    refusal = limits.opened(third, "198.51.100.1")
    assert refusal is not None and refusal[0] is ErrorCode.TOO_MANY_CONNECTIONS
    assert third.ip == ""  # a refused connection is not counted, so closing it frees nothing
    assert limits.opened(Conn(), "198.51.100.2") is None  # other addresses are not affected
    limits.closed(third)
    limits.closed(first)
    limits.closed(first)  # closing twice releases once
    assert limits.per_address == {"198.51.100.1": 1, "198.51.100.2": 1}
    assert limits.opened(third, "198.51.100.1") is None
    assert limits.counts["connections_per_address"] == 1


def test_ipv6_addresses_of_one_64_share_the_cap() -> None:
    limits, _ = make(max_conns_per_ip=1)
    assert limits.opened(Conn(), "2001:db8::1") is None
    assert limits.opened(Conn(), "2001:db8::2") is not None
    assert limits.opened(Conn(), "2001:db8:0:1::1") is None


def test_exempt_addresses_skip_the_count_and_the_rate() -> None:
    limits, _ = make(max_conns_per_ip=1, conn_rate_per_ip=1, exempt=networks("127.0.0.0/8"))
    assert all(limits.opened(Conn(), "127.0.0.1") is None for _ in range(50))
    assert limits.per_address == {}


# -- new connections per second ----------------------------------------------------------


def test_new_connections_per_address_burst_twice_the_rate_then_recover() -> None:
    limits, clock = make(conn_rate_per_ip=5)
    admitted = [limits.opened(Conn(), "192.0.2.1") is None for _ in range(20)]
    assert admitted == [True] * 10 + [False] * 10
    refusal = limits.opened(Conn(), "192.0.2.1")
    assert refusal is not None and refusal[0] is ErrorCode.CONNECTION_RATE
    assert limits.opened(Conn(), "192.0.2.9") is None  # per address
    clock.now += 0.2  # one interval at 5 a second
    assert limits.opened(Conn(), "192.0.2.1") is None
    assert limits.opened(Conn(), "192.0.2.1") is not None
    clock.now += 2.0
    assert sum(limits.opened(Conn(), "192.0.2.1") is None for _ in range(20)) == 10


def test_recovered_addresses_are_forgotten_and_the_table_is_bounded() -> None:
    limits, clock = make(conn_rate_per_ip=1, max_addresses=3)
    for i in range(5):
        assert limits.opened(Conn(), f"192.0.2.{i}") is None
    assert limits.tracked_addresses == 3
    assert limits.counts["address_table_full"] == 2  # let in, unmetered
    clock.now += 10
    limits.expired()
    assert limits.tracked_addresses == 0


# -- frames per connection ---------------------------------------------------------------


def test_frames_per_connection_burst_twice_the_rate() -> None:
    limits, clock = make(frame_rate=10)
    conn = Conn()
    allowed = [limits.frame_allowed(conn) for _ in range(30)]
    assert allowed == [True] * 20 + [False] * 10
    assert limits.counts["frame_rate"] == 10
    clock.now += 0.5
    assert sum(limits.frame_allowed(conn) for _ in range(10)) == 5
    other = Conn()
    assert limits.frame_allowed(other)  # each connection has its own schedule


def test_a_steady_sender_at_the_rate_is_never_refused() -> None:
    limits, clock = make(frame_rate=100)
    conn = Conn()
    for _ in range(10_000):
        clock.now += 0.01
        assert limits.frame_allowed(conn)


def test_zero_frame_rate_is_no_limit() -> None:
    limits, _ = make(frame_rate=0)
    conn = Conn()
    assert all(limits.frame_allowed(conn) for _ in range(100_000))
    assert conn.tat == 0.0


# -- slow readers and slow senders -------------------------------------------------------


def test_a_connection_paused_past_the_deadline_is_a_slow_reader() -> None:
    limits, clock = make(slow_reader_s=5)
    stuck, recovered = Conn(), Conn()
    limits.writable(stuck, False)
    limits.writable(recovered, False)
    clock.now += 3
    limits.writable(stuck, False)  # paused again: the first pause still counts
    limits.writable(recovered, True)
    assert limits.paused == 1
    clock.now += 1.9
    assert limits.expired() == []
    clock.now += 0.2
    [(conn, code, reason)] = limits.expired()
    assert conn is stuck and code is ErrorCode.SLOW_CONSUMER and "did not read" in reason
    assert limits.counts["slow_reader"] == 1
    limits.closed(stuck)
    assert limits.paused == 0 and limits.expired() == []


def test_half_a_frame_held_past_the_deadline_is_a_slow_sender() -> None:
    limits, clock = make(slow_sender_s=2)
    trickle, finished = Conn(), Conn()
    limits.partial(trickle, True)
    limits.partial(finished, True)
    started = clock.now
    clock.now += 1.5
    limits.partial(trickle, True)  # more bytes, still not whole: the clock keeps running
    limits.partial(finished, False)
    assert trickle.partial_at == started and finished.partial_at == 0.0
    clock.now += 0.5
    [(conn, code, _)] = limits.expired()
    assert conn is trickle and code is ErrorCode.SLOW_SENDER
    assert limits.counts["slow_sender"] == 1
    limits.closed(trickle)
    assert trickle.partial_at == 0.0 and limits.expired() == []

"""The dispatcher's pure rules: ordering, stickiness, spread, IDC fallback, saturation, and
the query parser. No sockets."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from multidict import MultiDict

from dispatcher.errors import ApiError
from dispatcher.query import MAX_RETRY, parse_route_query
from dispatcher.route import (
    EXHAUSTED,
    NO_NODES,
    OK,
    SATURATED,
    RouteQuery,
    plan,
    retry_after_ms,
    score,
    user_key,
)
from im.sessions import Node

LIMIT = 64
UIDS = [f"u{i}" for i in range(10_000)]


def node(name: str, idc: str = "a", **fields: object) -> Node:
    return Node(name, rpc="", ws=f"ws://{name}/ws", tcp=f"{name}:1", idc=idc, **fields)


def ws(name: str) -> str:
    return f"ws://{name}/ws"


def cluster(count: int, idc: str = "a", prefix: str = "r") -> list[Node]:
    return [node(f"{prefix}{i}", idc) for i in range(count)]


def first(nodes: list[Node], uid: str, **query: object) -> str:
    answer = plan(nodes, RouteQuery("p", uid, **query), LIMIT)
    assert answer.outcome == OK
    return answer.addresses[0]


def assert_even(counts: Counter, buckets: int, total: int, tolerance: float) -> None:
    assert len(counts) == buckets
    expected = total / buckets
    for key, count in counts.items():
        assert abs(count - expected) <= tolerance * expected, (key, count, expected)


def test_the_hash_is_pinned() -> None:
    # Changing it would move every user to another instance on the next deploy.
    assert user_key("p", "u1").hex() == "cf8bd47712beedc1"
    assert score(user_key("p", "u1"), "r0") == 0xC944FE54AFAFCB01


def test_first_choice_is_sticky_whatever_the_table_order() -> None:
    nodes = cluster(8)
    for uid in UIDS[:200]:
        chosen = first(nodes, uid)
        shuffled = nodes[:]
        random.Random(uid).shuffle(shuffled)
        assert first(shuffled, uid) == chosen


def test_first_choices_spread_evenly_over_instances() -> None:
    nodes = cluster(10)
    assert_even(Counter(first(nodes, uid) for uid in UIDS), 10, len(UIDS), 0.10)


def test_each_answer_lists_every_usable_instance_once() -> None:
    nodes = cluster(10)
    answer = plan(nodes, RouteQuery("p", "u1"), LIMIT)
    assert sorted(answer.addresses) == sorted(ws(n.instance) for n in nodes)


def test_losing_the_top_instance_spreads_each_users_next_choice() -> None:
    # For each user, its first choice fails: the next ones must spread over the other
    # instances, not all land on one neighbour.
    nodes = cluster(10)
    moved = Counter()
    seconds = Counter()
    for uid in UIDS:
        top, second = plan(nodes, RouteQuery("p", uid), LIMIT).addresses[:2]
        after = first(nodes, uid, retry=frozenset({top}))
        assert after == second
        moved[after] += 1
        seconds[(top, second)] += 1
    assert_even(moved, 10, len(UIDS), 0.10)
    assert len(seconds) == 90  # every (top, next) pair occurs


def test_a_dead_instance_s_users_spread_over_all_others_and_nobody_else_moves() -> None:
    nodes = cluster(10)
    before = {uid: first(nodes, uid) for uid in UIDS}
    dead = ws("r3")
    alive = [n for n in nodes if n.instance != "r3"]
    victims = [uid for uid, address in before.items() if address == dead]
    after = {uid: first(alive, uid) for uid in UIDS}
    assert all(after[uid] == before[uid] for uid in UIDS if before[uid] != dead)
    assert_even(Counter(after[uid] for uid in victims), 9, len(victims), 0.30)


def test_a_new_instance_takes_its_share_from_every_other() -> None:
    nodes = cluster(9)
    before = {uid: first(nodes, uid) for uid in UIDS}
    after = {uid: first([*nodes, node("r9")], uid) for uid in UIDS}
    moved = [uid for uid in UIDS if after[uid] != before[uid]]
    assert all(after[uid] == ws("r9") for uid in moved)
    assert abs(len(moved) - len(UIDS) / 10) <= 0.15 * len(UIDS) / 10
    assert_even(Counter(before[uid] for uid in moved), 9, len(moved), 0.35)


def test_the_client_s_idc_comes_first_then_the_others() -> None:
    nodes = cluster(3, "a", "a") + cluster(4, "b", "b")
    for uid in UIDS[:100]:
        addresses = plan(nodes, RouteQuery("p", uid, idc="b"), LIMIT).addresses
        assert [a[5] for a in addresses] == ["b"] * 4 + ["a"] * 3


def test_a_client_without_idc_is_at_home_everywhere() -> None:
    nodes = cluster(5, "a", "a") + cluster(5, "b", "b")
    firsts = Counter(first(nodes, uid)[5] for uid in UIDS[:2000])
    assert_even(firsts, 2, 2000, 0.10)


def test_an_unknown_idc_is_offered_every_instance() -> None:
    nodes = cluster(2, "a", "a") + cluster(2, "b", "b")
    assert len(plan(nodes, RouteQuery("p", "u1", idc="zz"), LIMIT).addresses) == 4


def test_same_isp_first_within_each_idc() -> None:
    nodes = [
        node("a-tel", "a", isp="tel"),
        node("a-uni", "a", isp="uni"),
        node("b-tel", "b", isp="tel"),
        node("b-uni", "b", isp="uni"),
    ]
    for uid in UIDS[:50]:
        addresses = plan(nodes, RouteQuery("p", uid, idc="a", isp="uni"), LIMIT).addresses
        assert addresses == (ws("a-uni"), ws("a-tel"), ws("b-uni"), ws("b-tel"))


def test_retry_excludes_failed_addresses_then_falls_back_to_other_idcs() -> None:
    nodes = cluster(2, "a", "a") + cluster(2, "b", "b")
    query = RouteQuery("p", "u1", idc="a", retry=frozenset({ws("a0")}))
    assert plan(nodes, query, LIMIT).addresses[0] == ws("a1")
    query = RouteQuery("p", "u1", idc="a", retry=frozenset({ws("a0"), ws("a1")}))
    addresses = plan(nodes, query, LIMIT).addresses
    assert sorted(addresses) == [ws("b0"), ws("b1")]


def test_retrying_every_address_is_exhausted() -> None:
    nodes = cluster(2)
    answer = plan(nodes, RouteQuery("p", "u1", retry=frozenset(map(ws, ["r0", "r1"]))), LIMIT)
    assert answer.outcome == EXHAUSTED
    assert answer.addresses == ()


@pytest.mark.parametrize(
    "limits",
    [
        {"draining": True},
        {"max_conns": 10, "conns": 10},
        {"max_conns": 10, "conns": 11},
        {"max_conn_rate": 50.0, "conn_rate": 50.0},
    ],
)
def test_draining_and_limited_instances_are_skipped(limits: dict) -> None:
    nodes = [node("busy", **limits), node("free")]
    for uid in UIDS[:50]:
        assert plan(nodes, RouteQuery("p", uid), LIMIT).addresses == (ws("free"),)


def test_instances_below_their_limits_or_without_limits_are_offered() -> None:
    nodes = [
        node("r0", max_conns=10, conns=9),
        node("r1", max_conn_rate=50.0, conn_rate=49.9),
        node("r2", conns=10**6, conn_rate=10**4),
    ]
    assert len(plan(nodes, RouteQuery("p", "u1"), LIMIT).addresses) == 3


def test_saturation_when_every_instance_is_closed() -> None:
    full = [node("r0", max_conns=1, conns=1), node("r1", draining=True)]
    answer = plan(full, RouteQuery("p", "u1"), LIMIT)
    assert (answer.outcome, answer.addresses, answer.pressure) == (SATURATED, (), 1.0)
    just_at_rate = [node("r0", max_conn_rate=10.0, conn_rate=10.0)]
    assert plan(just_at_rate, RouteQuery("p", "u1"), LIMIT).pressure == 0.0
    rate_half_over = [node("r0", max_conn_rate=10.0, conn_rate=15.0)]
    assert plan(rate_half_over, RouteQuery("p", "u1"), LIMIT).pressure == pytest.approx(0.5)
    far_over = [node("r0", max_conn_rate=10.0, conn_rate=100.0)]
    assert plan(far_over, RouteQuery("p", "u1"), LIMIT).pressure == 1.0


def test_saturation_counts_only_instances_not_retried() -> None:
    nodes = [node("r0"), node("r1", draining=True)]
    answer = plan(nodes, RouteQuery("p", "u1", retry=frozenset({ws("r0")})), LIMIT)
    assert answer.outcome == SATURATED


def test_no_nodes_when_the_table_is_empty_or_lacks_the_transport() -> None:
    assert plan([], RouteQuery("p", "u1"), LIMIT).outcome == NO_NODES
    ws_only = [Node("r0", rpc="", ws="ws://r0/ws")]
    assert plan(ws_only, RouteQuery("p", "u1", transport="tcp"), LIMIT).outcome == NO_NODES


def test_tcp_answers_tcp_urls_of_the_instances_that_serve_it() -> None:
    nodes = [node("r0"), Node("r1", rpc="", ws="ws://r1/ws")]
    answer = plan(nodes, RouteQuery("p", "u1", transport="tcp"), LIMIT)
    assert answer.addresses == ("tcp://r0:1",)


def test_the_list_is_capped_and_duplicates_are_dropped() -> None:
    nodes = cluster(10)
    assert len(plan(nodes, RouteQuery("p", "u1"), 3).addresses) == 3
    twins = [node("r0"), Node("r1", rpc="", ws=ws("r0"))]
    assert plan(twins, RouteQuery("p", "u1"), LIMIT).addresses == (ws("r0"),)


def test_users_of_other_products_are_hashed_apart() -> None:
    nodes = cluster(10)
    differ = sum(
        first(nodes, uid) != plan(nodes, RouteQuery("q", uid), LIMIT).addresses[0]
        for uid in UIDS[:1000]
    )
    assert 800 <= differ <= 980  # about 9 in 10 for independent hashes


def test_retry_after_stays_in_its_window_and_widens_with_pressure() -> None:
    assert retry_after_ms(0.0, 0.0, 500, 5000) == 500
    assert retry_after_ms(0.0, 0.999999, 500, 5000) == 999
    assert retry_after_ms(1.0, 0.999999, 500, 5000) == 4999
    assert retry_after_ms(0.5, 0.999999, 500, 5000) == 2749
    rng = random.Random(7)
    waits = [retry_after_ms(1.0, rng.random(), 500, 5000) for _ in range(1000)]
    assert min(waits) >= 500 and max(waits) < 5000
    assert_even(Counter((w - 500) // 900 for w in waits), 5, 1000, 0.25)  # uniform over the window
    assert retry_after_ms(0.0, 0.5, 800, 1000) == 900  # the window never passes high_ms


def query(**params: str | list[str]) -> MultiDict[str]:
    pairs = MultiDict[str]()
    for name, value in params.items():
        for one in value if isinstance(value, list) else [value]:
            pairs.add(name, one)
    return pairs


def test_parse_a_full_query() -> None:
    parsed = parse_route_query(
        query(
            product="p",
            uid="u1",
            transport="tcp",
            idc="a",
            isp="tel",
            retry=["tcp://x:1", "tcp://y:1"],
            later="ignored",
        )
    )
    assert parsed == RouteQuery("p", "u1", "tcp", "a", "tel", frozenset({"tcp://x:1", "tcp://y:1"}))


def test_parse_defaults_to_ws() -> None:
    assert parse_route_query(query(product="p", uid="u")) == RouteQuery("p", "u")
    assert parse_route_query(query(product="p", uid="u", transport="")).transport == "ws"


@pytest.mark.parametrize(
    ("params", "named", "problem"),
    [
        ({"uid": "u"}, "product", "is missing"),
        ({"product": "p"}, "uid", "is missing"),
        ({"product": "", "uid": "u"}, "product", "is missing"),
        ({"product": "p", "uid": "u", "transport": "udp"}, "transport", "must be one of ws, tcp"),
        ({"product": "p" * 65, "uid": "u"}, "product", "longer than 64"),
        ({"product": "p", "uid": "u" * 129}, "uid", "longer than 128"),
        ({"product": "p", "uid": "u", "idc": "i" * 65}, "idc", "longer than 64"),
        ({"product": "p", "uid": "u\n"}, "uid", "control characters"),
        ({"product": ["p", "q"], "uid": "u"}, "product", "more than once"),
        ({"product": "p", "uid": "u", "retry": [""]}, "retry", "address of 1 to 256"),
        ({"product": "p", "uid": "u", "retry": ["x" * 257]}, "retry", "address of 1 to 256"),
        (
            {"product": "p", "uid": "u", "retry": [f"ws://h{i}" for i in range(MAX_RETRY + 1)]},
            "retry",
            f"at most {MAX_RETRY}",
        ),
    ],
)
def test_parse_refuses_bad_parameters_by_name(params: dict, named: str, problem: str) -> None:
    with pytest.raises(ApiError) as caught:
        parse_route_query(query(**params))
    assert caught.value.status == 400
    assert caught.value.code == "bad_request"
    assert f"parameter {named!r}" in caught.value.message
    assert problem in caught.value.message

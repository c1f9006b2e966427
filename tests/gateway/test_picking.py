"""Picking and affinity as functions of load: least outstanding pairs by two choices, the servers'
reported queue depth counted while fresh, and bounded-load consistent hashing on the query."""

from __future__ import annotations

import random
from collections import Counter

from reranker.gateway.affinity import Affinity
from reranker.gateway.directory import Endpoint
from reranker.gateway.picking import Loads, parse_load_header

ENDPOINTS = [Endpoint(url=f"http://10.0.0.{i}:8000", name=f"pod-{i}") for i in range(4)]


def test_the_load_header_is_read() -> None:
    assert parse_load_header("TEXT named_metrics.queue_pairs=12, named_metrics.inflight_requests=3") == 12
    assert parse_load_header("TEXT cpu_utilization=0.5") is None
    assert parse_load_header("garbage") is None


def test_two_choices_never_pick_the_most_loaded() -> None:
    loads = Loads(rng=random.Random(1))
    for i, endpoint in enumerate(ENDPOINTS):
        loads.start(endpoint, 100 * i)  # pod-3 carries the most pairs
    picks = Counter(loads.pick(ENDPOINTS).name for _ in range(2000))  # type: ignore[union-attr]
    assert picks["pod-3"] == 0
    assert picks["pod-0"] > picks["pod-1"] > picks["pod-2"] > 0  # P2C: lighter endpoints more often, not only the lightest


def test_reported_queue_depth_counts_while_fresh() -> None:
    loads = Loads(report_seconds=60, rng=random.Random(2))
    a, b = ENDPOINTS[:2]
    loads.start(a, 10)
    loads.finish(a, 10, header="TEXT named_metrics.queue_pairs=500, named_metrics.inflight_requests=9")
    assert loads.load(a) == 500  # other gateways' work on a
    assert all(loads.pick([a, b]) == b for _ in range(50))
    stale = Loads(report_seconds=0.0)
    stale.finish(a, 0, header="TEXT named_metrics.queue_pairs=500")
    assert stale.load(a, now=10**9) == 0


def test_retries_exclude_tried_endpoints_and_ejected_ones_come_last() -> None:
    loads = Loads(rng=random.Random(3))
    assert loads.pick(ENDPOINTS[:2], exclude={ENDPOINTS[0].url}) == ENDPOINTS[1]
    assert loads.pick(ENDPOINTS[:2], exclude={e.url for e in ENDPOINTS[:2]}) is None
    loads.eject(ENDPOINTS[0])
    assert all(loads.pick(ENDPOINTS[:2]) == ENDPOINTS[1] for _ in range(20))
    assert loads.pick(ENDPOINTS[:1]) == ENDPOINTS[0]  # the only one left is still tried


def test_a_query_keeps_its_endpoint_while_under_the_bound() -> None:
    affinity = Affinity(balance=0.25)
    loads = Loads()
    homes = {}
    for q in range(200):
        endpoint, home = affinity.pick(f"query {q}", ENDPOINTS, loads.load, ENDPOINTS)  # type: ignore[misc]
        assert home
        homes[q] = endpoint
        assert affinity.pick(f"query {q}", ENDPOINTS, loads.load, ENDPOINTS)[0] == endpoint  # type: ignore[index]
    shares = Counter(e.name for e in homes.values())
    assert set(shares) == {e.name for e in ENDPOINTS} and min(shares.values()) > 25  # even shares of the ring


def test_an_overloaded_home_spills_to_the_same_next_endpoint() -> None:
    affinity = Affinity(balance=0.25)
    loads = Loads()
    home, _ = affinity.pick("hot query", ENDPOINTS, loads.load, ENDPOINTS)  # type: ignore[misc]
    loads.start(home, 1000)  # far over (1 + 0.25) x the mean
    spill, is_home = affinity.pick("hot query", ENDPOINTS, loads.load, ENDPOINTS)  # type: ignore[misc]
    assert spill != home and not is_home
    assert all(affinity.pick("hot query", ENDPOINTS, loads.load, ENDPOINTS)[0] == spill for _ in range(10))  # type: ignore[index]
    loads.finish(home, 1000, header=None)
    assert affinity.pick("hot query", ENDPOINTS, loads.load, ENDPOINTS)[0] == home  # type: ignore[index]


def test_a_new_endpoint_moves_only_its_share_of_queries() -> None:
    affinity = Affinity(balance=0.25)
    loads = Loads()
    before = {q: affinity.pick(f"q{q}", ENDPOINTS[:3], loads.load, ENDPOINTS[:3])[0] for q in range(1000)}  # type: ignore[index]
    after = {q: affinity.pick(f"q{q}", ENDPOINTS, loads.load, ENDPOINTS)[0] for q in range(1000)}  # type: ignore[index]
    moved = [q for q in before if before[q] != after[q]]
    assert all(after[q] == ENDPOINTS[3] for q in moved)  # only to the new endpoint
    assert 150 < len(moved) < 350  # about a quarter


def test_a_few_requests_in_flight_do_not_push_queries_off_their_homes() -> None:
    # 4 requests of 8 pairs in flight, two on the key's home: a bound on the raw mean (16 > 1.25 x 10.7)
    # would spill; the paper's, counting this request in units of its size, keeps it home (16 + 8 <= 24).
    affinity = Affinity(balance=0.25)
    loads = Loads()
    home, _ = affinity.pick("query", ENDPOINTS[:3], loads.load, ENDPOINTS[:3], weight=8)  # type: ignore[misc]
    others = [e for e in ENDPOINTS[:3] if e != home]
    loads.start(home, 16)
    loads.start(others[0], 8)
    loads.start(others[1], 8)
    assert affinity.pick("query", ENDPOINTS[:3], loads.load, ENDPOINTS[:3], weight=8) == (home, True)
    loads.start(home, 16)  # now 32 of 56 with this request: over ceil(1.25 x 56 / 24) x 8 = 24
    assert affinity.pick("query", ENDPOINTS[:3], loads.load, ENDPOINTS[:3], weight=8)[1] is False  # type: ignore[index]

"""Holding requests for a fleet with no ready endpoint: forwarded once one is ready, 503 with
Retry-After past the hold timeout, 429 past the bound on held requests, a wake asked for fleets
that may be woken. The fleet appears through the static directory's file, as a woken fleet's pod
appears in its EndpointSlice under Kubernetes."""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Callable

import httpx

from gateways import MINILM, GatewayProcess, fleet
from servers import ServerProcess

BODY = {"model": MINILM, "query": "held?", "documents": ["a", "b"]}


def test_a_held_request_is_forwarded_when_an_endpoint_is_ready(gateway: Callable[..., GatewayProcess],
                                                                minilm_servers: list[ServerProcess]) -> None:
    process = gateway([fleet("minilm", [MINILM], [], replicas=0, can_wake=True)], hold_timeout_seconds="30")
    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        held = [pool.submit(httpx.post, process.url + "/v2/rerank", json=BODY, timeout=60) for _ in range(5)]
        time.sleep(1.5)
        assert not any(f.done() for f in held)
        assert process.metric("reranker_gateway_held_requests") == 5
        assert process.metric("reranker_gateway_wakes_total") == 1  # one wake for the burst
        woke = time.monotonic()
        process.write([fleet("minilm", [MINILM], [minilm_servers[0].url], replicas=1, can_wake=True)])
        answers = [f.result() for f in held]
    assert [a.status_code for a in answers] == [200] * 5
    assert time.monotonic() - woke < 3
    assert process.metric("reranker_gateway_hold_seconds_count") == 5
    assert process.metric("reranker_gateway_hold_seconds_sum") >= 5 * 1.5
    assert process.metric("reranker_gateway_held_requests") == 0


def test_past_the_hold_timeout_the_client_gets_503_with_retry_after(gateway: Callable[..., GatewayProcess]) -> None:
    process = gateway([fleet("minilm", [MINILM], [], replicas=0)], hold_timeout_seconds="1")
    started = time.monotonic()
    resp = httpx.post(process.url + "/v2/rerank", json=BODY, timeout=30)
    assert 1 <= time.monotonic() - started < 5
    assert resp.status_code == 503 and "retry-after" in resp.headers
    assert resp.json()["error"] == "fleet_unavailable" and "HOLD_TIMEOUT" in resp.json()["message"]
    assert process.metric("reranker_gateway_wakes_total") == 0  # can_wake unset: not asked
    # TEI-shaped requests get TEI's body for the same refusal
    tei = httpx.post(process.url + "/rerank", json={"model": MINILM, "query": "q", "texts": ["a"]}, timeout=30)
    assert tei.status_code == 503 and tei.json()["error_type"] == "Unhealthy"


def test_held_requests_are_bounded(gateway: Callable[..., GatewayProcess]) -> None:
    process = gateway([fleet("minilm", [MINILM], [], replicas=0)], hold_timeout_seconds="3", max_held_requests="2")
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        held = [pool.submit(httpx.post, process.url + "/v2/rerank", json=BODY, timeout=30) for _ in range(2)]
        time.sleep(1)
        refused = httpx.post(process.url + "/v2/rerank", json=BODY, timeout=30)
        assert refused.status_code == 429 and refused.json()["error"] == "hold_full" and "retry-after" in refused.headers
        assert [f.result().status_code for f in held] == [503, 503]

"""What a misbehaving endpoint or client costs: a dead or resetting pod is retried elsewhere, a
refusing one (429/503) is retried once elsewhere, a hanging one costs one deadline and not the
pool, and a client that goes away closes what was forwarded for it."""

from __future__ import annotations

import concurrent.futures
import socket
import time
from collections.abc import Callable, Iterator

import httpx
import pytest
from stand_ins import StandIn

from gateways import MINILM, TINY, GatewayProcess, fleet
from servers import ServerProcess, free_port

BODY = {"query": "what is it?", "documents": ["one doc", "another doc"]}


@pytest.fixture
def stand_in() -> Iterator[Callable[[str], StandIn]]:
    started: list[StandIn] = []

    def start(mode: str) -> StandIn:
        started.append(StandIn(mode))  # type: ignore[arg-type]
        return started[-1]

    yield start
    for s in started:
        s.stop()


@pytest.mark.parametrize("bad", ["dead", "reset"])
def test_a_dead_or_resetting_endpoint_costs_no_failed_request(
        gateway: Callable[..., GatewayProcess], minilm_servers: list[ServerProcess],
        stand_in: Callable[[str], StandIn], bad: str) -> None:
    bad_url = f"http://127.0.0.1:{free_port()}" if bad == "dead" else stand_in("reset").url
    process = gateway([fleet("minilm", [MINILM], [bad_url, minilm_servers[0].url])], affinity="false")
    statuses = [httpx.post(process.url + "/v2/rerank", json={**BODY, "query": f"q{i}"}, timeout=30).status_code
                for i in range(20)]
    assert statuses == [200] * 20
    assert process.metric("reranker_gateway_retries_total", reason="connect") >= 1


def test_a_refusal_is_retried_once_on_another_endpoint(gateway: Callable[..., GatewayProcess],
                                                        minilm_servers: list[ServerProcess],
                                                        stand_in: Callable[[str], StandIn]) -> None:
    refusing = stand_in("refuse")
    process = gateway([fleet("minilm", [MINILM], [refusing.url, minilm_servers[0].url]),
                       fleet("refusing", ["busy"], [refusing.url, stand_in("refuse").url])],
                      affinity="false", default_model=MINILM)
    statuses = [httpx.post(process.url + "/v2/rerank", json={**BODY, "query": f"q{i}"}, timeout=30).status_code
                for i in range(20)]
    assert statuses == [200] * 20
    assert process.metric("reranker_gateway_retries_total", reason="refused") >= 1
    # every endpoint refuses: the client gets the pod's own 503 and Retry-After, after one retry
    before = process.metric("reranker_gateway_upstream_requests_total", model="busy")
    resp = httpx.post(process.url + "/v2/rerank", json={**BODY, "model": "busy"}, timeout=30)
    assert resp.status_code == 503 and resp.headers["retry-after"] == "2" and resp.json()["error"] == "queue_full"
    assert process.metric("reranker_gateway_upstream_requests_total", model="busy") - before == 2


def test_a_hanging_endpoint_costs_one_deadline_not_the_pool(gateway: Callable[..., GatewayProcess],
                                                            tiny_server: ServerProcess,
                                                            stand_in: Callable[[str], StandIn]) -> None:
    hanging = stand_in("hang")
    process = gateway([fleet("stuck", ["stuck"], [hanging.url]), fleet("tiny", [TINY], [tiny_server.url])],
                      request_timeout_seconds="4", endpoint_max_connections="4")
    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        started = time.monotonic()
        stuck = [pool.submit(httpx.post, process.url + "/v2/rerank", json={**BODY, "model": "stuck"}, timeout=30)
                 for _ in range(20)]
        time.sleep(0.5)
        t0 = time.monotonic()
        other = httpx.post(process.url + "/v2/rerank", json={**BODY, "model": TINY}, timeout=30)
        assert other.status_code == 200 and time.monotonic() - t0 < 3  # the stuck fleet's pool is its own
        answers = [f.result() for f in stuck]
    elapsed = time.monotonic() - started
    assert {a.status_code for a in answers} == {503}
    assert {a.json()["error"] for a in answers} == {"request_timeout"} and all("retry-after" in a.headers for a in answers)
    assert elapsed < 10  # 20 requests through 4 connections: each waited one deadline (4 s), not 5 in turn
    time.sleep(0.5)
    assert len(hanging.closed_at) == hanging.connections >= 1  # every hung connection was closed, none kept
    before = hanging.connections
    again = httpx.post(process.url + "/v2/rerank", json={**BODY, "model": "stuck"}, timeout=30)
    assert again.status_code == 503 and hanging.connections == before + 1  # the pool is not wedged: a new try connects


def test_a_client_that_goes_away_cancels_the_forwarded_request(gateway: Callable[..., GatewayProcess],
                                                               stand_in: Callable[[str], StandIn]) -> None:
    hanging = stand_in("hang")
    process = gateway([fleet("stuck", ["stuck"], [hanging.url])], request_timeout_seconds="60")
    body = httpx.Request("POST", process.url + "/v2/rerank", json={**BODY, "model": "stuck"})
    with socket.create_connection(("127.0.0.1", process.port)) as client:
        head = "".join(f"{k}: {v}\r\n" for k, v in body.headers.items())
        client.sendall(f"POST /v2/rerank HTTP/1.1\r\n{head}\r\n".encode() + body.content)
        deadline = time.monotonic() + 5
        while hanging.connections == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert hanging.connections == 1 and not hanging.closed_at
        gone = time.monotonic()
    deadline = time.monotonic() + 5
    while not hanging.closed_at and time.monotonic() < deadline:
        time.sleep(0.05)
    assert hanging.closed_at and hanging.closed_at[0] - gone < 2  # closed upstream at once, not at the deadline
    assert process.metric("reranker_gateway_requests_total", status="499") == 1


def test_a_reset_on_the_only_endpoint_is_retried_on_a_new_connection(gateway: Callable[..., GatewayProcess],
                                                                    minilm_servers: list[ServerProcess]) -> None:
    # the server closes idle kept-alive connections after 5 s (uvicorn's default); a request sent as it
    # does must not fail a fleet of one endpoint. Idle past that between requests:
    process = gateway([fleet("minilm", [MINILM], [minilm_servers[0].url])])
    assert httpx.post(process.url + "/v2/rerank", json=BODY, timeout=30).status_code == 200
    time.sleep(5.5)
    assert httpx.post(process.url + "/v2/rerank", json=BODY, timeout=30).status_code == 200


def test_a_dead_only_endpoint_is_503_after_the_retries(gateway: Callable[..., GatewayProcess]) -> None:
    process = gateway([fleet("dead", [MINILM], [f"http://127.0.0.1:{free_port()}"])], max_retries="2")
    resp = httpx.post(process.url + "/v2/rerank", json=BODY, timeout=30)
    assert resp.status_code == 503 and resp.json()["error"] == "upstream_unavailable" and "retry-after" in resp.headers
    assert process.metric("reranker_gateway_upstream_requests_total", status="error") == 3  # the try and 2 retries

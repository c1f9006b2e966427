"""Routing by `model` across fleets, for every rerank route a server has; unknown and missing models."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from gateways import MINILM, TINY, GatewayProcess, fleet
from servers import ServerProcess

#: One request per route and dialect, `model` filled in by the test.
REQUESTS: list[tuple[str, dict[str, Any]]] = [
    ("/rerank", {"query": "q", "documents": ["a b", "c d"], "top_k": 2}),  # native
    ("/rerank", {"query": "q", "texts": ["a b", "c d"], "return_text": True}),  # TEI
    ("/rerank", {"query": "q", "documents": ["a b", "c d"], "top_n": 1}),  # vLLM
    ("/v1/rerank", {"query": "q", "documents": ["a b", {"text": "c d"}], "return_documents": True}),  # Cohere v1, Jina
    ("/v2/rerank", {"query": "q", "documents": ["a b", "c d"]}),  # Cohere v2
    ("/v1/ranking", {"query": {"text": "q"}, "passages": [{"text": "a b"}, {"text": "c d"}]}),  # NIM
    ("/score", {"text_1": "q", "text_2": ["a b", "c d"]}),  # vLLM score
    ("/v1/score", {"text_1": "q", "text_2": ["a b", "c d"]}),
]


def _stable(answer: Any) -> Any:
    """An answer without what differs between two calls (ids, timings)."""
    if isinstance(answer, dict):
        return {k: v for k, v in answer.items() if k not in ("id", "created", "processing_time_ms")}
    return answer


@pytest.fixture(scope="module")
def two_fleets(tmp_path_factory: pytest.TempPathFactory, minilm_servers: list[ServerProcess],
               tiny_server: ServerProcess) -> Iterator[GatewayProcess]:
    process = GatewayProcess(tmp_path_factory.mktemp("gateway"),
                             [fleet("minilm", [MINILM, "minilm"], [s.url for s in minilm_servers]),
                              fleet("tiny", [TINY, "tiny"], [tiny_server.url])],
                             {"RERANKER_GATEWAY_DEFAULT_MODEL": "tiny"})
    yield process
    process.stop()


@pytest.mark.parametrize("path,body", REQUESTS, ids=[f"{p}-{i}" for i, (p, _) in enumerate(REQUESTS)])
def test_each_dialect_reaches_the_fleet_its_model_names(two_fleets: GatewayProcess, minilm_servers: list[ServerProcess],
                                                        tiny_server: ServerProcess, path: str, body: dict[str, Any]) -> None:
    for name, server in [("minilm", minilm_servers[0]), ("tiny", tiny_server), (MINILM, minilm_servers[1])]:
        sent = {**body, "model": name}
        direct = httpx.post(server.url + path, json=sent, timeout=30)
        through = httpx.post(two_fleets.url + path, json=sent, timeout=30)
        assert through.status_code == direct.status_code == 200, through.text
        assert _stable(through.json()) == _stable(direct.json())
    # the two fleets' models score differently: the answers above came from the right fleet
    a = httpx.post(two_fleets.url + "/v1/rerank", json={"model": "tiny", "query": "q", "documents": ["a b"]}).json()
    b = httpx.post(two_fleets.url + "/v1/rerank", json={"model": "minilm", "query": "q", "documents": ["a b"]}).json()
    assert a["results"][0]["relevance_score"] != b["results"][0]["relevance_score"]


def test_nim_hosted_path_names_the_model_in_the_url(two_fleets: GatewayProcess, tiny_server: ServerProcess) -> None:
    body = {"query": {"text": "q"}, "passages": [{"text": "a b"}, {"text": "c d"}]}
    through = httpx.post(two_fleets.url + "/v1/retrieval/tiny/reranking", json=body)
    direct = httpx.post(tiny_server.url + "/v1/retrieval/tiny/reranking", json=body)
    assert through.status_code == 200 and through.json() == direct.json()
    missing = httpx.post(two_fleets.url + "/v1/retrieval/nvidia/none/reranking", json=body)
    assert missing.status_code == 404 and missing.json()["error"] == "model_not_found"


@pytest.mark.parametrize("path,body", REQUESTS, ids=[f"{p}-{i}" for i, (p, _) in enumerate(REQUESTS)])
def test_unknown_model_is_404_listing_served_models_in_the_dialects_shape(
        two_fleets: GatewayProcess, path: str, body: dict[str, Any]) -> None:
    before = two_fleets.metric("reranker_gateway_upstream_requests_total")
    resp = httpx.post(two_fleets.url + path, json={**body, "model": "no-such-model"})
    assert resp.status_code == 404
    error = resp.json()
    if "texts" in body:  # TEI's body, as a server answers a TEI-shaped request
        assert error["error_type"] == "Validation" and "no-such-model" in error["error"]
        message = error["error"]
    else:
        assert error["error"] == "model_not_found"
        message = error["message"]
    for served in (MINILM, "minilm", TINY, "tiny"):
        assert repr(served) in message
    assert two_fleets.metric("reranker_gateway_upstream_requests_total") == before  # never forwarded


def test_no_model_goes_to_the_default_fleet(two_fleets: GatewayProcess, tiny_server: ServerProcess) -> None:
    body = {"query": "q", "documents": ["a b", "c d"]}
    through = httpx.post(two_fleets.url + "/v2/rerank", json=body).json()
    direct = httpx.post(tiny_server.url + "/v2/rerank", json=body).json()
    assert _stable(through) == _stable(direct)


def test_no_model_and_no_default_is_404(gateway: Callable[..., GatewayProcess], minilm_servers: list[ServerProcess],
                                        tiny_server: ServerProcess) -> None:
    process = gateway([fleet("minilm", [MINILM], [minilm_servers[0].url]), fleet("tiny", [TINY], [tiny_server.url])])
    resp = httpx.post(process.url + "/v2/rerank", json={"query": "q", "documents": ["a"]})
    assert resp.status_code == 404 and "RERANKER_GATEWAY_DEFAULT_MODEL" in resp.json()["message"]


def test_models_lists_every_fleets_names(two_fleets: GatewayProcess) -> None:
    listing = httpx.get(two_fleets.url + "/v1/models").json()
    cards = {card["id"]: card for card in listing["data"]}
    assert set(cards) == {MINILM, "minilm", TINY, "tiny"}
    assert cards["minilm"]["root"] == MINILM and cards["tiny"]["root"] == TINY
    assert cards["minilm"]["max_model_len"] == 256


def test_the_cohere_sdk_reaches_each_fleet_by_name(two_fleets: GatewayProcess, minilm_servers: list[ServerProcess],
                                                   tiny_server: ServerProcess) -> None:
    import cohere

    docs = ["Machine learning is a subset of AI", "Paris is in France", "Python is a language"]
    for name, server in [("minilm", minilm_servers[0]), ("tiny", tiny_server)]:
        through = cohere.ClientV2(base_url=two_fleets.url, api_key="any").rerank(model=name, query="What is ML?",
                                                                                 documents=docs, top_n=2)
        direct = cohere.ClientV2(base_url=server.url, api_key="any").rerank(model=name, query="What is ML?",
                                                                            documents=docs, top_n=2)
        assert [(r.index, r.relevance_score) for r in through.results] == \
            [(r.index, r.relevance_score) for r in direct.results]
    with pytest.raises(cohere.errors.NotFoundError):
        cohere.ClientV2(base_url=two_fleets.url, api_key="any").rerank(model="nope", query="q", documents=docs)


def test_metrics_per_model_and_dialect_and_the_same_query_on_the_same_endpoint(two_fleets: GatewayProcess) -> None:
    def by_endpoint() -> dict[str, float]:
        return {f"minilm-{i}": two_fleets.metric("reranker_gateway_upstream_requests_total", endpoint=f"minilm-{i}")
                for i in range(3)}

    hits = two_fleets.metric("reranker_gateway_affinity_total", model=MINILM, result="hit")
    answered = two_fleets.metric("reranker_gateway_requests_total", model=MINILM, dialect="cohere-v2", status="200")
    before = by_endpoint()
    for _ in range(6):
        resp = httpx.post(two_fleets.url + "/v2/rerank", json={"model": "minilm", "query": "the same query",
                                                               "documents": ["a b", "c d"]})
        assert resp.status_code == 200
    moved = {name: count - before[name] for name, count in by_endpoint().items()}
    assert sorted(moved.values()) == [0, 0, 6]  # one endpoint took every repeat of the query
    assert two_fleets.metric("reranker_gateway_affinity_total", model=MINILM, result="hit") - hits == 6
    assert two_fleets.metric("reranker_gateway_requests_total", model=MINILM, dialect="cohere-v2",
                             status="200") - answered == 6
    assert two_fleets.metric("reranker_gateway_request_duration_seconds_count", model=MINILM, dialect="cohere-v2") >= 6

"""Real clients against a real server process: the official cohere SDK (v1 and v2 clients)
and plain HTTP the way Jina and TEI clients send it, all to `reranker serve` under uvicorn.
"""

from __future__ import annotations

from collections.abc import Callable

import cohere
import httpx
import pytest

from servers import ServerProcess

QUERY = "What is machine learning?"
DOCS = ["Python is a programming language", "Machine learning is a subset of AI", "Paris is in France"]


@pytest.fixture(scope="module")
def server(module_server_factory: Callable[..., ServerProcess]) -> ServerProcess:
    return module_server_factory()


def test_cohere_v1_client(server: ServerProcess) -> None:
    co = cohere.Client(base_url=server.url, api_key="any-token")
    resp = co.rerank(model="rerank-english-v3.0", query=QUERY, documents=DOCS, top_n=2, return_documents=True)
    assert [r.index for r in resp.results] == [1, 0]
    assert resp.results[0].document is not None and resp.results[0].document.text == DOCS[1]
    assert 0 < resp.results[1].relevance_score < resp.results[0].relevance_score
    assert resp.id and resp.meta is not None and resp.meta.api_version.version == "1"
    objects = co.rerank(model="rerank-english-v3.0", query=QUERY,
                        documents=[{"title": "ml", "text": DOCS[1]}, {"title": "py", "text": DOCS[0]}], rank_fields=["text"])
    assert objects.results[0].index == 0


def test_cohere_v2_client(server: ServerProcess) -> None:
    co = cohere.ClientV2(base_url=server.url, api_key="any-token")
    resp = co.rerank(model="rerank-v3.5", query=QUERY, documents=DOCS, top_n=3, max_tokens_per_doc=512)
    assert [r.index for r in resp.results][0] == 1
    assert len(resp.results) == 3
    scores = [r.relevance_score for r in resp.results]
    assert scores == sorted(scores, reverse=True)


def test_cohere_client_sees_auth_errors(uvicorn_server: Callable[..., ServerProcess]) -> None:
    server = uvicorn_server({"RERANKER_API_KEYS": "secret"})
    with pytest.raises(cohere.errors.UnauthorizedError):
        cohere.ClientV2(base_url=server.url, api_key="wrong").rerank(model="m", query=QUERY, documents=DOCS)
    ok = cohere.ClientV2(base_url=server.url, api_key="secret").rerank(model="m", query=QUERY, documents=DOCS)
    assert ok.results[0].index == 1


def test_jina_and_tei_over_http(server: ServerProcess) -> None:
    query = "Which sentence is about machine learning?"  # not cached by the other tests: tokens are counted
    jina = httpx.post(server.url + "/v1/rerank", json={"model": "jina-reranker-v2-base-multilingual", "query": query,
                                                       "documents": DOCS, "top_n": 2, "return_documents": True},
                      headers={"Authorization": "Bearer jina_key"}).json()
    assert jina["model"] == "sentence-transformers/all-MiniLM-L6-v2"  # the model that scored
    assert jina["usage"]["total_tokens"] > 0
    assert [(r["index"], r["document"]["text"]) for r in jina["results"]] == [(1, DOCS[1]), (0, DOCS[0])]
    again = httpx.post(server.url + "/v1/rerank", json={"query": query, "documents": DOCS}).json()
    assert again["usage"]["total_tokens"] == 0  # all cached: nothing went through the model
    tei = httpx.post(server.url + "/rerank", json={"query": QUERY, "texts": DOCS, "raw_scores": False, "return_text": True})
    assert tei.status_code == 200
    assert [r["index"] for r in tei.json()] == [1, 0, 2]
    assert "x-compute-time" in tei.headers


def test_readme_ranking_is_sensible(server: ServerProcess) -> None:
    body = httpx.post(server.url + "/rerank", json={"query": "What is machine learning?",
                                                    "documents": ["Python is a programming language",
                                                                  "Machine learning is a subset of AI"]}).json()
    assert body["results"][0]["document"] == "Machine learning is a subset of AI"
    health = httpx.get(server.url + "/health").json()
    assert health["model"]["model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert (health["model"]["backend"], health["model"]["device"], health["model"]["dtype"]) == ("torch", "cpu", "fp32")

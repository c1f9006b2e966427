"""The other servers' APIs this one speaks: vLLM's /rerank form, NVIDIA NIM's ranking, vLLM's score
API, OpenAI's model list, TEI's /info and TEI's error body, each checked against the peer's
published shapes (TEI's against its own OpenAPI document, tests/fixtures/tei_openapi.yaml).

Runs the app in-process through its lifespan on the embedded MiniLM (a real model).
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import pytest_asyncio
import yaml

from servers import running_app

QUERY = "What is machine learning?"
DOCS = ["Python is a programming language", "Machine learning is a subset of AI", "Paris is in France"]
TEI_OPENAPI = yaml.safe_load((Path(__file__).parent / "fixtures" / "tei_openapi.yaml").read_text())


def tei_schema(name: str) -> dict[str, Any]:
    """A component of TEI's OpenAPI 3.0 document as JSON Schema (`nullable` as a null type)."""

    def convert(node: Any) -> Any:
        if isinstance(node, dict):
            out = {k: convert(v) for k, v in node.items() if k != "nullable"}
            if node.get("nullable") and "type" in node:
                out["type"] = [node["type"], "null"]
            return out
        if isinstance(node, list):
            return [convert(v) for v in node]
        return node

    document = convert(copy.deepcopy(TEI_OPENAPI))
    return {**document["components"]["schemas"][name], "components": document["components"]}


pytestmark = pytest.mark.asyncio(loop_scope="module")  # one server for the module


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with running_app(max_documents=50, max_body_bytes=64 * 1024, served_model_names="my-reranker") as c:
        yield c


async def native_scores(client: httpx.AsyncClient, query: str = QUERY, *, raw: bool = False) -> list[float]:
    body = (await client.post("/rerank", json={"query": query, "documents": DOCS, "raw_scores": raw})).json()
    return [r["score"] for r in sorted(body["results"], key=lambda r: r["index"])]


async def test_rerank_dialect_rule_both_sides(client: httpx.AsyncClient) -> None:
    """docs/api.md: on /rerank `texts` is TEI's, `top_k` native, else `model` or `top_n` vLLM's, else native."""
    native_keys, vllm_keys = {"results", "model", "processing_time_ms"}, {"id", "model", "usage", "results"}
    cases: list[tuple[dict[str, Any], set[str]]] = [({}, native_keys), ({"top_k": 2}, native_keys), ({"model": "my-reranker", "top_k": 2}, native_keys),
             ({"top_k": 2, "top_n": 2}, native_keys), ({"model": "my-reranker"}, vllm_keys), ({"top_n": 2}, vllm_keys),
             ({"model": "my-reranker", "top_n": 2, "return_documents": False}, vllm_keys)]
    expected = await native_scores(client)
    for extra, keys in cases:
        r = await client.post("/rerank", json={"query": QUERY, "documents": DOCS, **extra})
        assert r.status_code == 200, (extra, r.text)
        body = r.json()
        assert set(body) == keys, extra
        for result in body["results"]:
            score = result["score"] if keys == native_keys else result["relevance_score"]
            assert score == pytest.approx(expected[result["index"]], abs=1e-6)
            if keys == vllm_keys:
                if extra.get("return_documents") is False:
                    assert "document" not in result
                else:
                    assert result["document"] == {"text": DOCS[result["index"]]}
            else:
                assert result["document"] == DOCS[result["index"]]
        if "top_n" in extra or "top_k" in extra:
            assert len(body["results"]) == 2
    tei = (await client.post("/rerank", json={"query": QUERY, "texts": DOCS, "model": "my-reranker", "top_n": 1})).json()
    assert isinstance(tei, list) and [r["index"] for r in tei] == [1]  # `texts` wins: TEI's bare array, top_n honoured


async def test_vllm_top_n_zero_is_all_and_model_names(client: httpx.AsyncClient) -> None:
    body = (await client.post("/rerank", json={"model": "my-reranker", "query": QUERY, "documents": DOCS, "top_n": 0})).json()
    assert len(body["results"]) == 3 and body["model"] == "my-reranker" and body["id"].startswith("rerank-")
    r = await client.post("/rerank", json={"model": "other", "query": QUERY, "documents": DOCS})
    assert r.status_code == 404 and r.json()["error"] == "model_not_found"
    objects = (await client.post("/rerank", json={"model": "my-reranker", "query": QUERY,
                                                  "documents": [{"text": d} for d in DOCS]})).json()
    assert [(x["index"], x["document"]) for x in objects["results"]] == [(x["index"], x["document"]) for x in body["results"]]


async def test_nim_ranking_both_paths(client: httpx.AsyncClient) -> None:
    """NIM answers logits (raw scores), best first; the hosted path names the model in the URL."""
    raw = await native_scores(client, raw=True)
    body = {"model": "my-reranker", "query": {"text": QUERY}, "passages": [{"text": d} for d in DOCS], "truncate": "END"}
    for path in ("/v1/ranking", "/v1/retrieval/nvidia/llama-3_2-nv-rerankqa-1b-v2/reranking"):
        r = await client.post(path, json=body if path == "/v1/ranking" else {**body, "model": None})
        if path != "/v1/ranking":  # the path's model (llama-3.2-...) is not served here: RERANKER_SERVED_MODEL_NAMES
            assert r.status_code == 404 and "llama-3.2-nv-rerankqa-1b-v2" in r.json()["message"], r.text
            r = await client.post(path, json=body)
        assert r.status_code == 200, r.text
        rankings = r.json()["rankings"]
        assert set(r.json()) == {"rankings"} and [set(x) for x in rankings] == [{"index", "logit"}] * 3
        assert [x["index"] for x in rankings] == sorted(range(3), key=lambda i: -raw[i])
        for x in rankings:
            assert x["logit"] == pytest.approx(raw[x["index"]], abs=1e-6)
    top = (await client.post("/v1/ranking", json={**body, "top_k": 1})).json()["rankings"]
    assert [x["index"] for x in top] == [1]
    metrics = (await client.get("/metrics")).text  # one label for every hosted path, whatever the model
    assert 'reranker_requests_total{route="/v1/retrieval/{model}/reranking",status="200"}' in metrics
    assert 'reranker_requests_total{route="/v1/ranking",status="200"}' in metrics


async def test_nim_truncate_none_refuses_a_long_passage(client: httpx.AsyncClient) -> None:
    long = " ".join(["learning"] * 600)
    body = {"query": {"text": QUERY}, "passages": [{"text": long}]}
    refused = await client.post("/v1/ranking", json=body)  # NIM's default truncate is NONE
    assert refused.status_code == 422 and "passages.0" in refused.json()["message"]
    assert (await client.post("/v1/ranking", json={**body, "truncate": "END"})).status_code == 200


async def test_score_one_to_n_and_n_to_n(client: httpx.AsyncClient) -> None:
    expected = await native_scores(client)
    one = (await client.post("/score", json={"model": "my-reranker", "text_1": QUERY, "text_2": DOCS})).json()
    assert set(one) == {"id", "object", "created", "model", "data", "usage"} and one["object"] == "list"
    assert one["model"] == "my-reranker"
    assert [d["index"] for d in one["data"]] == [0, 1, 2] and {d["object"] for d in one["data"]} == {"score"}
    assert [d["score"] for d in one["data"]] == pytest.approx(expected, abs=1e-6)
    listed = (await client.post("/v1/score", json={"text_1": [QUERY], "text_2": DOCS})).json()
    assert [d["score"] for d in listed["data"]] == pytest.approx(expected, abs=1e-6)
    other = "Which city is the capital of France?"
    paris = await native_scores(client, other)
    n_n = (await client.post("/v1/score", json={"text_1": [QUERY, other], "text_2": [DOCS[1], DOCS[2]]})).json()
    assert [d["score"] for d in n_n["data"]] == pytest.approx([expected[1], paris[2]], abs=1e-6)
    single = (await client.post("/score", json={"text_1": QUERY, "text_2": DOCS[1]})).json()
    assert [d["score"] for d in single["data"]] == pytest.approx([expected[1]], abs=1e-6)


async def test_models_list_names_served(client: httpx.AsyncClient) -> None:
    body = (await client.get("/v1/models")).json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["sentence-transformers/all-MiniLM-L6-v2", "my-reranker"]
    assert all(m["object"] == "model" and isinstance(m["created"], int) and m["owned_by"] for m in body["data"])


async def test_info_is_teis_info(client: httpx.AsyncClient) -> None:
    info = (await client.get("/info")).json()
    jsonschema.validate(info, tei_schema("Info"))
    assert info["model_id"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert info["max_input_length"] > 0 and info["max_client_batch_size"] == 50 and info["max_batch_tokens"] > 0


TEI_ERRORS = [
    # (body, status, error_type, words in the message)
    ({"query": QUERY, "texts": []}, 400, "Empty", ["texts", "empty"]),
    ({"query": "   ", "texts": DOCS}, 422, "Validation", ["query", "empty"]),
    ({"query": QUERY, "texts": ["ok", 3]}, 422, "Validation", ["texts.1"]),
    ({"query": QUERY, "texts": ["d"] * 51}, 422, "Validation", ["RERANKER_MAX_DOCUMENTS"]),
    ({"query": "q" * 9000, "texts": DOCS}, 413, "Validation", ["RERANKER_MAX_QUERY_CHARS"]),
    ({"query": QUERY, "texts": [" ".join(["learning"] * 600)], "truncate": False}, 422, "Validation", ["texts.0"]),
    ({"query": QUERY, "texts": DOCS, "model": "not-served"}, 404, "Validation", ["not-served"]),
]


@pytest.mark.parametrize(("body", "status", "error_type", "words"), TEI_ERRORS,
                         ids=[f"{s}-{t}-{i}" for i, (_, s, t, _) in enumerate(TEI_ERRORS)])
async def test_tei_shaped_errors_are_teis(client: httpx.AsyncClient, body: dict[str, Any], status: int,
                                          error_type: str, words: list[str]) -> None:
    r = await client.post("/rerank", json=body)
    assert r.status_code == status, r.text
    payload = r.json()
    jsonschema.validate(payload, tei_schema("ErrorResponse"))
    assert set(payload) == {"error", "error_type"} and payload["error_type"] == error_type
    for word in words:
        assert word in payload["error"], payload["error"]


async def test_other_dialects_keep_the_house_error(client: httpx.AsyncClient) -> None:
    r = await client.post("/rerank", json={"query": QUERY, "documents": []})
    assert r.status_code == 422 and set(r.json()) == {"error", "message"}


async def test_tei_types_and_statuses_cover_every_error() -> None:
    """Each error the server raises has TEI's type and TEI's status for that type (router/src/http/server.rs)."""
    from reranker import errors

    enum = TEI_OPENAPI["components"]["schemas"]["ErrorType"]["enum"]
    expected = {errors.EmptyInput: (400, "Empty"), errors.PayloadTooLarge: (413, "Validation"),
                errors.QueueFull: (429, "Overloaded"), errors.BackendFailure: (424, "Backend"),
                errors.QueueTimeout: (503, "Unhealthy"), errors.NotReady: (503, "Unhealthy"),
                errors.WorkerTimeout: (503, "Unhealthy"), errors.InvalidRequest: (422, "Validation"),
                errors.InvalidJSON: (400, "Validation"), errors.Unauthorized: (401, "Validation")}
    for cls, (status, kind) in expected.items():
        assert errors.tei_error(cls("x")) == (status, kind), cls
        assert kind in enum
    for kind, status in errors.TEI_STATUS.items():
        assert kind in enum and 400 <= status < 600


async def test_tei_shaped_overload_is_teis_429() -> None:
    """A full queue answers a TEI-shaped request 429 `Overloaded` in TEI's body, Retry-After kept."""
    async with running_app(max_queue=8, batch_size=4, enable_prediction_cache=False, queue_timeout=60) as client:
        bodies = [{"query": f"q{i}", "texts": [f"document {i} {j}" for j in range(4)]} for i in range(30)]
        responses = await asyncio.wait_for(asyncio.gather(*(client.post("/rerank", json=b) for b in bodies)), 120)
        refused = [r for r in responses if r.status_code != 200]
        assert refused and {r.status_code for r in refused} == {429}, [r.text for r in refused]
        for r in refused:
            jsonschema.validate(r.json(), tei_schema("ErrorResponse"))
            assert r.json()["error_type"] == "Overloaded" and "RERANKER_MAX_QUEUE" in r.json()["error"]
            assert int(r.headers["retry-after"]) >= 1

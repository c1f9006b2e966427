"""The HTTP API, dialect by dialect: shapes field for field, options, and every bad input.

Runs the app in-process through its lifespan with the embedded MiniLM model (a real model:
rankings are meaningful).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from servers import running_app

QUERY = "What is machine learning?"
DOCS = ["Python is a programming language", "Machine learning is a subset of AI", "Paris is in France"]


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with running_app(max_documents=50, max_body_bytes=64 * 1024) as c:
        yield c


async def test_native_shape_and_ranking(client: httpx.AsyncClient) -> None:
    r = await client.post("/rerank", json={"query": QUERY, "documents": DOCS})
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"results", "model", "processing_time_ms"}
    assert [x["index"] for x in body["results"]][0] == 1
    assert body["results"][0] == {"index": 1, "document": DOCS[1], "score": pytest.approx(body["results"][0]["score"]),
                                  "relevance_score": body["results"][0]["score"]}
    scores = [x["score"] for x in body["results"]]
    assert scores == sorted(scores, reverse=True)
    assert r.headers["x-request-id"]
    top = (await client.post("/rerank", json={"query": QUERY, "documents": DOCS, "top_k": 1})).json()
    assert [x["index"] for x in top["results"]] == [1]


async def test_tei_shape(client: httpx.AsyncClient) -> None:
    r = await client.post("/rerank", json={"query": QUERY, "texts": DOCS, "return_text": True})
    assert r.status_code == 200
    body = r.json()
    assert isinstance(body, list) and len(body) == 3
    assert set(body[0]) == {"index", "score", "text"}
    assert body[0]["index"] == 1 and body[0]["text"] == DOCS[1]
    plain = (await client.post("/rerank", json={"query": QUERY, "texts": DOCS})).json()
    assert set(plain[0]) == {"index", "score"}


async def test_v1_cohere_and_jina_fields(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/rerank", json={"model": "jina-reranker-v2-base-multilingual", "query": QUERY,
                                              "documents": DOCS, "top_n": 2})
    body = r.json()
    assert r.status_code == 200
    assert {"id", "results", "meta", "model", "usage"} <= set(body)
    assert body["model"] == "sentence-transformers/all-MiniLM-L6-v2"  # the model that scored (any name accepted)
    assert body["usage"]["total_tokens"] > 0
    assert body["meta"] == {"api_version": {"version": "1"}, "billed_units": {"search_units": 1}}
    assert len(body["results"]) == 2
    assert body["results"][0] == {"index": 1, "relevance_score": pytest.approx(body["results"][0]["relevance_score"]),
                                  "document": {"text": DOCS[1]}}
    bare = (await client.post("/v1/rerank", json={"query": QUERY, "documents": DOCS, "return_documents": False})).json()
    assert all("document" not in x for x in bare["results"])


async def test_v1_document_objects_and_rank_fields(client: httpx.AsyncClient) -> None:
    docs = [{"title": "Snakes", "text": "Python is a programming language", "id": "a"},
            {"title": "AI", "text": "Machine learning is a subset of AI", "id": "b"}]
    body = (await client.post("/v1/rerank", json={"query": QUERY, "documents": docs})).json()
    assert body["results"][0]["document"] == docs[1]  # objects come back as sent
    by_title = (await client.post("/v1/rerank", json={"query": "reptiles", "documents": docs, "rank_fields": ["title"]})).json()
    assert by_title["results"][0]["index"] == 0
    both = (await client.post("/v1/rerank", json={"query": QUERY, "documents": docs, "rank_fields": ["title", "text"]})).json()
    assert both["results"][0]["index"] == 1
    # the text scored for one rank field is exactly that field
    plain = (await client.post("/v1/rerank", json={"query": QUERY, "documents": [d["text"] for d in docs]})).json()
    assert plain["results"][0]["relevance_score"] == pytest.approx(body["results"][0]["relevance_score"], abs=1e-6)


async def test_v2_shape(client: httpx.AsyncClient) -> None:
    body = (await client.post("/v2/rerank", json={"model": "rerank-v3.5", "query": QUERY, "documents": DOCS, "top_n": 2})).json()
    assert set(body) == {"id", "results", "meta"}
    assert [set(x) for x in body["results"]] == [{"index", "relevance_score"}] * 2
    assert body["results"][0]["index"] == 1
    assert body["meta"]["api_version"] == {"version": "2"}


async def test_chunked_long_documents_score_max_over_chunks(client: httpx.AsyncClient) -> None:
    # The relevant sentence sits at the end of a long document: truncation loses it, chunking finds it.
    filler = "The weather report says it will rain on Tuesday and the roads will be wet. " * 40
    long_doc = filler + "Machine learning is a subset of AI."
    docs = [long_doc, "Bananas are yellow fruit."]
    truncated = (await client.post("/v1/rerank", json={"query": QUERY, "documents": docs})).json()
    chunked = (await client.post("/v1/rerank", json={"query": QUERY, "documents": docs, "max_chunks_per_doc": 20})).json()
    score = {r["index"]: r["relevance_score"] for r in truncated["results"]}
    score_chunked = {r["index"]: r["relevance_score"] for r in chunked["results"]}
    assert score_chunked[0] > score[0] + 0.1
    assert score_chunked[1] == pytest.approx(score[1], abs=1e-6)  # a short document is one chunk
    one_chunk = (await client.post("/v1/rerank", json={"query": QUERY, "documents": docs, "max_chunks_per_doc": 1})).json()
    assert {r["index"]: r["relevance_score"] for r in one_chunk["results"]}[0] < score_chunked[0]
    v2 = (await client.post("/v2/rerank", json={"query": QUERY, "documents": docs, "max_tokens_per_doc": 4096})).json()
    assert {r["index"]: r["relevance_score"] for r in v2["results"]}[0] == pytest.approx(score_chunked[0], abs=1e-6)
    v2_cut = (await client.post("/v2/rerank", json={"query": QUERY, "documents": docs, "max_tokens_per_doc": 50})).json()
    assert {r["index"]: r["relevance_score"] for r in v2_cut["results"]}[0] < score_chunked[0]


async def test_tei_truncation_options(client: httpx.AsyncClient) -> None:
    long_doc = "rain " * 300 + "Machine learning is a subset of AI."
    r = await client.post("/rerank", json={"query": QUERY, "texts": [long_doc], "truncate": False})
    assert r.status_code == 422 and "texts.0" in r.json()["error"] and r.json()["error_type"] == "Validation"  # TEI's error body
    right = (await client.post("/rerank", json={"query": QUERY, "texts": [long_doc]})).json()
    left = (await client.post("/rerank", json={"query": QUERY, "texts": [long_doc], "truncation_direction": "left"})).json()
    assert left[0]["score"] > right[0]["score"] + 0.1


async def test_api_keys(tmp_path: Any) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# one per line\nfile-key\n")
    async with running_app(api_keys="k1, k2", api_keys_file=str(keys)) as c:
        body = {"query": QUERY, "documents": DOCS}
        assert (await c.post("/v1/rerank", json=body)).status_code == 401
        bad = await c.post("/v1/rerank", json=body, headers={"Authorization": "Bearer nope"})
        assert bad.status_code == 401 and bad.json()["error"] == "unauthorized"
        for key in ("k1", "k2", "file-key"):
            assert (await c.post("/v1/rerank", json=body, headers={"Authorization": f"Bearer {key}"})).status_code == 200
        assert (await c.get("/health")).status_code == 200  # probes stay open


async def test_any_bearer_token_without_keys(client: httpx.AsyncClient) -> None:
    r = await client.post("/v2/rerank", json={"query": QUERY, "documents": DOCS}, headers={"Authorization": "Bearer whatever"})
    assert r.status_code == 200


BAD_INPUTS = [
    # (route, body or raw bytes, status, error code, words the message must contain)
    ("/rerank", {"query": "", "documents": DOCS}, 422, "invalid_request", ["query", "empty"]),
    ("/rerank", {"query": QUERY, "documents": []}, 422, "invalid_request", ["documents", "empty"]),
    ("/rerank", {"query": QUERY}, 422, "invalid_request", ["documents", "required"]),
    ("/rerank", {"query": QUERY, "documents": ["ok", 3]}, 422, "invalid_request", ["documents.1", "string"]),
    ("/rerank", {"model": "m", "query": QUERY, "documents": DOCS, "top_n": -1}, 422, "invalid_request", ["top_n"]),
    ("/rerank", {"model": "m", "query": QUERY, "documents": [{"title": "x"}]}, 422, "invalid_request", ["documents.0", "text"]),
    ("/v1/ranking", {"query": "q", "passages": [{"text": "p"}]}, 422, "invalid_request", ["query"]),
    ("/v1/ranking", {"query": {"text": QUERY}, "passages": []}, 422, "invalid_request", ["passages", "empty"]),
    ("/v1/ranking", {"query": {"text": QUERY}, "passages": [{"text": "p"}], "truncate": "START"}, 422,
     "invalid_request", ["truncate"]),
    ("/v1/ranking", {"query": {"text": QUERY}, "passages": [{"text": "x"}] * 51}, 422, "invalid_request",
     ["passages", "RERANKER_MAX_DOCUMENTS"]),
    ("/score", {"text_1": QUERY, "text_2": []}, 422, "invalid_request", ["text_2", "empty"]),
    ("/score", {"text_1": [QUERY, QUERY], "text_2": DOCS}, 422, "invalid_request", ["text_1", "N:N"]),
    ("/v1/score", {"text_1": " ", "text_2": DOCS}, 422, "invalid_request", ["text_1", "empty"]),
    ("/rerank", {"query": QUERY, "documents": DOCS, "top_k": 0}, 422, "invalid_request", ["top_k", "greater than or equal to 1"]),
    ("/v1/rerank", {"query": QUERY, "documents": DOCS, "top_n": 0}, 422, "invalid_request", ["top_n"]),
    ("/v1/rerank", {"query": QUERY, "documents": [None]}, 422, "invalid_request", ["documents.0"]),
    ("/v1/rerank", {"query": QUERY, "documents": [{"title": "x"}]}, 422, "invalid_request", ["documents.0", "text"]),
    ("/v1/rerank", {"query": QUERY, "documents": DOCS, "max_chunks_per_doc": 0}, 422, "invalid_request", ["max_chunks_per_doc"]),
    ("/v2/rerank", {"query": QUERY, "documents": [{"text": "objects are v1 only"}]}, 422, "invalid_request", ["documents.0"]),
    ("/v2/rerank", {"query": QUERY, "documents": DOCS, "top_n": -1}, 422, "invalid_request", ["top_n"]),
    ("/v2/rerank", {"documents": DOCS}, 422, "invalid_request", ["query", "required"]),
    ("/v2/rerank", {"query": QUERY, "documents": ["d"] * 51}, 422, "invalid_request", ["51", "RERANKER_MAX_DOCUMENTS"]),
    ("/v1/rerank", [1, 2], 422, "invalid_request", ["JSON object"]),
    ("/v1/rerank", b"{not json", 400, "invalid_json", ["not valid JSON"]),
    ("/rerank", b"", 400, "invalid_json", ["not valid JSON"]),
    ("/v2/rerank", {"query": QUERY, "documents": ["x" * 70_000]}, 413, "payload_too_large", ["RERANKER_MAX_BODY_BYTES"]),
]


@pytest.mark.parametrize(("route", "body", "status", "code", "words"), BAD_INPUTS,
                         ids=[f"{r}-{s}-{i}" for i, (r, _, s, _, _) in enumerate(BAD_INPUTS)])
async def test_bad_input(client: httpx.AsyncClient, route: str, body: Any, status: int, code: str, words: list[str]) -> None:
    if isinstance(body, bytes):
        r = await client.post(route, content=body, headers={"content-type": "application/json"})
    else:
        r = await client.post(route, json=body)
    assert r.status_code == status, r.text
    payload = r.json()
    assert set(payload) == {"error", "message"}
    assert payload["error"] == code
    for word in words:
        assert word in payload["message"], payload["message"]
    # and the server is still fine afterwards
    assert (await client.post("/rerank", json={"query": QUERY, "documents": DOCS})).status_code == 200


async def test_chunked_body_over_limit_without_content_length(client: httpx.AsyncClient) -> None:
    async def stream() -> AsyncIterator[bytes]:
        yield b'{"query": "q", "documents": ["'
        for _ in range(100):
            yield b"x" * 1024
        yield b'"]}'
    r = await client.post("/v1/rerank", content=stream(), headers={"content-type": "application/json"})
    assert r.status_code == 413


async def test_probes_and_metrics(client: httpx.AsyncClient) -> None:
    await client.post("/rerank", json={"query": QUERY, "documents": DOCS})
    health = (await client.get("/health")).json()
    assert health["status"] == "healthy"
    assert health["model"]["backend"] == "torch" and health["model"]["device"] == "cpu" and health["model"]["dtype"] == "fp32"
    assert set(health["controller"]) >= {"waiting", "active", "available_slots", "max_parallel", "max_queue"}
    assert (await client.get("/ready")).status_code == 200
    text = (await client.get("/metrics")).text
    for name in ("reranker_requests_total", "reranker_request_duration_seconds", "reranker_queue_wait_seconds",
                 "reranker_inference_duration_seconds", "reranker_queue_depth", "reranker_inflight_requests",
                 "reranker_batch_size", "reranker_batch_tokens", "reranker_pairs_scored_total", "reranker_tokens_total",
                 "reranker_cache_hits_total", "reranker_cache_misses_total", "reranker_model_info"):
        assert name in text, name
    assert 'reranker_requests_total{route="/rerank",status="200"}' in text
    summary = (await client.get("/metrics", headers={"accept": "application/json"})).json()
    assert summary["total_requests"] >= 1
    assert set(summary["queue_wait_ms"]) >= {"p50", "p95", "p99"}
    assert set(summary["process_time_ms"]) >= {"p50", "p95", "p99"}
    # kubectl get --raw .../proxy/metrics and Prometheus accept JSON or anything: they get the text
    for accept in ("application/json, */*", "application/openmetrics-text;version=1.0.0;q=0.5,"
                   "text/plain;version=0.0.4;q=0.4,*/*;q=0.1", "application/json;q=0.5, text/plain"):
        r = await client.get("/metrics", headers={"accept": accept})
        assert r.headers["content-type"].startswith("text/plain") and "reranker_requests_total{" in r.text, accept
    assert (await client.get("/metrics", headers={"accept": "text/plain;q=0.2, application/json"})).json()
    docs = (await client.get("/openapi.json")).json()
    assert {"/rerank", "/v1/rerank", "/v2/rerank"} <= set(docs["paths"])


# --- hardening: inputs that used to give 500, compatibility with vLLM-style clients ----------

HOSTILE = [
    # (route, raw body, status, words the message must contain)
    ("/rerank", b'{"query": "\\ud800", "documents": ["a"]}', 422, ["query", "lone surrogate"]),
    ("/v2/rerank", b'{"query": "q", "documents": ["fine", "bad \\udc80 text"]}', 422, ["documents.1", "lone surrogate"]),
    ("/v1/rerank", b'{"query": "q", "documents": [{"text": "t", "meta": {"\\ud800": 1}}]}', 422, ["documents.0.meta", "lone surrogate"]),
    ("/rerank", b'{"query": "q", "documents": ["a"], "x": ' + b"[" * 20_000 + b"]" * 20_000 + b"}", 400, ["nested"]),
    ("/v1/rerank", b'{"query": "q", "documents": [{"text": "t", "deep": ' + b"[" * 500 + b"]" * 500 + b"}]}", 422,
     ["documents.0.deep", "nested deeper"]),
]


@pytest.mark.parametrize(("route", "body", "status", "words"), HOSTILE, ids=[f"{r}-{i}" for i, (r, *_) in enumerate(HOSTILE)])
async def test_hostile_json_is_a_4xx_naming_the_field(client: httpx.AsyncClient, route: str, body: bytes, status: int,
                                                       words: list[str]) -> None:
    """Issue 15.6: lone surrogates and deep nesting are refused before any work, naming where."""
    r = await client.post(route, content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    for word in words:
        assert word in r.json()["message"], r.json()["message"]
    assert (await client.post("/rerank", json={"query": QUERY, "documents": DOCS})).status_code == 200


async def test_client_gone_mid_upload_is_not_a_server_error(client: httpx.AsyncClient) -> None:
    """Issue 15.6: a body cut off by a disconnect is a 499 (client closed), not a 500."""
    app = client.app  # type: ignore[attr-defined]
    messages = [{"type": "http.request", "body": b'{"query": "q", "docu', "more_body": True}, {"type": "http.disconnect"}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return messages.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/rerank", "raw_path": b"/v1/rerank", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), (b"content-length", b"1000")],
             "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000)}
    await app(scope, receive, send)
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 499
    text = (await client.get("/metrics")).text
    assert 'status="500"' not in text


async def test_broken_model_nan_scores_are_424(tmp_path: Any) -> None:
    """Issue 15.6: a model that returns NaN is a failed dependency (424), and NaN is never cached."""
    import torch
    from transformers import AutoModelForSequenceClassification

    import models

    folder = models.build_tiny_bert(tmp_path / "nan-bert")
    model = AutoModelForSequenceClassification.from_pretrained(str(folder))
    with torch.no_grad():
        model.classifier.weight.fill_(float("nan"))
    model.save_pretrained(str(folder))
    async with running_app(model=str(folder)) as c:
        for _ in range(2):  # the second time too: nothing was cached
            r = await c.post("/v1/rerank", json={"query": QUERY, "documents": DOCS})
            assert r.status_code == 424, r.text
            assert r.json()["error"] == "backend_error" and "NaN" in r.json()["message"]
        assert c.app.state.runtime.cache.local.currsize == 0  # type: ignore[attr-defined]


async def test_rerank_in_vllms_form_gets_vllms_answer(client: httpx.AsyncClient) -> None:
    """vLLM's clients (LiteLLM's `hosted_vllm`) send `top_n` or `model` and no `top_k` to /rerank and
    read `document` as {text}: with a string there LiteLLM failed ('str' object has no attribute 'get')."""
    body = (await client.post("/rerank", json={"query": QUERY, "documents": DOCS, "top_n": 1})).json()
    assert set(body) == {"id", "model", "usage", "results"}
    assert body["results"] == [{"index": 1, "relevance_score": pytest.approx(body["results"][0]["relevance_score"]),
                                "document": {"text": DOCS[1]}}]
    assert body["model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert set(body["usage"]) == {"prompt_tokens", "total_tokens"}
    native = (await client.post("/rerank", json={"query": QUERY, "documents": DOCS, "top_k": 1})).json()
    assert set(native) == {"results", "model", "processing_time_ms"}
    assert native["results"][0]["document"] == DOCS[1]
    assert native["results"][0]["score"] == pytest.approx(body["results"][0]["relevance_score"], abs=1e-6)


async def test_served_model_names() -> None:
    """Issue 15.9: RERANKER_SERVED_MODEL_NAMES refuses other names with 404; responses name the model."""
    async with running_app(served_model_names="my-reranker, rerank-english") as c:
        r = await c.post("/v1/rerank", json={"model": "gpt-4", "query": QUERY, "documents": DOCS})
        assert r.status_code == 404 and r.json()["error"] == "model_not_found" and "my-reranker" in r.json()["message"]
        assert (await c.post("/v2/rerank", json={"model": "nope", "query": QUERY, "documents": DOCS})).status_code == 404
        ok = (await c.post("/v1/rerank", json={"model": "rerank-english", "query": QUERY, "documents": DOCS})).json()
        assert ok["model"] == "rerank-english"  # the alias the client asked for
        native = (await c.post("/rerank", json={"model": "my-reranker", "query": QUERY, "documents": DOCS})).json()
        assert native["model"] == "my-reranker"
        loaded = (await c.post("/rerank", json={"query": QUERY, "documents": DOCS})).json()
        assert loaded["model"] == "sentence-transformers/all-MiniLM-L6-v2"
    async with running_app() as lenient:  # the default: any name is accepted, the response names what scored
        r = await lenient.post("/v1/rerank", json={"model": "gpt-4", "query": QUERY, "documents": DOCS})
        assert r.status_code == 200 and r.json()["model"] == "sentence-transformers/all-MiniLM-L6-v2"


async def test_health_fails_liveness_after_a_failed_load(tmp_path: Any) -> None:
    """Issue 15.7: a failed model load makes /health 503 (Kubernetes restarts the pod with back-off)."""
    from reranker.app import create_app
    from reranker.settings import Settings

    empty = tmp_path / "not-a-model"
    empty.mkdir()
    app = create_app(Settings(model=str(empty)))
    async with app.router.lifespan_context(app):
        runtime = app.state.runtime
        for _ in range(200):
            if runtime.load_error:
                break
            await asyncio.sleep(0.05)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            health = await c.get("/health")
            assert health.status_code == 503
            assert health.json()["status"] == "error" and "config.json" in health.json()["error"]
            ready = await c.get("/ready")
            assert ready.status_code == 503 and ready.json()["reason"] == "error"


async def test_paths_and_methods_no_route_serves_answer_in_the_error_shape() -> None:
    """Starlette's own 404/405 (no route matched, e.g. a NIM hosted path whose model segment holds a
    newline) use the one error shape, as the OpenAPI document declares."""
    async with running_app() as c:
        missing = await c.post("/v1/retrieval/a%0Ab/reranking", json={})
        assert missing.status_code == 404
        assert missing.json()["error"] == "not_found" and missing.json()["message"]
        wrong = await c.get("/v1/rerank")
        assert wrong.status_code == 405
        assert wrong.json()["error"] == "method_not_allowed"

"""Fan-out: a request over the threshold is split across the fleet's endpoints, and the merged
answer equals one server's (indices, top n, returned documents, usage, scores) in every dialect."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from gateways import MINILM, GatewayProcess, fleet
from servers import ServerProcess

WORDS = "search engine ranking document query relevance model vector index cluster token batch".split()
DOCS = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(3 + i % 5)) for i in range(11)]


@pytest.fixture(scope="module")
def fanning(tmp_path_factory: pytest.TempPathFactory, minilm_servers: list[ServerProcess]) -> Iterator[GatewayProcess]:
    process = GatewayProcess(tmp_path_factory.mktemp("gateway"),
                             [fleet("minilm", [MINILM, "minilm"], [s.url for s in minilm_servers])],
                             {"RERANKER_GATEWAY_FANOUT_THRESHOLD": "4", "RERANKER_GATEWAY_FANOUT_MAX_WIDTH": "3"})
    yield process
    process.stop()


#: How far a part's scores may be from one server's: the servers' batch-invariance tolerance
#: (tests/test_batch_invariance.py), which holds at every precision `auto` may pick. They are not
#: invariant to the bit: a batch of 4 pairs and one of 11 run matrix products of other shapes,
#: which round differently (about 1e-7 apart in float32 on this CPU). One server under concurrent
#: load varies as much, as its batches mix requests.
SCORE_TOLERANCE = 1e-4


def _same(through: Any, direct: Any, where: str = "answer") -> None:
    """Equal, floats to SCORE_TOLERANCE; ids and timings aside."""
    if isinstance(direct, dict):
        keys = set(direct) - {"id", "created", "processing_time_ms"}
        assert set(through) - {"id", "created", "processing_time_ms"} == keys, where
        for key in keys:
            _same(through[key], direct[key], f"{where}.{key}")
    elif isinstance(direct, list):
        assert len(through) == len(direct), where
        for i, (a, b) in enumerate(zip(through, direct)):
            _same(a, b, f"{where}.{i}")
    elif isinstance(direct, float):
        assert through == pytest.approx(direct, rel=SCORE_TOLERANCE, abs=SCORE_TOLERANCE), where
    else:
        assert through == direct, where


CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("native", "/rerank", {"documents": DOCS, "top_k": 5}),
    ("native-raw-no-docs", "/rerank", {"documents": DOCS, "top_k": 20, "raw_scores": True, "return_documents": False}),
    ("native-all", "/rerank", {"documents": DOCS}),
    ("tei", "/rerank", {"texts": DOCS, "return_text": True, "raw_scores": True}),
    ("tei-top", "/rerank", {"texts": DOCS, "top_n": 3}),
    ("vllm", "/rerank", {"model": "minilm", "documents": [{"text": d} for d in DOCS], "top_n": 4}),
    ("vllm-all", "/rerank", {"model": "minilm", "documents": DOCS, "top_n": 0}),
    ("cohere-v1", "/v1/rerank", {"documents": DOCS, "top_n": 6, "return_documents": True}),
    ("cohere-v1-fields", "/v1/rerank", {"documents": [{"title": str(i), "text": d} for i, d in enumerate(DOCS)],
                                        "rank_fields": ["title", "text"]}),
    ("cohere-v2", "/v2/rerank", {"documents": DOCS, "top_n": 2, "return_documents": True}),
    ("nim", "/v1/ranking", {"passages": [{"text": d} for d in DOCS], "top_k": 3}),
    ("score-1-n", "/score", {"text_2": DOCS}),
    ("score-n-n", "/v1/score", {"text_1": [f"q{i}" for i in range(len(DOCS))], "text_2": DOCS}),
]


@pytest.mark.parametrize("name,path,body", CASES, ids=[c[0] for c in CASES])
def test_a_fanned_out_answer_equals_one_servers(fanning: GatewayProcess, minilm_servers: list[ServerProcess],
                                                name: str, path: str, body: dict[str, Any]) -> None:
    query = f"which text is about {name}?"
    if path == "/v1/ranking":
        sent = {"query": {"text": query}, **body}
    elif "score" in path:
        sent = {"text_1": query, **body}
    else:
        sent = {"query": query, **body}
    before = fanning.metric("reranker_gateway_upstream_requests_total")
    through = httpx.post(fanning.url + path, json=sent, timeout=60)
    direct = httpx.post(minilm_servers[0].url + path, json=sent, timeout=60)
    assert through.status_code == direct.status_code == 200, through.text
    _same(through.json(), direct.json())
    assert fanning.metric("reranker_gateway_upstream_requests_total") - before == 3  # split in three parts


def test_small_requests_are_not_split(fanning: GatewayProcess) -> None:
    before = fanning.metric("reranker_gateway_upstream_requests_total")
    resp = httpx.post(fanning.url + "/v2/rerank", json={"query": "small", "documents": DOCS[:4]})
    assert resp.status_code == 200 and len(resp.json()["results"]) == 4
    assert fanning.metric("reranker_gateway_upstream_requests_total") - before == 1
    assert fanning.metric("reranker_gateway_fanout_width_count") >= 1


def test_a_bad_part_fails_the_request_with_the_servers_answer(fanning: GatewayProcess,
                                                              minilm_servers: list[ServerProcess]) -> None:
    # v1 rank_fields naming a field only some documents lack: the part holding them fails with the server's 422
    docs = [{"text": d} for d in DOCS[:-1]] + [{"title": "no text"}]
    sent = {"query": "q", "documents": docs}
    through = httpx.post(fanning.url + "/v1/rerank", json=sent)
    direct = httpx.post(minilm_servers[0].url + "/v1/rerank", json=sent)
    assert through.status_code == direct.status_code == 422
    assert through.json() == direct.json()  # the message names documents.10, the request's own index
    assert "documents.10" in through.json()["message"]

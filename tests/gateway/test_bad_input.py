"""Bad input is answered by the gateway itself, with the server's own status and body, and never
forwarded: body size, not JSON, JSON nesting, invalid Unicode, a schema error, an empty TEI list,
too many documents (which a fan-out would otherwise hide)."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from gateways import MINILM, GatewayProcess, fleet
from servers import ServerProcess

DEEP = b'{"query": "q", "documents": ["a"], "x": ' + b"[" * 40 + b"]" * 40 + b"}"
CASES: list[tuple[str, str, bytes]] = [
    ("too-large", "/v1/rerank", b'{"query": "q", "documents": ["' + b"x" * (3 * 1024 * 1024) + b'"]}'),
    ("not-json", "/v1/rerank", b'{"query": "q", "documents": ['),
    ("deep", "/v1/rerank", DEEP),
    ("deep-tei", "/rerank", DEEP.replace(b'"documents"', b'"texts"')),
    ("lone-surrogate", "/v2/rerank", b'{"query": "q \\ud800", "documents": ["a"]}'),
    ("schema", "/v2/rerank", b'{"query": "q", "documents": "not a list"}'),
    ("blank-query", "/rerank", b'{"query": " ", "documents": ["a"], "top_k": 1}'),
    ("empty-tei", "/rerank", b'{"query": "q", "texts": []}'),
    ("nim-schema", "/v1/ranking", b'{"query": "q", "passages": [{"text": "a"}]}'),
    ("score-n-m", "/score", b'{"text_1": ["a", "b"], "text_2": ["c", "d", "e"]}'),
    ("too-many", "/v2/rerank", b'{"query": "q", "documents": [' + b",".join([b'"d"'] * 1001) + b"]}"),
]


@pytest.fixture(scope="module")
def fanning(tmp_path_factory: pytest.TempPathFactory, minilm_servers: list[ServerProcess]) -> Iterator[GatewayProcess]:
    process = GatewayProcess(tmp_path_factory.mktemp("gateway"),
                             [fleet("minilm", [MINILM], [s.url for s in minilm_servers])],
                             {"RERANKER_GATEWAY_FANOUT_THRESHOLD": "4"})
    yield process
    process.stop()


@pytest.mark.parametrize("name,path,body", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_the_servers_answer_without_being_forwarded(
        fanning: GatewayProcess, minilm_servers: list[ServerProcess], name: str, path: str, body: bytes) -> None:
    headers = {"content-type": "application/json"}
    before = fanning.metric("reranker_gateway_upstream_requests_total")
    through = httpx.post(fanning.url + path, content=body, headers=headers, timeout=30)
    assert fanning.metric("reranker_gateway_upstream_requests_total") == before  # never forwarded
    direct = httpx.post(minilm_servers[0].url + path, content=body, headers=headers, timeout=30)
    assert 400 <= through.status_code < 500
    assert (through.status_code, through.json()) == (direct.status_code, direct.json())

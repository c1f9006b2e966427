"""The client libraries users reach rerankers through, as their packages from PyPI ship them,
against a real `reranker serve` process on the embedded MiniLM: LiteLLM (six providers),
LangChain (Cohere's and NVIDIA's rerankers in a ContextualCompressionRetriever), LlamaIndex
(the Cohere postprocessor on a tiny index) and Haystack (the TEI and Cohere rankers).

Each is pointed at the server only by its base URL, as docs/clients.md shows, and must rank as
the native route does: same order, scores within 1e-6, its own top-n honoured.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from servers import ServerProcess

QUERY = "What is machine learning?"
DOCS = ["Python is a programming language", "Machine learning is a subset of AI", "Paris is in France"]
#: Not a Cohere, NVIDIA or Hugging Face key: any bearer token is accepted by a server without keys.
KEY = "any-token"

# No network here: LiteLLM reads its bundled model cost map instead of fetching it; Haystack and
# LlamaIndex send no telemetry.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("HAYSTACK_TELEMETRY_ENABLED", "False")


@pytest.fixture(scope="module")
def server(module_server_factory: Callable[..., ServerProcess]) -> ServerProcess:
    return module_server_factory()


@pytest.fixture(scope="module")
def reference(server: ServerProcess) -> dict[str, list[float]]:
    """The native route's scores by document index: activated, and raw (NIM answers logits)."""
    out = {}
    for kind, raw in (("scores", False), ("raw", True)):
        body = httpx.post(server.url + "/rerank", json={"query": QUERY, "documents": DOCS, "raw_scores": raw}).json()
        out[kind] = [r["score"] for r in sorted(body["results"], key=lambda r: r["index"])]
    return out


def check(ranked: list[tuple[int, float | None]], expected: list[float], top: int) -> None:
    """`ranked`: (document index, score) as the client returned them."""
    assert [i for i, _ in ranked] == sorted(range(len(expected)), key=lambda i: -expected[i])[:top]
    for i, score in ranked:
        assert score == pytest.approx(expected[i], abs=1e-6)


LITELLM = [("cohere/rerank-v3.5", "scores"), ("jina_ai/jina-reranker-v2-base-multilingual", "scores"),
           ("hosted_vllm/BAAI/bge-reranker-base", "scores"), ("huggingface/BAAI/bge-reranker-base", "scores"),
           ("nvidia_nim/nvidia/llama-3_2-nv-rerankqa-1b-v2", "raw"),
           ("nvidia_nim/ranking/nvidia/llama-3.2-nv-rerankqa-1b-v2", "raw")]


@pytest.mark.parametrize(("model", "kind"), LITELLM, ids=[m.split("/")[0] + ("-ranking" if "/ranking/" in m else "")
                                                          for m, _ in LITELLM])
def test_litellm_rerank(server: ServerProcess, reference: dict[str, list[float]], model: str, kind: str) -> None:
    import litellm

    response = litellm.rerank(model=model, query=QUERY, documents=DOCS, top_n=2, api_base=server.url, api_key=KEY)
    check([(r["index"], r["relevance_score"]) for r in response.results], reference[kind], 2)
    if not model.startswith("nvidia_nim/"):  # NIM answers no documents
        assert response.results[0]["document"]["text"] == DOCS[1]


def test_litellm_infinity(server: ServerProcess, reference: dict[str, list[float]]) -> None:
    """LiteLLM's `infinity` provider posts to /rerank exactly what `hosted_vllm` posts (same body, same
    path), but reads `document` as a string where vLLM answers {text}: the server answers vLLM's form,
    so Infinity's callers ask for no documents back (docs/clients.md). With them, LiteLLM's parser
    refuses the answer; this test says so rather than skipping it."""
    import litellm

    response = litellm.rerank(model="infinity/BAAI/bge-reranker-base", query=QUERY, documents=DOCS, top_n=2,
                              return_documents=False, api_base=server.url, api_key=KEY)
    check([(r["index"], r["relevance_score"]) for r in response.results], reference["scores"], 2)
    with pytest.raises(Exception, match="document"):
        litellm.rerank(model="infinity/BAAI/bge-reranker-base", query=QUERY, documents=DOCS, top_n=2,
                       api_base=server.url, api_key=KEY)


def _langchain_retriever(compressor: Any) -> Any:
    from langchain_classic.retrievers import ContextualCompressionRetriever
    from langchain_core.documents import Document
    from langchain_core.embeddings import DeterministicFakeEmbedding
    from langchain_core.vectorstores import InMemoryVectorStore

    # The first stage is not under test: LangChain's own deterministic embedding (no embedding
    # service here) and k covering every document, so the order that comes out is the reranker's.
    store = InMemoryVectorStore.from_documents([Document(page_content=d, metadata={"i": i}) for i, d in enumerate(DOCS)],
                                               DeterministicFakeEmbedding(size=32))
    return ContextualCompressionRetriever(base_compressor=compressor,
                                          base_retriever=store.as_retriever(search_kwargs={"k": len(DOCS)}))


def test_langchain_cohere_rerank(server: ServerProcess, reference: dict[str, list[float]]) -> None:
    from langchain_cohere import CohereRerank

    retriever = _langchain_retriever(CohereRerank(model="rerank-v3.5", base_url=server.url, cohere_api_key=KEY, top_n=2))
    docs = retriever.invoke(QUERY)
    check([(d.metadata["i"], d.metadata["relevance_score"]) for d in docs], reference["scores"], 2)


def test_langchain_nvidia_rerank(server: ServerProcess, reference: dict[str, list[float]]) -> None:
    from langchain_nvidia_ai_endpoints import NVIDIARerank

    # No model named: it asks GET /v1/models and takes the first, the loaded model.
    with pytest.warns(UserWarning, match="Default model is set as: sentence-transformers/all-MiniLM-L6-v2"):
        reranker = NVIDIARerank(base_url=server.url + "/v1", top_n=2)
    docs = _langchain_retriever(reranker).invoke(QUERY)
    check([(d.metadata["i"], d.metadata["relevance_score"]) for d in docs], reference["raw"], 2)


def test_llamaindex_cohere_rerank(server: ServerProcess, reference: dict[str, list[float]]) -> None:
    from llama_index.core import VectorStoreIndex
    from llama_index.core.embeddings import MockEmbedding
    from llama_index.core.schema import TextNode
    from llama_index.postprocessor.cohere_rerank import CohereRerank

    # As in LangChain's test: LlamaIndex's own constant embedding (no embedding service here) and a
    # top k covering every node, so the order is the reranker's.
    index = VectorStoreIndex([TextNode(text=d, id_=str(i)) for i, d in enumerate(DOCS)],
                             embed_model=MockEmbedding(embed_dim=8))
    nodes = index.as_retriever(similarity_top_k=len(DOCS)).retrieve(QUERY)
    reranked = CohereRerank(api_key=KEY, base_url=server.url, top_n=2).postprocess_nodes(nodes, query_str=QUERY)
    check([(int(n.node.node_id), n.score) for n in reranked], reference["scores"], 2)


def test_haystack_tei_ranker(server: ServerProcess, reference: dict[str, list[float]]) -> None:
    from haystack import Document
    from haystack_integrations.components.rankers.huggingface_api import HuggingFaceTEIRanker

    ranker = HuggingFaceTEIRanker(url=server.url, top_k=2, token=None)
    docs = ranker.run(query=QUERY, documents=[Document(content=d, meta={"i": i}) for i, d in enumerate(DOCS)])["documents"]
    check([(d.meta["i"], d.score) for d in docs], reference["scores"], 2)


def test_haystack_cohere_ranker(server: ServerProcess, reference: dict[str, list[float]]) -> None:
    from haystack import Document
    from haystack.utils import Secret
    from haystack_integrations.components.rankers.cohere import CohereRanker

    ranker = CohereRanker(api_key=Secret.from_token(KEY), api_base_url=server.url, top_k=2)
    docs = ranker.run(query=QUERY, documents=[Document(content=d, meta={"i": i}) for i, d in enumerate(DOCS)])["documents"]
    check([(d.meta["i"], d.score) for d in docs], reference["scores"], 2)

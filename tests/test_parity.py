"""Score parity: every route scores exactly what sentence-transformers scores (fp32, 1e-5).

Cross-encoders are compared with `CrossEncoder.predict` (sigmoid activation), the embedded
bi-encoder with `SentenceTransformer` embeddings and cosine similarity. Documents include one
far longer than the max length, so truncation must match too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from servers import running_app

QUERY = "What is machine learning?"
DOCS = [
    "Machine learning is a subset of AI",
    "Python is a programming language",
    "The capital of France is Paris, a city on the Seine.",
    "learning " * 700,  # far past every max length: truncated, never an error
    "Rerankers score how relevant a document is to a search query.",
]


def reference_cross(path: Path, max_length: int) -> np.ndarray:
    from sentence_transformers import CrossEncoder

    model = CrossEncoder(str(path), max_length=max_length, device="cpu")
    return np.asarray(model.predict([(QUERY, d) for d in DOCS], activation_fn=torch.nn.Sigmoid()), dtype=np.float64)


def reference_bi(path: Path) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(path), device="cpu")
    q = model.encode([QUERY], convert_to_numpy=True)[0]
    d = model.encode(DOCS, convert_to_numpy=True)
    return (d @ q) / (np.linalg.norm(d, axis=1) * np.linalg.norm(q))


async def scores_from_every_route(client) -> dict[str, np.ndarray]:  # type: ignore[no-untyped-def]
    out: dict[str, np.ndarray] = {}
    native = (await client.post("/rerank", json={"query": QUERY, "documents": DOCS})).json()
    out["native"] = np.array([r["score"] for r in sorted(native["results"], key=lambda r: r["index"])])
    tei = (await client.post("/rerank", json={"query": QUERY, "texts": DOCS})).json()
    out["tei"] = np.array([r["score"] for r in sorted(tei, key=lambda r: r["index"])])
    v1 = (await client.post("/v1/rerank", json={"query": QUERY, "documents": DOCS})).json()
    out["v1"] = np.array([r["relevance_score"] for r in sorted(v1["results"], key=lambda r: r["index"])])
    v2 = (await client.post("/v2/rerank", json={"query": QUERY, "documents": DOCS})).json()
    out["v2"] = np.array([r["relevance_score"] for r in sorted(v2["results"], key=lambda r: r["index"])])
    return out


@pytest.mark.parametrize("model_fixture", ["tiny_bert", "tiny_xlmr"])
async def test_cross_encoder_parity(model_fixture: str, request: pytest.FixtureRequest) -> None:
    path: Path = request.getfixturevalue(model_fixture)
    expected = reference_cross(path, max_length=128)
    assert np.ptp(expected) > 1e-3, "random model should give distinct scores"
    async with running_app(model=str(path), max_length=512, enable_prediction_cache=False) as client:
        for route, got in (await scores_from_every_route(client)).items():
            np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0, err_msg=route)


async def test_bi_encoder_parity(minilm: Path) -> None:
    expected = reference_bi(minilm)
    async with running_app(enable_prediction_cache=False) as client:
        health = (await client.get("/health")).json()
        assert health["model"]["kind"] == "bi-encoder"
        for route, got in (await scores_from_every_route(client)).items():
            np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0, err_msg=route)


async def test_raw_scores_are_logits(tiny_bert: Path) -> None:
    from sentence_transformers import CrossEncoder

    logits = CrossEncoder(str(tiny_bert), max_length=128, device="cpu").predict(
        [(QUERY, d) for d in DOCS], activation_fn=torch.nn.Identity())
    async with running_app(model=str(tiny_bert)) as client:
        tei = (await client.post("/rerank", json={"query": QUERY, "texts": DOCS, "raw_scores": True})).json()
        got = np.array([r["score"] for r in sorted(tei, key=lambda r: r["index"])])
        np.testing.assert_allclose(got, logits, atol=1e-5, rtol=0)
        native = (await client.post("/rerank", json={"query": QUERY, "documents": DOCS, "raw_scores": True})).json()
        assert any(r["score"] < 0 or r["score"] > 1 for r in native["results"])


async def test_two_label_head_scores_softmax_positive_class(tmp_path: Path) -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    import models
    from sentence_transformers import CrossEncoder

    path = models.build_tiny_bert(tmp_path / "two", num_labels=2, seed=3)
    logits = CrossEncoder(str(path), max_length=128, device="cpu").predict(
        [(QUERY, d) for d in DOCS], activation_fn=torch.nn.Identity())
    expected = torch.softmax(torch.tensor(logits, dtype=torch.float64), dim=1)[:, 1].numpy()
    async with running_app(model=str(path)) as client:
        v1 = (await client.post("/v1/rerank", json={"query": QUERY, "documents": DOCS})).json()
        got = np.array([r["relevance_score"] for r in sorted(v1["results"], key=lambda r: r["index"])])
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)

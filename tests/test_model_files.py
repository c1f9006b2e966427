"""Which model folder the server loads: RERANKER_LOCAL_MODEL_PATH alone, the embedded model's id.

A pod of a RerankerDeployment with only `model.localPath` (or `model.pvc`) gets
RERANKER_LOCAL_MODEL_PATH and no RERANKER_MODEL: it must serve exactly that folder, never the
embedded default instead. One whose `model.id` is the embedded model's id serves the weights
inside the image with no hub call, so fleets run without internet. Both are checked through
the app's lifespan (the real loading path) and on `model_files.resolve` itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NoReturn

import pytest

from reranker.backends import BackendError, model_files
from servers import running_app

QUERY = "What is machine learning?"
DOCS = ["Machine learning is a subset of artificial intelligence.", "Paris is in France.",
        "Python is a programming language."]


@pytest.fixture
def no_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hub is unreachable here anyway; this makes a hub call fail loudly on any machine."""
    def refuse(model: str, revision: str | None) -> NoReturn:
        raise AssertionError(f"hub called for {model}@{revision}")
    monkeypatch.setattr(model_files, "_download", refuse)


async def _serving(**settings: Any) -> dict[str, Any]:
    """What /health says is serving, after a real request went through it."""
    async with running_app(warmup_on_start=False, **settings) as client:
        r = await client.post("/v1/rerank", json={"query": QUERY, "documents": DOCS})
        assert r.status_code == 200, r.text
        assert len(r.json()["results"]) == len(DOCS)
        info: dict[str, Any] = (await client.get("/health")).json()["model"]
        return info


async def test_local_model_path_alone_is_the_model(tiny_bert: Path, no_hub: None) -> None:
    info = await _serving(local_model_path=str(tiny_bert))
    # The tiny random cross-encoder, not the embedded bi-encoder.
    assert info["model"] == str(tiny_bert) and info["kind"] == "cross-encoder"
    assert info["revision"].startswith("local-")
    files = model_files.resolve(None, revision=None, local_fallback=tiny_bert)
    assert files.path == tiny_bert.resolve()


def test_local_model_path_that_is_not_a_folder_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(BackendError, match="RERANKER_LOCAL_MODEL_PATH=.*is not a folder"):
        model_files.resolve(None, revision=None, local_fallback=tmp_path / "missing")


async def test_embedded_model_id_is_served_offline(no_hub: None) -> None:
    info = await _serving(model=model_files.EMBEDDED_MODEL_NAME)
    assert info["model"] == model_files.EMBEDDED_MODEL_NAME
    assert info["revision"].startswith("embedded")
    files = model_files.resolve(model_files.EMBEDDED_MODEL_NAME, revision=None,
                                local_fallback=None)
    assert files.path == model_files.embedded_model_path() and files.revision.startswith("embedded")
    assert files.kind == "bi-encoder"


def test_a_pinned_revision_of_the_embedded_id_goes_to_the_hub(no_hub: None) -> None:
    with pytest.raises(BackendError, match="hub called for sentence-transformers/all-MiniLM-L6-v2@abc123"):
        model_files.resolve(model_files.EMBEDDED_MODEL_NAME, revision="abc123", local_fallback=None)


def test_with_an_id_the_local_path_is_the_offline_fallback(tiny_bert: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    def unreachable(model: str, revision: str | None) -> NoReturn:
        raise OSError("hub unreachable")
    monkeypatch.setattr(model_files, "_download", unreachable)
    files = model_files.resolve("org/some-cross-encoder", revision=None, local_fallback=tiny_bert)
    assert files.path == tiny_bert.resolve() and files.name == "org/some-cross-encoder"
    assert files.kind == "cross-encoder"

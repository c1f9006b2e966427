"""The MLX backend against the PyTorch backend: same tokens, same scores (1e-4), same rankings.

MLX runs here on its Linux CPU build (mlx[cpu]): the same code and numerics as on a Mac, with a
slow reference BLAS, so the MiniLM inputs are kept small. The tiny random models of
tests/models.py cover the BERT and XLM-RoBERTa cross-encoder heads; the real MiniLM weights
cover the bi-encoder path, checked against sentence-transformers too.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import platform
import shutil
import threading
from pathlib import Path

import httpx
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import models
from servers import running_app
from reranker import backends
from reranker.backends import Backend, BackendError, DeviceUnavailable, load_backend, pick_runtime
from reranker.settings import Settings

LONG_DOC = " ".join(models.CORPUS[:30])  # ~450 tokens: truncated by every model here
PAIRS = [
    ("what is the capital of france", "The capital of France is Paris, a city on the Seine."),
    ("rerankers", "Rerankers score how relevant a document is to a search query."),
    ("kubernetes restarts", LONG_DOC),
    ("a", "b"),
    ("redis cache", "Redis is an in-memory data store used as a cache and message broker. " * 3),
    ("Berlin", "Die Hauptstadt von Deutschland ist Berlin."),
]
TOL = 1e-4


def load(model: Path | None, device: str, **settings: object) -> Backend:
    # tests/conftest.py defaults test servers to RERANKER_RUNTIME=torch (the references are torch fp32):
    # the MLX side names its runtime, as a user who sets RERANKER_RUNTIME must.
    runtime = "mlx" if device == "mlx" else "torch"
    return load_backend(Settings(model=str(model) if model else None, device=device, runtime=runtime,  # type: ignore[arg-type]
                                 warmup_on_start=False, **settings))


def max_diff(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b)
    return float(np.max(np.abs(np.array(a) - np.array(b))))


def assert_same_tokens(ref: Backend, mlx: Backend, pairs: list[tuple[str, str]]) -> list[int]:
    lengths = mlx.pair_lengths(pairs)
    assert lengths == ref.pair_lengths(pairs)
    assert mlx.token_counts([d for _, d in pairs]) == ref.token_counts([d for _, d in pairs])
    assert mlx.token_offsets(LONG_DOC) == ref.token_offsets(LONG_DOC)
    assert mlx.special_tokens_per_pair == ref.special_tokens_per_pair
    assert mlx.info.max_length == ref.info.max_length
    return lengths


# --- cross-encoders ------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["tiny_bert", "tiny_xlmr"])
def test_cross_encoder_matches_torch(family: str, request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(family)
    ref, mlx = load(path, "cpu"), load(path, "mlx")
    lengths = assert_same_tokens(ref, mlx, PAIRS)
    assert lengths[2] == mlx.info.max_length, "the long pair must be truncated"
    assert len(set(lengths)) >= 4, "the batch must mix lengths, so most rows are padded"

    scores = mlx.score(PAIRS)
    assert max_diff(scores, ref.score(PAIRS)) <= TOL
    # Padding changes nothing: each pair alone scores as in the padded batch.
    alone = [mlx.score([pair])[0] for pair in PAIRS]
    assert max_diff(alone, scores) <= 1e-5
    assert mlx.info.backend == "mlx" and mlx.info.kind == "cross-encoder" and mlx.info.activation == "sigmoid"
    assert mlx.info.fingerprint == ref.info.fingerprint  # one shared cache for pods and Macs (fp32)


@pytest.mark.parametrize("builder", [models.build_tiny_bert, models.build_tiny_xlmr])
def test_two_label_head_scores_log_odds(builder, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Two labels (no/yes): the raw score is l1 - l0, computed here from transformers directly."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = builder(tmp_path / "two-labels", num_labels=2, seed=5)
    mlx = load(path, "mlx")
    tok = AutoTokenizer.from_pretrained(str(path))
    hf = AutoModelForSequenceClassification.from_pretrained(str(path)).eval()
    features = tok([q for q, _ in PAIRS], [d for _, d in PAIRS], padding=True, truncation=True,
                   max_length=mlx.info.max_length, return_tensors="pt")
    with torch.inference_mode():
        logits = hf(**features).logits.float()
    expected = (logits[:, 1] - logits[:, 0]).tolist()
    assert max_diff(mlx.score(PAIRS), expected) <= TOL
    assert max_diff(mlx.score(PAIRS), load(path, "cpu").score(PAIRS)) <= TOL


@pytest.mark.parametrize("family,prefix", [("tiny_bert", "bert."), ("tiny_xlmr", "roberta.")])
def test_checkpoint_without_prefix_loads(family: str, prefix: str, request: pytest.FixtureRequest,
                                         tmp_path: Path) -> None:
    """Checkpoints saved with the backbone prefix (`bert.`, `roberta.`) or without it score alike."""
    from safetensors.numpy import load_file, save_file

    source: Path = request.getfixturevalue(family)
    folder = tmp_path / "bare"
    shutil.copytree(source, folder)
    weights = load_file(str(source / "model.safetensors"))
    assert any(k.startswith(prefix) for k in weights)
    bare = {k.removeprefix(prefix): v for k, v in weights.items()}
    save_file(bare, str(folder / "model.safetensors"), metadata={"format": "pt"})
    assert max_diff(load(folder, "mlx").score(PAIRS), load(source, "mlx").score(PAIRS)) == 0.0


def test_pytorch_bin_checkpoint_loads(tiny_xlmr: Path, tmp_path: Path) -> None:
    """A model folder with only pytorch_model.bin (older hub models) loads through torch."""
    import torch
    from safetensors.torch import load_file

    folder = tmp_path / "bin-only"
    shutil.copytree(tiny_xlmr, folder)
    torch.save(load_file(str(folder / "model.safetensors")), str(folder / "pytorch_model.bin"))
    (folder / "model.safetensors").unlink()
    assert max_diff(load(folder, "mlx").score(PAIRS), load(tiny_xlmr, "mlx").score(PAIRS)) == 0.0


def test_bi_encoder_from_prefixed_checkpoint(tiny_bert: Path) -> None:
    """A BERT checkpoint whose keys carry `bert.` also loads as a bi-encoder (mean pooling, cosine)."""
    ref, mlx = load(tiny_bert, "cpu", model_kind="bi-encoder"), load(tiny_bert, "mlx", model_kind="bi-encoder")
    assert mlx.info.kind == "bi-encoder" and mlx.info.activation == "identity"
    assert_same_tokens(ref, mlx, PAIRS)
    assert max_diff(mlx.score(PAIRS), ref.score(PAIRS)) <= TOL


# --- the real MiniLM weights -----------------------------------------------------------------

@pytest.fixture(scope="module")
def minilm_pair() -> tuple[Backend, Backend]:
    return load(None, "cpu"), load(None, "mlx")


def test_minilm_matches_torch_and_sentence_transformers(minilm_pair: tuple[Backend, Backend], minilm: Path) -> None:
    from sentence_transformers import SentenceTransformer

    ref, mlx = minilm_pair
    assert mlx.info.model == ref.info.model == "sentence-transformers/all-MiniLM-L6-v2"
    lengths = assert_same_tokens(ref, mlx, PAIRS)
    assert lengths[2] == mlx.info.max_length == 256, "the long document must be truncated to 256 tokens"
    # Two batches, to keep the reference-BLAS CPU build quick: the truncated one on its own, and the
    # others together (mixed lengths, so most rows are padded).
    long_batch, mixed = [PAIRS[2]], [p for i, p in enumerate(PAIRS) if i != 2]
    pairs = long_batch + mixed
    scores = mlx.score(long_batch) + mlx.score(mixed)
    assert max_diff(scores, ref.score(long_batch) + ref.score(mixed)) <= TOL

    st = SentenceTransformer(str(minilm), device="cpu")
    q = st.encode([p[0] for p in pairs], normalize_embeddings=True, convert_to_numpy=True)
    d = st.encode([p[1] for p in pairs], normalize_embeddings=True, convert_to_numpy=True)
    assert max_diff(scores, (q * d).sum(axis=1).tolist()) <= TOL


def test_minilm_quantized_modules_and_info(minilm_pair: tuple[Backend, Backend]) -> None:
    """int8 on MiniLM (hidden 384): every Linear and the word embeddings become 8-bit, group 64."""
    mlx_int8 = load(None, "mlx", quantization="int8")
    assert mlx_int8.info.dtype == "int8"
    modules = dict(mlx_int8.model.named_modules())  # type: ignore[attr-defined]
    linears = [m for m in modules.values() if isinstance(m, (nn.Linear, nn.QuantizedLinear))]
    assert linears and all(isinstance(m, nn.QuantizedLinear) and m.bits == 8 and m.group_size == 64 for m in linears)
    assert isinstance(modules["embeddings.word_embeddings"], nn.QuantizedEmbedding)
    assert isinstance(modules["embeddings.position_embeddings"], nn.Embedding)
    assert modules["embeddings.LayerNorm"].weight.dtype == mx.float32
    # Small inputs only: the Linux CPU build of MLX uses a reference BLAS.
    few = PAIRS[:2]
    assert max_diff(mlx_int8.score(few), minilm_pair[1].score(few)) <= 0.02


# --- dtypes, info, threads, errors -----------------------------------------------------------

def test_info_reports_dtype_and_device(tiny_bert: Path) -> None:
    expected_device = "mlx-gpu" if mx.default_device().type == mx.DeviceType.gpu else "mlx-cpu"
    if platform.system() == "Linux":
        assert expected_device == "mlx-cpu"
    fp32 = load(tiny_bert, "mlx")
    reference = fp32.score(PAIRS)
    for quantization, dtype_name, dtype in [("bf16", "bf16", mx.bfloat16), ("fp16", "fp16", mx.float16)]:
        backend = load(tiny_bert, "mlx", quantization=quantization)
        assert (backend.info.backend, backend.info.device, backend.info.dtype) == ("mlx", expected_device, dtype_name)
        weight = backend.model.bert.encoder.layer[0].attention.self.query.weight  # type: ignore[attr-defined]
        assert weight.dtype == dtype
        scores = backend.score(PAIRS)
        assert all(isinstance(s, float) for s in scores)
        assert max_diff(scores, reference) <= 0.05
    assert (fp32.info.device, fp32.info.dtype) == (expected_device, "fp32")


def build_bert(folder: Path, *, hidden: int, intermediate: int) -> Path:
    """A random BERT cross-encoder of the given widths, with MiniLM's tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    torch.manual_seed(3)
    config = BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=intermediate, max_position_embeddings=128,
                        num_labels=1)  # type: ignore[call-arg]
    BertForSequenceClassification(config).save_pretrained(str(folder))
    AutoTokenizer.from_pretrained(str(models.minilm_path())).save_pretrained(str(folder))
    return folder


def test_int8_on_dims_that_do_not_fit_the_group_stays_fp32(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """No input dimension (32, 96) is a multiple of 64: nothing is quantized, and /health says fp32."""
    folder = build_bert(tmp_path / "bert-32-96", hidden=32, intermediate=96)
    with caplog.at_level(logging.WARNING, logger="reranker.backends.mlx"):
        backend = load(folder, "mlx", quantization="int8")
    assert backend.info.dtype == "fp32"
    assert "int8 left it in fp32" in caplog.text
    assert not any(isinstance(m, nn.QuantizedLinear) for _, m in backend.model.named_modules())  # type: ignore[attr-defined]
    assert max_diff(backend.score(PAIRS), load(folder, "cpu").score(PAIRS)) <= TOL


def test_int8_quantizes_the_layers_that_fit(tiny_bert: Path, tmp_path: Path) -> None:
    """tiny_bert (hidden 32, intermediate 64): only the FFN output layers (input 64) are quantized.
    A model whose dims all fit gets every Linear quantized, the classifier included."""
    partial = load(tiny_bert, "mlx", quantization="int8")
    assert partial.info.dtype == "int8"
    layer = partial.model.bert.encoder.layer[0]  # type: ignore[attr-defined]
    assert isinstance(layer.output.dense, nn.QuantizedLinear)
    assert not isinstance(layer.intermediate.dense, nn.QuantizedLinear)
    assert max_diff(partial.score(PAIRS), load(tiny_bert, "mlx").score(PAIRS)) <= 0.05

    folder = build_bert(tmp_path / "bert-64", hidden=64, intermediate=128)
    fp32, int8 = load(folder, "mlx"), load(folder, "mlx", quantization="int8")
    assert int8.info.dtype == "int8"
    assert isinstance(int8.model.classifier, nn.QuantizedLinear)  # type: ignore[attr-defined]
    assert isinstance(int8.model.bert.pooler.dense, nn.QuantizedLinear)  # type: ignore[attr-defined]
    assert isinstance(int8.model.bert.embeddings.word_embeddings, nn.QuantizedEmbedding)  # type: ignore[attr-defined]
    diff = max_diff(int8.score(PAIRS), fp32.score(PAIRS))
    assert 0 < diff <= 0.02, diff


def test_scores_from_many_threads(tiny_xlmr: Path) -> None:
    """The batcher calls score from worker threads; MLX streams are thread-local, the backend copes."""
    backend = load(tiny_xlmr, "mlx")
    expected = backend.score(PAIRS)
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda _: backend.score(PAIRS), range(8)))
    assert all(max_diff(r, expected) == 0.0 for r in results)
    # Loaded from a thread that then ends, scored from another: still fine.
    holder: dict[str, Backend] = {}
    thread = threading.Thread(target=lambda: holder.update(b=load(tiny_xlmr, "mlx")))
    thread.start()
    thread.join()
    assert max_diff(holder["b"].score(PAIRS), expected) == 0.0
    holder["b"].close()


def test_unsupported_architecture_is_a_clear_error(tmp_path: Path) -> None:
    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2Model"]}))
    with pytest.raises(BackendError, match="BERT and XLM-RoBERTa families only.*PyTorch"):
        load(folder, "mlx")


def test_missing_head_is_a_clear_error() -> None:
    """MiniLM has no classification head: forcing cross-encoder fails instead of scoring with random weights."""
    with pytest.raises(BackendError, match=r"lacks .*classifier.*RERANKER_MODEL_KIND"):
        load(None, "mlx", model_kind="cross-encoder")


def test_device_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    def auto(**settings: object) -> str:
        return pick_runtime(Settings(runtime="auto", **settings))  # type: ignore[arg-type]

    monkeypatch.setattr(backends, "_gpu_present", lambda: False)
    assert auto(device="mlx") == "mlx"  # forced: works on Linux with mlx[cpu]
    assert pick_runtime(Settings(runtime="mlx")) == "mlx"
    assert auto(device="cpu") == "openvino"  # a CPU without Apple silicon: tests/test_openvino_backend.py
    monkeypatch.setattr(backends, "_apple_silicon", lambda: False)
    assert auto(device="auto") == "openvino"
    monkeypatch.setattr(backends, "_apple_silicon", lambda: True)
    assert auto(device="auto") == "mlx"
    assert auto(device="auto", use_mlx=False) == "openvino"
    assert pick_runtime(Settings(runtime="torch", device="auto")) == "torch"
    with pytest.raises(DeviceUnavailable, match="not RERANKER_RUNTIME=torch"):
        pick_runtime(Settings(runtime="torch", device="mlx"))
    monkeypatch.setattr(backends.importlib.util, "find_spec", lambda name: None)  # neither mlx nor openvino installed
    assert auto(device="auto") == "torch"
    with pytest.raises(DeviceUnavailable, match=r"pip install 'reranker-fleet\[mlx\]'"):
        auto(device="mlx")


# --- servers ---------------------------------------------------------------------------------

QUERY = "how do vaccines work"
DOCS = [
    "Vacuum cleaners work by creating low pressure that pulls in dust.",
    "Vaccines train the immune system to recognise a germ without causing the disease.",
    "The river flooded the valley after days of heavy rain.",
    "After vaccination the body makes antibodies that fight the real infection later.",
    "Jazz music developed in New Orleans in the early twentieth century.",
]


async def route_answers(client: httpx.AsyncClient) -> dict[str, list[tuple[int, float]]]:
    """(index, score) in ranked order from every rerank route and dialect."""
    out: dict[str, list[tuple[int, float]]] = {}
    r = await client.post("/rerank", json={"query": QUERY, "documents": DOCS})
    assert r.status_code == 200, r.text
    out["native"] = [(x["index"], x["score"]) for x in r.json()["results"]]
    r = await client.post("/rerank", json={"query": QUERY, "texts": DOCS, "raw_scores": True})
    assert r.status_code == 200, r.text
    out["tei"] = [(x["index"], x["score"]) for x in r.json()]
    r = await client.post("/v1/rerank", json={"query": QUERY, "documents": [{"text": d} for d in DOCS], "top_n": 3})
    assert r.status_code == 200, r.text
    out["v1"] = [(x["index"], x["relevance_score"]) for x in r.json()["results"]]
    r = await client.post("/v2/rerank", json={"query": QUERY, "documents": DOCS, "top_n": 3})
    assert r.status_code == 200, r.text
    out["v2"] = [(x["index"], x["relevance_score"]) for x in r.json()["results"]]
    return out


def assert_same_ranking(got: dict[str, list[tuple[int, float]]], want: dict[str, list[tuple[int, float]]]) -> None:
    assert got.keys() == want.keys()
    for route in want:
        assert [i for i, _ in got[route]] == [i for i, _ in want[route]], route
        assert max_diff([s for _, s in got[route]], [s for _, s in want[route]]) <= TOL, route


async def test_mlx_server_answers_every_route_like_torch() -> None:
    async with running_app(device="cpu") as client:
        torch_answers = await route_answers(client)
    async with running_app(device="mlx", runtime="mlx") as client:
        mlx_answers = await route_answers(client)
        health = (await client.get("/health")).json()
        metrics = (await client.get("/metrics")).text
    assert torch_answers["native"][0][0] in (1, 3) and len(torch_answers["native"]) == len(DOCS)
    assert_same_ranking(mlx_answers, torch_answers)
    assert health["status"] == "healthy"
    assert (health["model"]["backend"], health["model"]["device"], health["model"]["dtype"]) == ("mlx", "mlx-cpu", "fp32") \
        or platform.system() != "Linux"
    assert 'backend="mlx"' in metrics and "reranker_model_info" in metrics


def test_uvicorn_server_with_mlx(uvicorn_server, minilm_pair: tuple[Backend, Backend]) -> None:  # type: ignore[no-untyped-def]
    """The real `reranker serve` with RERANKER_DEVICE=mlx ranks as the PyTorch backend does."""
    server = uvicorn_server({"RERANKER_DEVICE": "mlx", "RERANKER_RUNTIME": "mlx"})
    health = httpx.get(server.url + "/health", timeout=10).json()
    assert health["model"]["backend"] == "mlx" and health["status"] == "healthy"
    raw = minilm_pair[0].score([(QUERY, d) for d in DOCS])
    want_order = sorted(range(len(DOCS)), key=lambda i: -raw[i])

    async def ask() -> dict[str, list[tuple[int, float]]]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            return await route_answers(client)
    answers = asyncio.run(ask())
    for route, ranked in answers.items():
        assert [i for i, _ in ranked] == want_order[: len(ranked)], route
    assert max_diff([s for _, s in answers["tei"]], [raw[i] for i in want_order]) <= TOL


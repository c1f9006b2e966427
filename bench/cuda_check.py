"""CUDA paths, checked on a GPU machine: fp32/fp16/bf16, mixed precision, torch.compile.

    python bench/cuda_check.py TOKENIZER_DIR [OUT_JSON]

Builds a MiniLM-sized cross-encoder (random weights, MiniLM's tokenizer), scores the same
pairs with the CPU fp32 backend (the reference) and with each CUDA configuration, and prints
max abs difference, Spearman correlation and pairs/s (ratios to CUDA fp32, same run). Then
serves the app in-process on CUDA and checks /health and the scores of /rerank and
/v1/rerank. Not part of the test suite: CI has no GPU.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def build(tok_dir: str) -> Path:
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tok = AutoTokenizer.from_pretrained(tok_dir)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                     intermediate_size=1536, max_position_embeddings=512, num_labels=1, initializer_range=0.05)
    torch.manual_seed(0)
    folder = Path(tempfile.mkdtemp(prefix="ce-"))
    BertForSequenceClassification(cfg).eval().save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def rate(backend, pairs, batch: int) -> float:  # type: ignore[no-untyped-def]
    for i in range(0, 4 * batch, batch):  # warm every shape the timed loop uses
        backend.score(pairs[i:i + batch])
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(3):
        for i in range(0, len(pairs), batch):
            backend.score(pairs[i:i + batch])
    torch.cuda.synchronize()
    return 3 * len(pairs) / (time.perf_counter() - t0)


def main() -> int:
    from reranker.backends import load_backend
    from reranker.settings import Settings

    tok_dir = sys.argv[1]
    out_path = sys.argv[2] if len(sys.argv) > 2 else None
    model = build(tok_dir)
    rng = random.Random(0)
    words = "search ranking document query relevance model vector index cluster token batch latency river".split()
    pairs = [(f"query {i % 16} " + rng.choice(words), " ".join(rng.choice(words) for _ in range(rng.randint(100, 140))))
             for i in range(512)]
    report: dict = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "configs": {}}  # type: ignore[type-arg]
    ref_backend = load_backend(Settings(model=str(model), device="cpu"))
    ref = np.array(ref_backend.score(pairs[:128]))
    auto = load_backend(Settings(model=str(model)))
    report["auto_device"] = auto.info.device
    configs = {
        "fp32": dict(quantization="none"),
        "fp16": dict(quantization="fp16"),
        "bf16": dict(quantization="bf16"),
        "fp32+autocast": dict(quantization="none", enable_mixed_precision=True),
        "fp32+compile": dict(quantization="none", enable_torch_compile=True),
        "fp16+compile": dict(quantization="fp16", enable_torch_compile=True),
    }
    base_rate = None
    for name, kw in configs.items():
        try:
            b = load_backend(Settings(model=str(model), device="cuda", **kw))
            t0 = time.perf_counter()
            got = np.array(b.score(pairs[:128]))
            first = time.perf_counter() - t0
            r32, r128 = rate(b, pairs, 32), rate(b, pairs, 128)
            base_rate = base_rate or r32
            entry = {"dtype": b.info.dtype, "device": b.info.device, "max_abs_diff_logit": float(np.abs(got - ref).max()),
                     "spearman": spearman(got, ref), "pairs_per_s_b32": round(r32, 1), "pairs_per_s_b128": round(r128, 1),
                     "ratio_b32_to_fp32": round(r32 / base_rate, 2), "first_call_s": round(first, 2)}
        except Exception as exc:  # report every config, even a failing one
            entry = {"error": f"{exc.__class__.__name__}: {exc}"}
        report["configs"][name] = entry
        print(name, json.dumps(entry), flush=True)
    try:
        Settings(model=str(model), device="cuda", quantization="int8")
        report["int8_cuda"] = "accepted (unexpected)"
    except Exception as exc:
        report["int8_cuda"] = f"refused: {exc}"
    print("int8 on cuda:", report["int8_cuda"])
    report["server"] = asyncio.run(server_check(model, ref))
    print("server:", json.dumps(report["server"]))
    if out_path:
        Path(out_path).write_text(json.dumps(report, indent=2))
    return 0


async def server_check(model: Path, ref: np.ndarray) -> dict:  # type: ignore[type-arg]
    import httpx
    from reranker.app import create_app
    from reranker.settings import Settings

    out: dict = {}  # type: ignore[type-arg]
    for quant in ("none", "bf16"):
        app = create_app(Settings(model=str(model), device="cuda", quantization=quant))
        async with app.router.lifespan_context(app):
            runtime = app.state.runtime
            for _ in range(600):
                if runtime.loaded.is_set() or runtime.load_error:
                    break
                await asyncio.sleep(0.1)
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
                health = (await c.get("/health")).json()
                docs = ["machine learning is a subset of AI", "python is a language", "paris is in france"]
                native = (await c.post("/rerank", json={"query": "what is ML", "texts": docs, "raw_scores": True})).json()
                v1 = (await c.post("/v1/rerank", json={"query": "what is ML", "documents": docs})).json()
                out[quant] = {"health_model": health["model"], "ready": (await c.get("/ready")).status_code,
                              "tei_status": isinstance(native, list), "v1_results": len(v1.get("results", []))}
    return out


if __name__ == "__main__":
    sys.exit(main())

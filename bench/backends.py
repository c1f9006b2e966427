"""Throughput of each backend x dtype on one fixed workload, as ratios to PyTorch fp32.

    .venv/bin/python bench/backends.py            # 128 pairs, batch 32, 1 timed pass
    .venv/bin/python bench/backends.py --quick    # 64 pairs (two batches: both of OpenVINO's streams busy), 1 timed pass

The workload: pairs of (short query, document of 100-150 tokens), built deterministically from
tests/fixtures/ranking.json, scored in batches of 32 straight through `Backend.score` (no HTTP,
no batcher, no cache), with as many forwards at once as the server runs for that backend: what
the forwards cost on this machine. Every variant is loaded with the same settings and warmed;
then the variants score the workload in turn, pass after pass (the baseline included, in the
same process), so load from other processes on a shared machine falls on all variants alike.
Scores are also compared with PyTorch fp32, so a fast variant that ranks wrongly shows.

On Linux, MLX runs on its CPU build (mlx[cpu]) with a reference BLAS: its figures here say
nothing about a Mac's GPU, only that the code runs; see docs/mlx.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from reranker.backends import Backend

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "ranking.json"

VARIANTS = [("torch", "none"), ("torch", "bf16"), ("openvino", "none"), ("openvino", "bf16"), ("openvino", "int8"),
            ("openvino", "int8-dynamic"), ("openvino", "auto"), ("mlx", "none"), ("mlx", "bf16"), ("mlx", "int8")]


def workload(tokenizer: object, *, pairs: int, seed: int = 0) -> list[tuple[str, str]]:
    """`pairs` (query, document) pairs, documents of 100-150 tokens, 32 documents per query."""
    queries = json.loads(FIXTURE.read_text(encoding="utf-8"))["queries"]
    sentences = [s for q in queries for s in q["relevant"] + q["irrelevant"]]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(pairs):
        target = int(rng.integers(100, 151))
        doc: list[str] = []
        while len(tokenizer(" ".join(doc), add_special_tokens=False)["input_ids"]) < target:  # type: ignore[operator]
            doc.append(sentences[int(rng.integers(len(sentences)))])
        ids = tokenizer(" ".join(doc), add_special_tokens=False)["input_ids"][:target]  # type: ignore[operator]
        out.append((queries[(i // 32) % len(queries)]["query"], tokenizer.decode(ids)))  # type: ignore[attr-defined]
    return out


def load(runtime: str, quantization: str, model: str | None) -> "Backend":
    from reranker.backends import load_backend
    from reranker.settings import Settings

    return load_backend(Settings(model=model, runtime=runtime, device="mlx" if runtime == "mlx" else "cpu",
                                 quantization=quantization, warmup_on_start=False))


def measure(backends: list["Backend"], pairs: list[tuple[str, str]], *, batch: int,
            repeats: int) -> tuple[list[float], list[list[float]]]:
    """Seconds spent and scores, per backend. Each variant scores the workload's batches with as
    many forwards at once as the server runs for it (`Backend.sizing`: OpenVINO one per stream,
    PyTorch on a CPU one on every core); the variants take turns, pass after pass, so load from
    other processes falls on all of them alike."""
    from concurrent.futures import ThreadPoolExecutor

    sys.path.insert(0, str(Path(__file__).parent))
    from workload import score_side_by_side

    batches = [pairs[i:i + batch] for i in range(0, len(pairs), batch)]
    pools = [ThreadPoolExecutor(max(1, backend.sizing().max_parallel)) for backend in backends]
    for backend, pool in zip(backends, pools):
        list(pool.map(backend.score, batches[:1] * pool._max_workers))  # warm every worker's infer request
    seconds = [0.0] * len(backends)
    scores: list[list[float]] = [[] for _ in backends]
    for rep in range(repeats):
        for i, (backend, pool) in enumerate(zip(backends, pools)):
            started = time.perf_counter()
            out = score_side_by_side(backend, batches, pool)
            seconds[i] += time.perf_counter() - started
            if rep == 0:
                scores[i] = out
    for pool in pools:
        pool.shutdown()
    return seconds, scores


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="64 pairs, 1 timed pass")
    parser.add_argument("--pairs", type=int, help="pairs in the workload (default 128; --quick: 64)")
    parser.add_argument("--batch", type=int, default=32, help="pairs per forward pass")
    parser.add_argument("--repeats", type=int, help="timed passes over the workload (default 1)")
    parser.add_argument("--model", help="model id or folder (default: the embedded all-MiniLM-L6-v2)")
    parser.add_argument("--cross-encoder", action="store_true",
                        help="the MiniLM-sized cross-encoder of bench/workload.py instead of --model")
    parser.add_argument("--only", nargs="*", metavar="RUNTIME:DTYPE",
                        help="run only these variants, e.g. torch:none mlx:int8 (torch:none always runs)")
    args = parser.parse_args(argv)
    n_pairs = args.pairs or (64 if args.quick else 128)
    repeats = args.repeats or 1
    variants = VARIANTS
    if args.only:
        wanted = {tuple(v.split(":")) for v in args.only} | {("torch", "none")}
        variants = [v for v in VARIANTS if v in wanted]

    import torch
    from transformers import AutoTokenizer

    from reranker.backends import model_files

    if args.cross_encoder:
        sys.path.insert(0, str(Path(__file__).parent))
        import workload as bench_workload

        args.model = str(bench_workload.build_cross_encoder())
    files = model_files.resolve(args.model, revision=None, local_fallback=None)
    tokenizer = AutoTokenizer.from_pretrained(str(files.path))
    pairs = workload(tokenizer, pairs=n_pairs)
    lengths = [len(tokenizer(q, d)["input_ids"]) for q, d in pairs]
    print(f"# {files.name} ({files.kind}); {n_pairs} pairs of {min(lengths)}-{max(lengths)} tokens "
          f"(query + document), batch {args.batch}, {repeats} timed pass(es)")
    print(f"# {platform.machine()} {platform.system()}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads)", end="")
    try:
        from importlib.metadata import version

        import mlx.core as mx

        print(f", mlx {version('mlx')} ({mx.default_device()})")
    except ImportError:
        print(", mlx not installed")
        variants = [v for v in variants if v[0] != "mlx"]

    backends = [load(runtime, quantization, args.model) for runtime, quantization in variants]
    seconds, scores = measure(backends, pairs, batch=args.batch, repeats=repeats)
    rates = [n_pairs * repeats / s for s in seconds]
    base = np.array(scores[0])
    print("\n| backend | dtype | device | pairs/s | vs torch fp32 | max abs diff vs torch fp32 |")
    print("|---|---|---|---|---|---|")
    for (_, asked), backend, rate, got in zip(variants, backends, rates, scores):
        info = backend.info
        diff = float(np.abs(np.array(got) - base).max())
        dtype = f"auto: {info.dtype}" if asked == "auto" else info.dtype
        print(f"| {info.backend} | {dtype} | {info.device} | {rate:.2f} | {rate / rates[0]:.3f}x | {diff:.4f} |")
    for backend in backends:
        backend.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

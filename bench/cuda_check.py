"""The CUDA path on a GPU machine: fidelity, the forward variants, and the server's throughput.

    python bench/cuda_check.py --tokenizer DIR --out DIR            # on a GPU (bench/cuda_check.sh wraps it)
    python bench/cuda_check.py --tokenizer DIR --out DIR --device cpu --small   # dry run of every section

Models (random weights, so nothing is downloaded): a MiniLM-sized BERT cross-encoder (6 layers,
hidden 384, MiniLM's tokenizer) and an XLM-R-base-sized one (bge-reranker-base's shape: 12 layers,
hidden 768, vocabulary 250002). Pairs are ~145 tokens. Sections, each recorded in OUT/cuda_check.json:

 1. ceilings: a large bf16 matrix product (TFLOP/s) on this GPU
 2. fidelity per precision vs the CPU fp32 backend (max abs logit diff, Spearman), and what
    quantization=auto picked
 3. the bare forward on one pre-tokenized batch, same run: padded eager, padded + CUDA graph
    (captured for that one shape, the best case of per-bucket graphs), packed (padding-free)
    eager -- at a large and a small batch, and at mixed lengths
 4. the backend's score_encoded (pack, upload, forward, download) from 1, 2 and 3 threads at once
    (one CUDA stream each): batches in flight
 5. the server path: the app's ranker and batcher in-process, many concurrent 100-document
    requests of distinct pairs (no cache hits); the host-only ceiling (same path, a backend
    that returns at once) and the tokenizer alone, to show what limits it
 6. the share of wall time the GPU spends in kernels during section 5 (torch.profiler)
 7. the HTTP server (uvicorn subprocess) under client processes, when uvicorn is installed

Ratios to the padded eager forward and to fp32 are printed with the absolute figures; the last lines
are a summary table. Not part of the test suite: CI has no GPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import statistics
import sys
import tempfile
import threading
import time
import traceback
import itertools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "server"))
sys.path.insert(0, str(REPO / "tests"))  # models.py: the XLM-R tokenizer the tests train

import numpy as np  # noqa: E402
import torch  # noqa: E402

WORDS = ("search engine ranking document query relevance model vector index cluster token batch latency "
         "throughput operator cache river mountain history science music paris learning").split()
REPORT: dict[str, Any] = {"sections": {}}
SUMMARY: list[tuple[str, str]] = []
ARGS: argparse.Namespace


def say(name: str, value: Any) -> None:
    print(f"{name:<64} {value}", flush=True)


def record(section: str, key: str, value: Any) -> None:
    REPORT["sections"].setdefault(section, {})[key] = value
    Path(ARGS.out, "cuda_check.json").write_text(json.dumps(REPORT, indent=1, default=str))


def section(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Run a section, record its failure instead of stopping the script."""
    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        def run(*a: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            print(f"\n== {name}", flush=True)
            try:
                return fn(*a, **kw)
            except Exception as exc:  # report every section, even a failing one
                traceback.print_exc()
                record(name, "error", f"{exc.__class__.__name__}: {exc}")
                return None
            finally:
                record(name, "seconds", round(time.perf_counter() - t0, 1))
        return run
    return wrap


def sync() -> None:
    if ARGS.device == "cuda":
        torch.cuda.synchronize()


# --- models and workload ----------------------------------------------------------------------
def build_minilm(tok_dir: str) -> Path:
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    small = ARGS.small
    cfg = BertConfig(vocab_size=30522, hidden_size=64 if small else 384, num_hidden_layers=2 if small else 6,
                     num_attention_heads=4 if small else 12, intermediate_size=128 if small else 1536,
                     max_position_embeddings=512, num_labels=1, initializer_range=0.05)
    torch.manual_seed(0)
    folder = Path(tempfile.mkdtemp(prefix="minilm-"))
    BertForSequenceClassification(cfg).eval().save_pretrained(str(folder))
    AutoTokenizer.from_pretrained(tok_dir).save_pretrained(str(folder))
    return folder


def build_xlmr_base() -> Path:
    import models  # tests/models.py
    from transformers import XLMRobertaConfig, XLMRobertaForSequenceClassification

    small = ARGS.small
    tokenizer = models._xlmr_tokenizer()
    cfg = XLMRobertaConfig(vocab_size=1000 if small else 250002, hidden_size=64 if small else 768,
                           num_hidden_layers=2 if small else 12, num_attention_heads=4 if small else 12,
                           intermediate_size=128 if small else 3072, max_position_embeddings=514, type_vocab_size=1,
                           pad_token_id=1, bos_token_id=0, eos_token_id=2, num_labels=1, initializer_range=0.05)
    torch.manual_seed(1)
    folder = Path(tempfile.mkdtemp(prefix="xlmr-"))
    XLMRobertaForSequenceClassification(cfg).eval().save_pretrained(str(folder))
    tokenizer.model_max_length = 512
    tokenizer.save_pretrained(str(folder))
    return folder


def make_pairs(backend: Any, n: int, *, target: int = 145, seed: int = 0, tag: str = "") -> list[tuple[str, str]]:
    """n distinct pairs of about `target` tokens with this backend's tokenizer."""
    rng = random.Random(seed)

    def doc(k: int, i: int) -> str:
        return f"{tag}{i} " + " ".join(rng.choice(WORDS) for _ in range(k))

    probe = [(f"query {i}", doc(100, i)) for i in range(16)]
    per_word = (np.mean([e.tokens for e in backend.encode(probe)]) - 6) / 100
    words = max(4, int((target - 8) / per_word))
    return [(f"query {i % 97} {rng.choice(WORDS)}", doc(rng.randint(int(words * 0.9), int(words * 1.1)), i))
            for i in range(n)]


def load(model: Path, device: str, quantization: str, **kw: Any) -> Any:
    from reranker.backends import load_backend
    from reranker.settings import Settings

    return load_backend(Settings(model=str(model), device=device, quantization=quantization,
                                 warmup_on_start=False, **kw))


def spearman(a: Any, b: Any) -> float:
    from reranker.backends.calibration import spearman as rho

    return rho(a, b)


# --- 1. ceilings --------------------------------------------------------------------------------
@section("1 ceilings")
def ceilings() -> None:
    n = 1024 if ARGS.small else 8192
    dtype = torch.bfloat16 if ARGS.device == "cuda" else torch.float32
    a = torch.randn(n, n, device=ARGS.device, dtype=dtype)
    b = torch.randn(n, n, device=ARGS.device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync()
    reps = 20
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync()
    tflops = 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e12
    record("1 ceilings", "matmul_tflops", round(tflops, 1))
    say(f"1. {dtype} matmul {n}^3", f"{tflops:.1f} TFLOP/s")
    SUMMARY.append(("matmul ceiling", f"{tflops:.0f} TFLOP/s"))


# --- 2. fidelity --------------------------------------------------------------------------------
@section("2 fidelity")
def fidelity(name: str, model: Path, pairs: list[tuple[str, str]]) -> None:
    ref_backend = load(model, "cpu", "none")
    ref = np.array(ref_backend.score(pairs))
    del ref_backend
    out: dict[str, Any] = {}
    for quant in (["none", "fp16", "bf16", "auto"] if ARGS.device == "cuda" else ["none", "bf16"]):
        b = load(model, ARGS.device, quant)
        got = np.array(b.score(pairs))
        entry = {"dtype": b.info.dtype, "packed": getattr(b, "packed", None) is not None,
                 "max_abs_diff_logit": float(np.abs(got - ref).max()), "spearman": round(spearman(got, ref), 5)}
        out[quant] = entry
        say(f"2. {name} {quant:<5} served {b.info.dtype}", json.dumps(entry))
        b.close()
    record("2 fidelity", name, out)
    for quant, e in out.items():
        SUMMARY.append((f"{name} fidelity {quant} ({e['dtype']})",
                        f"max abs {e['max_abs_diff_logit']:.1e}, Spearman {e['spearman']:.4f}"))


# --- 3. bare forward variants -------------------------------------------------------------------
def timed(fn: Callable[[], Any], reps: int) -> float:
    """Seconds per call, median of 3 runs of `reps` calls (after a warm-up)."""
    for _ in range(3):
        fn()
    sync()
    runs = []
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        sync()
        runs.append((time.perf_counter() - t0) / reps)
    return statistics.median(runs)


@section("3 forward variants")
def forward_variants(name: str, model: Path, pairs: list[tuple[str, str]], quant: str) -> None:
    from reranker.backends.packing import pack

    from reranker.backends.packing import PackedEncoder

    b = load(model, ARGS.device, quant)
    if ARGS.device == "cpu":  # the dry run: the server packs on CUDA only, the code is the same
        b.packed = PackedEncoder(b.model, cross_encoder=True)
    if getattr(b, "packed", None) is None:
        raise RuntimeError("the backend did not take the packed path")
    results: dict[str, Any] = {}
    reps = 3 if ARGS.small else 20
    for label, batch_pairs in (("B512 ~145 tok", pairs[:512]), ("B64 ~145 tok", pairs[:64]),
                               ("B512 mixed 20-500", mixed(pairs[:512]))):
        enc = b.encode(batch_pairs)
        feats = b.collate_cross(enc)
        inputs = {k: torch.from_numpy(v).to(b.device) for k, v in feats.as_dict().items()}
        n = len(enc)
        real = sum(e.tokens for e in enc)
        row: dict[str, Any] = {"pairs": n, "real_tokens": real, "padded_tokens": int(feats.input_ids.size)}
        with torch.inference_mode():
            padded = timed(lambda: b.model(**inputs).logits, reps)
            row["padded_eager_pairs_s"] = round(n / padded)
            if ARGS.device == "cuda":
                try:
                    row["padded_graph_pairs_s"] = round(n / graph_time(b.model, inputs, reps))
                except Exception as exc:  # capture can fail on a host sync inside the model: say so
                    row["padded_graph_error"] = f"{exc.__class__.__name__}: {exc}"[:300]
            p = pack([e.ids for e in enc], [e.type_ids for e in enc], position_offset=b.packed.position_offset)
            lane = b.lanes.get() if b.lanes is not None else None
            dev = b._upload(lane, p)[0] if lane is not None else cpu_packed(p)
            def forward() -> Any:
                return b.packed.logits(b.packed.hidden(dev), dev)

            packed = timed(forward, reps)
            row["packed_eager_pairs_s"] = round(n / packed)
            if ARGS.device == "cuda" and label.startswith("B512 ~"):
                row["packed_breakdown"] = breakdown(forward)
                if name == "minilm" and ARGS.compile:
                    try:
                        t0 = time.perf_counter()
                        compiled = torch.compile(forward, dynamic=True)
                        compiled()
                        sync()
                        row["packed_compiled_first_call_s"] = round(time.perf_counter() - t0, 1)
                        row["packed_compiled_pairs_s"] = round(n / timed(compiled, reps))
                        row["packed_compiled_breakdown"] = breakdown(compiled)
                    except Exception as exc:  # say why, keep going
                        row["packed_compiled_error"] = f"{exc.__class__.__name__}: {exc}"[:300]
        row["packed_vs_padded"] = round(padded / packed, 2)
        results[label] = row
        say(f"3. {name} {quant} {label}", json.dumps(row))
        SUMMARY.append((f"{name} bare forward {quant} {label}",
                        " ".join(f"{k.replace('_pairs_s', '')} {v}" for k, v in row.items() if k.endswith("_pairs_s"))
                        + " pairs/s"))
    record("3 forward variants", f"{name} {quant}", results)
    b.close()


def breakdown(fn: Callable[[], Any]) -> dict[str, float]:
    """One forward: host time to enqueue it, wall time to finish it, and GPU time in kernels."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    sync()
    t0 = time.perf_counter()
    fn()
    host = time.perf_counter() - t0
    sync()
    wall = time.perf_counter() - t0
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        sync()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return {"enqueue_ms": round(host * 1e3, 2), "wall_ms": round(wall * 1e3, 2), "kernels": len(kernels),
            "kernel_ms": round(sum(e.time_range.elapsed_us() for e in kernels) / 1e3, 2)}


def mixed(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    rng = random.Random(5)
    out = []
    for q, d in pairs:
        words = d.split()
        k = rng.randint(10, 400)
        out.append((q, " ".join((words * (k // len(words) + 1))[:k])))
    return out


def cpu_packed(p: Any) -> Any:
    from reranker.backends.packing import DevicePacked

    def t(a: Any) -> Any:
        return None if a is None else torch.from_numpy(a)

    return DevicePacked(input_ids=t(p.input_ids), token_type_ids=t(p.token_type_ids), position_ids=t(p.position_ids),
                        cu_seqlens=t(p.cu_seqlens).int(), slots=t(p.slots), max_len=p.max_len)


def graph_time(model: Any, inputs: dict[str, torch.Tensor], reps: int) -> float:
    """The padded forward replayed from a CUDA graph captured for this one shape (a 4-D mask, so
    transformers does not inspect it on the host while capturing)."""
    static = {k: v.clone() for k, v in inputs.items()}
    static["attention_mask"] = static["attention_mask"][:, None, None, :].bool()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            model(**static)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        model(**static).logits
    return timed(graph.replay, reps)


# --- 4. batches in flight -----------------------------------------------------------------------
@section("4 batches in flight")
def in_flight(name: str, model: Path, pairs: list[tuple[str, str]], quant: str) -> None:
    b = load(model, ARGS.device, quant)
    batch = 32 if ARGS.small else 512
    encoded = b.encode(pairs)
    batches = [encoded[i:i + batch] for i in range(0, len(encoded) - batch + 1, batch)]
    for bt in batches[:2]:
        b.score_encoded(bt)
    out: dict[str, Any] = {}
    base = None
    for threads in (1, 2, 3):
        rounds = 2 if ARGS.small else 6
        work: list[Any] = []
        lock = threading.Lock()

        def worker() -> None:
            while True:
                with lock:
                    if not work:
                        return
                    bt = work.pop()
                b.score_encoded(bt)

        def run_threads() -> float:
            sync()
            t0 = time.perf_counter()
            pool = [threading.Thread(target=worker) for _ in range(threads)]
            for t in pool:
                t.start()
            for t in pool:
                t.join()
            return time.perf_counter() - t0

        work = batches[: 2 * threads]
        run_threads()  # new threads: their streams, pinned buffers and allocator pools warm up first
        work = batches * rounds
        rate = len(batches) * rounds * batch / run_threads()
        base = base or rate
        out[f"{threads} threads"] = {"pairs_s": round(rate), "ratio_to_1": round(rate / base, 2)}
        say(f"4. {name} {quant} score_encoded, {threads} thread(s), batch {batch}", json.dumps(out[f"{threads} threads"]))
    record("4 batches in flight", f"{name} {quant}", out)
    SUMMARY.append((f"{name} score_encoded 1/2/3 threads", " / ".join(str(v["pairs_s"]) for v in out.values()) + " pairs/s"))
    b.close()


# --- 5. the server path ---------------------------------------------------------------------------
async def drive(ranker: Any, requests: Iterator[tuple[str, list[str]]], concurrency: int,
                seconds: float) -> dict[str, Any]:
    """`concurrency` clients send requests back to back for `seconds`."""
    from reranker.batcher import Ticket
    from reranker.chunking import Split

    from reranker.errors import QueueFull

    latencies: list[float] = []
    pairs = refused = 0
    deadline = time.perf_counter() + seconds

    async def client() -> None:
        nonlocal pairs, refused
        while time.perf_counter() < deadline:
            query, docs = next(requests)
            t0 = time.perf_counter()
            try:
                await ranker.rank(query, docs, split=Split(), ticket=Ticket())
            except QueueFull:  # admission's estimate said no: back off like a client would
                refused += 1
                await asyncio.sleep(0.05)
                continue
            latencies.append(time.perf_counter() - t0)
            pairs += len(docs)

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    return {"pairs_s": round(pairs / wall), "requests": len(latencies), "refused": refused,
            "p50_ms": round(1000 * np.percentile(latencies, 50)),
            "p99_ms": round(1000 * np.percentile(latencies, 99))}


def request_stream(pairs: list[tuple[str, str]], docs_per_request: int, tag: str) -> Iterator[tuple[str, list[str]]]:
    """Endless 100-document requests; each pass over the documents has new queries, so no pair repeats
    (nothing is a cache hit) while the token counts stay the same."""
    blocks = [(q, [d for _, d in pairs[i:i + docs_per_request]])
              for i, (q, _) in enumerate(pairs[:len(pairs) - docs_per_request + 1:docs_per_request])]
    for round_ in itertools.count():
        for q, docs in blocks:
            yield f"{tag}{round_} {q}", docs


async def server_run(model: Path | None, pairs: list[tuple[str, str]], *, backend: Any = None, seconds: float,
                     concurrency: int, profile: bool = False, **settings: Any) -> dict[str, Any]:
    from reranker.app import create_app
    from reranker.settings import Settings

    kw = {"device": ARGS.device, "max_queue": 10_000_000, "queue_timeout": 600.0, "worker_timeout": 600.0, **settings}
    app = create_app(Settings(model=str(model) if model else None, **kw), backend=backend)
    async with app.router.lifespan_context(app):
        runtime = app.state.runtime
        while not (runtime.loaded.is_set() or runtime.load_error):
            await asyncio.sleep(0.05)
        if runtime.load_error:
            raise RuntimeError(runtime.load_error)
        requests = request_stream(pairs, 100, "r")
        await drive(runtime.ranker, requests, concurrency, max(1.0, seconds / 4))  # warm-up
        result = await drive(runtime.ranker, requests, concurrency, seconds)
        if profile and ARGS.device == "cuda":  # a separate, shorter window: profiling slows the host
            from torch.profiler import ProfilerActivity, profile as torch_profile

            with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                t0 = time.perf_counter()
                profiled = await drive(runtime.ranker, requests, concurrency, 3.0)
                torch.cuda.synchronize()
                wall = time.perf_counter() - t0
            result["kernel_share"] = {**kernel_share(prof, wall), "pairs_s_while_profiled": profiled["pairs_s"]}
        result["batcher"] = {"batch_size": runtime.batcher.batch_size, "max_batch_tokens": runtime.batcher.max_batch_tokens,
                             "max_parallel": runtime.batcher.max_parallel, "padded": getattr(runtime.batcher, "padded", True)}
        result["dtype"] = runtime.backend.info.dtype
        reg = runtime.metrics.registry
        batches = reg.get_sample_value("reranker_batch_size_count") or 1
        result["mean_batch_pairs"] = round((reg.get_sample_value("reranker_batch_size_sum") or 0) / batches)
        return result


def kernel_share(prof: Any, wall: float) -> dict[str, Any]:
    """Busy time of the GPU (union of kernel intervals) over the profiled wall time."""
    intervals = []
    for evt in prof.events():
        if evt.device_type == torch.autograd.DeviceType.CUDA and evt.time_range.elapsed_us() > 0:
            intervals.append((evt.time_range.start, evt.time_range.end))
    intervals.sort()
    busy, end = 0.0, -math.inf
    for s, e in intervals:
        if s > end:
            busy += e - s
            end = e
        elif e > end:
            busy += e - end
            end = e
    top = prof.key_averages().table(sort_by="cuda_time_total", row_limit=12)
    Path(ARGS.out, "profile.txt").write_text(top)
    return {"busy_fraction": round(busy / 1e6 / wall, 3), "kernels": len(intervals)}


class Instant:
    """A backend that returns scores at once: the host-only ceiling. `tokenize=False` also skips
    the tokenizer (every pair gets the same ids): what the ranker and batcher alone cost."""

    def __init__(self, real: Any, *, tokenize: bool = True) -> None:
        self.real = real
        self.tokenize = tokenize
        self.fixed = real.encode([("query", "a document of a few words")])[0]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def encode(self, pairs: Any) -> Any:
        return self.real.encode(pairs) if self.tokenize else [self.fixed] * len(pairs)

    def score_encoded(self, batch: Any) -> list[float]:
        return [0.0] * len(batch)

    def close(self) -> None:  # the real backend serves the next run too
        pass


@section("5 server path")
def server_path(name: str, model: Path, pairs: list[tuple[str, str]], quant: str, variants: dict[str, dict[str, Any]]) -> None:
    seconds = 3.0 if ARGS.small else 8.0
    out: dict[str, Any] = {}
    for label, settings in variants.items():
        res = asyncio.run(server_run(model, pairs, seconds=seconds, concurrency=64, quantization=quant,
                                     profile=settings.pop("profile", False), **settings))
        out[label] = res
        say(f"5. {name} server path {label}", json.dumps(res))
        SUMMARY.append((f"{name} server path {label} ({res['dtype']})",
                        f"{res['pairs_s']} pairs/s p50 {res['p50_ms']} ms p99 {res['p99_ms']} ms"
                        + (f" GPU busy {res['kernel_share']['busy_fraction']:.0%}" if "kernel_share" in res else "")))
    record("5 server path", f"{name} {quant}", out)


@section("5 host ceiling")
def host_ceiling(name: str, model: Path, pairs: list[tuple[str, str]]) -> None:
    real = load(model, "cpu", "none")
    rate_tok = tokenizer_rate(real, pairs)
    out: dict[str, Any] = {"tokenizer_pairs_s": rate_tok}
    for label, tokenize in (("instant model", True), ("instant model, no tokenizer", False)):
        res = asyncio.run(server_run(None, pairs, backend=Instant(real, tokenize=tokenize),
                                     seconds=3.0 if ARGS.small else 6.0, concurrency=64,
                                     batch_size=512, max_batch_tokens=65536, max_parallel=2))
        out[label] = res
        say(f"5. {name} server path, {label}", json.dumps(res))
    record("5 host ceiling", name, out)
    say(f"5. {name} tokenizer alone ({os.cpu_count()} cpus)", f"{rate_tok} pairs/s")
    SUMMARY.append((f"{name} host only: tokenizer / +ranker+batcher / ranker+batcher",
                    f"{rate_tok} / {out['instant model']['pairs_s']} / "
                    f"{out['instant model, no tokenizer']['pairs_s']} pairs/s"))


def tokenizer_rate(backend: Any, pairs: list[tuple[str, str]]) -> int:
    from concurrent.futures import ThreadPoolExecutor

    chunks = [pairs[i:i + 100] for i in range(0, len(pairs), 100)]
    with ThreadPoolExecutor(min(32, (os.cpu_count() or 1) + 4)) as pool:
        list(pool.map(backend.encode, chunks[:8]))
        t0 = time.perf_counter()
        list(pool.map(backend.encode, chunks))
    return round(len(pairs) / (time.perf_counter() - t0))


# --- 7. HTTP --------------------------------------------------------------------------------------
@section("7 http")
def http(name: str, model: Path, pairs: list[tuple[str, str]], quant: str) -> None:
    import importlib.util
    import multiprocessing

    if importlib.util.find_spec("uvicorn") is None:
        raise RuntimeError("uvicorn is not installed here")
    sys.path.insert(0, str(REPO / "bench"))
    import workload as w

    env = {"RERANKER_MODEL": str(model), "RERANKER_DEVICE": ARGS.device, "RERANKER_QUANTIZATION": quant,
           "RERANKER_MAX_QUEUE": "10000000", "RERANKER_QUEUE_TIMEOUT": "600", "ENABLE_PREDICTION_CACHE": "true"}
    server = w.Server(env)
    try:
        stream = request_stream(pairs, 100, "http")
        bodies = [{"query": q, "documents": docs} for q, docs in itertools.islice(stream, 4000 if not ARGS.small else 200)]
        procs = 1 if ARGS.small else 6
        with multiprocessing.get_context("spawn").Pool(procs) as pool:
            parts = pool.starmap(_client, [(server.url, bodies[i::procs], 16, 4.0 if ARGS.small else 15.0)
                                           for i in range(procs)])
        pairs_total = sum(p["pairs"] for p in parts)
        wall = max(p["seconds"] for p in parts)
        lat = [x for p in parts for x in p["latencies"]]
        res = {"pairs_s": round(pairs_total / wall), "clients": procs * 16,
               "p50_ms": round(1000 * float(np.percentile(lat, 50))), "p99_ms": round(1000 * float(np.percentile(lat, 99))),
               "statuses": [p["statuses"] for p in parts]}
    finally:
        server.stop()
    record("7 http", f"{name} {quant}", res)
    say(f"7. {name} HTTP {procs * 16} clients", json.dumps(res))
    SUMMARY.append((f"{name} HTTP /rerank {procs * 16} clients ({quant})",
                    f"{res['pairs_s']} pairs/s p50 {res['p50_ms']} ms p99 {res['p99_ms']} ms"))


def _client(url: str, bodies: list[dict[str, Any]], clients: int, seconds: float) -> dict[str, Any]:
    sys.path.insert(0, str(REPO / "bench"))
    import workload as w

    res = asyncio.run(w.load(url, bodies, clients=clients, max_seconds=seconds))
    return {"pairs": res.pairs, "seconds": res.seconds, "latencies": res.latencies, "statuses": res.statuses}


def main() -> int:
    global ARGS
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", required=True, help="folder with MiniLM's tokenizer files")
    parser.add_argument("--out", required=True, help="folder for cuda_check.json and profile.txt")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--small", action="store_true", help="tiny models and sizes (a dry run of every section)")
    parser.add_argument("--skip", default="", help="comma-separated section numbers to skip")
    parser.add_argument("--compile", action="store_true", help="section 3 also times torch.compile (~1 min)")
    ARGS = parser.parse_args()
    Path(ARGS.out).mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, ARGS.skip.split(",")))
    import transformers

    REPORT.update(torch=torch.__version__, transformers=transformers.__version__, cpus=os.cpu_count(),
                  gpu=torch.cuda.get_device_name(0) if ARGS.device == "cuda" else None)
    say("devices", f"{REPORT['gpu']} torch {torch.__version__} transformers {transformers.__version__}")
    if "1" not in skip:
        ceilings()
    minilm = build_minilm(ARGS.tokenizer)
    xlmr = build_xlmr_base()
    cpu_minilm = load(minilm, "cpu", "none")
    cpu_xlmr = load(xlmr, "cpu", "none")
    n = 1600 if ARGS.small else 8000
    pairs = make_pairs(cpu_minilm, n, seed=1)
    xpairs = make_pairs(cpu_xlmr, n // 2, seed=2)
    tokens = np.mean([e.tokens for e in cpu_minilm.encode(pairs[:256])])
    xtokens = np.mean([e.tokens for e in cpu_xlmr.encode(xpairs[:256])])
    say("pairs", f"minilm {len(pairs)} x {tokens:.0f} tokens, xlmr {len(xpairs)} x {xtokens:.0f} tokens")
    REPORT.update(minilm_tokens=float(tokens), xlmr_tokens=float(xtokens))
    half = "bf16" if ARGS.device == "cpu" else "fp16"
    if "2" not in skip:
        fidelity("minilm", minilm, pairs[:256])
        fidelity("xlmr-base", xlmr, xpairs[:128])
    if "3" not in skip:
        forward_variants("minilm", minilm, pairs, half)
        forward_variants("xlmr-base", xlmr, xpairs, half)
    if "4" not in skip:
        in_flight("minilm", minilm, pairs[:6144], half)
    if "5" not in skip:
        host_ceiling("minilm", minilm, pairs)
        server_path("minilm", minilm, pairs, "auto" if ARGS.device == "cuda" else "none", {
            "defaults": {"profile": True},
            "max_parallel 1": {"max_parallel": 1},
            "max_parallel 3": {"max_parallel": 3},
        })
        server_path("xlmr-base", xlmr, xpairs, "auto" if ARGS.device == "cuda" else "none", {"defaults": {}})
    if "7" not in skip:
        http("minilm", minilm, pairs, "auto" if ARGS.device == "cuda" else "none")
    print("\n== summary", flush=True)
    for k, v in SUMMARY:
        say(k, v)
    Path(ARGS.out, "summary.txt").write_text("\n".join(f"{k:<64} {v}" for k, v in SUMMARY) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

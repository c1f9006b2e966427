"""The throughput benchmark: the server against the backend's own batched throughput, same run.

    .venv/bin/python bench/run.py --quick   # < 90 s; last line: ratio=<server@16 clients / in-process>
    .venv/bin/python bench/run.py           # every section below

Sections (full run), all on the same MiniLM-sized cross-encoder, dtype and workload:
 1. in-process baseline: backend.score on batches of 32 pairs (~145 tokens)
 2. the server (uvicorn subprocess) with 1, 4, 16, 64 concurrent clients: pairs/s, p50, p99
 3. target: server at 16 clients >= 0.95 x in-process
 4. mixed lengths (10-400 tokens): length-grouped token-budget batching vs first-come fixed-size
 5. one request of 1 query x 20 documents vs the in-process forward of the same 20 pairs
 6. repeated requests (warm cache) vs cold
 7. overload at 4x capacity: statuses, p99 of admitted requests vs the queue timeout, RSS
 8. fp32, bf16, int8 in-process side by side (the same runtime)

The runtime and precision are the defaults' picks (RERANKER_RUNTIME=auto, RERANKER_QUANTIZATION=auto:
OpenVINO on a CPU), read from the in-process backend; every server here runs the same ones.
Ratios, not absolute times, are the result: the machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import workload as w  # noqa: E402

DOC_TOKENS = (120, 140)  # with the query and special tokens: ~145-token pairs
DOCS_PER_REQUEST = 20


def load_backend(model: Path, quantization: str = "auto", batch_size: int = 32):  # type: ignore[no-untyped-def]
    from reranker.backends import load_backend as load
    from reranker.settings import Settings

    return load(Settings(model=str(model), quantization=quantization, batch_size=batch_size))


def env_quantization(dtype: str) -> str:
    """The RERANKER_QUANTIZATION that loads `dtype` (what auto picked in-process: the server runs the same)."""
    return "none" if dtype == "fp32" else dtype


def in_process(backend, pairs: list[tuple[str, str]], batch: int = 32, warm_batches: int = 6) -> float:  # type: ignore[no-untyped-def]
    """Pairs/s of the backend alone, with as many forwards at once as the server runs (OpenVINO: one
    per stream), so the server / in-process ratio measures the server, not the streams."""
    # oneDNN/MKL pick kernels per shape: the first forwards are slow
    w.score_side_by_side(backend, [pairs[(i * batch) % len(pairs):][:batch] for i in range(warm_batches)])
    t0 = time.perf_counter()
    w.score_side_by_side(backend, [pairs[i:i + batch] for i in range(0, len(pairs), batch)])
    return len(pairs) / (time.perf_counter() - t0)


def bodies(n_requests: int, seed: int, tokens: tuple[int, int] = DOC_TOKENS) -> list[dict]:  # type: ignore[type-arg]
    docs = w.texts(n_requests * DOCS_PER_REQUEST, tokens=tokens, seed=seed, tag=f"s{seed}-")
    return [{"query": f"search ranking query {i}", "documents": docs[i * DOCS_PER_REQUEST:(i + 1) * DOCS_PER_REQUEST]}
            for i in range(n_requests)]


def row(name: str, value: str) -> None:
    print(f"{name:<58} {value}", flush=True)


async def mixed_lengths(backend) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """The same burst of mixed-length pairs through the batcher, grouped by length vs first-come."""
    from reranker.batcher import Batcher, Job
    from reranker.metrics import Metrics

    docs = w.texts(384, tokens=(8, 380), seed=11, tag="m")
    pairs = [("mixed length query", d) for d in docs]
    encoded = backend.encode(pairs)
    rates = []
    for by_length in (True, False):
        batcher = Batcher(backend, Metrics(), batch_size=32, max_batch_tokens=16384, window_ms=0, max_parallel=1,
                          worker_timeout=600, by_length=by_length)
        batcher.start()
        loop = asyncio.get_running_loop()
        jobs = [Job(pair=p, key=str(i), tokens=e.tokens, encoded=e, future=loop.create_future())
                for i, (p, e) in enumerate(zip(pairs, encoded))]
        t0 = time.perf_counter()
        batcher.submit(jobs)
        await asyncio.gather(*(j.future for j in jobs))
        rates.append(len(jobs) / (time.perf_counter() - t0))
        await batcher.stop()
    return rates[0], rates[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="baseline and 16 clients only (< 90 s)")
    args = parser.parse_args()

    model = w.build_cross_encoder()
    backend = load_backend(model)  # the defaults: RERANKER_RUNTIME=auto, RERANKER_QUANTIZATION=auto
    info = backend.info
    print(f"# {info.backend} {info.dtype} ({info.precision})", flush=True)
    n_base = 192 if args.quick else 384
    base_pairs = [(b["query"], d) for b in bodies(n_base // DOCS_PER_REQUEST + 1, seed=1) for d in b["documents"]][:n_base]
    lengths = backend.pair_lengths(base_pairs)
    base_before = in_process(backend, base_pairs)
    row(f"1. in-process {info.backend} {info.dtype}, batch 32, {min(lengths)}-{max(lengths)}-token pairs (before)",
        f"{base_before:8.1f} pairs/s")
    base = base_before

    # The server runs exactly what the in-process baseline runs (auto could race to another pick).
    env = {"RERANKER_MODEL": str(model), "ENABLE_PREDICTION_CACHE": "false", "RERANKER_BATCH_SIZE": "32",
           "RERANKER_MAX_QUEUE": "100000", "RERANKER_QUEUE_TIMEOUT": "120", "RERANKER_RUNTIME": info.backend,
           "RERANKER_QUANTIZATION": env_quantization(info.dtype)}
    server = w.Server(env)
    ratio16 = 0.0
    try:
        client_counts = [16] if args.quick else [1, 4, 16, 64]
        for seed, clients in enumerate(client_counts, start=100):
            n_req = max(clients, int(base * (12 if args.quick else 20) / DOCS_PER_REQUEST))
            res = asyncio.run(w.load(server.url, bodies(n_req, seed=seed), clients=clients, max_seconds=60))
            row(f"2. server, {clients:>2} clients, {DOCS_PER_REQUEST}-doc requests",
                f"{res.pairs_per_s:8.1f} pairs/s  p50 {res.pct(50):7.0f} ms  p99 {res.pct(99):7.0f} ms  "
                f"x{res.pairs_per_s / base:.3f} of in-process  statuses {res.statuses}")
            if clients == 16:
                ratio16 = res.pairs_per_s
        # The machine drifts (other work, clocks): the baseline is the mean of before and after.
        base_after = in_process(backend, base_pairs)
        base = (base_before + base_after) / 2
        row(f"1. in-process {info.backend} {info.dtype} (after the server runs)", f"{base_after:8.1f} pairs/s; baseline = mean {base:.1f}")
        ratio16 /= base
        row("3. target: server@16 / in-process >= 0.95", f"{ratio16:.3f} {'MET' if ratio16 >= 0.95 else 'MISSED'}")
        if not args.quick:
            pick = {k: env[k] for k in ("RERANKER_RUNTIME", "RERANKER_QUANTIZATION")}
            sections_full(backend, model, server, base, base_pairs, pick)
    finally:
        server.stop()
    print(f"ratio={ratio16:.3f}")
    return 0


def sections_full(backend, model: Path, server: "w.Server", base: float,  # type: ignore[no-untyped-def]
                  base_pairs: list[tuple[str, str]], pick: dict[str, str]) -> None:
    import httpx

    grouped, fifo = asyncio.run(mixed_lengths(backend))
    row("4. mixed 10-400 tokens: length-grouped token-budget", f"{grouped:8.1f} pairs/s")
    row("4. mixed 10-400 tokens: first-come fixed-size 32", f"{fifo:8.1f} pairs/s")
    row("4. target: grouped / first-come >= 1.5", f"{grouped / fifo:.2f} {'MET' if grouped / fifo >= 1.5 else 'MISSED'}")

    single = bodies(1, seed=500)[0]
    pairs = [(single["query"], d) for d in single["documents"]]
    backend.score(pairs)
    t0 = time.perf_counter()
    for _ in range(5):
        backend.score(pairs)
    forward = (time.perf_counter() - t0) / 5
    lat = []
    for i in range(5):
        body = bodies(1, seed=600 + i)[0]
        t0 = time.perf_counter()
        assert httpx.post(server.url + "/rerank", json=body, timeout=60).status_code == 200
        lat.append(time.perf_counter() - t0)
    lat.sort()
    row("5. 1 x 20 request latency (median of 5) / in-process forward",
        f"{lat[2] * 1000:.0f} ms / {forward * 1000:.0f} ms = {lat[2] / forward:.3f} (target <= 1.15)")

    cached = w.Server({"RERANKER_MODEL": str(model), "ENABLE_PREDICTION_CACHE": "true", **pick})
    try:
        warm_bodies = bodies(8, seed=700)
        cold = asyncio.run(w.load(cached.url, warm_bodies, clients=8, max_seconds=60))
        warm = asyncio.run(w.load(cached.url, warm_bodies * 40, clients=8, max_seconds=60))
        row("6. warm cache vs cold (8 clients)", f"{warm.pairs_per_s:8.1f} vs {cold.pairs_per_s:.1f} pairs/s = "
            f"x{warm.pairs_per_s / cold.pairs_per_s:.1f} (target >= 20)")
    finally:
        cached.stop()

    queue_timeout = 5.0
    over = w.Server({"RERANKER_MODEL": str(model), "ENABLE_PREDICTION_CACHE": "false", "RERANKER_MAX_QUEUE": "256",
                     "RERANKER_QUEUE_TIMEOUT": str(queue_timeout), **pick})
    try:
        rss0 = over.rss_mb()
        rate = 4 * base / DOCS_PER_REQUEST  # requests/s: 4x what the model can score
        n = int(rate * 20)  # 20 s of offered load
        res = asyncio.run(w.open_loop(over.url, bodies(n, seed=800), rate=rate))
        rss1 = over.rss_mb()
        ok_statuses = set(res.statuses) <= {200, 429, 503}
        p99 = res.pct(99)
        row(f"7. overload: {rate:.1f} req/s = 4x capacity for 20 s, queue 256 pairs, timeout {queue_timeout:g}s",
            f"statuses {res.statuses} {'OK' if ok_statuses else 'BAD'}; admitted p99 {p99:.0f} ms "
            f"({'<=' if p99 <= queue_timeout * 1000 else '>'} timeout); served {res.pairs_per_s:.1f} pairs/s "
            f"(x{res.pairs_per_s / base:.2f} of in-process); RSS {rss0:.0f} -> {rss1:.0f} MB")
        if os.environ.get("BENCH_VERBOSE"):
            print(sorted(round(x, 2) for x in res.latencies))
    finally:
        over.stop()

    rates = {}
    for quant in ("none", "bf16", "int8"):  # the same runtime at each precision
        other = load_backend(model, quantization=quant)
        rates[quant] = in_process(other, base_pairs)
        name = f"{other.info.backend} {other.info.dtype}"
        row(f"8. in-process {name} / fp32", f"{rates[quant]:8.1f} pairs/s = x{rates[quant] / rates['none']:.2f}")
        other.close()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())

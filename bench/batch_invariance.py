"""Do a pair's batch-mates change its score? And what does making them not cost? OpenVINO, per precision.

    .venv/bin/python bench/batch_invariance.py                   # embedded MiniLM, 875 pairs
    .venv/bin/python bench/batch_invariance.py --pairs 300 --cross-encoder --repeats 5

For each variant the same pairs (queries of 2-12 tokens, documents of 5-250: many lengths) are
scored one at a time (a batch of 1), then shuffled into batches of 32 of mixed lengths and scored
with as many forwards at once as the server runs (one per OpenVINO stream), as a server under load
mixes requests: the max abs difference between the two and the count over 1e-4. Then speed: the
first --timed-pairs pairs sorted by length into batches of 32 (what the batcher does, and where
rounding the width up costs most), the variants taking turns pass after pass so load from other
processes falls on all alike; the median pass's pairs/s, and as a ratio to the old default in the
same run.

Variants: each precision with the old padding (to the batch's longest pair, "x1") and with the
width rounded up to a multiple of 16 tokens ("x16", what the backend does now), and `auto`'s pick.
"old default" is int8-dynamic in groups of 128 with x1 padding: what `auto` served on main on an
AVX512-VNNI CPU without AMX (docs/openvino.md).
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import workload  # noqa: E402

TOLERANCE = 1e-4


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=875)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7, help="timed passes per variant (the median is reported)")
    parser.add_argument("--timed-pairs", type=int, default=256, help="pairs in each timed pass (the first N)")
    parser.add_argument("--speed-only", action="store_true", help="skip the invariance passes")
    parser.add_argument("--cross-encoder", action="store_true", help="the bench's MiniLM-sized cross-encoder")
    parser.add_argument("--cache", type=Path, help="RERANKER_MODEL_CACHE_DIR (default: a fresh temp folder)")
    args = parser.parse_args(argv)

    from reranker.backends import load_backend
    from reranker.backends.openvino import WIDTH_MULTIPLE
    from reranker.backends.precision import cpu_flags
    from reranker.settings import Settings

    cache = args.cache or Path(tempfile.mkdtemp(prefix="bench-inv-"))
    model = str(workload.build_cross_encoder()) if args.cross_encoder else None

    def load(quantization: str, group: int | None = None):  # type: ignore[no-untyped-def]
        backend = load_backend(Settings(model=model, runtime="openvino", quantization=quantization,
                                        model_cache_dir=cache, warmup_on_start=False))
        if group is not None:  # another group size than RERANKER_QUANTIZATION=int8-dynamic's
            backend._use(backend._compile(backend._load_ir("int8-dynamic"), "f32", group=group))
        return backend

    loaded = {"fp32": load("none"), "bf16": load("bf16"), "int8-dynamic/128": load("int8-dynamic", 128),
              "int8-dynamic/64": load("int8-dynamic", 64), "auto": load("auto")}
    variants = [(name, backend, width) for name, backend in loaded.items() if name != "auto"
                for width in (1, WIDTH_MULTIPLE)] + [("auto: " + str(loaded["auto"].info.numerics), loaded["auto"], WIDTH_MULTIPLE)]
    queries = workload.texts(25, tokens=(2, 12), seed=1, tag="q")
    documents = workload.texts(args.pairs, tokens=(5, 250), seed=2, tag="d")
    pairs = [(queries[i % len(queries)], d) for i, d in enumerate(documents)]
    encoded = loaded["fp32"].encode(pairs)
    lengths = [e.tokens + (len(e.query) if e.query else 0) for e in encoded]
    print(f"# {loaded['fp32'].info.model} ({loaded['fp32'].info.kind}), {args.pairs} pairs of {min(lengths)}-{max(lengths)} "
          f"tokens, batches of {args.batch}; CPU {'AMX' if 'amx_tile' in cpu_flags() else 'no AMX'}, "
          f"{'avx512_bf16' if 'avx512_bf16' in cpu_flags() else 'no avx512_bf16'}")
    print(f"# auto picked: {loaded['auto'].info.precision}")

    shuffled = list(range(len(pairs)))
    random.Random(0).shuffle(shuffled)
    mixed = [shuffled[i:i + args.batch] for i in range(0, len(shuffled), args.batch)]
    by_length = sorted(range(len(pairs)), key=lambda i: lengths[i])
    timed = sorted(range(min(args.timed_pairs, len(pairs))), key=lambda i: lengths[i])
    grouped = [[pairs[i] for i in timed[i:i + args.batch]] for i in range(0, len(timed), args.batch)]

    rows = []
    for name, backend, width in variants:
        backend.width_multiple = width
        if args.speed_only:
            rows.append([name, width, float("nan"), -1, []])
            continue
        alone = np.array([backend.score([p])[0] for p in pairs])
        with ThreadPoolExecutor(backend.sizing().max_parallel) as pool:
            scored = list(pool.map(lambda batch: backend.score([pairs[i] for i in batch]), mixed))  # noqa: B023
        together = np.zeros(len(pairs))
        for batch, scores in zip(mixed, scored):
            together[batch] = scores
        diff = np.abs(together - alone)
        rows.append([name, width, float(diff.max()), int((diff > TOLERANCE).sum()), []])

    pools = [ThreadPoolExecutor(backend.sizing().max_parallel) for _, backend, _ in variants]
    for (_, backend, width), pool in zip(variants, pools):  # warm every worker's infer request
        backend.width_multiple = width
        list(pool.map(backend.score, grouped[:pool._max_workers]))
    for _ in range(args.repeats):
        for row, (_, backend, width), pool in zip(rows, variants, pools):
            backend.width_multiple = width
            started = time.perf_counter()
            workload.score_side_by_side(backend, grouped, pool)
            row[4].append(len(timed) / (time.perf_counter() - started))
    base = next(float(np.median(row[4])) for row in rows if row[0] == "int8-dynamic/128" and row[1] == 1)
    print(f"\n{len(timed)} pairs per timed pass, median of {args.repeats} passes (range in brackets)")
    print("| variant | padding | max abs diff, alone vs mixed batches | pairs over 1e-4 | pairs/s | vs old default |")
    print("|---|---|---|---|---|---|")
    for name, width, worst, over, rates in rows:
        rate = float(np.median(rates))
        print(f"| {name} | x{width} | {worst:.1e} | {over} | {rate:.1f} [{min(rates):.0f}-{max(rates):.0f}] "
              f"| {rate / base:.2f}x |")
    for pool in pools:
        pool.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())

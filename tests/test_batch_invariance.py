"""A pair's score does not depend on its batch-mates (OpenVINO, the CPU default runtime).

The same pairs are scored one at a time and then in shuffled batches of mixed lengths, two
forwards at once on the backend's streams (what the server's batcher does under load), with the
embedded MiniLM at the precision `auto` picks on this CPU and at each reduced precision it may
pick. Before batches were padded to a multiple of 16 tokens, int8-dynamic moved scores by up to
3.3e-3 and bf16 by 5.5e-4 between the two (bench/batch_invariance.py measures it).
"""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from reranker.backends import Backend, load_backend
from reranker.settings import Settings

pytest.importorskip("openvino", reason="openvino is part of the server extra")

TOLERANCE = 1e-4
WORDS = ("search engine ranking document query relevance model vector index cluster token batch speed server "
         "network operator memory cache python river mountain history science music").split()


def mixed_pairs(n: int = 72) -> list[tuple[str, str]]:
    """Queries of 2-8 words against documents of 3-120 words: lengths on both sides of many 16-token blocks."""
    rng = random.Random(7)
    return [(" ".join(rng.choices(WORDS, k=rng.randint(2, 8))), f"{i} " + " ".join(rng.choices(WORDS, k=rng.randint(3, 120))))
            for i in range(n)]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ov-cache")


def variation(backend: Backend, pairs: list[tuple[str, str]]) -> float:
    alone = np.array([backend.score([p])[0] for p in pairs])
    worst = 0.0
    for size in (5, 16, 32):
        order = list(range(len(pairs)))
        random.Random(size).shuffle(order)
        batches = [order[i:i + size] for i in range(0, len(order), size)]
        with ThreadPoolExecutor(max(1, backend.sizing().max_parallel)) as pool:
            scored = list(pool.map(lambda batch: backend.score([pairs[i] for i in batch]), batches))
        together = np.zeros(len(pairs))
        for batch, scores in zip(batches, scored):
            together[batch] = scores
        worst = max(worst, float(np.abs(together - alone).max()))
    return worst


@pytest.mark.parametrize("quantization", ["auto", "int8-dynamic", "bf16", "none"])
def test_scores_do_not_depend_on_batch_mates(quantization: str, cache: Path) -> None:
    backend = load_backend(Settings(runtime="openvino", quantization=quantization, model_cache_dir=cache,
                                    warmup_on_start=False))
    moved = variation(backend, mixed_pairs())
    print(f"\n{quantization} ({backend.info.numerics}): batch-mates move scores by {moved:.1e}")
    assert moved <= TOLERANCE, (backend.info.numerics, moved)
    if quantization == "auto":  # and the start-up check that let it serve said so
        assert backend.info.dtype == "fp32" or "batch-mates move" in backend.info.precision

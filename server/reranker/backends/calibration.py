"""`RERANKER_QUANTIZATION=auto` on a GPU: the fastest half precision that keeps the ranking.

Half precision is what makes a GPU fast, but how much it moves scores depends on the model (its
activation ranges), not only on the dtype, so it is measured on the model being loaded: a fixed
set of calibration pairs is scored in fp32 and in each candidate precision, fastest first, and the
first whose scores keep Spearman >= SPEARMAN_FLOOR against fp32 (and stay finite: fp16 can
overflow) is served. fp16 and bf16 run at the same tensor-core rate (docs/cuda.md has the
measurement); fp16 comes first because its 10-bit mantissa moves scores less than bf16's 7.
If neither holds, fp32 is served.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .base import Pair

log = logging.getLogger(__name__)

SPEARMAN_FLOOR = 0.999
CANDIDATES = ("fp16", "bf16")

_TOPICS = {
    "python": "python is a programming language with a large standard library and many packages",
    "paris": "paris is the capital of france and sits on the seine river in the north of the country",
    "redis": "redis keeps data in memory and serves it as a cache or a message broker",
    "kubernetes": "kubernetes schedules containers onto nodes and restarts them when they fail",
    "learning": "machine learning fits models to data so that they predict what they have not seen",
    "music": "a symphony orchestra plays music written for strings, woodwinds, brass and percussion",
    "mountains": "the alps are a mountain range in europe with glaciers and high passes",
    "bread": "bread is baked from flour, water, salt and yeast that makes the dough rise",
}


def calibration_pairs(n: int = 96, seed: int = 0) -> list[Pair]:
    """Queries against documents that range from on-topic to unrelated (fixed seed): a spread of
    scores, so the rank correlation measures the precision, not ties."""
    rng = random.Random(seed)
    topics = list(_TOPICS)
    pairs: list[Pair] = []
    for i in range(n):
        query_topic = topics[i % len(topics)]
        doc_topics = rng.sample(topics, rng.randint(1, 3))
        if i % 3 == 0:
            doc_topics[0] = query_topic
        words = " ".join(_TOPICS[t] for t in doc_topics).split()
        rng.shuffle(words)
        pairs.append(Pair(f"what is {query_topic}", " ".join(words[: rng.randint(min(10, len(words)), len(words))])))
    return pairs


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Rank correlation (ties broken by position: the calibration scores are continuous)."""
    ra = np.argsort(np.argsort(np.asarray(a, dtype=np.float64)))
    rb = np.argsort(np.argsort(np.asarray(b, dtype=np.float64)))
    return float(np.corrcoef(ra, rb)[0, 1])


@dataclass(frozen=True)
class Choice:
    dtype: str
    measured: dict[str, float]  # candidate -> Spearman vs fp32 (NaN: non-finite scores)


def choose(score_in: Callable[[str], list[float]], candidates: Sequence[str] = CANDIDATES,
           floor: float = SPEARMAN_FLOOR, *, check: Callable[[str], bool] | None = None) -> Choice:
    """`score_in(dtype)` scores the calibration pairs in that precision; returns the pick.

    `check(dtype)`, when given, is a further test a candidate that keeps the ranking must pass
    (OpenVINO: its scores do not depend on their batch-mates); one that fails is passed over."""
    reference = score_in("fp32")
    measured: dict[str, float] = {}
    for name in candidates:
        scores = score_in(name)
        rho = spearman(reference, scores) if all(math.isfinite(s) for s in scores) else math.nan
        measured[name] = rho
        if rho >= floor and (check is None or check(name)):
            log.info("quantization auto: %s (Spearman %.5f vs fp32 on %d calibration pairs)", name, rho, len(scores))
            return Choice(name, measured)
    log.warning("quantization auto: fp32, no candidate kept Spearman >= %s (%s)", floor, measured)
    return Choice("fp32", measured)

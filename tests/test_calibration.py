"""quantization=auto on CUDA picks its precision by measured fidelity (backends/calibration.py).

The choice is a pure function of the scores each precision gives on the calibration pairs, so it
is tested here with scores made to agree or disagree with fp32; the GPU run (docs/cuda.md) shows
what it picks for real models.
"""

from __future__ import annotations

import math

from reranker.backends.calibration import calibration_pairs, choose, spearman


def scorer(table: dict[str, list[float]]):  # type: ignore[no-untyped-def]
    asked: list[str] = []

    def score_in(dtype: str) -> list[float]:
        asked.append(dtype)
        return table[dtype]

    return score_in, asked


REF = [float(i) for i in range(20)]
CLOSE = [x + 0.001 * ((-1) ** i) for i, x in enumerate(REF)]  # same order
SWAPPED = REF[:10] + list(reversed(REF[10:]))  # half the ranking reversed


def test_first_candidate_that_keeps_the_ranking_wins() -> None:
    score_in, asked = scorer({"fp32": REF, "fp16": CLOSE, "bf16": CLOSE})
    choice = choose(score_in)
    assert choice.dtype == "fp16" and asked == ["fp32", "fp16"]  # bf16 is not even tried
    assert choice.measured["fp16"] == 1.0


def test_overflow_or_reordering_moves_on_then_falls_back_to_fp32() -> None:
    score_in, _ = scorer({"fp32": REF, "fp16": [math.inf] + CLOSE[1:], "bf16": CLOSE})
    assert choose(score_in).dtype == "bf16"  # fp16 overflowed: non-finite scores never pass
    score_in, _ = scorer({"fp32": REF, "fp16": SWAPPED, "bf16": SWAPPED})
    choice = choose(score_in)
    assert choice.dtype == "fp32" and choice.measured["bf16"] < 0.999


def test_calibration_pairs_are_fixed_and_varied() -> None:
    pairs = calibration_pairs()
    assert pairs == calibration_pairs() and len(set(pairs)) == len(pairs) == 96
    assert len({p.query for p in pairs}) == 8 and min(len(p.document.split()) for p in pairs) >= 10
    assert spearman([1, 2, 3], [10, 20, 30]) == 1.0 and spearman([1, 2, 3], [3, 2, 1]) == -1.0

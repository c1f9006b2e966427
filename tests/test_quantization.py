"""bf16 and int8 against fp32, per backend, measured on a ranking fixture with real weights.

The fixture (tests/fixtures/ranking.json, written for this project) has 10 queries, each with 3
relevant and 5 irrelevant documents; every query's 8 documents are scored as one batch with the
embedded all-MiniLM-L6-v2. For each runtime and dtype the scores are compared with the same
runtime's fp32 scores:

- max abs: the largest score difference over the 80 pairs;
- Spearman: rank correlation over all 80 scores, and the mean/min of the per-query correlations
  (each over 8 documents: one swapped neighbour pair costs 0.024);
- top-3: mean overlap of each query's top 3 documents with fp32's top 3.

The floors asserted below are the measured figures with a margin (docs/benchmarks.md has the
table); `pytest -s` prints the measurement. int8 is OpenVINO's NNCF post-training quantization
(int8 weights and activations, calibrated once on generic text) on a CPU, and MLX's 8-bit weights
(groups of 64, fp32 activations); PyTorch has no int8 (its dynamic quantization is deprecated).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import spearmanr

from reranker.backends import Backend, load_backend, precision
from reranker.settings import Settings

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "ranking.json").read_text(encoding="utf-8"))["queries"]
DEVICES = {"torch": "cpu", "mlx": "mlx", "openvino": "cpu"}


def load(runtime: str, quantization: str) -> Backend:
    return load_backend(Settings(runtime=runtime, device=DEVICES[runtime], quantization=quantization,
                                 warmup_on_start=False))


def fixture_scores(backend: Backend) -> np.ndarray:
    """(queries, 8) raw scores; the 3 relevant documents come first in each row."""
    return np.array([backend.score([(q["query"], d) for d in q["relevant"] + q["irrelevant"]]) for q in FIXTURE])


def top3(row: np.ndarray) -> set[int]:
    return set(np.argsort(-row, kind="stable")[:3].tolist())


@dataclass(frozen=True)
class Fidelity:
    max_abs: float
    spearman: float
    spearman_query_mean: float
    spearman_query_min: float
    top3: float

    @classmethod
    def measure(cls, ref: np.ndarray, got: np.ndarray) -> "Fidelity":
        per_query = [float(spearmanr(a, b).statistic) for a, b in zip(ref, got)]
        return cls(
            max_abs=float(np.abs(ref - got).max()),
            spearman=float(spearmanr(ref.ravel(), got.ravel()).statistic),
            spearman_query_mean=float(np.mean(per_query)), spearman_query_min=float(np.min(per_query)),
            top3=float(np.mean([len(top3(a) & top3(b)) / 3 for a, b in zip(ref, got)])),
        )

    def row(self, name: str) -> str:
        return (f"| {name} | {self.max_abs:.4f} | {self.spearman:.4f} | {self.spearman_query_mean:.4f} "
                f"| {self.spearman_query_min:.4f} | {self.top3:.3f} |")


#: Floors: (min Spearman over all pairs, min mean per-query Spearman, min top-3, max abs diff).
#: Measured on this fixture (docs/benchmarks.md): bf16 every runtime 0.9999 / 1.0 / 1.0 / <= 0.004;
#: mlx int8 0.9997 / 1.0 / 1.0 / 0.004; openvino int8 0.998 / 0.99 / 1.0 / 0.02; openvino int8-dynamic
#: 0.9997 / 1.0 / 1.0 / 0.006. bf16 and int8-dynamic are what RERANKER_QUANTIZATION=auto may pick, so
#: their floor is the auto rule's: Spearman >= 0.999.
FLOORS = {
    ("torch", "bf16"): (0.999, 0.99, 0.9, 0.02),
    ("mlx", "bf16"): (0.999, 0.99, 0.9, 0.02),
    ("openvino", "bf16"): (0.999, 0.99, 0.9, 0.02),
    ("mlx", "int8"): (0.99, 0.99, 0.9, 0.02),
    ("openvino", "int8"): (0.99, 0.98, 0.9, 0.05),
    ("openvino", "int8-dynamic"): (0.999, 0.99, 0.9, 0.02),
}

MEASURED: dict[str, Fidelity] = {}
SCORES: dict[tuple[str, str], np.ndarray] = {}


def scores_of(runtime: str, quantization: str) -> np.ndarray:
    """The fixture scored by one runtime at one dtype, once per test session."""
    if (runtime, quantization) not in SCORES:
        backend = load(runtime, quantization)
        expected = "fp32" if quantization == "none" else quantization
        assert (backend.info.backend, backend.info.dtype) == (runtime, expected)
        SCORES[(runtime, quantization)] = fixture_scores(backend)
        backend.close()
    return SCORES[(runtime, quantization)]


@pytest.fixture(scope="module", autouse=True)
def report() -> Iterator[None]:
    yield
    if MEASURED:
        print("\n| compared (runtime dtype: vs its own fp32) | max abs | Spearman (80 pairs) | Spearman per query, mean "
              "| per query, min | top-3 |\n|---|---|---|---|---|---|")
        print("\n".join(f.row(name) for name, f in MEASURED.items()))


@pytest.fixture(scope="module")
def fp32() -> dict[str, np.ndarray]:
    return {runtime: scores_of(runtime, "none") for runtime in DEVICES}


def test_fixture_is_a_real_ranking_task(fp32: dict[str, np.ndarray]) -> None:
    """fp32 MiniLM finds the relevant documents (else the fidelity figures would mean little),
    and the two runtimes agree at fp32."""
    assert len(FIXTURE) == 10 and all(len(q["relevant"]) == 3 and len(q["irrelevant"]) == 5 for q in FIXTURE)
    for runtime, scores in fp32.items():
        recall_at_3 = np.mean([len(top3(row) & {0, 1, 2}) / 3 for row in scores])
        assert recall_at_3 >= 0.9, (runtime, recall_at_3)
        # Every relevant document beats every irrelevant one for most queries.
        separated = np.mean([row[:3].min() > row[3:].max() for row in scores])
        assert separated >= 0.8, (runtime, separated)
    for runtime in ("mlx", "openvino"):
        fidelity = MEASURED[f"{runtime} fp32 vs torch fp32"] = Fidelity.measure(fp32["torch"], fp32[runtime])
        assert fidelity.max_abs <= 1e-4 and fidelity.spearman >= 0.9999, (runtime, fidelity)


@pytest.mark.parametrize("runtime,quantization", list(FLOORS))
def test_quantized_scores_stay_close_to_fp32(runtime: str, quantization: str, fp32: dict[str, np.ndarray]) -> None:
    if quantization == "bf16" and runtime == "openvino" and not precision.native_bf16():
        pytest.skip("OpenVINO runs bf16 only on CPUs with native bf16 (avx512_bf16/amx_bf16); this one has none")
    scores = scores_of(runtime, quantization)
    fidelity = MEASURED[f"{runtime} {quantization}"] = Fidelity.measure(fp32[runtime], scores)
    print(f"\n{runtime} {quantization}: {fidelity}")
    min_spearman, min_query_spearman, min_top3, max_abs = FLOORS[(runtime, quantization)]
    assert fidelity.spearman >= min_spearman
    assert fidelity.spearman_query_mean >= min_query_spearman
    assert fidelity.top3 >= min_top3
    assert 0 < fidelity.max_abs <= max_abs  # > 0: the dtype really changed the arithmetic


@pytest.mark.parametrize("other", ["mlx", "openvino"])
def test_runtimes_compared_at_bf16(other: str) -> None:
    """torch and another runtime at bf16: how far apart their scores are (they share cache keys)."""
    if other == "openvino" and not precision.native_bf16():
        pytest.skip("OpenVINO runs bf16 only on CPUs with native bf16 (avx512_bf16/amx_bf16); this one has none")
    fidelity = Fidelity.measure(scores_of("torch", "bf16"), scores_of(other, "bf16"))
    MEASURED[f"torch bf16 vs {other} bf16"] = fidelity
    print(f"\ntorch vs {other} bf16: {fidelity}")
    assert fidelity.top3 >= 0.9 and fidelity.spearman >= 0.999


def test_openvino_auto_pick_keeps_the_ranking(fp32: dict[str, np.ndarray]) -> None:
    """What `auto` serves on this CPU, measured at start (int8-dynamic where it keeps Spearman >= 0.999
    on calibration pairs and runs faster, else bf16 where faster, else fp32), keeps the bar on the fixture."""
    backend = load("openvino", "auto")
    fidelity = MEASURED[f"openvino auto ({backend.info.dtype})"] = Fidelity.measure(fp32["openvino"], fixture_scores(backend))
    print(f"\nopenvino auto: {backend.info.precision}\n{fidelity}")
    assert fidelity.spearman >= 0.999 and fidelity.top3 >= 0.9


def test_openvino_auto_refuses_int8_dynamic_where_it_loses_the_ranking(tmp_path: Path) -> None:
    """The gate rejecting, on a real model and at the real floor: the benchmarks' MiniLM-sized
    cross-encoder (bench/workload.py: MiniLM weights, random classification head, scores spread
    over a tiny range) loses Spearman 0.999 against fp32 with int8-dynamic at every group size, so
    `auto` serves a float precision, and says so with the figures it measured."""
    import sys

    from reranker.backends import calibration
    from reranker.backends.openvino import DYNAMIC_GROUPS

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from workload import build_cross_encoder

    assert calibration.SPEARMAN_FLOOR == 0.999  # the floor is the server's, not lowered here
    backend = load_backend(Settings(model=str(build_cross_encoder(tmp_path / "ce")), runtime="openvino",
                                    quantization="auto", model_cache_dir=tmp_path / "cache", warmup_on_start=False))
    record = backend.info.precision_record
    assert record is not None
    measured = {int(group): rho for group, rho in record["spearman"].items()}  # type: ignore[attr-defined]
    print(f"\nopenvino auto on the bench cross-encoder: {backend.info.precision}")
    assert sorted(measured) == sorted(DYNAMIC_GROUPS)  # every group tried, none held
    assert all(rho < calibration.SPEARMAN_FLOOR for rho in measured.values()), measured
    assert backend.info.dtype in ("fp32", "bf16") and "int8-dynamic not kept" in backend.info.precision
    for group, rho in measured.items():
        assert f"group {group} {rho:.4f}" in backend.info.precision

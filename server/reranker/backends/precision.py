"""Which precision serves: RERANKER_QUANTIZATION as asked, or `auto`'s pick for this hardware.

`auto` (the default) picks the fastest precision that keeps the ranking of fp32: Spearman
>= 0.999 against fp32 on tests/fixtures/ranking.json (the fidelity table in docs/benchmarks.md).

- CPU with native bf16 (the `avx512_bf16` or `amx_bf16` flags: Intel Cooper Lake, Sapphire
  Rapids and later, AMD Zen 4 and later): bf16 keeps Spearman 0.9999 and often runs 1.5-2.3x
  fp32, but not always (AVX512-BF16 without AMX: 0.6-0.9x measured on this project's VMs, whose
  bf16 dot product runs at fp32's FMA rate), so the backends time bf16 against fp32 on probe
  batches at start (`race`) and keep the faster.
- CPU without native bf16: fp32 (bf16 is emulated there, slower than fp32).
- Then, on OpenVINO, int8-dynamic (int8 weights, activations quantized at run time per group of
  values): how much it moves scores depends on the model, so it is measured on it at start, on
  calibration pairs (calibration.py, as on CUDA), and served only where it keeps Spearman >= 0.999
  and runs faster than the float pick (openvino.py). The static int8 (NNCF, activations
  calibrated once) is faster still but measured at Spearman 0.9987: below the bar, so it is never
  picked automatically; ask for it with RERANKER_QUANTIZATION=int8.
- CUDA (PyTorch): measured at load on the model itself: the first of fp16, bf16 that keeps
  Spearman >= 0.999 against fp32 on calibration pairs (calibration.py, docs/cuda.md), else fp32.
- MPS and MLX: fp32, the reference; ask for bf16/fp16 explicitly where it pays.

On OpenVINO, whatever is timed (the bf16 race, int8-dynamic) is decided once per fleet and CPU
type and recorded in the fleet's Redis and the model cache (precision_record.py): replicas that
raced differently under load had split one fleet into two precisions and two score caches. A
reduced precision serves only if a pair's score does not depend on its batch-mates (checked on
the calibration pairs: openvino.py pads batches so that it holds).

The pick and the reason are reported by /health (`model.precision`, `model.numerics`,
`model.precision_record`), and the dtype by `reranker_model_info`.
"""

from __future__ import annotations

import functools
import json
import platform
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from .base import Pair

#: CPU flags (Linux /proc/cpuinfo names) that mean bf16 matrix products run natively.
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


@dataclass(frozen=True)
class Precision:
    """What RERANKER_QUANTIZATION resolved to: none (fp32) | bf16 | fp16 | int8 | int8-dynamic, and why."""

    quantization: str
    reason: str


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux); empty elsewhere (macOS on Apple silicon has no x86 flags)."""
    if platform.system() != "Linux":
        return frozenset()
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


#: The instruction-set flags that decide which int8/bf16 kernels run (a record key hashes all flags).
DECIDING_FLAGS = frozenset({"avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16",
                            "amx_int8", "amx_tile"})


@functools.cache
def cpu_summary() -> dict[str, object]:
    """The CPU beside a precision record in /health, for people (the operator's status.precision):
    its model name (Linux /proc/cpuinfo, else the platform's) and the flags that decide a pick."""
    name = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"model": " ".join(name.split()), "flags": sorted(cpu_flags() & DECIDING_FLAGS)}


def native_bf16(flags: frozenset[str] | None = None) -> str | None:
    """The flag that gives this CPU native bf16, or None."""
    present = cpu_flags() if flags is None else flags
    return next((flag for flag in NATIVE_BF16_FLAGS if flag in present), None)


def resolve(quantization: str, *, device: str, flags: frozenset[str] | None = None) -> Precision:
    """The precision to load: `quantization` unless it is `auto`, then the pick for `device`."""
    if quantization != "auto":
        return Precision(quantization, f"RERANKER_QUANTIZATION={quantization}")
    if device == "cuda":  # loaded in fp32, then the backend measures fp16/bf16 (calibration.py)
        return Precision("none", "auto: fp32 until the calibration at load picks")
    if device != "cpu":
        return Precision("none", f"auto: fp32 on {device} (the reference; bf16/fp16 only when asked)")
    flag = native_bf16(flags)
    if flag is not None:
        return Precision("bf16", f"auto: the CPU has native bf16 ({flag}); bf16 keeps Spearman >= 0.999 vs fp32")
    return Precision("none", "auto: the CPU has no native bf16 (no avx512_bf16/amx_bf16): fp32")


#: Generic text (not the test fixture): int8 calibration and the probe batches `auto` times.
SAMPLE_TEXT = Path(__file__).with_name("data") / "calibration.json"


def sample_pairs(*, batches: int, size: int) -> list[list[Pair]]:
    """`batches` batches of `size` (query, passage) pairs from SAMPLE_TEXT, each batch one query."""
    data = json.loads(SAMPLE_TEXT.read_text(encoding="utf-8"))
    queries, passages = data["queries"], data["passages"]
    return [[Pair(queries[i % len(queries)], passages[(i * size + j) % len(passages)]) for j in range(size)]
            for i in range(batches)]


def race(candidates: Mapping[str, Callable[[], object]], *, rounds: int = 3) -> dict[str, float]:
    """Seconds each candidate takes over `rounds` runs, interleaved so that background load falls on
    all alike, after one warm-up run each (kernels are chosen on first use)."""
    seconds = dict.fromkeys(candidates, 0.0)
    for round_ in range(rounds + 1):
        for name, run in candidates.items():
            started = time.perf_counter()
            run()
            if round_:
                seconds[name] += time.perf_counter() - started
    return seconds


def raced(seconds: Mapping[str, float]) -> Precision:
    """`auto`'s pick from a race of "bf16" against "none" (fp32), and the reason /health shows."""
    fastest = min(seconds, key=seconds.__getitem__)
    ratio = seconds["none"] / seconds["bf16"]
    return Precision(fastest, f"auto: the CPU has native bf16 ({native_bf16()}); measured at start, bf16 ran "
                              f"{ratio:.2f}x fp32's speed: {'bf16' if fastest == 'bf16' else 'fp32'} "
                              "(both keep Spearman >= 0.999 vs fp32)")

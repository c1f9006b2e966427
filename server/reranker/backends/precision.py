"""Which precision serves: RERANKER_QUANTIZATION as asked, or `auto`'s pick for this hardware.

`auto` (the default) picks the fastest precision that keeps the ranking of fp32: Spearman
>= 0.999 against fp32 on tests/fixtures/ranking.json (the fidelity table in docs/benchmarks.md).

- CPU with native bf16 (the `avx512_bf16` or `amx_bf16` flags: Intel Cooper Lake, Sapphire
  Rapids and later, AMD Zen 4 and later): bf16, Spearman 0.9999 and 1.5-2.3x fp32's throughput
  in every runtime measured. int8 is faster still but measured at Spearman 0.99-0.993: below the
  bar, so it is never picked automatically; ask for it with RERANKER_QUANTIZATION=int8.
- CPU without native bf16: fp32 (bf16 is emulated there, slower than fp32).
- CUDA (PyTorch): measured at load on the model itself: the first of fp16, bf16 that keeps
  Spearman >= 0.999 against fp32 on calibration pairs (calibration.py, docs/cuda.md), else fp32.
- MPS and MLX: fp32, the reference; ask for bf16/fp16 explicitly where it pays.

The pick and the reason are reported by /health (`model.precision`), and the dtype by
`reranker_model_info`.
"""

from __future__ import annotations

import functools
import platform
from dataclasses import dataclass
from pathlib import Path

#: CPU flags (Linux /proc/cpuinfo names) that mean bf16 matrix products run natively.
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


@dataclass(frozen=True)
class Precision:
    """What RERANKER_QUANTIZATION resolved to: none (fp32) | bf16 | fp16 | int8, and why."""

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

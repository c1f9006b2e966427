"""Runtimes behind one interface; `load_backend` picks one from the settings.

Each runtime lives in its own module and is imported only when chosen, so a server without
mlx (or an operator without torch) never imports it. A missing optional dependency is an
error naming the extra to install.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import platform
import time
from typing import TYPE_CHECKING

from .base import Backend, BackendError, BackendInfo, ConversionNeeded, DeviceUnavailable, Encoded, EngineSizing, Pair
from . import model_files, precision

if TYPE_CHECKING:  # pragma: no cover
    from ..settings import Settings

__all__ = ["Backend", "BackendError", "BackendInfo", "ConversionNeeded", "DeviceUnavailable", "Encoded",
           "EngineSizing", "Pair", "load_backend", "pick_runtime", "precision"]

#: Runtime name -> (module, class). One line per runtime.
RUNTIMES: dict[str, tuple[str, str]] = {
    "torch": ("reranker.backends.torch", "TorchBackend"),
    "mlx": ("reranker.backends.mlx", "MLXBackend"),
    "openvino": ("reranker.backends.openvino", "OpenVINOBackend"),
}


#: Kinds every runtime's own class serves.
ENCODER_KINDS = ("cross-encoder", "bi-encoder")

#: (runtime, model kind) -> (module, class), where a kind has a backend of its own on that runtime.
KIND_BACKENDS: dict[tuple[str, str], tuple[str, str]] = {
    ("torch", "llm"): ("reranker.backends.torch_llm", "TorchLLMBackend"),
    ("mlx", "llm"): ("reranker.backends.mlx_llm", "MLXLLMBackend"),
}


def _apple_silicon() -> bool:
    return platform.system() == "Darwin" and platform.machine() == "arm64"


#: Device files a CUDA (NVIDIA) or ROCm (AMD) GPU brings: without one, torch is not imported to ask.
GPU_DEVICE_FILES = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd")


def _gpu_present() -> bool:
    """A GPU torch can use. On a Linux machine without a GPU's device files torch is not imported
    (seconds of a start, and the OpenVINO path needs none of it)."""
    if platform.system() == "Linux" and not any(os.path.exists(f) for f in GPU_DEVICE_FILES):
        return False
    try:
        import torch
    except ImportError:
        return False
    mps = getattr(torch.backends, "mps", None)
    return bool(torch.cuda.is_available() or (mps is not None and mps.is_available()))


def pick_runtime(settings: "Settings") -> str:
    """RERANKER_RUNTIME when set; auto: mlx on Apple silicon (if installed and allowed), torch on a GPU,
    openvino on a CPU when installed (the fastest CPU runtime, docs/benchmarks.md), else torch."""
    runtime, device = settings.runtime, settings.device
    if runtime == "mlx" or device == "mlx":
        if runtime not in ("auto", "mlx"):
            raise DeviceUnavailable(f"RERANKER_DEVICE=mlx runs on the mlx runtime, not RERANKER_RUNTIME={runtime}")
        if importlib.util.find_spec("mlx") is None:
            raise DeviceUnavailable("mlx is not installed: pip install 'reranker-fleet[mlx]'")
        return "mlx"
    if runtime == "openvino":
        if importlib.util.find_spec("openvino") is None:
            raise DeviceUnavailable("RERANKER_RUNTIME=openvino but openvino is not installed: "
                                    "pip install 'reranker-fleet[openvino]'")
        return "openvino"
    if runtime == "torch":
        return "torch"
    if device == "auto" and settings.use_mlx and _apple_silicon() and importlib.util.find_spec("mlx") is not None:
        return "mlx"
    on_cpu = device == "cpu" or (device == "auto" and not _gpu_present())
    if on_cpu and importlib.util.find_spec("openvino") is not None:
        return "openvino"
    return "torch"


def load_backend(settings: "Settings") -> Backend:
    """Resolve the model files and load them on the runtime the settings ask for."""
    started = time.perf_counter()
    files = model_files.resolve(
        settings.model, revision=settings.model_revision, local_fallback=settings.local_model_path,
        kind=settings.model_kind, max_length=settings.max_length,
    )
    found = time.perf_counter()
    runtime = pick_runtime(settings)
    if files.kind not in ENCODER_KINDS and (runtime, files.kind) not in KIND_BACKENDS:
        if settings.runtime != "auto":
            raise BackendError(f"RERANKER_RUNTIME={runtime} serves cross-encoders and bi-encoders, not {files.kind} "
                               "models: use torch or mlx")
        runtime = "torch"  # auto: the runtime that serves this kind
    if settings.quantization == "int8-dynamic" and (runtime != "openvino" or files.kind not in ENCODER_KINDS):
        raise BackendError(f"RERANKER_QUANTIZATION=int8-dynamic is OpenVINO's (cross-encoders and bi-encoders on a "
                           f"CPU), not the {runtime} runtime's for {files.kind} models: use int8, bf16 or none")
    module_name, class_name = KIND_BACKENDS.get((runtime, files.kind), RUNTIMES[runtime])
    module = importlib.import_module(module_name)  # the runtime's libraries (openvino, torch, mlx)
    imported = time.perf_counter()
    backend: Backend = getattr(module, class_name)(files, settings)
    backend.startup = {**backend.startup, "imports": imported - found, "model_files": found - started}
    return backend

"""Runtimes behind one interface; `load_backend` picks one from the settings.

Each runtime lives in its own module and is imported only when chosen, so a server without
mlx (or an operator without torch) never imports it. A missing optional dependency is an
error naming the extra to install.
"""

from __future__ import annotations

import importlib
import importlib.util
import platform
from typing import TYPE_CHECKING

from .base import Backend, BackendError, BackendInfo, DeviceUnavailable, Encoded, EngineSizing, Pair
from . import model_files

if TYPE_CHECKING:  # pragma: no cover
    from ..settings import Settings

__all__ = ["Backend", "BackendError", "BackendInfo", "DeviceUnavailable", "Encoded", "EngineSizing", "Pair",
           "load_backend", "pick_runtime"]

#: Runtime name -> (module, class). One line per runtime.
RUNTIMES: dict[str, tuple[str, str]] = {
    "torch": ("reranker.backends.torch", "TorchBackend"),
    "mlx": ("reranker.backends.mlx", "MLXBackend"),
}


#: (runtime, model kind) -> (module, class), where a kind has a backend of its own on that runtime.
KIND_BACKENDS: dict[tuple[str, str], tuple[str, str]] = {
    ("torch", "llm"): ("reranker.backends.torch_llm", "TorchLLMBackend"),
    ("mlx", "llm"): ("reranker.backends.mlx_llm", "MLXLLMBackend"),
}


def _apple_silicon() -> bool:
    return platform.system() == "Darwin" and platform.machine() == "arm64"


def pick_runtime(settings: "Settings") -> str:
    """mlx when forced, or on Apple silicon with mlx installed and allowed; else torch."""
    if settings.device == "mlx":
        if importlib.util.find_spec("mlx") is None:
            raise DeviceUnavailable("RERANKER_DEVICE=mlx but mlx is not installed: pip install 'reranker-fleet[mlx]'")
        return "mlx"
    if settings.device == "auto" and settings.use_mlx and _apple_silicon() and importlib.util.find_spec("mlx") is not None:
        return "mlx"
    return "torch"


def load_backend(settings: "Settings") -> Backend:
    """Resolve the model files and load them on the runtime the settings ask for."""
    files = model_files.resolve(
        settings.model, revision=settings.model_revision, local_fallback=settings.local_model_path,
        kind=settings.model_kind, max_length=settings.max_length,
    )
    runtime = pick_runtime(settings)
    module_name, class_name = KIND_BACKENDS.get((runtime, files.kind), RUNTIMES[runtime])
    module = importlib.import_module(module_name)
    backend: Backend = getattr(module, class_name)(files, settings)
    return backend

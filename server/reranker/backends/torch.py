"""The PyTorch backend: Hugging Face cross-encoders and bi-encoders on cuda, mps or cpu.

Cross-encoders run through `AutoModelForSequenceClassification`, tokenized exactly as
sentence-transformers' `CrossEncoder` does (pair encoding, longest-first truncation to
max_length), so scores match it. Bi-encoders run through `AutoModel` with the pooling the
model's sentence-transformers config names, and pairs score by cosine similarity.

Dtypes: fp32; bf16 weights (what RERANKER_QUANTIZATION=auto picks on a CPU with native bf16);
fp16 on CUDA/MPS. int8 on a CPU is the OpenVINO runtime's (backends/openvino.py): torch's dynamic
quantization is deprecated. Logits are cast to fp32 before anything else touches them.

Tokenization (shared with MLX) lives in tokenization.py.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

from .base import Backend, BackendError, BackendInfo, DeviceUnavailable, Encoded
from .model_files import ModelFiles
from .precision import resolve
from .tokenization import BiBatch, Features, HFTokenization

if TYPE_CHECKING:  # pragma: no cover
    from ..settings import Settings

log = logging.getLogger(__name__)

try:
    import torch
    from transformers import AutoModel, AutoModelForSequenceClassification
except ImportError as exc:  # pragma: no cover - the `server` extra brings them
    raise ImportError("the PyTorch backend needs torch and transformers: pip install 'reranker-fleet[server]'") from exc


def pick_device(requested: str) -> str:
    """auto: cuda, then mps, then cpu. A forced device that is absent is an error."""
    cuda, mps = torch.cuda.is_available(), bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    if requested == "auto":
        return "cuda" if cuda else "mps" if mps else "cpu"
    if requested == "cuda" and not cuda:
        raise DeviceUnavailable("RERANKER_DEVICE=cuda but torch sees no CUDA device (install a CUDA build of torch and the NVIDIA driver)")
    if requested == "mps" and not mps:
        raise DeviceUnavailable("RERANKER_DEVICE=mps but torch's MPS backend is not available (needs macOS on Apple silicon)")
    return requested


def _dtype_for(quantization: str, device: str) -> tuple[Any, str]:
    if quantization == "bf16":
        return torch.bfloat16, "bf16"
    if quantization == "fp16":
        if device == "cpu":
            raise BackendError("fp16 is not supported on cpu: use bf16 or int8")
        return torch.float16, "fp16"
    if quantization == "int8":
        # torch's dynamic quantization (quantize_dynamic) is deprecated and measured at Spearman 0.987 on the
        # fixture; int8 on a CPU is OpenVINO's NNCF int8 (faster, Spearman >= 0.99): docs/benchmarks.md.
        raise BackendError("int8 runs on the OpenVINO runtime (NNCF int8 weights and activations): set "
                           "RERANKER_RUNTIME=openvino (or auto, on a CPU); on GPUs use bf16 or fp16")
    return torch.float32, "fp32"


class TorchBackend(HFTokenization, Backend):
    """A Hugging Face model on a torch device."""

    def __init__(self, files: ModelFiles, settings: "Settings") -> None:
        self.files = files
        self.device = pick_device(settings.device if settings.device != "mlx" else "auto")
        picked = resolve(settings.quantization, device=self.device)
        self.torch_dtype, dtype_name = _dtype_for(picked.quantization, self.device)
        self.max_length = min(settings.max_length, files.max_length)
        self.mixed_precision = settings.enable_mixed_precision
        self._init_tokenizer(files)
        self.model = self._load_model(files)
        if settings.enable_torch_compile:
            self.model = torch.compile(self.model)  # type: ignore[assignment]
        activation: Literal["sigmoid", "identity"] = "sigmoid" if files.kind == "cross-encoder" else "identity"
        self.info = BackendInfo(
            model=files.name, revision=files.revision, kind=files.kind, backend="torch",
            device=self.device, dtype=dtype_name, max_length=self.max_length, activation=activation,
            precision=picked.reason,
            autocast=self._autocast_dtype(),
        )

    def _load_model(self, files: ModelFiles) -> Any:
        path = str(files.path)
        if files.kind == "cross-encoder":
            model = AutoModelForSequenceClassification.from_pretrained(path, dtype=self.torch_dtype)
            self.num_labels = int(model.config.num_labels)
            if self.num_labels not in (1, 2):
                raise BackendError(f"{files.name} has {self.num_labels} labels; a reranker needs 1 (relevance logit) or 2 (no/yes)")
        else:
            model = AutoModel.from_pretrained(path, dtype=self.torch_dtype)
        model.eval()
        return model.to(self.device)

    # --- scoring ---------------------------------------------------------------------------
    def _autocast_dtype(self) -> str | None:
        """fp16 (CUDA) or bf16 (elsewhere) under ENABLE_MIXED_PRECISION with fp32 weights, else None."""
        if not self.mixed_precision or self.torch_dtype != torch.float32:
            return None
        return "fp16" if self.device == "cuda" else "bf16"

    def _autocast(self) -> Any:
        dtype = self._autocast_dtype()
        if dtype is None:
            return torch.autocast(device_type="cpu", enabled=False)
        device_type = "cuda" if self.device == "cuda" else "cpu"
        return torch.autocast(device_type=device_type, dtype=torch.float16 if dtype == "fp16" else torch.bfloat16)

    def score_encoded(self, batch: Sequence[Encoded]) -> list[float]:
        if not batch:
            return []
        with torch.inference_mode(), self._autocast():
            if self.files.kind == "cross-encoder":
                return self._score_cross(self.collate_cross(batch))
            return self._score_bi(self.collate_bi(batch))

    def _tensors(self, features: Features) -> dict[str, Any]:
        return {name: torch.from_numpy(array).to(self.device) for name, array in features.as_dict().items()}

    def _score_cross(self, features: Features) -> list[float]:
        logits = self.model(**self._tensors(features)).logits.float()
        if self.num_labels == 2:
            # softmax(l)[1] == sigmoid(l1 - l0): keep the log-odds as the raw score.
            raw = logits[:, 1] - logits[:, 0]
        else:
            raw = logits[:, 0]
        return raw.cpu().tolist()

    def embed(self, features: Features) -> Any:
        inputs = self._tensors(features)
        hidden = self.model(**inputs).last_hidden_state.float()
        mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooling = self.files.pooling
        if pooling == "cls":
            pooled = hidden[:, 0]
        elif pooling == "max":
            pooled = hidden.masked_fill(mask == 0, -1e9).max(dim=1).values
        elif pooling == "lasttoken":
            last = inputs["attention_mask"].sum(dim=1) - 1
            pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        else:
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, p=2, dim=1)

    def _score_bi(self, batch: BiBatch) -> list[float]:
        emb = self.embed(batch.features)
        q = emb[torch.from_numpy(batch.queries).to(emb.device)]
        d = emb[torch.from_numpy(batch.documents).to(emb.device)]
        return (q * d).sum(dim=1).cpu().tolist()

    def close(self) -> None:
        del self.model
        if self.device == "cuda":
            torch.cuda.empty_cache()

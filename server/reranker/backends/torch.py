"""The PyTorch backend: Hugging Face cross-encoders and bi-encoders on cuda, mps or cpu.

Cross-encoders run through `AutoModelForSequenceClassification`, tokenized exactly as
sentence-transformers' `CrossEncoder` does (pair encoding, longest-first truncation to
max_length), so scores match it. Bi-encoders run through `AutoModel` with the pooling the
model's sentence-transformers config names, and pairs score by cosine similarity.

Dtypes: fp32; bf16 weights (what RERANKER_QUANTIZATION=auto picks on a CPU with native bf16);
fp16 on CUDA/MPS. int8 on a CPU is the OpenVINO runtime's (backends/openvino.py): torch's dynamic
quantization is deprecated. Logits are cast to fp32 before anything else touches them.

Tokenization (shared with MLX) lives in tokenization.py.

On CUDA, BERT- and XLM-R-shaped models run padding-free: each batch is packed into one row
(packing.py) and moved through a per-thread stream with pinned buffers (staging.py), so the host
prepares the next batch while the GPU runs the current one and each batch waits once, for its
scores. Other architectures, and CPU/MPS, run padded batches as before.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Literal

from . import cpus
from .base import Backend, BackendError, BackendInfo, DeviceUnavailable, Encoded, EngineSizing
from .model_files import ModelFiles
from .precision import Precision, cpu_flags, race, raced, resolve, sample_pairs
from .precision_record import PrecisionRecord, default_cache_dir, record_key
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
    """The dtype to load in. auto loads fp32: on CUDA the precision is then chosen by measurement."""
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


#: CUDA defaults where the settings leave batching open (see `TorchBackend.sizing`).
CUDA_BATCH_SIZE = 512
CUDA_BATCH_TOKENS = 65536
CUDA_PARALLEL = 2


class TorchBackend(HFTokenization, Backend):
    """A Hugging Face model on a torch device."""

    def __init__(self, files: ModelFiles, settings: "Settings") -> None:
        self.files = files
        self.device = pick_device(settings.device if settings.device != "mlx" else "auto")
        if self.device == "cpu" and (threads := cpus.capped()) is not None:
            torch.set_num_threads(threads)  # a pod's CPU limit, not the node's cores
        picked = resolve(settings.quantization, device=self.device)
        # auto with native bf16 on a CPU: load fp32, then time a bf16 copy against it and keep the faster.
        racing = settings.quantization == "auto" and picked.quantization == "bf16" and self.device == "cpu"
        self.torch_dtype, dtype_name = _dtype_for("none" if racing else picked.quantization, self.device)
        self.max_length = min(settings.max_length, files.max_length)
        self.mixed_precision = settings.enable_mixed_precision
        self._init_tokenizer(files)
        self.model = self._load_model(files)
        self.packed, self.lanes = self._packed_path()
        if racing:
            picked = self._fleet_race(settings)
            self.torch_dtype, dtype_name = _dtype_for(picked.quantization, self.device)
        if settings.quantization == "auto" and self.device == "cuda":
            dtype_name, reason = self._choose_precision()
            picked = replace(picked, quantization="none" if dtype_name == "fp32" else dtype_name, reason=reason)
        if settings.enable_torch_compile:
            self.model = torch.compile(self.model)  # type: ignore[assignment]
        activation: Literal["sigmoid", "identity"] = "sigmoid" if files.kind == "cross-encoder" else "identity"
        self.info = BackendInfo(
            model=files.name, revision=files.revision, kind=files.kind, backend="torch",
            device=self.device, dtype=dtype_name, max_length=self.max_length, activation=activation,
            precision=picked.reason,
            autocast=self._autocast_dtype(),
        )

    def _fleet_race(self, settings: "Settings") -> Precision:
        """The bf16 race, run once per fleet and CPU type and then read (precision_record.py):
        replicas that raced differently under load would serve different numbers under
        different fingerprints, and never share the fleet's score cache."""
        key = record_key({"model": self.files.name, "revision": self.files.revision, "kind": self.files.kind,
                          "max_length": self.max_length, "runtime": "torch", "torch": torch.__version__,
                          "asked": "auto", "cpu": sorted(cpu_flags())})
        record = PrecisionRecord(key, folder=(settings.model_cache_dir or default_cache_dir()) / "torch",
                                 redis_url=settings.redis_url if settings.redis_enabled else None,
                                 prefix=settings.redis_prefix)
        decision = record.agree(lambda: {"quantization": (won := self._race_bf16()).quantization,
                                         "reason": won.reason})
        wanted = decision.plan.get("quantization")
        if wanted not in ("bf16", "none"):  # a record this version cannot read: the race here decides
            log.warning("torch: not a precision record: %s", decision.plan)
            return self._race_bf16()
        if wanted == "bf16" and next(self.model.parameters()).dtype != torch.bfloat16:
            self.model = self.model.to(torch.bfloat16)
        elif wanted == "none" and next(self.model.parameters()).dtype != torch.float32:
            self.torch_dtype = torch.float32  # the fleet serves fp32: the fp32 weights again, not bf16's upcast
            self.model = self._load_model(self.files)
        return Precision(wanted, f"{decision.plan.get('reason', '')} [{decision.describe()}]")

    def _race_bf16(self) -> Precision:
        """bf16 against fp32 on the same probe batch (precision.race); the slower copy is dropped."""
        fp32 = self.model
        bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
        batch = self.encode(sample_pairs(batches=1, size=8)[0])

        def run(model: Any, dtype: Any) -> None:
            self.model, self.torch_dtype = model, dtype
            self.score_encoded(batch)

        picked = raced(race({"bf16": lambda: run(bf16, torch.bfloat16), "none": lambda: run(fp32, torch.float32)}))
        self.model = bf16 if picked.quantization == "bf16" else fp32
        log.info("torch: %s", picked.reason)
        return picked

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

    def _choose_precision(self) -> tuple[str, str]:
        """quantization=auto on CUDA: the first half precision whose scores keep the fp32 ranking
        on calibration pairs (calibration.py), measured on this model; fp32 if none does.
        Returns the dtype and the reason /health reports."""
        import copy

        from .calibration import calibration_pairs, choose

        encoded = self.encode(calibration_pairs())
        fp32 = self.model
        dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

        def score_in(name: str) -> list[float]:
            self.model = fp32 if name == "fp32" else copy.deepcopy(fp32).to(dtypes[name])
            self.packed, self.lanes = self._packed_path()
            return self.score_encoded(encoded)

        choice = choose(score_in)
        if choice.dtype != "fp32":
            score_in(choice.dtype)  # keep the chosen copy; the fp32 weights are freed
        else:
            score_in("fp32")
        self.torch_dtype = dtypes[choice.dtype]
        del fp32
        torch.cuda.empty_cache()
        measured = ", ".join(f"{name} {rho:.4f}" for name, rho in choice.measured.items())
        return choice.dtype, (f"auto: {choice.dtype} on cuda, measured at load: Spearman vs fp32 on "
                              f"{len(encoded)} calibration pairs {measured} (floor 0.999)")

    def _packed_path(self) -> tuple[Any, Any]:
        """The padding-free CUDA path, where the model's architecture allows it (else the padded one)."""
        if self.device != "cuda":
            return None, None
        from .packing import PackedEncoder
        from .staging import Lanes

        # The weights were copied on the default stream; the lanes' streams must not race them.
        torch.cuda.synchronize()

        cross = self.files.kind == "cross-encoder"
        if not PackedEncoder.supports(self.model, cross_encoder=cross):
            log.info("%s (%s) runs padded batches on CUDA: no packed head for it", self.files.name,
                     self.model.config.model_type)
            return None, Lanes(self.device)
        return PackedEncoder(self.model, cross_encoder=cross), Lanes(self.device)

    def sizing(self) -> EngineSizing:
        if self.device != "cuda":
            return EngineSizing()
        # Measured on an H200 (docs/cuda.md): a MiniLM-sized model needs hundreds of pairs per
        # forward to leave launch overhead behind; two batches in flight keep the GPU busy.
        return EngineSizing(batch_size=CUDA_BATCH_SIZE, max_batch_tokens=CUDA_BATCH_TOKENS,
                            max_parallel=CUDA_PARALLEL, padded=self.packed is None)

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
            if self.packed is not None:
                return self._score_packed(batch)
            if self.files.kind == "cross-encoder":
                return self._score_cross(self.collate_cross(batch))
            return self._score_bi(self.collate_bi(batch))

    def _tensors(self, features: Features) -> dict[str, Any]:
        return {name: torch.from_numpy(array).to(self.device) for name, array in features.as_dict().items()}

    def _raw(self, logits: Any) -> Any:
        if self.num_labels == 2:
            # softmax(l)[1] == sigmoid(l1 - l0): keep the log-odds as the raw score.
            return logits[:, 1] - logits[:, 0]
        return logits[:, 0]

    def _score_cross(self, features: Features) -> list[float]:
        logits = self.model(**self._tensors(features)).logits.float()
        return self._raw(logits).cpu().tolist()  # type: ignore[no-any-return]

    def embed(self, features: Features) -> Any:
        inputs = self._tensors(features)
        hidden = self.model(**inputs).last_hidden_state.float()
        return self._pool(hidden, inputs["attention_mask"])

    def _pool(self, hidden: Any, attention_mask: Any) -> Any:
        """Sentence embeddings from (N, L, hidden) states and their (N, L) mask, L2-normalized."""
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooling = self.files.pooling
        if pooling == "cls":
            pooled = hidden[:, 0]
        elif pooling == "max":
            pooled = hidden.masked_fill(mask == 0, -1e9).max(dim=1).values
        elif pooling == "lasttoken":
            last = attention_mask.sum(dim=1) - 1
            pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        else:
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, p=2, dim=1)

    def _score_bi(self, batch: BiBatch) -> list[float]:
        emb = self.embed(batch.features)
        q = emb[torch.from_numpy(batch.queries).to(emb.device)]
        d = emb[torch.from_numpy(batch.documents).to(emb.device)]
        return (q * d).sum(dim=1).cpu().tolist()  # type: ignore[no-any-return]

    # --- the padding-free CUDA path ----------------------------------------------------------
    def _score_packed(self, batch: Sequence[Encoded]) -> list[float]:
        """Scores of a batch, packed, on this thread's CUDA stream: one upload, one wait."""
        from .packing import pack

        lane = self.lanes.get()
        offset = self.packed.position_offset
        if self.files.kind == "cross-encoder":
            packed = pack([e.ids for e in batch], [e.type_ids for e in batch], position_offset=offset)
            with torch.cuda.stream(lane.stream):
                dev, _ = self._upload(lane, packed)
                logits = self.packed.logits(self.packed.hidden(dev), dev).float()
                return lane.download(self._raw(logits))
        rows, queries, documents = self.distinct_rows(batch)
        packed = pack(rows, position_offset=offset)
        with torch.cuda.stream(lane.stream):
            dev, (q, d) = self._upload(lane, packed, queries, documents)
            block, mask = self.packed.unpack(self.packed.hidden(dev), dev)
            emb = self._pool(block.float(), mask)
            return lane.download((emb[q] * emb[d]).sum(dim=1))

    @staticmethod
    def _upload(lane: Any, packed: Any, *extra: Any) -> tuple[Any, list[Any]]:
        """One non-blocking copy of a packed batch (and `extra` int64 arrays) to the device."""
        from .packing import DevicePacked

        types = [] if packed.token_type_ids is None else [packed.token_type_ids]
        views = lane.upload([packed.input_ids, packed.position_ids, packed.cu_seqlens, packed.slots, *extra, *types])
        batch = DevicePacked(input_ids=views[0], position_ids=views[1], cu_seqlens=views[2].int(), slots=views[3],
                             token_type_ids=views[-1] if types else None, max_len=packed.max_len)
        return batch, views[4:4 + len(extra)]

    def close(self) -> None:
        del self.model
        if self.device == "cuda":
            torch.cuda.empty_cache()

"""The MLX backend: BERT and XLM-RoBERTa rerankers on Apple silicon, written with `mlx.nn`.

Macs in the fleet serve the same models as the PyTorch pods, and their scores share one cache
(the fingerprint leaves the runtime out), so this backend reproduces the Hugging Face forward
pass exactly rather than approximately: the model is rebuilt here module for module, with the
Hugging Face attribute names, so `model.safetensors` loads without a rename table; tokenization
is the model's own Hugging Face tokenizer with the same calls as `backends/torch.py`, so
lengths, truncation and chunking agree token for token. tests/test_mlx_backend.py holds the
two runtimes to 1e-4 of each other.

Supported: cross-encoders of the BERT family (BertForSequenceClassification: pooler
dense+tanh on [CLS], then classifier) and the RoBERTa family (XLM-R, RoBERTa, CamemBERT:
classifier.dense+tanh+classifier.out_proj on <s>, positions counted from padding_idx+1), and
bi-encoders on either backbone (pooling from the sentence-transformers config, normalized,
scored by cosine). Anything else is a load-time error that says to use the PyTorch backend.

Dtypes: fp32 by default; bf16 or fp16 weights and activations; int8 = 8-bit affine weights
(group size 64, `mlx.nn.quantize`) on every Linear layer and the word embeddings whose input
dimension is a multiple of 64, with fp32 activations. Scores are cast to fp32 before leaving.

Threads: MLX streams are thread-local (mlx >= 0.31.2): an array built in one thread cannot be
evaluated in another ("There is no Stream(cpu, 0) in current thread"). The batcher calls
`score` from a pool of worker threads, so every MLX operation (loading included) runs on one
thread this backend owns; callers tokenize in their own thread and hand arrays over.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar, cast

from .base import Backend, BackendError, BackendInfo, DeviceUnavailable, Encoded
from .model_files import ModelFiles
from .precision import resolve
from .tokenization import Features, HFTokenization

if TYPE_CHECKING:  # pragma: no cover
    from ..settings import Settings

log = logging.getLogger(__name__)

try:
    import mlx.core as mx
    import mlx.nn as nn
    import numpy as np
    from mlx.utils import tree_flatten
except ImportError as exc:  # pragma: no cover - the `mlx` extra brings it
    raise DeviceUnavailable(
        f"the MLX backend needs mlx ({exc}): pip install 'reranker-fleet[mlx]' "
        "(mlx on macOS, mlx[cpu] on Linux)"
    ) from exc

T = TypeVar("T")

#: int8: 8-bit affine weights in groups of 64 along the input dimension.
QUANT_BITS, QUANT_GROUP = 8, 64

BERT_TYPES = {"bert"}
ROBERTA_TYPES = {"roberta", "xlm-roberta", "camembert"}

ACTIVATIONS: dict[str, Callable[[Any], Any]] = {
    "gelu": nn.gelu,  # the exact erf form, as Hugging Face's "gelu"
    "gelu_new": nn.gelu_approx,  # tanh approximation
    "gelu_pytorch_tanh": nn.gelu_approx,
    "relu": nn.relu,
}

DTYPES = {"none": ("fp32", mx.float32), "bf16": ("bf16", mx.bfloat16), "fp16": ("fp16", mx.float16),
          "int8": ("int8", mx.float32)}


@dataclass(frozen=True)
class Config:
    """The fields of a Hugging Face BERT/RoBERTa config.json this backend reads."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    hidden_act: str
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    pad_token_id: int
    num_labels: int

    @property
    def roberta(self) -> bool:
        return self.model_type in ROBERTA_TYPES

    @classmethod
    def read(cls, path: Path, name: str) -> "Config":
        raw = json.loads((path / "config.json").read_text(encoding="utf-8"))
        model_type = raw.get("model_type", "")
        if model_type not in BERT_TYPES | ROBERTA_TYPES:
            raise BackendError(f"{name} is a {model_type!r} model; the MLX backend runs BERT and XLM-RoBERTa "
                               "families only: use RERANKER_DEVICE=cpu/cuda (PyTorch) for it")
        if raw.get("position_embedding_type", "absolute") != "absolute":
            raise BackendError(f"{name} uses {raw['position_embedding_type']} position embeddings; "
                               "the MLX backend supports absolute ones only")
        act = raw.get("hidden_act", "gelu")
        if act not in ACTIVATIONS:
            raise BackendError(f"{name} uses activation {act!r}; the MLX backend knows {sorted(ACTIVATIONS)}")
        # transformers derives num_labels from id2label when both are absent its default is 2.
        num_labels = len(raw["id2label"]) if raw.get("id2label") else int(raw.get("num_labels", 2))
        return cls(
            model_type=model_type, vocab_size=int(raw["vocab_size"]), hidden_size=int(raw["hidden_size"]),
            num_hidden_layers=int(raw["num_hidden_layers"]), num_attention_heads=int(raw["num_attention_heads"]),
            intermediate_size=int(raw["intermediate_size"]), hidden_act=act,
            max_position_embeddings=int(raw["max_position_embeddings"]),
            type_vocab_size=int(raw.get("type_vocab_size", 2)), layer_norm_eps=float(raw.get("layer_norm_eps", 1e-12)),
            pad_token_id=int(raw.get("pad_token_id", 1 if model_type in ROBERTA_TYPES else 0)), num_labels=num_labels,
        )


# --- the model, module for module as in transformers' modeling_bert / modeling_roberta ----------
# Attribute names are Hugging Face's (`LayerNorm`, `attention.self`), so parameter paths equal
# the checkpoint's keys.

class Embeddings(nn.Module):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self._roberta, self._pad = cfg.roberta, cfg.pad_token_id

    def __call__(self, input_ids: mx.array, token_type_ids: mx.array) -> mx.array:
        if self._roberta:
            # RoBERTa counts positions from padding_idx + 1 over the non-pad tokens; pads get padding_idx.
            real = (input_ids != self._pad).astype(mx.int32)
            positions = mx.cumsum(real, axis=1) * real + self._pad
        else:
            positions = mx.arange(input_ids.shape[1])[None, :]
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        return self.LayerNorm(x + self.position_embeddings(positions))


class SelfAttention(nn.Module):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.value = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self._heads = cfg.num_attention_heads

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        batch, length, hidden = x.shape
        head_dim = hidden // self._heads

        def heads(t: mx.array) -> mx.array:
            return t.reshape(batch, length, self._heads, head_dim).transpose(0, 2, 1, 3)

        out = mx.fast.scaled_dot_product_attention(
            heads(self.query(x)), heads(self.key(x)), heads(self.value(x)), scale=head_dim ** -0.5, mask=mask)
        return out.transpose(0, 2, 1, 3).reshape(batch, length, hidden)


class DenseNorm(nn.Module):
    """dense, then LayerNorm of (result + residual): BertSelfOutput and BertOutput."""

    def __init__(self, d_in: int, d_out: int, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)
        self.LayerNorm = nn.LayerNorm(d_out, eps=eps)

    def __call__(self, x: mx.array, residual: mx.array) -> mx.array:
        return self.LayerNorm(self.dense(x) + residual)


class Attention(nn.Module):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.self = SelfAttention(cfg)
        self.output = DenseNorm(cfg.hidden_size, cfg.hidden_size, cfg.layer_norm_eps)

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        return self.output(self.self(x, mask), x)


class Intermediate(nn.Module):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self._act = ACTIVATIONS[cfg.hidden_act]

    def __call__(self, x: mx.array) -> mx.array:
        return self._act(self.dense(x))


class Layer(nn.Module):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.attention = Attention(cfg)
        self.intermediate = Intermediate(cfg)
        self.output = DenseNorm(cfg.intermediate_size, cfg.hidden_size, cfg.layer_norm_eps)

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        attended = self.attention(x, mask)
        return self.output(self.intermediate(attended), attended)


class Encoder(nn.Module):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.layer = [Layer(cfg) for _ in range(cfg.num_hidden_layers)]

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        for layer in self.layer:
            x = layer(x, mask)
        return x


class Pooler(nn.Module):
    """BERT's pooler: dense + tanh on the first token."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def __call__(self, hidden: mx.array) -> mx.array:
        return mx.tanh(self.dense(hidden[:, 0]))


class Backbone(nn.Module):
    """BertModel / XLMRobertaModel: embeddings, encoder and (BERT cross-encoders) the pooler."""

    def __init__(self, cfg: Config, *, pooler: bool) -> None:
        super().__init__()
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg)
        if pooler:
            self.pooler = Pooler(cfg)

    def __call__(self, input_ids: mx.array, token_type_ids: mx.array, attention_mask: mx.array) -> mx.array:
        keep = (attention_mask != 0)[:, None, None, :]  # (batch, heads, queries, keys): pads are never attended
        return self.encoder(self.embeddings(input_ids, token_type_ids), keep)


class RobertaHead(nn.Module):
    """RobertaClassificationHead: dense + tanh on <s>, then out_proj."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.out_proj = nn.Linear(cfg.hidden_size, cfg.num_labels)

    def __call__(self, hidden: mx.array) -> mx.array:
        return self.out_proj(mx.tanh(self.dense(hidden[:, 0])))


class BertCrossEncoder(nn.Module):
    """BertForSequenceClassification: logits = classifier(pooler(hidden))."""

    prefix = "bert"

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.bert = Backbone(cfg, pooler=True)
        self.classifier = nn.Linear(cfg.hidden_size, cfg.num_labels)

    def __call__(self, input_ids: mx.array, token_type_ids: mx.array, attention_mask: mx.array) -> mx.array:
        return self.classifier(self.bert.pooler(self.bert(input_ids, token_type_ids, attention_mask)))


class RobertaCrossEncoder(nn.Module):
    """XLMRobertaForSequenceClassification: no pooler; the head reads <s>."""

    prefix = "roberta"

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.roberta = Backbone(cfg, pooler=False)
        self.classifier = RobertaHead(cfg)

    def __call__(self, input_ids: mx.array, token_type_ids: mx.array, attention_mask: mx.array) -> mx.array:
        return self.classifier(self.roberta(input_ids, token_type_ids, attention_mask))


BACKBONE_PARTS = ("embeddings.", "encoder.", "pooler.")
BACKBONE_PREFIXES = ("bert.", "roberta.", "model.")


def checkpoint_names(key: str, *, prefix: str) -> str:
    """A checkpoint key as a parameter path of our model (`prefix`: "bert", "roberta" or "" for bi-encoders).

    Checkpoints name the backbone with the task model's prefix (`bert.encoder...`) or without it
    (a bare BertModel): both load into either model kind. Old BERT checkpoints call LayerNorm's
    parameters gamma and beta.
    """
    key = key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
    for known in BACKBONE_PREFIXES:
        if key.startswith(known) and key[len(known):].startswith(BACKBONE_PARTS):
            key = key[len(known):]
            break
    if prefix and key.startswith(BACKBONE_PARTS):
        key = f"{prefix}.{key}"
    return key


def read_weights(path: Path, name: str) -> dict[str, mx.array]:
    """Every tensor of the checkpoint: safetensors (one file or shards), else pytorch_model.bin via torch."""
    shards = sorted(path.glob("*.safetensors"))
    if shards:
        weights: dict[str, mx.array] = {}
        for shard in shards:
            weights.update(mx.load(str(shard)))  # type: ignore[arg-type]
        return weights
    bins = sorted(path.glob("pytorch_model*.bin"))
    if not bins:
        raise BackendError(f"{name} has no model.safetensors or pytorch_model.bin in {path}")
    try:
        import torch
    except ImportError as exc:
        raise BackendError(f"{name} ships only pytorch_model.bin: reading it needs torch "
                           "(pip install torch), or convert it to safetensors") from exc
    weights = {}
    for file in bins:
        for key, tensor in torch.load(str(file), map_location="cpu", weights_only=True).items():
            weights[key] = mx.array(tensor.float().numpy())
    return weights


def load_weights(model: nn.Module, weights: dict[str, mx.array], *, prefix: str, name: str) -> None:
    """Load the checkpoint into the model; every model parameter must come from it."""
    wanted = {k for k, _ in cast(list[tuple[str, Any]], tree_flatten(model.parameters()))}
    mapped = {checkpoint_names(k, prefix=prefix): v for k, v in weights.items()}
    missing = sorted(wanted - mapped.keys())
    if missing:
        raise BackendError(f"{name}: the checkpoint lacks {len(missing)} parameter(s) this model needs, "
                           f"e.g. {missing[:4]} (is RERANKER_MODEL_KIND right for it?)")
    unused = sorted(mapped.keys() - wanted)
    if unused:
        log.debug("%s: %d checkpoint tensors unused (%s...)", name, len(unused), unused[:4])
    model.load_weights([(k, mapped[k].astype(mx.float32)) for k in sorted(wanted)], strict=True)


def _quantizable(path: str, module: nn.Module) -> bool:
    """int8 targets: Linear layers and the word embeddings, when their input dim fits the group size."""
    if isinstance(module, nn.Linear) or (isinstance(module, nn.Embedding) and path.endswith("word_embeddings")):
        return int(module.weight.shape[-1]) % QUANT_GROUP == 0
    return False


def device_name() -> str:
    """`mlx-gpu` (Metal, on a Mac) or `mlx-cpu` (the Linux CPU build, or a forced CPU device)."""
    return "mlx-gpu" if mx.default_device().type == mx.DeviceType.gpu else "mlx-cpu"


class MLXBackend(HFTokenization, Backend):
    """A Hugging Face BERT/XLM-R model rebuilt in mlx.nn, on MLX's default device."""

    def __init__(self, files: ModelFiles, settings: "Settings") -> None:
        self.files = files
        self.max_length = min(settings.max_length, files.max_length)
        self.config = Config.read(files.path, files.name)
        if files.kind == "cross-encoder" and self.config.num_labels not in (1, 2):
            raise BackendError(f"{files.name} has {self.config.num_labels} labels; a reranker needs "
                               "1 (relevance logit) or 2 (no/yes)")
        self.num_labels = self.config.num_labels
        if settings.enable_torch_compile or settings.enable_mixed_precision:
            log.warning("ENABLE_TORCH_COMPILE and ENABLE_MIXED_PRECISION are PyTorch options; the MLX backend "
                        "ignores them (use RERANKER_QUANTIZATION=bf16/fp16 for lower precision)")
        self._init_tokenizer(files)
        # The one thread that touches MLX (see the module docstring).
        self._mlx = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlx")
        picked = resolve(settings.quantization, device="mlx")
        dtype_name, self.model = self._on_mlx(lambda: self._load_model(picked.quantization))
        activation: Literal["sigmoid", "identity"] = "sigmoid" if files.kind == "cross-encoder" else "identity"
        self.info = BackendInfo(
            model=files.name, revision=files.revision, kind=files.kind, backend="mlx",
            device=device_name(), dtype=dtype_name, max_length=self.max_length, activation=activation,
            precision=picked.reason,
        )

    def _on_mlx(self, work: Callable[[], T]) -> T:
        return self._mlx.submit(work).result()

    def _load_model(self, quantization: str) -> tuple[str, nn.Module]:
        cfg, name = self.config, self.files.name
        model: nn.Module
        if self.files.kind == "cross-encoder":
            model = RobertaCrossEncoder(cfg) if cfg.roberta else BertCrossEncoder(cfg)
            prefix = model.prefix  # type: ignore[attr-defined]
        else:
            model, prefix = Backbone(cfg, pooler=False), ""
        load_weights(model, read_weights(self.files.path, name), prefix=prefix, name=name)
        dtype_name, dtype = DTYPES[quantization]
        if dtype != mx.float32:
            model.set_dtype(dtype)
        if quantization == "int8":
            nn.quantize(model, group_size=QUANT_GROUP, bits=QUANT_BITS, class_predicate=_quantizable)
            quantized = sum(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules())
            if not quantized:
                log.warning("%s: no layer has an input dimension divisible by %d; int8 left it in fp32",
                            name, QUANT_GROUP)
                dtype_name = "fp32"
        model.eval()
        mx.eval(model.parameters())  # materialize now, on the MLX thread, not lazily in the first request
        return dtype_name, model

    # --- scoring: tokenized and padded in tokenization.py, handed over as numpy ----------------
    @staticmethod
    def _arrays(features: Features) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ids = features.input_ids.astype(np.int32)
        types = features.token_type_ids.astype(np.int32) if features.token_type_ids is not None else np.zeros_like(ids)
        return ids, types, features.attention_mask.astype(np.int32)

    def score_encoded(self, batch: Sequence[Encoded]) -> list[float]:
        if not batch:
            return []
        if self.files.kind == "cross-encoder":
            features = self._arrays(self.collate_cross(batch))
            return self._on_mlx(lambda: self._score_cross(*features))
        bi = self.collate_bi(batch)
        arrays = self._arrays(bi.features)
        return self._on_mlx(lambda: self._score_bi(arrays, bi.queries, bi.documents))

    def _score_cross(self, ids: np.ndarray, types: np.ndarray, mask: np.ndarray) -> list[float]:
        logits = self.model(mx.array(ids), mx.array(types), mx.array(mask)).astype(mx.float32)
        # softmax(l)[1] == sigmoid(l1 - l0): keep the log-odds as the raw score.
        raw = logits[:, 1] - logits[:, 0] if self.num_labels == 2 else logits[:, 0]
        return np.array(raw).tolist()  # type: ignore[no-any-return]

    def _embed(self, ids: np.ndarray, types: np.ndarray, mask: np.ndarray) -> mx.array:
        hidden = self.model(mx.array(ids), mx.array(types), mx.array(mask)).astype(mx.float32)
        keep = mx.array(mask)[:, :, None].astype(mx.float32)
        pooling = self.files.pooling
        if pooling == "cls":
            pooled = hidden[:, 0]
        elif pooling == "max":
            pooled = mx.where(keep == 0, mx.array(-1e9, mx.float32), hidden).max(axis=1)
        elif pooling == "lasttoken":
            last = mx.array(mask.sum(axis=1) - 1)
            pooled = hidden[mx.arange(hidden.shape[0]), last]
        else:
            pooled = (hidden * keep).sum(axis=1) / mx.maximum(keep.sum(axis=1), 1e-9)
        # torch.nn.functional.normalize: x / max(||x||, 1e-12)
        return pooled / mx.maximum(mx.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)

    def _score_bi(self, features: tuple[np.ndarray, np.ndarray, np.ndarray],
                  queries: np.ndarray, docs: np.ndarray) -> list[float]:
        emb = self._embed(*features)
        cosine = (emb[mx.array(queries)] * emb[mx.array(docs)]).sum(axis=1)
        return np.array(cosine).tolist()  # type: ignore[no-any-return]

    def close(self) -> None:
        if getattr(self, "model", None) is None:
            return

        def free() -> None:
            self.model = None  # type: ignore[assignment]
            mx.clear_cache()
        self._on_mlx(free)
        self._mlx.shutdown(wait=True)

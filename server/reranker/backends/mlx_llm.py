"""The MLX backend for LLM rerankers: mlx-lm's model definitions, the same prompts and scores.

Macs serve the same decoder rerankers as the PyTorch pods and share their cache (the fingerprint
leaves the runtime out), so this backend builds exactly the prompts of prompts.py and reads the
same answer-token logits. The layers are mlx-lm's (its Qwen3, Qwen2, Gemma and Gemma2
definitions load the Hugging Face checkpoints as they are), not written here.

Shared prefix: each group of pairs of one (query, instruction) runs its common prefix once into
mlx-lm's KV caches, which are repeated across the group's documents; the documents then run
right-padded after it. Under causal attention a real token never attends to padding that comes
after it, so no padding mask is needed, and each row is read at its own last real token. Pairs
alone in their group (or all, when sharing is off) run whole, right-padded, in one forward.

Threads: as in mlx.py, every MLX operation runs on the one thread this backend owns.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from .base import Backend, BackendError, BackendInfo, DeviceUnavailable, Encoded
from .model_files import ModelFiles
from .prompts import LLMPrompts, plan_prefixes

if TYPE_CHECKING:  # pragma: no cover
    from ..settings import Settings

log = logging.getLogger(__name__)

try:
    import mlx.core as mx
    import mlx.nn as nn
    import numpy as np
    from mlx_lm.models.cache import KVCache, make_prompt_cache
    from mlx_lm.utils import load_model
except ImportError as exc:  # pragma: no cover - the `mlx` extra brings them
    raise DeviceUnavailable(
        f"the MLX backend for LLM rerankers needs mlx and mlx-lm ({exc}): pip install 'reranker-fleet[mlx]'"
    ) from exc

from .mlx import DTYPES, QUANT_BITS, QUANT_GROUP, device_name  # noqa: E402  (after the import guard)

T = TypeVar("T")


def _quantizable(path: str, module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and int(module.weight.shape[-1]) % QUANT_GROUP == 0


def _rope_from_parameters(path: Path) -> dict[str, Any]:
    """transformers >= 5 saves rope_theta inside rope_parameters; mlx-lm reads the top-level key
    (and would silently fall back to its own default), so lift it for checkpoints saved that way."""
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    rope = config.get("rope_parameters") or {}
    if "rope_theta" not in config and isinstance(rope, dict) and "rope_theta" in rope:
        return {"rope_theta": rope["rope_theta"]}
    return {}


class MLXLLMBackend(LLMPrompts, Backend):
    """A causal-LM reranker from mlx-lm, on MLX's default device."""

    def __init__(self, files: ModelFiles, settings: "Settings") -> None:
        self.files = files
        self.max_length = min(settings.max_length, files.max_length)
        self._init_prompts(files, settings)
        self._mlx = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlx")
        quantization = "none" if settings.quantization == "auto" else settings.quantization  # auto: fp32, as torch_llm
        dtype_name, self.model = self._on_mlx(lambda: self._load_model(quantization))
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.info = BackendInfo(
            model=files.name, revision=files.revision, kind="llm", backend="mlx", device=device_name(),
            dtype=dtype_name, max_length=self.max_length, activation="sigmoid", template=self.template.id,
        )

    def _on_mlx(self, work: Callable[[], T]) -> T:
        return self._mlx.submit(work).result()

    def _load_model(self, quantization: str) -> tuple[str, Any]:
        try:
            model, _ = load_model(self.files.path, model_config=_rope_from_parameters(self.files.path))
        except ValueError as exc:  # mlx-lm has no definition of this architecture
            raise BackendError(f"mlx-lm cannot load {self.files.name}: {exc}; use the PyTorch backend") from exc
        dtype_name, dtype = DTYPES[quantization]
        model.set_dtype(dtype)
        if quantization == "int8":
            nn.quantize(model, group_size=QUANT_GROUP, bits=QUANT_BITS, class_predicate=_quantizable)
        model.eval()
        mx.eval(model.parameters())
        return dtype_name, model

    # --- scoring ---------------------------------------------------------------------------
    def score_encoded(self, batch: Sequence[Encoded]) -> list[float]:
        if not batch:
            return []
        plan = plan_prefixes(batch, share=self.share_prefix)
        answer = self.answer_ids()
        logits = self._on_mlx(lambda: self._answer_logits(plan.prefixes, plan.group, plan.rest, answer))
        raw = logits[:, 0] - logits[:, 1] if logits.shape[1] == 2 else logits[:, 0]
        return raw.tolist()  # type: ignore[no-any-return]

    def _answer_logits(self, prefixes: list[tuple[int, ...]], group: list[int], rest: list[tuple[int, ...]],
                       answer: list[int]) -> np.ndarray:
        out = np.zeros((len(rest), len(answer)), dtype=np.float32)
        whole = [r for r, g in enumerate(group) if g < 0]
        if whole:
            out[whole] = self._rows([rest[r] for r in whole], None, answer)
        for g, prefix in enumerate(prefixes):
            rows = [r for r, gr in enumerate(group) if gr == g]
            cache = make_prompt_cache(self.model)
            self.model.model(mx.array([prefix]), cache=cache)
            expanded = []
            for layer in cache:
                keys, values = layer.keys[..., : layer.offset, :], layer.values[..., : layer.offset, :]
                copy = KVCache()
                copy.update_and_fetch(mx.repeat(keys, len(rows), axis=0), mx.repeat(values, len(rows), axis=0))
                expanded.append(copy)
            out[rows] = self._rows([rest[r] for r in rows], expanded, answer)
        return out

    def _rows(self, seqs: list[tuple[int, ...]], cache: list[Any] | None, answer: list[int]) -> np.ndarray:
        """Right-padded rows after the (shared) cache; logits of the answer tokens at each last real token."""
        width = max(len(s) for s in seqs)
        ids = np.full((len(seqs), width), self.pad_id, dtype=np.int32)
        for i, seq in enumerate(seqs):
            ids[i, : len(seq)] = seq
        hidden = self.model.model(mx.array(ids), cache=cache)
        last = mx.array([len(s) - 1 for s in seqs])
        final = hidden[mx.arange(len(seqs)), last]
        logits = self._head(final)[:, mx.array(answer)].astype(mx.float32)
        return np.array(logits)

    def _head(self, hidden: Any) -> Any:
        """The model's output layer, as mlx-lm's Model.__call__ applies it, for one position per row."""
        model = self.model
        logits = model.lm_head(hidden) if hasattr(model, "lm_head") else model.model.embed_tokens.as_linear(hidden)
        cap = getattr(model, "final_logit_softcapping", None)
        if cap:
            logits = mx.tanh(logits / cap) * cap
        return logits

    def close(self) -> None:
        if getattr(self, "model", None) is None:
            return

        def free() -> None:
            self.model = None
            mx.clear_cache()
        self._on_mlx(free)
        self._mlx.shutdown(wait=True)

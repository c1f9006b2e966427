"""The PyTorch backend for LLM rerankers: decoder models scored from answer-token logits.

Qwen3-Reranker, bge-reranker-v2-gemma and mxbai-rerank-v2 are causal LMs: a pair is scored by
building the model card's prompt (prompts.py, from the family's template file) and reading the
logits of the answer tokens at the last position: raw = logit(yes) - logit(no) (two tokens,
the log-odds; sigmoid gives softmax's P(yes)) or raw = logit(Yes) (one token).

Shared prefix. Every pair of one request shares its prompt up to the document: the system
line, the instruction and the query (for Qwen3-Reranker ~60 of ~200 tokens). Inside a batch,
pairs are grouped by (query, instruction); each group's common token prefix runs once, and its
keys/values are expanded across the group's documents, which run after it. One forward covers
all groups' prefixes (right-padded) and one all documents (right-padded after the prefix):

    row r:  [ prefix of its group (L_g) | holes up to the longest prefix | its own tokens | pad ]

The holes and the padding are masked out of attention and the document's position ids start at
L_g, so every real token sees exactly what it sees in the whole prompt run alone: padding never
changes a score. Each row's score is read at its own last real token. The prefix is found on
token ids (the longest common prefix of the group's prompts), so the ids are exactly those of the
reference tokenization whatever the tokenizer does at the document's boundary.

Dtypes and devices as the cross-encoder backend (fp32, bf16, fp16 on GPUs); int8 is refused
(dynamic quantization of a decoder's lm_head is not a reranker's fidelity). Logits go to fp32
before the scores are taken.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from . import prompts
from .base import Backend, BackendError, BackendInfo, Encoded
from .model_files import ModelFiles
from .prompts import LLMPrompts, PrefixPlan

if TYPE_CHECKING:  # pragma: no cover
    from ..settings import Settings

log = logging.getLogger(__name__)

try:
    import torch
    from transformers import AutoModelForCausalLM
except ImportError as exc:  # pragma: no cover - the `server` extra brings them
    raise ImportError("the PyTorch backend needs torch and transformers: pip install 'reranker-fleet[server]'") from exc

from .torch import _dtype_for, pick_device  # noqa: E402  (after the import guard)


class TorchLLMBackend(LLMPrompts, Backend):
    """A causal-LM reranker on a torch device."""

    def __init__(self, files: ModelFiles, settings: "Settings") -> None:
        self.files = files
        self.device = pick_device(settings.device if settings.device != "mlx" else "auto")
        if settings.quantization == "int8":
            raise BackendError("RERANKER_QUANTIZATION=int8 is not supported for LLM rerankers: use bf16 (or fp16 on a GPU)")
        # auto: fp32 here (auto's bf16 rule rests on encoder fidelity measurements, not an LLM's)
        quantization = "none" if settings.quantization == "auto" else settings.quantization
        self.torch_dtype, dtype_name = _dtype_for(quantization, self.device)
        self.max_length = min(settings.max_length, files.max_length)
        self._init_prompts(files, settings)
        self.model = AutoModelForCausalLM.from_pretrained(str(files.path), dtype=self.torch_dtype).eval().to(self.device)
        if settings.enable_torch_compile:
            log.warning("ENABLE_TORCH_COMPILE is ignored for LLM rerankers (shapes vary per batch)")
        self.decoder = self.model.base_model
        self.head = self.model.get_output_embeddings()
        self.softcap = getattr(self.model.config, "final_logit_softcapping", None)
        # transformers renamed the cache argument (past_key_values -> cache) in 5.x.
        params = inspect.signature(self.decoder.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.info = BackendInfo(
            model=files.name, revision=files.revision, kind="llm", backend="torch", device=self.device,
            dtype=dtype_name, max_length=self.max_length, activation="sigmoid", template=self.template.id,
        )

    # --- scoring ---------------------------------------------------------------------------
    def score_encoded(self, batch: Sequence[Encoded]) -> list[float]:
        if not batch:
            return []
        plan = prompts.plan_prefixes(batch, share=self.share_prefix)
        with torch.inference_mode():
            logits = self._answer_logits(plan)
        pos = logits[:, 0]
        raw = pos - logits[:, 1] if logits.shape[1] == 2 else pos
        return raw.cpu().tolist()

    def _answer_logits(self, plan: PrefixPlan) -> Any:
        """Logits of the answer tokens (positive[, negative]) at each row's last real token, fp32."""
        device = self.device
        rows = len(plan.rest)
        cache = None
        prefix_mask = None
        prefix_len = torch.zeros(rows, dtype=torch.long, device=device)
        if plan.prefixes:
            width = max(len(p) for p in plan.prefixes)
            ids, mask = self._right_pad(plan.prefixes, width)
            out = self.decoder(input_ids=ids, attention_mask=mask, use_cache=True)
            cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
            # Expand each group's keys/values to its rows; rows without a group get group 0's,
            # fully masked out below.
            group = torch.tensor([max(g, 0) for g in plan.group], dtype=torch.long, device=device)
            cache.reorder_cache(group)
            shared = torch.tensor([g >= 0 for g in plan.group], dtype=torch.bool, device=device)
            prefix_mask = mask.index_select(0, group) * shared.unsqueeze(1).to(mask.dtype)
            prefix_len = prefix_mask.sum(dim=1)
        width = max(len(r) for r in plan.rest)
        ids, mask = self._right_pad(plan.rest, width)
        positions = prefix_len.unsqueeze(1) + torch.arange(width, device=device).unsqueeze(0)
        kwargs: dict[str, Any] = {"input_ids": ids, "position_ids": positions, "use_cache": cache is not None}
        if cache is not None and prefix_mask is not None:
            kwargs["attention_mask"] = torch.cat([prefix_mask, mask], dim=1)
            kwargs[self._cache_arg] = cache
        else:
            kwargs["attention_mask"] = mask
        hidden = self.decoder(**kwargs).last_hidden_state
        last = mask.sum(dim=1) - 1
        final = hidden[torch.arange(rows, device=device), last]
        # The output layer, for the answer tokens' rows only (the model computes the whole vocabulary:
        # 150k rows for Qwen, as much work as a few tokens of the forward).
        answer = torch.tensor(self.answer_ids(), dtype=torch.long, device=device)
        logits = final @ self.head.weight.index_select(0, answer).T
        if getattr(self.head, "bias", None) is not None:
            logits = logits + self.head.bias.index_select(0, answer)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits.float()

    def _right_pad(self, seqs: Sequence[Sequence[int]], width: int) -> tuple[Any, Any]:
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, seq in enumerate(seqs):
            ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[i, : len(seq)] = 1
        return ids.to(self.device), mask.to(self.device)

    def close(self) -> None:
        del self.model
        if self.device == "cuda":
            torch.cuda.empty_cache()

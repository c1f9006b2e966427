"""Padding-free forward passes for BERT- and XLM-R-shaped encoders (the CUDA path).

A padded batch makes every pair as long as the longest one: with mixed lengths most of the GPU's
work is on padding. Here a batch is *packed* instead: all pairs' tokens back to back in one row,
with `cu_seqlens` (the offset where each pair starts) and per-token position ids that restart at
every pair. Every layer but attention works token by token, so it runs on the packed row as is;
attention must not look across pairs, so it runs through `packed_attention`, which transformers
calls for every layer once the model's attention implementation is set to `PACKED` (BERT and
XLM-R pass extra forward kwargs through to it):

- on CUDA in fp16/bf16: PyTorch's variable-length flash attention (`torch.nn.attention.varlen`),
  the kernel TEI's speed comes from;
- elsewhere (fp32, CPU in the tests): the packed row is scattered into a padded block for that one
  call (SDPA with a key-padding mask) and gathered back, which gives the padded path's numbers.

The model's own modules and weights are used throughout: no model code is rewritten here. A
model without a known head layout (see `HEADS`) is not packed and takes the padded path.
Packing itself is numpy on the host (`pack`), so batches are built off the GPU's critical path.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

PACKED = "reranker_packed"

#: How each model type turns [CLS] hidden states into logits: BERT through its pooler (dense +
#: tanh) then the classifier; RoBERTa-family heads take the [CLS] features themselves.
HEADS: dict[str, Callable[[Any, torch.Tensor], torch.Tensor]] = {
    "bert": lambda model, cls: model.classifier(model.dropout(model.bert.pooler(cls.unsqueeze(1)))),
    "roberta": lambda model, cls: model.classifier(cls.unsqueeze(1)),
    "xlm-roberta": lambda model, cls: model.classifier(cls.unsqueeze(1)),
}
#: Model types whose position ids count from padding_idx + 1 (RoBERTa's convention), not from 0.
OFFSET_POSITIONS = {"roberta", "xlm-roberta"}


@dataclass(frozen=True)
class Packed:
    """One batch, packed: int64 arrays over all T tokens, and the N+1 pair boundaries."""

    input_ids: np.ndarray  # (T,)
    token_type_ids: np.ndarray | None  # (T,), None when the model takes no segment ids
    position_ids: np.ndarray  # (T,), restarting at every pair
    cu_seqlens: np.ndarray  # (N + 1,), cu_seqlens[i] is where pair i starts
    slots: np.ndarray  # (T,), each token's place in an (N, max_len) padded block: row * max_len + position
    max_len: int

    @property
    def rows(self) -> int:
        return len(self.cu_seqlens) - 1

    @property
    def tokens(self) -> int:
        return len(self.input_ids)


def pack(rows: Sequence[Sequence[int]], types: Sequence[Sequence[int] | None] | None = None, *,
         position_offset: int = 0) -> Packed:
    """Concatenate token-id rows; `types` (segment ids per row) is kept only if every row has them."""
    lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
    total = int(lengths.sum())
    cu = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lengths, out=cu[1:])
    ids = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64, count=total)
    max_len = int(lengths.max(initial=0))
    within = np.arange(total, dtype=np.int64) - np.repeat(cu[:-1], lengths)
    type_ids = None
    if types is not None and all(t is not None for t in types):
        type_ids = _segments(types, lengths, within, total)  # type: ignore[arg-type]
    slots = within + np.repeat(np.arange(len(rows), dtype=np.int64) * max_len, lengths)
    return Packed(input_ids=ids, token_type_ids=type_ids, position_ids=within + position_offset, cu_seqlens=cu,
                  slots=slots, max_len=max_len)


def _segments(types: Sequence[Sequence[int]], lengths: np.ndarray, within: np.ndarray, total: int) -> np.ndarray:
    """Packed segment ids. A pair's are 0s then 1s ([CLS] query [SEP] | document [SEP]), so only
    where the 1s start is read per pair (C-speed list scans), not every id through Python."""
    starts = np.empty(len(types), dtype=np.int64)
    for i, row in enumerate(types):
        try:
            first = row.index(1)  # type: ignore[attr-defined]
        except ValueError:
            first = len(row)
        if sum(row) != len(row) - first:  # not 0s then 1s: read them all
            return np.fromiter(itertools.chain.from_iterable(types), dtype=np.int64, count=total)
        starts[i] = first
    return (within >= np.repeat(starts, lengths)).astype(np.int64)


def _varlen_attn() -> Callable[..., torch.Tensor] | None:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # torch < 2.10: the padded fallback below serves
        return None
    return varlen_attn  # type: ignore[return-value]


_VARLEN = _varlen_attn()


def packed_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, *, scaling: float | None = None, dropout: float = 0.0,
                     cu_seq_lens_q: torch.Tensor | None = None, max_length_q: int | None = None,
                     packed_slots: torch.Tensor | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: (1, heads, T, dim) in, (1, T, heads, dim) out.

    Without `cu_seq_lens_q` the call is an ordinary padded batch and goes to SDPA unchanged.
    """
    if cu_seq_lens_q is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,  # type: ignore[no-any-return]
                                      dropout=dropout, **kwargs)
    assert max_length_q is not None and packed_slots is not None
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (T, heads, dim)
    if _VARLEN is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        # The kernel's default scale is dim ** -0.5, what BERT and XLM-R use; `scale=` only exists
        # in newer torch releases, so it is passed only when a model differs.
        extra = {} if scaling is None or math.isclose(scaling, q.shape[-1] ** -0.5) else {"scale": scaling}
        out = _VARLEN(q, k, v, cu_seq_lens_q, cu_seq_lens_q, max_length_q, max_length_q, **extra)
    else:
        out = _padded_attention(q, k, v, cu_seq_lens_q, packed_slots, max_length_q, scaling)
    return out.unsqueeze(0), None


def _padded_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, slots: torch.Tensor,
                      max_len: int, scaling: float | None) -> torch.Tensor:
    """Attention of packed rows through a padded block: the fallback where varlen kernels are absent."""
    mask = padding_mask(cu, max_len)
    n, heads, dim = len(cu) - 1, q.shape[1], q.shape[2]

    def block(t: torch.Tensor) -> torch.Tensor:
        out = t.new_zeros(n * max_len, heads, dim)
        out[slots] = t
        return out.view(n, max_len, heads, dim).transpose(1, 2)  # (N, heads, L, dim)

    keep = mask[:, None, None, :]  # keys: real tokens only
    attn = F.scaled_dot_product_attention(block(q), block(k), block(v), attn_mask=keep, scale=scaling)
    return attn.transpose(1, 2).reshape(n * max_len, heads, dim)[slots]


def padding_mask(cu: torch.Tensor, max_len: int) -> torch.Tensor:
    """The (N, max_len) mask of real tokens of the padded block for boundaries `cu` (no host sync)."""
    lengths = cu[1:] - cu[:-1]
    return torch.arange(max_len, device=cu.device)[None, :] < lengths[:, None]


def register() -> None:
    """Make `PACKED` a valid attention implementation (idempotent): packed calls use
    `packed_attention`, padded ones SDPA with SDPA's mask."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(PACKED, packed_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED, sdpa_mask)


class PackedEncoder:
    """Runs a loaded Hugging Face encoder (a cross-encoder with its head, or a bare bi-encoder) on
    packed batches. `supports` says whether a model can be."""

    def __init__(self, model: Any, *, cross_encoder: bool) -> None:
        self.model = model
        self.model_type = model.config.model_type
        self.cross_encoder = cross_encoder
        self.base = getattr(model, model.base_model_prefix) if cross_encoder else model
        embeddings = self.base.embeddings
        self.position_offset = embeddings.padding_idx + 1 if self.model_type in OFFSET_POSITIONS else 0
        register()
        model.set_attn_implementation(PACKED)

    @staticmethod
    def supports(model: Any, *, cross_encoder: bool) -> bool:
        model_type = getattr(model.config, "model_type", None)
        if cross_encoder:
            return model_type in HEADS
        return model_type in HEADS and hasattr(model, "embeddings")

    def hidden(self, batch: "DevicePacked") -> torch.Tensor:
        """Last hidden states of the packed row, (T, hidden)."""
        type_ids = batch.token_type_ids
        out = self.base(input_ids=batch.input_ids[None], token_type_ids=None if type_ids is None else type_ids[None],
                        position_ids=batch.position_ids[None], cu_seq_lens_q=batch.cu_seqlens,
                        cu_seq_lens_k=batch.cu_seqlens, max_length_q=batch.max_len, max_length_k=batch.max_len,
                        packed_slots=batch.slots)
        return out.last_hidden_state[0]  # type: ignore[no-any-return]

    def logits(self, hidden: torch.Tensor, batch: "DevicePacked") -> torch.Tensor:
        """The classification head on each pair's first token: (N, labels)."""
        return HEADS[self.model_type](self.model, hidden[batch.cu_seqlens[:-1].long()])

    @staticmethod
    def unpack(hidden: torch.Tensor, batch: "DevicePacked") -> tuple[torch.Tensor, torch.Tensor]:
        """Packed (T, hidden) back to a padded (N, max_len, hidden) block and its attention mask."""
        mask = padding_mask(batch.cu_seqlens, batch.max_len)
        block = hidden.new_zeros(mask.numel(), hidden.shape[-1])
        block[batch.slots] = hidden
        return block.view(mask.shape[0], batch.max_len, -1), mask.long()


@dataclass(frozen=True)
class DevicePacked:
    """A `Packed` batch on the model's device (cu_seqlens as int32, as the varlen kernels take it)."""

    input_ids: torch.Tensor
    token_type_ids: torch.Tensor | None
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    slots: torch.Tensor
    max_len: int

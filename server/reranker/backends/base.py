"""The narrow interface every runtime implements: load, warmup, score, info.

A backend turns (query, document) pairs into raw scores: the relevance logit of a
cross-encoder (log-odds of the positive class for two-label heads), or the cosine similarity
of a bi-encoder. Activation (sigmoid) happens outside, in fp32, in `reranker.activation`,
so cached scores are raw and `raw_scores` requests come for free.

Each pair is tokenized once: `encode` turns pairs into `Encoded` token ids (their length is what
the batcher groups and budgets by), and `score_encoded` runs the forward on a batch of them, so the
lengths for batching and the forward's inputs come from one tokenizer call. The encoded form is
plain token ids, runtime-neutral: each backend collates (pads) a batch into its own tensors.

Backends are synchronous and may be slow: the batcher calls `score_encoded` from worker threads.
Hardware libraries (torch, mlx, openvino) are imported only inside the backend modules.
"""

from __future__ import annotations

import time

import abc
import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from dataclasses import asdict, dataclass
from typing import Literal, NamedTuple

Kind = Literal["cross-encoder", "bi-encoder", "llm"]


class Pair(NamedTuple):
    """What one score is computed from. `instruction` is what the backend resolved (see
    `Backend.instruction`): None for models that take none (cross- and bi-encoders)."""

    query: str
    document: str
    instruction: str | None = None


@dataclass(frozen=True, slots=True)
class Encoded:
    """One pair, tokenized once, truncated to the model's max length.

    Cross-encoders: `ids` is the whole sequence the model reads ([CLS] query [SEP] document [SEP])
    and `type_ids` its segment ids (None for models without them, e.g. XLM-R).
    Bi-encoders: `ids` is the document and `query` the query, each embedded on its own.
    LLM rerankers: `ids` is the whole prompt and `query` the prompt with an empty document, the
    same for every pair of one (query, instruction): the key that groups pairs for prefix reuse.
    """

    ids: list[int]
    type_ids: list[int] | None = None
    query: list[int] | None = None

    @property
    def tokens(self) -> int:
        """What this pair costs in a forward pass: the length the batcher groups and budgets by."""
        return len(self.ids)


class BackendError(RuntimeError):
    """A backend could not be loaded or could not score a batch."""


class DeviceUnavailable(BackendError):
    """The configured device is not available here; the message names what to install."""


class ConversionNeeded(BackendError):
    """The model must be converted first and this server cannot convert it (no PyTorch: the slim
    image). `available()` says, cheaply, whether the converted files have appeared since (another
    process ran `reranker convert`): the server waits on it instead of failing (runtime.py)."""

    def __init__(self, message: str, *, available: Callable[[], bool]) -> None:
        super().__init__(message)
        self.available = available


@dataclass(frozen=True)
class BackendInfo:
    """What is actually serving: reported by /health and the model-info metric."""

    model: str
    revision: str
    kind: Kind
    backend: str
    device: str
    dtype: str
    max_length: int
    activation: Literal["sigmoid", "identity"]
    template: str | None = None  # LLM rerankers: the prompt template's name@digest
    precision: str = ""  # why this dtype: RERANKER_QUANTIZATION as asked, or what `auto` picked and why
    autocast: str | None = None  # the dtype the forward runs under with ENABLE_MIXED_PRECISION (fp32 weights)
    #: The exact arithmetic where `dtype` does not say it all (OpenVINO: "int8-dynamic/group-128",
    #: "int8/float-layers-bf16"; "fp32"/"bf16" otherwise). Part of the fingerprint where it differs from dtype.
    numerics: str | None = None
    #: A precision decided once for the fleet (precision_record.py): where this start got it from
    #: ("origin": "measured" | "recorded by the fleet (redis)" | "recorded on disk"), the record's key,
    #: and the record (graph, hint, group, reason, measured_by, measured_at). None: nothing was measured.
    precision_record: dict[str, object] | None = None

    @property
    def fingerprint(self) -> str:
        """Identifies the scores this backend produces: cached scores are keyed by it.

        The runtime (torch or mlx) and device are left out for fp32/bf16/fp16: they produce
        the same scores within 1e-4 in fp32 (tests/test_mlx_backend.py), so pods and Macs share
        one cache. int8 is not one method: torch's dynamic quantization and MLX's weight-only
        8-bit differ by ~0.1, so for int8 the runtime is part of the fingerprint. Mixed precision
        (autocast) changes scores by ~1e-2, so it is part of it too; so is everything else that
        changes the numbers: weights (revision: a commit, or a local folder's content digest),
        dtype, max length, kind, the LLM prompt template, and the exact numerics where the dtype
        does not name them (int8-dynamic's group size, int8's float layers in bf16 or fp32).
        """
        fields = {"model": self.model, "revision": self.revision, "kind": self.kind,
                  "dtype": self.dtype, "max_length": self.max_length}
        if self.dtype == "int8":
            fields["runtime"] = self.backend
        if self.template is not None:
            fields["template"] = self.template
        if self.autocast is not None:
            fields["autocast"] = self.autocast
        if self.numerics is not None and self.numerics != self.dtype:
            fields["numerics"] = self.numerics  # e.g. int8-dynamic's group size: other groups, other scores
            fields["runtime"] = self.backend
        material = json.dumps(fields, sort_keys=True)
        return hashlib.sha256(material.encode()).hexdigest()[:16]

    def as_dict(self) -> dict[str, object]:
        return {**asdict(self), "fingerprint": self.fingerprint}


@dataclass(frozen=True)
class EngineSizing:
    """How the batcher feeds this backend when the settings leave it open: what fits the device.

    padded: the forward pays for longest pair x pairs (token budget counted that way, lengths
    grouped to cut padding); False for padding-free forwards, which pay for the real tokens.
    spread: the max_parallel forwards run on disjoint compute (OpenVINO's CPU streams, each on
    its own cores): work that would make one batch is split across the idle workers, so a lone
    request uses every core, and one forward's rate times max_parallel is the backend's.
    """

    batch_size: int = 32
    max_batch_tokens: int = 16384
    max_parallel: int = 1
    padded: bool = True
    spread: bool = False


class Backend(abc.ABC):
    """One loaded model on one device."""

    info: BackendInfo
    #: Seconds each part of loading took (imports, model_files, convert, compile, precision; a
    #: backend fills what it does): /health's `startup` and the ready log line.
    startup: Mapping[str, float] = MappingProxyType({})

    @abc.abstractmethod
    def encode(self, pairs: Sequence[Pair]) -> list[Encoded]:
        """Tokenize pairs for the forward pass (one tokenizer call per pair, truncated)."""

    @abc.abstractmethod
    def score_encoded(self, batch: Sequence[Encoded]) -> list[float]:
        """Raw scores (fp32 logits or cosine similarities), one per encoded pair, in order."""

    def score(self, pairs: Sequence[Pair]) -> list[float]:
        """Raw scores of pairs of texts: `encode` then `score_encoded`."""
        return self.score_encoded(self.encode(pairs)) if pairs else []

    def pair_lengths(self, pairs: Sequence[Pair]) -> list[int]:
        """Tokens each pair occupies in a forward pass, after truncation to max_length."""
        return [e.tokens for e in self.encode(pairs)]

    @abc.abstractmethod
    def token_counts(self, texts: Sequence[str]) -> list[int]:
        """Tokens of each text on its own, without special tokens and without truncation."""

    @abc.abstractmethod
    def token_offsets(self, text: str) -> list[tuple[int, int]]:
        """Character span of each token of `text` (no special tokens): used to chunk documents."""

    @property
    @abc.abstractmethod
    def special_tokens_per_pair(self) -> int:
        """Special tokens the tokenizer adds around one pair ([CLS] q [SEP] d [SEP]: 3)."""

    def instruction(self, requested: str | None) -> str | None:
        """The instruction pairs carry for a request that asked for `requested` (None: none asked).

        Cross- and bi-encoders take no instruction: None, so it changes neither scores nor cache
        keys. LLM rerankers fill in their template's default, so "no instruction" and "the default"
        are one cache entry.
        """
        return None

    def doc_window(self, query: str, instruction: str | None = None) -> int:
        """Document tokens that fit in one forward next to the query (and prompt): the chunk size."""
        limit = self.info.max_length - self.special_tokens_per_pair
        if self.info.kind == "bi-encoder":
            return max(1, limit)
        query_tokens = self.token_counts([query])[0]
        return max(limit // 2, limit - query_tokens)

    def warmup_pair(self) -> Pair:
        """A realistic pair (~100 tokens) for the warm-up forwards."""
        return Pair("what is a reranker?", "A reranker scores how relevant a document is to a query. " * 8)

    def warmup(self) -> float:
        """A few forwards of realistic shapes, so the first request is not the slow one; returns
        the pairs/s of a last, timed forward of 8: admission's first throughput estimate. The
        first forwards pay one-off costs (kernel choice, allocation) that say nothing of the rate:
        counted in, they made a fresh server refuse a burst it could serve."""
        pair = self.warmup_pair()
        for size in (1, 8):
            self.score([pair] * size)
        started = time.perf_counter()
        self.score([pair] * 8)
        return 8 / max(time.perf_counter() - started, 1e-6)

    def sizing(self) -> EngineSizing:
        """Batch size, token budget and forwards in flight that suit this backend's device."""
        return EngineSizing()

    def close(self) -> None:
        """Free device memory (optional)."""

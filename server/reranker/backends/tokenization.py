"""Tokenization shared by every runtime: the model's own Hugging Face (fast) tokenizer.

Every backend tokenizes with exactly the same calls (pair encoding, longest-first truncation to
max_length, as sentence-transformers does), so token counts, chunk boundaries and scores agree
between runtimes. Fast tokenizers are not safe to share between threads that change truncation
settings ("Already borrowed"), so each thread gets its own copy.

Pairs are tokenized once (`encode`, unpadded ids); a batch is padded here (`collate`, numpy), and
each runtime turns the arrays into its own tensors. Padding in numpy costs microseconds per batch,
far less than a second pass through the tokenizer.
"""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .base import Encoded, Pair
from .model_files import ModelFiles

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Features:
    """A padded batch (right padding), int64 numpy arrays of shape (rows, longest row)."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    token_type_ids: np.ndarray | None  # None: the model takes no segment ids (XLM-R)

    def as_dict(self) -> dict[str, np.ndarray]:
        out = {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        if self.token_type_ids is not None:
            out["token_type_ids"] = self.token_type_ids
        return out


@dataclass(frozen=True)
class BiBatch:
    """A bi-encoder batch: each distinct text once, and which row is each pair's query and document."""

    features: Features
    queries: np.ndarray
    documents: np.ndarray


class HFTokenization:
    """The tokenization half of the Backend interface; a backend inherits it and calls `_init_tokenizer`."""

    files: ModelFiles
    max_length: int

    def _init_tokenizer(self, files: ModelFiles) -> None:
        from transformers import AutoTokenizer

        self._tokenizer = AutoTokenizer.from_pretrained(str(files.path))
        if not getattr(self._tokenizer, "is_fast", False):
            log.warning("%s has no fast tokenizer: chunking falls back to whitespace offsets", files.name)
        # Lengths are measured untruncated on purpose (chunking); truncation always passes max_length.
        self._tokenizer.model_max_length = 1 << 30
        self._local = threading.local()
        self._local.tokenizer = self._tokenizer

    @property
    def tokenizer(self) -> Any:
        tok = getattr(self._local, "tokenizer", None)
        if tok is None:
            tok = self._local.tokenizer = copy.deepcopy(self._tokenizer)
        return tok

    @property
    def _engine(self) -> Any:
        """This thread's copy of the fast tokenizer's Rust engine, set once to truncate as the
        transformers call does (longest first, to max_length; no padding). `encode` calls it
        directly: transformers' per-pair Python around the same call held the GIL for most of the
        time, which capped a GPU server at ~9k pairs/s (docs/cuda.md). None: no fast tokenizer."""
        engine = getattr(self._local, "engine", None)
        if engine is None and getattr(self._tokenizer, "is_fast", False):
            engine = self._local.engine = copy.deepcopy(self._tokenizer.backend_tokenizer)
            engine.no_padding()
            engine.enable_truncation(self.max_length, strategy="longest_first",
                                     direction=getattr(self._tokenizer, "truncation_side", "right"))
        return engine

    def _encode_batch(self, inputs: list[Any]) -> list[Any]:
        engine = self._engine
        fast = getattr(engine, "encode_batch_fast", None)  # tokenizers >= 0.21: no offsets computed
        return (fast or engine.encode_batch)(inputs)  # type: ignore[no-any-return]

    @property
    def special_tokens_per_pair(self) -> int:
        if self.files.kind == "bi-encoder":
            return int(self.tokenizer.num_special_tokens_to_add(pair=False))
        return int(self.tokenizer.num_special_tokens_to_add(pair=True))

    def token_counts(self, texts: Sequence[str]) -> list[int]:
        enc = self.tokenizer(list(texts), add_special_tokens=False, truncation=False)
        return [len(ids) for ids in enc["input_ids"]]

    def token_offsets(self, text: str) -> list[tuple[int, int]]:
        enc = self.tokenizer(text, add_special_tokens=False, truncation=False, return_offsets_mapping=True)
        return [(int(a), int(b)) for a, b in enc["offset_mapping"]]

    def encode(self, pairs: Sequence[Pair]) -> list[Encoded]:
        """One tokenizer call for all pairs; bi-encoders tokenize each distinct text once."""
        if not pairs:
            return []
        if self.files.kind == "bi-encoder":
            texts = list(dict.fromkeys(t for pair in pairs for t in pair[:2]))
            if self._engine is not None:
                ids = [e.ids for e in self._encode_batch(texts)]
            else:
                ids = self.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]
            by_text = dict(zip(texts, ids))
            return [Encoded(ids=by_text[p[1]], query=by_text[p[0]]) for p in pairs]
        # pair[0], pair[1]: a Pair or a plain (query, document) tuple; the instruction is for LLMs only.
        if self._engine is not None:
            encodings = self._encode_batch([(p[0], p[1]) for p in pairs])
            if self._uses_type_ids:
                return [Encoded(ids=e.ids, type_ids=e.type_ids) for e in encodings]
            return [Encoded(ids=e.ids) for e in encodings]
        enc = self.tokenizer([p[0] for p in pairs], [p[1] for p in pairs], truncation=True, max_length=self.max_length)
        types = enc.get("token_type_ids") if self._uses_type_ids else None
        return [Encoded(ids=ids, type_ids=types[i] if types is not None else None)
                for i, ids in enumerate(enc["input_ids"])]

    @property
    def _uses_type_ids(self) -> bool:
        return "token_type_ids" in self._tokenizer.model_input_names

    def collate(self, rows: Sequence[Sequence[int]], types: Sequence[Sequence[int] | None] | None = None) -> Features:
        """Pad token-id rows to the longest (right padding, the tokenizer's pad id)."""
        width = max(len(r) for r in rows)
        pad = self._tokenizer.pad_token_id or 0
        ids = np.full((len(rows), width), pad, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        type_ids = np.zeros((len(rows), width), dtype=np.int64) if self._uses_type_ids else None
        for i, row in enumerate(rows):
            ids[i, : len(row)] = row
            mask[i, : len(row)] = 1
            if type_ids is not None and types is not None and types[i] is not None:
                type_ids[i, : len(row)] = types[i]  # type: ignore[index]
        return Features(input_ids=ids, attention_mask=mask, token_type_ids=type_ids)

    def collate_cross(self, batch: Sequence[Encoded]) -> Features:
        """A cross-encoder batch: one row per pair."""
        return self.collate([e.ids for e in batch], [e.type_ids for e in batch])

    @staticmethod
    def distinct_rows(batch: Sequence[Encoded]) -> tuple[list[list[int]], np.ndarray, np.ndarray]:
        """A bi-encoder batch's distinct texts (usually one query, many documents), each once, and
        which row is each pair's query and document."""
        rows: dict[tuple[int, ...], int] = {}
        queries, documents = [], []
        for e in batch:
            assert e.query is not None, "a bi-encoder pair carries its query's ids"
            queries.append(rows.setdefault(tuple(e.query), len(rows)))
            documents.append(rows.setdefault(tuple(e.ids), len(rows)))
        return [list(r) for r in rows], np.array(queries, dtype=np.int64), np.array(documents, dtype=np.int64)

    def collate_bi(self, batch: Sequence[Encoded]) -> BiBatch:
        """A bi-encoder batch: each distinct text embedded once."""
        rows, queries, documents = self.distinct_rows(batch)
        return BiBatch(features=self.collate(rows), queries=queries, documents=documents)

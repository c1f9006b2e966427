"""Tokenization shared by every runtime: the model's own Hugging Face (fast) tokenizer.

Both backends tokenize with exactly the same calls (pair encoding, longest-first truncation to
max_length, as sentence-transformers does), so token counts, chunk boundaries and scores agree
between PyTorch and MLX. Fast tokenizers are not safe to share between threads that change
truncation settings ("Already borrowed"), so each thread gets its own copy.
"""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Sequence
from typing import Any

from .base import Pair
from .model_files import ModelFiles

log = logging.getLogger(__name__)


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

    def pair_lengths(self, pairs: Sequence[Pair]) -> list[int]:
        if self.files.kind == "bi-encoder":
            docs = self.tokenizer([p[1] for p in pairs], truncation=True, max_length=self.max_length)
            return [len(ids) for ids in docs["input_ids"]]
        enc = self.tokenizer([p[0] for p in pairs], [p[1] for p in pairs], truncation=True, max_length=self.max_length)
        return [len(ids) for ids in enc["input_ids"]]

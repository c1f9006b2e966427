"""Tokenization shared by every runtime: the model's own fast tokenizer (its tokenizer.json).

Every backend tokenizes with exactly the same calls (pair encoding, longest-first truncation to
max_length, as sentence-transformers does), so token counts, chunk boundaries and scores agree
between runtimes. Fast tokenizers are not safe to share between threads that change truncation
settings ("Already borrowed"), so each thread gets its own copy.

Two ways to load the same tokenizer: the PyTorch and MLX runtimes (and the LLM prompts) load it with
transformers' AutoTokenizer; the OpenVINO runtime reads tokenizer.json with the `tokenizers`
library alone (`read_tokenizer`), plus the few settings transformers would take from
tokenizer_config.json / special_tokens_map.json (pad token, truncation side, which ids the model
takes, BERT's lower-casing), so the CPU image needs neither transformers nor PyTorch and a start
skips their imports (seconds: bench/startup_imports.py). The ids are the same either way
(tests/test_slim_path.py compares them with AutoTokenizer's on BERT and XLM-R tokenizers).

Pairs are tokenized once (`encode`, unpadded ids); a batch is padded here (`collate`, numpy), and
each runtime turns the arrays into its own tensors. Padding in numpy costs microseconds per batch,
far less than a second pass through the tokenizer.
"""

from __future__ import annotations

import copy
import json
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .base import BackendError, Encoded, Pair
from .model_files import ModelFiles

log = logging.getLogger(__name__)

#: transformers' tokenizer classes whose models take no segment ids (their `model_input_names`
#: leave out token_type_ids); every other class takes them (PreTrainedTokenizerBase's default).
NO_TYPE_IDS = frozenset({"RobertaTokenizer", "XLMRobertaTokenizer", "CamembertTokenizer", "DistilBertTokenizer",
                         "MPNetTokenizer", "BartTokenizer", "LongformerTokenizer", "GPT2Tokenizer",
                         "FlaubertTokenizer", "XLMTokenizer", "Qwen2Tokenizer", "LlamaTokenizer",
                         "GemmaTokenizer", "T5Tokenizer", "MBartTokenizer", "BigBirdTokenizer"})
_TYPE_IDS = ("input_ids", "token_type_ids", "attention_mask")


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


@dataclass(frozen=True)
class TokenizerFiles:
    """A model's fast tokenizer, read without transformers: the Rust engine and what
    tokenizer_config.json / special_tokens_map.json add to it."""

    engine: Any  # tokenizers.Tokenizer, truncation and padding off
    pad_token_id: int | None
    truncation_side: str
    model_input_names: tuple[str, ...]


def _token(value: object) -> str | None:
    """A special token as the configs write it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    return data if isinstance(data, dict) else {}


def read_tokenizer(folder: Path) -> TokenizerFiles:
    """The model's tokenizer.json and the settings transformers' AutoTokenizer would apply on top."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers

    file = folder / "tokenizer.json"
    if not file.is_file():
        raise BackendError(f"{folder} has no tokenizer.json (a fast tokenizer): the OpenVINO runtime reads only "
                           "that; convert the tokenizer with transformers or use RERANKER_RUNTIME=torch")
    engine = Tokenizer.from_file(str(file))
    engine.no_truncation()
    engine.no_padding()
    config = _json(folder / "tokenizer_config.json")
    specials = _json(folder / "special_tokens_map.json")
    # Where transformers' tokenizer class rebuilds a part of the pipeline from tokenizer_config.json,
    # the same part is rebuilt here. BERT: the normalizer, when the casing options differ from it.
    state = json.loads(engine.to_str()).get("normalizer") or {}
    if state.get("type") == "BertNormalizer":
        wanted: dict[str, Any] = {"lowercase": config.get("do_lower_case", state.get("lowercase")),
                  "strip_accents": config.get("strip_accents", state.get("strip_accents")),
                  "handle_chinese_chars": config.get("tokenize_chinese_chars", state.get("handle_chinese_chars"))}
        if any(state.get(k) != v for k, v in wanted.items()):
            engine.normalizer = normalizers.BertNormalizer(clean_text=state.get("clean_text", True), **wanted)
    tokenizer_class = str(config.get("tokenizer_class") or "").removesuffix("Fast")
    if tokenizer_class in ("XLMRobertaTokenizer", "CamembertTokenizer"):
        # transformers (5) builds these classes' pre-tokenizer itself, whatever the file says: split on
        # whitespace, then Metaspace (hub files say the same; a file made otherwise would differ).
        scheme = "always" if config.get("add_prefix_space", True) else "never"
        engine.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme=scheme)])
    pad = _token(config.get("pad_token")) or _token(specials.get("pad_token"))
    if pad is None and isinstance((padding := json.loads(engine.to_str()).get("padding")), dict):
        pad = padding.get("pad_token")
    names = config.get("model_input_names")
    if not isinstance(names, list):
        names = [n for n in _TYPE_IDS if n != "token_type_ids" or tokenizer_class not in NO_TYPE_IDS]
    return TokenizerFiles(engine=engine, pad_token_id=None if pad is None else engine.token_to_id(pad),
                          truncation_side=str(config.get("truncation_side") or "right"),
                          model_input_names=tuple(names))


class HFTokenization:
    """The tokenization half of the Backend interface; a backend inherits it and calls `_init_tokenizer`."""

    files: ModelFiles
    max_length: int

    def _init_tokenizer(self, files: ModelFiles, *, transformers: bool = True) -> None:
        """`transformers=False`: read tokenizer.json with the `tokenizers` library alone (no
        transformers import); `self.tokenizer` is then None and every call goes to the engine."""
        self._local = threading.local()
        if not transformers:
            found = read_tokenizer(files.path)
            self._tokenizer: Any = None
            self._base_engine: Any = found.engine
            self.pad_token_id: int = found.pad_token_id or 0
            self._truncation_side = found.truncation_side
            self._input_names: tuple[str, ...] = found.model_input_names
            return
        from transformers import AutoTokenizer

        self._tokenizer = AutoTokenizer.from_pretrained(str(files.path))
        if not getattr(self._tokenizer, "is_fast", False):
            log.warning("%s has no fast tokenizer: chunking falls back to whitespace offsets", files.name)
        # Lengths are measured untruncated on purpose (chunking); truncation always passes max_length.
        self._tokenizer.model_max_length = 1 << 30
        self._local.tokenizer = self._tokenizer
        self._base_engine = self._tokenizer.backend_tokenizer if getattr(self._tokenizer, "is_fast", False) else None
        self.pad_token_id = self._tokenizer.pad_token_id or 0
        self._truncation_side = getattr(self._tokenizer, "truncation_side", "right")
        self._input_names = tuple(self._tokenizer.model_input_names)

    @property
    def tokenizer(self) -> Any:
        """This thread's transformers tokenizer (None when loaded without transformers)."""
        if self._tokenizer is None:
            return None
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
        if engine is None and self._base_engine is not None:
            engine = self._local.engine = copy.deepcopy(self._base_engine)
            engine.no_padding()
            engine.enable_truncation(self.max_length, strategy="longest_first", direction=self._truncation_side)
        return engine

    @property
    def _plain(self) -> Any:
        """This thread's engine without truncation or padding: lengths and offsets of whole texts."""
        engine = getattr(self._local, "plain", None)
        if engine is None and self._base_engine is not None:
            engine = self._local.plain = copy.deepcopy(self._base_engine)
            engine.no_padding()
            engine.no_truncation()
        return engine

    def _encode_batch(self, inputs: list[Any]) -> list[Any]:
        engine = self._engine
        fast = getattr(engine, "encode_batch_fast", None)  # tokenizers >= 0.21: no offsets computed
        return (fast or engine.encode_batch)(inputs)  # type: ignore[no-any-return]

    @property
    def special_tokens_per_pair(self) -> int:
        pair = self.files.kind != "bi-encoder"
        if self._tokenizer is None:  # no transformers: the engine (the same calls)
            return int(self._base_engine.num_special_tokens_to_add(pair))
        return int(self.tokenizer.num_special_tokens_to_add(pair=pair))

    def token_counts(self, texts: Sequence[str]) -> list[int]:
        if self._tokenizer is None:  # no transformers: the engine (the same calls)
            plain = self._plain
            fast = getattr(plain, "encode_batch_fast", None) or plain.encode_batch
            return [len(e.ids) for e in fast(list(texts), add_special_tokens=False)]
        enc = self.tokenizer(list(texts), add_special_tokens=False, truncation=False)
        return [len(ids) for ids in enc["input_ids"]]

    def token_offsets(self, text: str) -> list[tuple[int, int]]:
        if self._tokenizer is None:  # no transformers: the engine (the same calls)
            return [(int(a), int(b)) for a, b in self._plain.encode(text, add_special_tokens=False).offsets]
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
        return "token_type_ids" in self._input_names

    def collate(self, rows: Sequence[Sequence[int]], types: Sequence[Sequence[int] | None] | None = None) -> Features:
        """Pad token-id rows to the longest (right padding, the tokenizer's pad id)."""
        width = max(len(r) for r in rows)
        ids = np.full((len(rows), width), self.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        type_ids = np.zeros((len(rows), width), dtype=np.int64) if self._uses_type_ids else None
        for i, row in enumerate(rows):
            ids[i, : len(row)] = row
            mask[i, : len(row)] = 1
            row_types = types[i] if types is not None else None
            if type_ids is not None and row_types is not None:
                type_ids[i, : len(row)] = row_types
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

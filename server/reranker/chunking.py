"""Long documents: truncate (default), cut from the left, or split into chunks.

By default nothing here runs: the tokenizer truncates each pair longest-first to the max
length, exactly as sentence-transformers does, so long documents never fail. When a request
asks (`max_chunks_per_doc` in Cohere v1, `max_tokens_per_doc` in Cohere v2, TEI's
`truncation_direction=left` or `truncate=false`), documents are measured in tokens and cut
on token boundaries (character offsets from the fast tokenizer), so each chunk fits the
model's window next to the query. A chunked document scores the max over its chunks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .backends import Backend
from .errors import InvalidRequest


@dataclass(frozen=True)
class Split:
    truncate: bool = True
    left: bool = False
    max_chunks: int | None = None
    max_doc_tokens: int | None = None
    field: str = "documents"

    @property
    def trivial(self) -> bool:
        return self.truncate and not self.left and self.max_chunks is None and self.max_doc_tokens is None


def split_documents(backend: Backend, query: str, documents: Sequence[str], split: Split,
                    instruction: str | None = None) -> list[list[str]]:
    """The texts to score for each document: one (possibly cut) text, or its chunks."""
    if split.trivial:
        return [[doc] for doc in documents]
    window = backend.doc_window(query, instruction)
    chunking = split.max_chunks is not None or split.max_doc_tokens is not None
    out: list[list[str]] = []
    for i, doc in enumerate(documents):
        offsets = backend.token_offsets(doc)
        n = len(offsets)
        if split.max_doc_tokens is not None and n > split.max_doc_tokens:
            n = split.max_doc_tokens
            doc = doc[: offsets[n - 1][1]]
        if n <= window:
            out.append([doc])
            continue
        if not split.truncate:
            raise InvalidRequest(
                f"{split.field}.{i}: {n} tokens, more than the {window} that fit next to the query "
                f"(max length {backend.info.max_length}); send truncate=true or a shorter text")
        if chunking:
            starts = range(0, n, window)
            if split.max_chunks is not None:
                starts = starts[: split.max_chunks]
            out.append([doc[offsets[s][0]: offsets[min(s + window, n) - 1][1]] for s in starts])
        elif split.left:
            out.append([doc[offsets[n - window][0]:]])
        else:
            out.append([doc])
    return out

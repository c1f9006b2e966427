"""What the gateway needs to know of each dialect: read with the server's own schema, which field
holds the documents, which limits the answer, and how to cut a request into parts.

Requests are read exactly as the server reads them (reranker.reading and reranker.schemas), so the
`model` a request names, its dialect and its 422s are the server's. A request is forwarded as the
bytes the client sent; only a fan-out rewrites it, one part per slice of its documents.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from ..errors import EmptyInput, InvalidRequest
from ..reading import dialect_of, validate
from ..schemas import (NativeRerankRequest, NIMRankingRequest, ScoreRequest, TEIRerankRequest, V1RerankRequest,
                       V2RerankRequest, VLLMRerankRequest)

#: The rerank routes every server has; NIM's hosted path (the model in the URL) is matched apart.
RANKING_PATHS = ("/rerank", "/v1/rerank", "/v2/rerank", "/v1/ranking", "/score", "/v1/score")
NIM_HOSTED = "/v1/retrieval/{model}/reranking"

_SCHEMAS: dict[str, type[BaseModel]] = {
    "native": NativeRerankRequest, "tei": TEIRerankRequest, "vllm": VLLMRerankRequest, "cohere-v1": V1RerankRequest,
    "cohere-v2": V2RerankRequest, "nim": NIMRankingRequest, "score": ScoreRequest}
#: The field holding what is ranked, per dialect.
DOCUMENTS = {"native": "documents", "tei": "texts", "vllm": "documents", "cohere-v1": "documents",
             "cohere-v2": "documents", "nim": "passages", "score": "text_2"}
#: Fields that cut the answer to the best n (a part keeps the field, so its dialect reads the same).
_TOP_FIELDS = ("top_k", "top_n")


@dataclass(frozen=True)
class Parsed:
    """A request as the gateway routes it."""

    dialect: str
    data: dict[str, Any]
    request: BaseModel
    model: str | None
    key: str  # what affinity hashes: the query (and instruction): what the servers' score caches key on
    documents: int

    @property
    def top(self) -> int | None:
        value = getattr(self.request, "top_k", None) or getattr(self.request, "top_n", None)
        return int(value) if value else None


def dialect_for(path: str, data: Any) -> str:
    if path == "/rerank":
        return dialect_of(data)
    if path == "/v1/rerank":
        return "cohere-v1"
    if path == "/v2/rerank":
        return "cohere-v2"
    if path in ("/score", "/v1/score"):
        return "score"
    return "nim"


def read(path: str, data: Any, *, path_model: str | None = None) -> Parsed:
    """Validate `data` with the server's schema for `path`; the server's 422 (or TEI's 400 Empty) if it is bad."""
    dialect = dialect_for(path, data)
    if dialect == "tei" and isinstance(data, dict) and data.get("texts") == []:
        raise EmptyInput("texts: must not be empty")
    req: Any = validate(_SCHEMAS[dialect], data)
    if dialect == "nim":
        query, model = req.query.text, req.model or path_model
        documents = len(req.passages)
    elif dialect == "score":
        pairs = req.pairs()
        query, model, documents = pairs[0][0], req.model, len(pairs)
    else:
        query, model, documents = req.query, req.model, len(getattr(req, DOCUMENTS[dialect]))
    instruction = getattr(req, "instruction", None)
    key = f"{query}\x00{instruction}" if instruction else query
    return Parsed(dialect=dialect, data=data, request=req, model=model, key=key, documents=documents)


def check_documents(parsed: Parsed, limit: int) -> None:
    """The server's bound on documents per request (RERANKER_MAX_DOCUMENTS), checked before a fan-out
    could hide it."""
    if parsed.documents > limit:
        raise InvalidRequest(f"{DOCUMENTS[parsed.dialect]}: {parsed.documents} documents, more than the limit of "
                             f"{limit} (RERANKER_MAX_DOCUMENTS)")


def split(parsed: Parsed, width: int) -> list[tuple[int, bytes, int]]:
    """The request cut into `width` contiguous parts: (offset of its first document, body, documents).
    Each part asks for all its results (the merge cuts to top n)."""
    n = parsed.documents
    field = DOCUMENTS[parsed.dialect]
    data = parsed.data
    parts = []
    for i in range(width):
        start, stop = n * i // width, n * (i + 1) // width
        if stop <= start:
            continue
        body = dict(data)
        if parsed.dialect == "score":
            req: Any = parsed.request
            first = [req.text_1] if isinstance(req.text_1, str) else req.text_1
            second = [req.text_2] if isinstance(req.text_2, str) else req.text_2
            body["text_2"] = second[start:stop]
            if len(first) > 1:
                body["text_1"] = first[start:stop]
        else:
            body[field] = data[field][start:stop]
            for name in _TOP_FIELDS:
                if name in data and data[name] is not None:
                    body[name] = stop - start
        parts.append((start, json.dumps(body, ensure_ascii=False).encode("utf-8"), stop - start))
    return parts

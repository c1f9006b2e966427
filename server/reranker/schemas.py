"""Request and response bodies of every dialect the server speaks.

- native (`POST /rerank`, the original service): {query, documents, top_k} ->
  {results: [{index, document, score}], processing_time_ms}
- TEI (`POST /rerank` with `texts`): {query, texts, raw_scores, return_text, truncate} ->
  a bare array [{index, score, text?}]
- Cohere v1 + Jina (`POST /v1/rerank`): one response carries both APIs' fields
- Cohere v2 (`POST /v2/rerank`)

Field lists follow the peer APIs (docs/api.md). Unknown fields are ignored (clients send
extras such as `priority`), but a known field with a bad value is a 422 naming it.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator


class _Request(BaseModel):
    # strict: a JSON value of another type (0.0 for a bool, "3" for a number) is a 422, as the schema says
    model_config = ConfigDict(extra="ignore", strict=True)

    # Schema-only bounds (the validators below give the messages): what a client may send, exactly.
    query: str = Field(..., description="The search query (not blank).",
                       json_schema_extra={"minLength": 1, "pattern": r"\S"})
    model: str | None = Field(None, description="The model to rank with: any name is accepted, unless "
                              "RERANKER_SERVED_MODEL_NAMES lists the names served (others: 404).")
    instruction: str | None = Field(
        None, validation_alias=AliasChoices("instruction", "instruct"),
        description="LLM rerankers (Qwen3-Reranker...): the task instruction in the prompt; unset or empty: the "
        "model's default. `instruct` is accepted too (SGLang's name). Ignored by cross-encoders and bi-encoders.")

    @field_validator("query")
    @classmethod
    def _query_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("query must not be empty")
        return value


def _documents_not_empty(value: list[Any]) -> list[Any]:
    if not value:
        raise ValueError("documents must not be empty")
    return value


class NativeRerankRequest(_Request):
    documents: list[str] = Field(..., description="Documents to rank.", json_schema_extra={"minItems": 1})
    top_k: int | None = Field(None, ge=1, validation_alias=AliasChoices("top_k", "top_n"),
                              description="Return only the best k (`top_n`, as vLLM, Jina and llama.cpp clients send it, is an alias).")
    return_documents: bool = Field(True, description="Echo each document's text.")
    raw_scores: bool = Field(False, description="Return raw logits instead of sigmoid scores.")

    _check_documents = field_validator("documents")(_documents_not_empty)


class TEIRerankRequest(_Request):
    texts: list[str] = Field(..., description="Documents to rank (TEI's name).", json_schema_extra={"minItems": 1})
    truncate: bool | None = Field(None, description="Truncate inputs longer than the max length (default true here; false: 422 for long inputs).")
    truncation_direction: Literal["right", "left", "Right", "Left"] = Field("right", description="Which end of a long document is cut.")
    raw_scores: bool = Field(False, description="Return raw logits instead of sigmoid scores.")
    return_text: bool = Field(False, description="Echo each text.")

    @field_validator("texts")
    @classmethod
    def _texts_not_empty(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("texts must not be empty")
        return value


class V1RerankRequest(_Request):
    """Cohere v1 and Jina share this path and these fields."""

    documents: list[str | dict[str, Any]] = Field(..., description="Strings, or objects carrying the rank_fields (default `text`).",
                                                  json_schema_extra={"minItems": 1})
    top_n: int | None = Field(None, ge=1, description="Return only the best n.")
    return_documents: bool = Field(True, description="Echo each document (`{text}`, or the object as sent).")
    rank_fields: list[str] | None = Field(None, description="Object fields scored, in order (default ['text']).",
                                          json_schema_extra={"minItems": 1})
    max_chunks_per_doc: int | None = Field(None, ge=1, description="Split long documents into up to this many chunks; a document scores the max over its chunks.")
    raw_scores: bool = Field(False, description="Return raw logits instead of sigmoid scores.")

    _check_documents = field_validator("documents")(_documents_not_empty)

    @field_validator("rank_fields")
    @classmethod
    def _fields_not_empty(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and not value:
            raise ValueError("rank_fields must not be empty")
        return value


class V2RerankRequest(_Request):
    documents: list[str] = Field(..., description="Documents to rank (strings only in Cohere v2).",
                                 json_schema_extra={"minItems": 1})
    top_n: int | None = Field(None, ge=1, description="Return only the best n.")
    max_tokens_per_doc: int | None = Field(None, ge=1, description="Documents are cut to this many tokens, then chunked to the model's window; a document scores the max over its chunks.")
    return_documents: bool = Field(False, description="Echo each document as {text} (not part of Cohere v2; off by default).")
    priority: int | None = Field(None, description="Accepted for compatibility; ignored.")

    _check_documents = field_validator("documents")(_documents_not_empty)


# --- responses ---------------------------------------------------------------------------

class NativeResult(BaseModel):
    index: int
    document: str | None = None
    score: float
    relevance_score: float  # = score: the name vLLM/Jina/llama.cpp-style clients read


class NativeRerankResponse(BaseModel):
    results: list[NativeResult]
    model: str
    processing_time_ms: float


class TEIResult(BaseModel):
    index: int
    score: float
    text: str | None = None


class DocumentText(BaseModel):
    model_config = ConfigDict(extra="allow")
    text: str | None = None


class CohereResult(BaseModel):
    index: int
    relevance_score: float
    document: dict[str, Any] | None = None


class ApiVersion(BaseModel):
    version: str


class BilledUnits(BaseModel):
    search_units: int


class Meta(BaseModel):
    api_version: ApiVersion
    billed_units: BilledUnits


class Usage(BaseModel):
    total_tokens: int


class V1RerankResponse(BaseModel):
    id: str
    results: list[CohereResult]
    meta: Meta
    model: str
    usage: Usage


class V2RerankResponse(BaseModel):
    id: str
    results: list[CohereResult]
    meta: Meta


class ErrorResponse(BaseModel):
    error: str
    message: str

"""Request and response bodies of every dialect the server speaks.

- native (`POST /rerank`, the original service): {query, documents, top_k} ->
  {results: [{index, document, score}], processing_time_ms}
- TEI (`POST /rerank` with `texts`): {query, texts, raw_scores, return_text, truncate} ->
  a bare array [{index, score, text?}]
- Cohere v1 + Jina (`POST /v1/rerank`): one response carries both APIs' fields
- Cohere v2 (`POST /v2/rerank`)
- vLLM (`POST /rerank` in vLLM's form: `model` or `top_n`, no `top_k`): {id, model, usage, results:
  [{index, relevance_score, document: {text}}]} (docs/api.md has the rule)
- NVIDIA NIM (`POST /v1/ranking`, `/v1/retrieval/<org>/<model>/reranking`): {model, query: {text},
  passages: [{text}], truncate} -> {rankings: [{index, logit}]}
- vLLM's score API (`POST /score`, `/v1/score`): {text_1, text_2} -> {data: [{index, score}]}
- `GET /v1/models` (OpenAI's list) and TEI's `GET /info`

Field lists follow the peer APIs (docs/api.md). Unknown fields are ignored (clients send
extras such as `priority`), but a known field with a bad value is a 422 naming it.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator


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
    top_n: int | None = Field(None, ge=1, description="Return only the best n (not TEI's: LiteLLM's `huggingface` "
                              "provider sends it, and TEI itself answers every text).")

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


class VLLMRerankRequest(_Request):
    """vLLM's /rerank (LiteLLM's `hosted_vllm`, vLLM's docs): as the native request, with vLLM's answer."""

    documents: list[str | dict[str, Any]] = Field(..., description="Strings, or objects with a `text` field.",
                                                  json_schema_extra={"minItems": 1})
    top_n: int | None = Field(None, ge=0, description="Return only the best n (vLLM: 0 or unset, all).")
    return_documents: bool = Field(True, description="Echo each document as {text}.")

    _check_documents = field_validator("documents")(_documents_not_empty)


class NIMText(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    text: str = Field(..., description="The text.")


class NIMRankingRequest(BaseModel):
    """NVIDIA NIM's reranking API (NeMo Retriever reranking, `/v1/ranking`)."""

    model_config = ConfigDict(extra="ignore", strict=True)
    model: str | None = Field(None, description="The model to rank with (see `model` in docs/api.md).")
    query: NIMText = Field(..., description="The query, as {text}.")
    passages: list[NIMText] = Field(..., description="Passages to rank, each as {text}.", json_schema_extra={"minItems": 1})
    truncate: Literal["NONE", "END"] = Field("NONE", description="END: cut long passages at the model's window; "
                                             "NONE (NIM's default): a passage too long is a 422.")
    top_k: int | None = Field(None, ge=1, description="Return only the best k (sent by LiteLLM's `nvidia_nim`).")

    @field_validator("passages")
    @classmethod
    def _passages_not_empty(cls, value: list[NIMText]) -> list[NIMText]:
        if not value:
            raise ValueError("passages must not be empty")
        return value

    @field_validator("query")
    @classmethod
    def _query_not_blank(cls, value: NIMText) -> NIMText:
        if not value.text.strip():
            raise ValueError("query.text must not be empty")
        return value


def _texts_not_empty(value: str | list[str]) -> str | list[str]:
    items = [value] if isinstance(value, str) else value
    if not items:
        raise ValueError("must not be empty")
    return value


class ScoreRequest(BaseModel):
    """vLLM's score API: text_1 against text_2, 1:1, 1:N or N:N."""

    model_config = ConfigDict(extra="ignore", strict=True)
    model: str | None = Field(None, description="The model to score with (see `model` in docs/api.md).")
    text_1: str | list[str] = Field(..., description="The query: one string, or a list (one item: paired with every "
                                    "text_2; N items: paired item by item with text_2's N).")
    text_2: str | list[str] = Field(..., description="The documents: one string or a list.")

    _check_text_1 = field_validator("text_1")(_texts_not_empty)
    _check_text_2 = field_validator("text_2")(_texts_not_empty)

    @field_validator("text_1")
    @classmethod
    def _queries_not_blank(cls, value: str | list[str]) -> str | list[str]:
        for text in [value] if isinstance(value, str) else value:
            if not text.strip():
                raise ValueError("a query must not be empty")
        return value

    @model_validator(mode="after")
    def _n_to_n(self) -> ScoreRequest:
        first = [self.text_1] if isinstance(self.text_1, str) else self.text_1
        second = [self.text_2] if isinstance(self.text_2, str) else self.text_2
        if len(first) != 1 and len(first) != len(second):
            raise ValueError(f"text_1 has {len(first)} items and text_2 {len(second)}: N:N needs as many of each")
        return self

    def pairs(self) -> list[tuple[str, str]]:
        """(query, document) in response order: one query against every text_2, or item by item."""
        first = [self.text_1] if isinstance(self.text_1, str) else self.text_1
        second = [self.text_2] if isinstance(self.text_2, str) else self.text_2
        if len(first) == 1:
            return [(first[0], doc) for doc in second]
        return list(zip(first, second))


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


class VLLMDocument(BaseModel):
    text: str


class VLLMResult(BaseModel):
    index: int
    relevance_score: float
    document: VLLMDocument | None = None


class VLLMUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class VLLMRerankResponse(BaseModel):
    id: str
    model: str
    usage: VLLMUsage
    results: list[VLLMResult]


class NIMRanking(BaseModel):
    index: int
    logit: float


class NIMRankingResponse(BaseModel):
    rankings: list[NIMRanking]


class ScoreData(BaseModel):
    index: int
    object: Literal["score"] = "score"
    score: float


class ScoreUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int
    completion_tokens: int = 0


class ScoreResponse(BaseModel):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[ScoreData]
    usage: ScoreUsage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    root: str
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TEIClassifierModel(BaseModel):
    id2label: dict[str, str]
    label2id: dict[str, int]


class TEIModelType(BaseModel):
    reranker: TEIClassifierModel


class TEIInfo(BaseModel):
    """TEI's `GET /info` (its OpenAPI `Info`), with what this server is."""

    model_id: str
    model_sha: str | None
    model_dtype: str
    model_type: TEIModelType
    max_concurrent_requests: int
    max_input_length: int
    max_batch_tokens: int
    max_batch_requests: int | None
    max_client_batch_size: int
    auto_truncate: bool
    tokenization_workers: int
    version: str


class ErrorResponse(BaseModel):
    error: str
    message: str


class TEIErrorResponse(BaseModel):
    """TEI's error body, answered to TEI-shaped requests (`texts` on /rerank)."""

    error: str
    error_type: Literal["Unhealthy", "Backend", "Overloaded", "Validation", "Tokenizer", "Empty"]

"""Every error a client can see, typed, with its HTTP status in one place.

Routes raise these; one exception handler in `app.py` renders them as
`{"error": code, "message": text}` with the status (and Retry-After) they carry. Anything
else that escapes is a bug: it is logged with the request id and answered 500.

A TEI-shaped request (`texts` on /rerank) is answered TEI's body instead,
`{"error": text, "error_type": ...}`, with TEI's status for that type (`tei_error` below), so
TEI's clients (Haystack's HuggingFaceTEIRanker, LiteLLM's `huggingface` provider) read it.
"""

from __future__ import annotations


class APIError(Exception):
    status: int = 400
    code: str = "bad_request"
    retry_after: float | None = None

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        if retry_after is not None:
            self.retry_after = retry_after


class InvalidJSON(APIError):
    status, code = 400, "invalid_json"


class InvalidRequest(APIError):
    status, code = 422, "invalid_request"


class EmptyInput(InvalidRequest):
    """A list to rank is empty (TEI answers this `Empty`, 400)."""


class Unauthorized(APIError):
    status, code = 401, "unauthorized"


class ModelNotFound(APIError):
    """The request names a model this server does not serve (RERANKER_SERVED_MODEL_NAMES set)."""

    status, code = 404, "model_not_found"


class PayloadTooLarge(APIError):
    status, code = 413, "payload_too_large"


class QueueFull(APIError):
    """The bounded queue cannot take the request's pairs: back off and retry."""

    status, code = 429, "queue_full"


class QueueTimeout(APIError):
    """The request waited longer than RERANKER_QUEUE_TIMEOUT for the model."""

    status, code = 503, "queue_timeout"


class NotReady(APIError):
    """The model is still loading, or the server is draining for shutdown."""

    status, code = 503, "not_ready"


class WorkerTimeout(APIError):
    """A forward pass ran past RERANKER_WORKER_TIMEOUT."""

    status, code = 503, "worker_timeout"


class RequestTimeout(APIError):
    """The request's one deadline passed (queue, forward, another server's work and the cache
    fill together: RERANKER_QUEUE_TIMEOUT + RERANKER_WORKER_TIMEOUT); never a hang."""

    status, code = 503, "request_timeout"


class EngineFailure(APIError):
    """The batching task died: nothing queued here will be scored (the server is not Ready)."""

    status, code = 503, "engine_failed"


class BackendFailure(APIError):
    """The model raised while scoring, returned NaN, or returned a score count that does not
    match the batch's pairs (TEI answers 424 for the same)."""

    status, code = 424, "backend_error"


#: TEI's status for each of its error types (text-embeddings-inference, router/src/http/server.rs).
TEI_STATUS = {"Empty": 400, "Validation": 413, "Tokenizer": 422, "Backend": 424, "Overloaded": 429, "Unhealthy": 503}


def tei_error(exc: APIError) -> tuple[int, str]:
    """(status, error_type) of `exc` in TEI's terms. A malformed body or field keeps its own
    status (TEI's JSON extractor answers those 4xx itself), typed `Validation`."""
    if isinstance(exc, EmptyInput):
        return TEI_STATUS["Empty"], "Empty"
    if isinstance(exc, PayloadTooLarge):
        return TEI_STATUS["Validation"], "Validation"
    if isinstance(exc, QueueFull):
        return TEI_STATUS["Overloaded"], "Overloaded"
    if isinstance(exc, BackendFailure):
        return TEI_STATUS["Backend"], "Backend"
    if exc.status == 503:
        return TEI_STATUS["Unhealthy"], "Unhealthy"
    return exc.status, "Validation"


class ClientGone(Exception):
    """The client disconnected; nothing is sent back."""

"""Every error a client can see, typed, with its HTTP status in one place.

Routes raise these; one exception handler in `app.py` renders them as
`{"error": code, "message": text}` with the status (and Retry-After) they carry. Anything
else that escapes is a bug: it is logged with the request id and answered 500.
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


class BackendFailure(APIError):
    """The model raised while scoring, or returned NaN (TEI answers 424 for the same)."""

    status, code = 424, "backend_error"


class ClientGone(Exception):
    """The client disconnected; nothing is sent back."""

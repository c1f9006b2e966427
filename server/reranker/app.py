"""The application factory: settings in, a FastAPI app out.

The lifespan owns the runtime (model, batcher, cache, Redis client); a pure ASGI middleware
gives each request an id, counts it in the metrics and logs one line for it; one exception
handler renders every `APIError` as `{"error", "message"}` with its status and Retry-After.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import __version__, docs_pages, logs
from .backends import Backend
from .errors import APIError, ClientGone, tei_error
from .routes import router
from .routes_compat import router as compat_router
from .runtime import Runtime
from .settings import Settings

log = logging.getLogger("reranker.access")

_ROUTES = {"/rerank", "/v1/rerank", "/v2/rerank", "/v1/ranking", "/score", "/v1/score", "/health", "/ready",
           "/metrics"}
#: NIM's hosted path names the model in the URL: one metrics label for all of them.
_NIM_HOSTED = "/v1/retrieval/{model}/reranking"


#: Routes whose answers carry the server's load (the gateway's picking reads it).
_RANKING_ROUTES = {"/rerank", "/v1/rerank", "/v2/rerank", "/v1/ranking", "/score", "/v1/score", _NIM_HOSTED}
#: Envoy ORCA's per-response load report header, in its TEXT form: the pairs waiting for the model
#: (queued and admitted) and the rerank requests in flight, as the answer leaves.
LOAD_HEADER = b"endpoint-load-metrics"


def _load_header(runtime: Runtime) -> tuple[bytes, bytes]:
    admission = runtime.admission
    value = f"TEXT named_metrics.queue_pairs={admission.waiting}, named_metrics.inflight_requests={admission.inflight}"
    return LOAD_HEADER, value.encode("latin-1")


def _is_nim_hosted(path: str) -> bool:
    return path.startswith("/v1/retrieval/") and path.endswith("/reranking")


class RequestContext:
    """Request id, metrics and one access-log line per request (pure ASGI: streams untouched)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        rid = headers.get(b"x-request-id", b"").decode("latin-1")[:128] or uuid.uuid4().hex
        token = logs.request_id.set(rid)
        path = scope.get("path", "")
        route = path if path in _ROUTES else _NIM_HOSTED if _is_nim_hosted(path) else "other"
        status = 500
        started = time.perf_counter()
        app = scope.get("app")
        runtime: Runtime | None = getattr(app.state, "runtime", None) if app is not None else None

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                extra = [(b"x-request-id", rid.encode("latin-1"))]
                if runtime is not None and runtime.admission.draining:
                    extra.append((b"connection", b"close"))  # the client's next request goes elsewhere
                if runtime is not None and route in _RANKING_ROUTES:
                    extra.append(_load_header(runtime))
                message["headers"] = list(message["headers"]) + extra
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            if runtime is not None and route not in ("/metrics", "/health", "/ready"):
                runtime.metrics.requests.labels(route=route, status=str(status)).inc()
                runtime.metrics.request_duration.labels(route=route).observe(elapsed)
                runtime.metrics.total_requests += 1
                if status >= 400:
                    runtime.metrics.failed_requests += 1
            if runtime is not None and route in _RANKING_ROUTES:
                runtime.note_request()  # /health's activity: what scale-to-zero reads
            if route not in ("/metrics", "/health", "/ready") or status >= 400:
                log.info("%s %s %d %.1fms", scope.get("method"), path, status, elapsed * 1000,
                         extra={"status": status, "duration_ms": round(elapsed * 1000, 2)})
            logs.request_id.reset(token)


def _error(exc: APIError, *, dialect: str | None = None) -> JSONResponse:
    headers = {}
    if exc.retry_after is not None:
        headers["Retry-After"] = str(max(1, int(round(exc.retry_after))))
    if dialect == "tei":  # a TEI-shaped request (routes set request.state.dialect): TEI's body and status
        status, error_type = tei_error(exc)
        return JSONResponse({"error": exc.message, "error_type": error_type}, status_code=status, headers=headers)
    return JSONResponse({"error": exc.code, "message": exc.message}, status_code=exc.status, headers=headers)


def create_app(settings: Settings | None = None, *, backend: Backend | None = None) -> FastAPI:
    """Build the app. `backend` injects an already-loaded model (tests, benchmarks)."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime = Runtime(settings, backend=backend)
        app.state.runtime = runtime
        await runtime.start()
        try:
            yield
        finally:
            await runtime.stop()

    # The docs pages are docs_pages' (assets served here, no CDN); the schema too when protected.
    closed_docs: dict[str, Any] = {"docs_url": None, "redoc_url": None,
                                   **({"openapi_url": None} if settings.protect_docs else {})}
    app = FastAPI(title="Reranker", version=__version__, lifespan=lifespan,
                  description="Rerank documents for a query: native, TEI, vLLM, Cohere v1/v2, Jina and NVIDIA NIM "
                  "APIs; vLLM's score API.",
                  **closed_docs)
    app.include_router(router)
    app.include_router(compat_router)
    docs_pages.install(app, protect=settings.protect_docs)
    app.add_middleware(RequestContext)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return _error(exc, dialect=getattr(request.state, "dialect", None))

    @app.exception_handler(ClientGone)
    async def client_gone(_request: Request, _exc: ClientGone) -> Response:
        return Response(status_code=499)  # nobody reads it; the access log shows nginx's "client closed"

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> Response:
        # Starlette's own answers (no route matched: 404; wrong method: 405) in the house error shape,
        # e.g. a NIM hosted path whose model segment holds a newline matches no route.
        codes = {404: "not_found", 405: "method_not_allowed"}
        body = {"error": codes.get(exc.status_code, "http_error"), "message": str(exc.detail)}
        return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        return JSONResponse({"error": "invalid_request", "message": problems}, status_code=422)

    @app.exception_handler(Exception)
    async def unexpected(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return JSONResponse({"error": "internal", "message": f"internal error ({exc.__class__.__name__}); "
                             f"request id {logs.request_id.get()}"}, status_code=500)

    return app


"""HTTP routes: the rerank dialects (native, TEI, vLLM, Cohere v1/Jina, Cohere v2) and the probes.

NIM's ranking, vLLM's score API and the model listings are in `routes_compat.py`, built on the
helpers here. Which dialect a body on /rerank speaks is read from its own fields (`dialect_of`).

Each rerank route parses its dialect, hands the texts to the `Ranker`, and shapes the
answer the way that dialect's clients expect. Bodies are parsed here rather than by FastAPI's
body injection so that one limit (413), one JSON error (400) and one validation error shape
(422, naming the field) hold for every route; the OpenAPI schema is declared explicitly.

Nothing a client sends may reach the model or the JSON encoder unchecked: strings that are not
valid Unicode (lone surrogates), JSON nested deeper than any dialect needs, a query longer than
RERANKER_MAX_QUERY_CHARS and a body cut off by a gone client are answered here, before any work.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel

from . import activation
from .batcher import Ticket
from .chunking import Split
from .errors import EmptyInput, InvalidRequest, ModelNotFound, PayloadTooLarge
from .reading import dialect_of, parse_body, read_body
from .reading import validate as _validate
from .runtime import Runtime
from .schemas import (ErrorResponse, NativeRerankRequest, NativeRerankResponse, TEIErrorResponse, TEIRerankRequest,
                      TEIResult, V1RerankRequest, V1RerankResponse, V2RerankRequest, V2RerankResponse,
                      VLLMRerankRequest, VLLMRerankResponse)

router = APIRouter()


def _runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


def _schema(model: type[BaseModel]) -> dict[str, Any]:
    """`model`'s JSON schema with its nested models inlined: declared in a route's OpenAPI, a
    `$defs` entry is no component, and a reference to it resolves nowhere (ReDoc fails on it)."""
    schema = model.model_json_schema(ref_template="#/$defs/{model}")
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return inline({**defs[ref.removeprefix("#/$defs/")], **{k: v for k, v in node.items() if k != "$ref"}})
            return {k: inline(v) for k, v in node.items()}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    result: dict[str, Any] = inline(schema)
    return result


def _openapi(*models: type[BaseModel]) -> dict[str, Any]:
    schemas = [_schema(m) for m in models]
    # anyOf, not oneOf: a body may fit more than one dialect (native and vLLM's /rerank share fields),
    # and the server takes it if it fits any; the fields decide which (docs/api.md).
    schema: dict[str, Any] = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


#: Every error a rerank route can answer, each with the one error shape (errors.py).
_ERRORS: dict[int | str, dict[str, Any]] = {status: {"model": ErrorResponse, "description": text} for status, text in {
    400: "Body is not JSON", 401: "Missing or invalid API key", 404: "Model not served (RERANKER_SERVED_MODEL_NAMES)",
    413: "Body or query too large", 422: "Invalid field (the message names it)",
    424: "The model failed to score", 429: "Queue full or too many requests (Retry-After)",
    503: "Loading, draining, queue or request timeout, or the engine cannot serve (Retry-After)"}.items()}

async def _read_json(request: Request, limit: int) -> Any:
    return await parse_body(await read_body(request, limit))


async def _in_flight(request: Request) -> AsyncIterator[None]:
    """Counts a rerank request from its first byte to its answer; 429 past RERANKER_MAX_CONCURRENT_REQUESTS."""
    with _runtime(request).admission.request():
        yield


def _authorize(request: Request, runtime: Runtime) -> None:
    runtime.api_keys.authorize(request.headers.get("authorization"))


def _check_size(runtime: Runtime, req: Any, n: int, field: str) -> None:
    """The request's bounds, checked before any work: documents per request; the query's length and
    the instruction's (each is paired with every document)."""
    limit = runtime.settings.max_documents
    if n > limit:
        raise InvalidRequest(f"{field}: {n} documents, more than the limit of {limit} (RERANKER_MAX_DOCUMENTS)")
    max_query = runtime.settings.max_query_chars
    for name in ("query", "instruction"):
        text = getattr(req, name) or ""
        if len(text) > max_query:
            raise PayloadTooLarge(f"{name}: {len(text)} characters, more than the limit of {max_query} "
                                  "(RERANKER_MAX_QUERY_CHARS)")


def _served_model(runtime: Runtime, requested: str | None) -> str:
    """The model name a response carries: the client's when it asked for a name served here, else
    the loaded model's. With RERANKER_SERVED_MODEL_NAMES set, any other name is a 404."""
    loaded = runtime.backend_info.model
    names = runtime.model_names
    if requested is None or requested == loaded:
        return loaded
    if requested in names:
        return requested
    if names:
        raise ModelNotFound(f"model: {requested!r} is not served here; served: {sorted(names | {loaded})} "
                            "(RERANKER_SERVED_MODEL_NAMES)")
    return loaded


async def _watch_disconnect(request: Request, ticket: Ticket) -> None:
    """The body is read; the next ASGI message can only be the client going away."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            dropped = ticket.cancel()
            request.app.state.runtime.metrics.rejected.labels(reason="client_gone").inc()
            request.app.state.runtime.dropped_pairs += dropped
            return


async def _rank(request: Request, runtime: Runtime, query: str, texts: Sequence[str], split: Split,
                instruction: str | None = None) -> tuple[list[float], int]:
    ticket = Ticket()
    watcher = asyncio.get_running_loop().create_task(_watch_disconnect(request, ticket))
    try:
        runtime.admission.check_serving()
        assert runtime.ranker is not None  # ready implies loaded
        ranked = await runtime.ranker.rank(query, texts, split=split, ticket=ticket, instruction=instruction)
    finally:
        watcher.cancel()
    return ranked.raw, ranked.tokens


def _order(scores: list[float], top: int | None) -> list[int]:
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return order[:top] if top is not None else order


def _timing_headers(started: float) -> dict[str, str]:
    return {"x-compute-time": f"{(time.perf_counter() - started) * 1000:.2f}"}


def _activate(runtime: Runtime, raw: list[float], raw_scores: bool) -> list[float]:
    if raw_scores:
        return raw
    return [activation.apply(r, runtime.backend_info.activation) for r in raw]


#: /rerank's errors: the house shape, or TEI's for TEI-shaped requests (errors.tei_error).
_RERANK_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"description": f"{error['description']}; TEI-shaped requests get TEI's body",
             "content": {"application/json": {"schema": {"anyOf": [_schema(ErrorResponse), _schema(TEIErrorResponse)]}}}}
    for status, error in _ERRORS.items()}


@router.post("/rerank", openapi_extra=_openapi(NativeRerankRequest, TEIRerankRequest, VLLMRerankRequest),
             tags=["rerank"], summary="Rerank (native shape; TEI's with `texts`; vLLM's with `model` or `top_n` "
             "and no `top_k`)", dependencies=[Depends(_in_flight)],
             responses={200: {"content": {"application/json": {"schema": {"anyOf": [
                 _schema(NativeRerankResponse), {"type": "array", "items": _schema(TEIResult)},
                 _schema(VLLMRerankResponse)]}}}}, **_RERANK_ERRORS})
async def rerank(request: Request) -> Any:
    runtime = _runtime(request)
    _authorize(request, runtime)
    data = await _read_json(request, runtime.settings.max_body_bytes)
    started = time.perf_counter()
    dialect = dialect_of(data)
    if dialect == "tei":
        return await _rerank_tei(request, runtime, data, started)
    if dialect == "vllm":
        return await _rerank_vllm(request, runtime, data)

    native = _validate(NativeRerankRequest, data)
    _check_size(runtime, native, len(native.documents), "documents")
    model = _served_model(runtime, native.model)

    raw, _ = await _rank(request, runtime, native.query, native.documents, Split(), native.instruction)
    scores = _activate(runtime, raw, native.raw_scores)
    results = [{"index": i, "document": native.documents[i] if native.return_documents else None, "score": scores[i],
                "relevance_score": scores[i]} for i in _order(scores, native.top_k)]
    body = NativeRerankResponse(results=results, model=model,  # type: ignore[arg-type]
                                processing_time_ms=round((time.perf_counter() - started) * 1000, 3))
    return JSONResponse(body.model_dump(), headers=_timing_headers(started))


async def _rerank_tei(request: Request, runtime: Runtime, data: dict[str, Any], started: float) -> Response:
    request.state.dialect = "tei"  # errors from here on are TEI's body (app.py)
    if data.get("texts") == []:
        raise EmptyInput("texts: must not be empty")
    tei = _validate(TEIRerankRequest, data)
    _check_size(runtime, tei, len(tei.texts), "texts")
    _served_model(runtime, tei.model)
    split = Split(truncate=tei.truncate is not False, left=tei.truncation_direction.lower() == "left", field="texts")
    raw, _ = await _rank(request, runtime, tei.query, tei.texts, split, tei.instruction)
    scores = _activate(runtime, raw, tei.raw_scores)
    ranked = [TEIResult(index=i, score=scores[i], text=tei.texts[i] if tei.return_text else None)
              .model_dump(exclude_none=True) for i in _order(scores, tei.top_n)]
    return JSONResponse(ranked, headers=_timing_headers(started))


async def _rerank_vllm(request: Request, runtime: Runtime, data: dict[str, Any]) -> dict[str, Any]:
    req = _validate(VLLMRerankRequest, data)
    _check_size(runtime, req, len(req.documents), "documents")
    model = _served_model(runtime, req.model)
    texts = [_rank_text(doc, ["text"], i) for i, doc in enumerate(req.documents)]
    raw, tokens = await _rank(request, runtime, req.query, texts, Split(), req.instruction)
    scores = _activate(runtime, raw, False)
    results = []
    for i in _order(scores, req.top_n or None):
        item: dict[str, Any] = {"index": i, "relevance_score": scores[i]}
        if req.return_documents:
            item["document"] = {"text": texts[i]}
        results.append(item)
    return {"id": f"rerank-{uuid.uuid4().hex}", "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}, "results": results}


def _rank_text(doc: str | dict[str, Any], fields: list[str], i: int) -> str:
    if isinstance(doc, str):
        return doc
    values = []
    for name in fields:
        if name not in doc:
            raise InvalidRequest(f"documents.{i}: missing rank field {name!r} (rank_fields={fields})")
        value = doc[name]
        if not isinstance(value, str):
            raise InvalidRequest(f"documents.{i}.{name}: rank fields must be strings")
        values.append(value)
    if len(fields) == 1:
        return values[0]
    return "\n".join(f"{name}: {value}" for name, value in zip(fields, values))


@router.post("/v1/rerank", openapi_extra=_openapi(V1RerankRequest), tags=["rerank"],
             summary="Rerank (Cohere v1 and Jina)", response_model=V1RerankResponse,
             response_model_exclude_none=True, dependencies=[Depends(_in_flight)], responses=_ERRORS)
async def rerank_v1(request: Request) -> Any:
    runtime = _runtime(request)
    _authorize(request, runtime)
    req = _validate(V1RerankRequest, await _read_json(request, runtime.settings.max_body_bytes))
    _check_size(runtime, req, len(req.documents), "documents")
    model = _served_model(runtime, req.model)
    fields = req.rank_fields or ["text"]
    texts = [_rank_text(doc, fields, i) for i, doc in enumerate(req.documents)]

    raw, tokens = await _rank(request, runtime, req.query, texts,
                              Split(max_chunks=req.max_chunks_per_doc), req.instruction)
    scores = _activate(runtime, raw, req.raw_scores)
    results = []
    for i in _order(scores, req.top_n):
        item: dict[str, Any] = {"index": i, "relevance_score": scores[i]}
        if req.return_documents:
            doc = req.documents[i]
            item["document"] = {"text": doc} if isinstance(doc, str) else doc
        results.append(item)
    return {"id": str(uuid.uuid4()), "results": results, "model": model,
            "usage": {"total_tokens": tokens},
            "meta": {"api_version": {"version": "1"}, "billed_units": {"search_units": 1}}}


@router.post("/v2/rerank", openapi_extra=_openapi(V2RerankRequest), tags=["rerank"],
             summary="Rerank (Cohere v2)", response_model=V2RerankResponse, response_model_exclude_none=True,
             dependencies=[Depends(_in_flight)], responses=_ERRORS)
async def rerank_v2(request: Request) -> Any:
    runtime = _runtime(request)
    _authorize(request, runtime)
    req = _validate(V2RerankRequest, await _read_json(request, runtime.settings.max_body_bytes))
    _check_size(runtime, req, len(req.documents), "documents")
    _served_model(runtime, req.model)

    raw, _ = await _rank(request, runtime, req.query, req.documents,
                         Split(max_doc_tokens=req.max_tokens_per_doc), req.instruction)
    scores = _activate(runtime, raw, False)
    results = []
    for i in _order(scores, req.top_n):
        item: dict[str, Any] = {"index": i, "relevance_score": scores[i]}
        if req.return_documents:
            item["document"] = {"text": req.documents[i]}
        results.append(item)
    return {"id": str(uuid.uuid4()), "results": results,
            "meta": {"api_version": {"version": "2"}, "billed_units": {"search_units": 1}}}


@router.get("/health", tags=["probes"],
            summary="Liveness and stats; 503 once the model failed to load or the engine is wedged or dead",
            responses={503: {"description": "The model failed to load, every forward slot is stuck past "
                                            "RERANKER_WORKER_TIMEOUT, or the batching task died (the body says why)"}})
async def health(request: Request) -> Any:
    runtime = _runtime(request)
    stats = runtime.health()
    if runtime.fault:
        # Neither a failed load nor a wedged engine recovers in this process: failing liveness gets
        # it restarted with back-off (Kubernetes; launchd and systemd via the container or unit),
        # and says why.
        return JSONResponse(stats, status_code=503)
    return stats


@router.get("/ready", tags=["probes"],
            summary="Readiness: 200 once warm, 503 while loading or draining, or when it cannot serve",
            responses={503: {"description": "Loading, draining, the load failed, or the engine is wedged or dead"}})
async def ready(request: Request) -> Any:
    runtime = _runtime(request)
    fault = runtime.fault
    if runtime.admission.ready and not runtime.admission.draining and fault is None:
        return {"ready": True}
    if runtime.admission.draining:
        reason = "draining"
    elif runtime.waiting:  # no converted model yet, and this server cannot convert (runtime.py)
        return JSONResponse({"ready": False, "reason": "waiting", "message": runtime.waiting},
                            status_code=503, headers={"Retry-After": "5"})
    elif runtime.load_error:
        reason = "error"
    elif fault:
        reason = "wedged"
    else:
        reason = "loading"
    return JSONResponse({"ready": False, "reason": reason, "message": fault or reason},
                        status_code=503, headers={"Retry-After": "5"})


def _prefers_json(accept: str) -> bool:
    """JSON only for a client that prefers it to the Prometheus text: `Accept: application/json`
    does, kubectl's `application/json, */*` (`kubectl get --raw .../proxy/metrics`) and
    Prometheus' own header do not."""
    weights: dict[str, float] = {}
    for part in accept.split(","):
        media, *params = (p.strip().lower() for p in part.split(";"))
        q = next((p[2:] for p in params if p.startswith("q=")), "1")
        try:
            weights[media] = max(weights.get(media, 0.0), float(q))
        except ValueError:
            continue
    text = max(weights.get(m, 0.0) for m in ("text/plain", "application/openmetrics-text", "*/*"))
    return weights.get("application/json", 0.0) > text


@router.get("/metrics", tags=["probes"], summary="Prometheus text; the JSON summary with Accept: application/json",
            responses={200: {"content": {"text/plain": {"schema": {"type": "string"}},
                                         "application/json": {"schema": {"type": "object"}}}},
                       401: {"model": ErrorResponse, "description": "RERANKER_PROTECT_METRICS and no valid key"}})
async def metrics(request: Request) -> Response:
    runtime = _runtime(request)
    if runtime.settings.protect_metrics:
        _authorize(request, runtime)
    if _prefers_json(request.headers.get("accept", "")):
        return JSONResponse({**runtime.metrics.summary(), "controller": runtime.admission.controller()})
    return PlainTextResponse(generate_latest(runtime.metrics.registry), media_type=CONTENT_TYPE_LATEST)

"""Routes of other servers' APIs that rerank clients call: NVIDIA NIM's ranking, vLLM's score API,
OpenAI's model list and TEI's `/info`.

A client pointed at this server in place of a NIM, a vLLM or a TEI finds the routes it probes and
posts to, with their shapes (schemas.py), so it works unchanged (docs/clients.md). Each route reuses
the pipeline of the rerank routes (`routes.py`: reading, limits, model names, ranking), so limits,
errors and scores are the same on every route.
"""

from __future__ import annotations

import time
import uuid
from types import SimpleNamespace
from typing import Any

from fastapi import APIRouter, Depends, Request

from . import __version__
from .chunking import Split
from .routes import (_ERRORS, _activate, _authorize, _check_size, _in_flight, _openapi, _order, _rank, _read_json,
                     _runtime, _served_model, _validate)
from .runtime import Runtime
from .schemas import (ModelList, NIMRankingRequest, NIMRankingResponse, ScoreRequest, ScoreResponse, TEIInfo)

router = APIRouter()

#: When this process started: the `created` of the models it lists (OpenAI's field: seconds since the epoch).
_STARTED = int(time.time())


async def _nim_rank(request: Request, path_model: str | None) -> dict[str, Any]:
    runtime = _runtime(request)
    _authorize(request, runtime)
    req = _validate(NIMRankingRequest, await _read_json(request, runtime.settings.max_body_bytes))
    _check_size(runtime, SimpleNamespace(query=req.query.text, instruction=None), len(req.passages), "passages")
    _served_model(runtime, req.model or path_model)
    texts = [p.text for p in req.passages]
    raw, _ = await _rank(request, runtime, req.query.text, texts, Split(truncate=req.truncate == "END", field="passages"))
    # NIM answers logits (no activation), best first
    return {"rankings": [{"index": i, "logit": raw[i]} for i in _order(raw, req.top_k)]}


_NIM: dict[str, Any] = {"openapi_extra": _openapi(NIMRankingRequest), "tags": ["rerank"], "response_model": NIMRankingResponse,
        "dependencies": [Depends(_in_flight)], "responses": _ERRORS}


@router.post("/v1/ranking", summary="Rerank (NVIDIA NIM): rankings by logit, best first", **_NIM)
async def nim_ranking(request: Request) -> Any:
    return await _nim_rank(request, None)


@router.post("/v1/retrieval/{model:path}/reranking", summary="Rerank (NVIDIA's hosted NIM path, as LiteLLM's "
             "`nvidia_nim` and langchain-nvidia-ai-endpoints call it)", **_NIM)
async def nim_retrieval_reranking(request: Request, model: str) -> Any:
    return await _nim_rank(request, model.replace("_", "."))  # the hosted path spells llama-3.2 as llama-3_2


@router.post("/score", openapi_extra=_openapi(ScoreRequest), tags=["score"], response_model=ScoreResponse,
             summary="Score text pairs (vLLM's score API): text_1 against text_2, 1:N or N:N",
             dependencies=[Depends(_in_flight)], responses=_ERRORS)
@router.post("/v1/score", openapi_extra=_openapi(ScoreRequest), tags=["score"], response_model=ScoreResponse,
             summary="Score text pairs (vLLM's score API), as /score", dependencies=[Depends(_in_flight)],
             responses=_ERRORS)
async def score(request: Request) -> Any:
    runtime = _runtime(request)
    _authorize(request, runtime)
    req = _validate(ScoreRequest, await _read_json(request, runtime.settings.max_body_bytes))
    pairs = req.pairs()
    _check_size(runtime, SimpleNamespace(query=max((q for q, _ in pairs), key=len), instruction=None), len(pairs),
                "text_2")
    model = _served_model(runtime, req.model)
    # One ranking per distinct query (1:N is one), in order of first appearance.
    by_query: dict[str, list[int]] = {}
    for i, (query, _) in enumerate(pairs):
        by_query.setdefault(query, []).append(i)
    scores = [0.0] * len(pairs)
    tokens = 0
    for query, positions in by_query.items():
        raw, used = await _rank(request, runtime, query, [pairs[i][1] for i in positions], Split(field="text_2"))
        tokens += used
        for i, value in zip(positions, _activate(runtime, raw, False)):
            scores[i] = value
    return {"id": f"score-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()), "model": model,
            "data": [{"index": i, "object": "score", "score": s} for i, s in enumerate(scores)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0}}


def _names(runtime: Runtime) -> list[str]:
    loaded = runtime.backend_info.model
    return [loaded, *sorted(runtime.model_names - {loaded})]


@router.get("/v1/models", tags=["models"], response_model=ModelList,
            summary="The served model names (OpenAI's list): the loaded model's id, then RERANKER_SERVED_MODEL_NAMES",
            responses={401: _ERRORS[401]})
async def models(request: Request) -> Any:
    runtime = _runtime(request)
    _authorize(request, runtime)
    info = runtime.backend_info
    return {"object": "list", "data": [{"id": name, "object": "model", "created": _STARTED, "owned_by": "reranker-fleet",
                                        "root": info.model, "max_model_len": info.max_length}
                                       for name in _names(runtime)]}


@router.get("/info", tags=["models"], response_model=TEIInfo, summary="What is served (TEI's /info)",
            responses={401: _ERRORS[401]})
async def info(request: Request) -> Any:
    runtime = _runtime(request)
    _authorize(request, runtime)
    served = runtime.backend_info
    settings = runtime.settings
    batcher = runtime.batcher
    return {"model_id": served.model, "model_sha": served.revision or None, "model_dtype": served.dtype,
            "model_type": {"reranker": {"id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}}},
            "max_concurrent_requests": settings.max_concurrent_requests, "max_input_length": served.max_length,
            "max_batch_tokens": batcher.max_batch_tokens if batcher is not None else 0,
            "max_batch_requests": None, "max_client_batch_size": settings.max_documents, "auto_truncate": True,
            "tokenization_workers": 1, "version": __version__}

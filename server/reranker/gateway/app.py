"""The gateway's application factory: settings and a directory in, a FastAPI app out.

Every rerank route a server has is a route here (the same paths, so a client changes only its base
URL), plus `GET /v1/models` over every fleet, and the gateway's own probes and metrics. The
lifespan owns the directory and the connection pools.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .. import __version__
from .dialects import RANKING_PATHS
from .directory import Directory, Fleet
from .proxy import Gateway
from .settings import GatewaySettings

_STARTED = int(time.time())


def _route(path: str) -> Any:
    async def forward(request: Request) -> Response:
        gateway: Gateway = request.app.state.gateway
        return await gateway.handle(request, path)

    forward.__name__ = "rerank_" + path.strip("/").replace("/", "_")
    return forward


async def _max_length(fleet: Fleet, cache: dict[tuple[str, str], int]) -> int:
    """The fleet's max_model_len, as one of its servers lists it (0 while none is ready)."""
    key = (fleet.namespace, fleet.name)
    if key not in cache and fleet.endpoints:
        try:
            async with httpx.AsyncClient(base_url=fleet.endpoints[0].url, timeout=2, trust_env=False) as client:
                cards = (await client.get("/v1/models")).json()["data"]
            cache[key] = int(cards[0]["max_model_len"])
        except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError):
            return 0
    return cache.get(key, 0)


def create_app(settings: GatewaySettings, directory: Directory) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await directory.start()
        gateway = Gateway(settings, directory)
        app.state.gateway = gateway
        try:
            yield
        finally:
            await gateway.close()
            await directory.stop()

    app = FastAPI(title="Reranker gateway", version=__version__, lifespan=lifespan,
                  description="One door to every reranker fleet: routes by `model`, balances by load, fans large "
                  "requests out, holds requests while a fleet wakes from zero.")
    for path in RANKING_PATHS:
        app.add_api_route(path, _route(path), methods=["POST"], tags=["rerank"], include_in_schema=True)

    @app.post("/v1/retrieval/{model:path}/reranking", tags=["rerank"])
    async def nim_hosted(request: Request, model: str) -> Response:
        gateway: Gateway = request.app.state.gateway
        return await gateway.handle(request, "/v1/ranking", path_model=model.replace("_", "."))

    lengths: dict[tuple[str, str], int] = {}

    @app.get("/v1/models", tags=["models"])
    async def models(request: Request) -> Any:
        gateway: Gateway = request.app.state.gateway
        names = gateway.router.names()
        fleets = {(f.namespace, f.name): f for f in names.values()}
        found = await asyncio.gather(*(_max_length(f, lengths) for f in fleets.values()))
        length = dict(zip(fleets, found))
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": _STARTED, "owned_by": "reranker-fleet",
             "root": fleet.served_names[0], "max_model_len": length[(fleet.namespace, fleet.name)]}
            for name, fleet in sorted(names.items())]}

    @app.get("/health", tags=["probes"])
    async def health(request: Request) -> Any:
        gateway: Gateway = request.app.state.gateway
        return {"status": "healthy", "version": __version__, "held_requests": gateway.holds.held,
                "fleets": [{"namespace": f.namespace, "name": f.name, "served_names": list(f.served_names),
                            "endpoints": [{"name": e.name, "url": e.url, "load": gateway.loads.load(e)}
                                          for e in f.endpoints],
                            "replicas": f.replicas, "can_wake": f.can_wake} for f in directory.fleets()]}

    @app.get("/ready", tags=["probes"])
    async def ready(request: Request) -> Any:
        if getattr(request.app.state, "gateway", None) is None:
            return JSONResponse({"ready": False, "reason": "starting"}, status_code=503, headers={"Retry-After": "1"})
        # A directory that has not listed its fleets yet would answer every model 404: not Ready until it has.
        if not getattr(directory, "synced", True):
            return JSONResponse({"ready": False, "reason": "syncing"}, status_code=503, headers={"Retry-After": "1"})
        return {"ready": True}

    @app.get("/metrics", tags=["probes"])
    async def metrics(request: Request) -> Response:
        gateway: Gateway = request.app.state.gateway
        return PlainTextResponse(generate_latest(gateway.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app

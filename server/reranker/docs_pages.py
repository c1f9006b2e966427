"""The interactive API docs (/docs: Swagger UI, /redoc: ReDoc), served with their assets from here.

FastAPI's own pages load Swagger UI and ReDoc from a CDN: in an air-gapped cluster they are a
blank page. The assets ship in the `fastapi-offline` package (a dependency of the `server`
extra); this module serves its files under /docs-assets and builds both pages against them,
with no Google fonts. With RERANKER_PROTECT_DOCS the pages and /openapi.json are behind the API
keys (the assets hold nothing of this server, so they stay open).
"""

from __future__ import annotations

from importlib.resources import files
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles

#: Where the Swagger UI and ReDoc files are served from.
ASSETS = "/docs-assets"


def _assets_dir() -> str:
    return str(files("fastapi_offline") / "static")


def _authorize_if(request: Request, protect: bool) -> None:
    if protect:
        request.app.state.runtime.api_keys.authorize(request.headers.get("authorization"))


def install(app: FastAPI, *, protect: bool) -> None:
    """Serve /docs, /redoc (and, when `protect`, /openapi.json behind the keys) on `app`, which
    must be built with `docs_url=None, redoc_url=None` (and `openapi_url=None` when `protect`)."""
    app.mount(ASSETS, StaticFiles(directory=_assets_dir()), name="docs-assets")
    router = APIRouter(include_in_schema=False)

    if protect:
        @router.get("/openapi.json")
        async def openapi_schema(request: Request) -> Any:
            _authorize_if(request, protect)
            return JSONResponse(request.app.openapi())

    @router.get("/docs")
    async def swagger_ui(request: Request) -> Response:
        _authorize_if(request, protect)
        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{request.app.title} - docs",
                                   swagger_js_url=f"{ASSETS}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{ASSETS}/swagger-ui.css",
                                   swagger_favicon_url=f"{ASSETS}/favicon.png")

    @router.get("/redoc")
    async def redoc(request: Request) -> Response:
        _authorize_if(request, protect)
        return get_redoc_html(openapi_url="/openapi.json", title=f"{request.app.title} - ReDoc",
                              redoc_js_url=f"{ASSETS}/redoc.standalone.js", redoc_favicon_url=f"{ASSETS}/favicon.png",
                              with_google_fonts=False)

    app.include_router(router)

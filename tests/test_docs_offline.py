"""/docs and /redoc render with no network: headless Chromium (Debian's `chromium`) loads each page
from a real `reranker serve` process with every host but the server's unresolvable, and the
rendered DOM must list the operations (Swagger UI) or name them (ReDoc).

Before, FastAPI's pages loaded Swagger UI and ReDoc from a CDN: blank in an air-gapped cluster.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from servers import ServerProcess

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def server(module_server_factory: Callable[..., ServerProcess]) -> ServerProcess:
    return module_server_factory()


def render(url: str, profile: Path) -> str:
    """The DOM after the page's scripts ran, fetched by a browser that can reach only 127.0.0.1."""
    assert CHROMIUM is not None, "Debian's chromium is not installed: hack/install-system-deps (make system-deps)"
    out = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--no-first-run", "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}",
         # no network but the server: any other host (a CDN, Google fonts) fails to resolve
         "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1", "--proxy-server=direct://",
         "--virtual-time-budget=20000", "--dump-dom", url],
        capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_pages_reference_no_other_host(server: ServerProcess) -> None:
    for page in ("/docs", "/redoc"):
        html = httpx.get(server.url + page).text
        assert not re.findall(r"""(?:src|href)=["']?(?:https?:)?//""", html), html
        for asset in re.findall(r"""(?:src|href)=["']?(/docs-assets/[^"' >]+)""", html):
            assert httpx.get(server.url + asset).status_code == 200, asset


def test_swagger_ui_lists_the_operations_offline(server: ServerProcess, tmp_path: Path) -> None:
    dom = render(server.url + "/docs", tmp_path / "profile")
    paths = set(re.findall(r'data-path="([^"]+)"', dom))
    assert {"/rerank", "/v1/rerank", "/v2/rerank", "/v1/ranking", "/v1/score", "/v1/models", "/info"} <= paths, paths
    assert "opblock" in dom


def test_redoc_names_the_operations_offline(server: ServerProcess, tmp_path: Path) -> None:
    dom = render(server.url + "/redoc", tmp_path / "profile")
    assert "redoc-wrap" in dom or "api-content" in dom, dom[:2000]
    for path in ("/v1/rerank", "/v1/ranking", "/v1/score"):
        assert path in dom, path

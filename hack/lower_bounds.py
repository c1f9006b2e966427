"""Install every dependency at its declared lower bound in a fresh venv and run the unit tests.

pyproject.toml promises `name>=X`: this checks the promise. Each direct requirement of the
server, operator and dev extras is pinned to its lower bound through a pip constraints file
(`name==X`), so pip may not silently pick something newer; then the unit tests run against that
install. A bound the code does not work with fails here, not on a user's machine.

    python3 hack/lower_bounds.py            # or: make test-lower-bounds
    python3 hack/lower_bounds.py --keep     # reuse the venv of an earlier run

The venv lives in .lower-bounds/ (ignored by git). Downloads are large (PyTorch with its CUDA
libraries from PyPI), so this is not part of `make test`.
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
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
EXTRAS = ("server", "operator", "dev")
#: Unit tests: no Kubernetes control plane, no Redis, no subprocess servers.
UNIT_TESTS = ("tests/test_api.py", "tests/test_batcher.py", "tests/test_engine.py", "tests/test_fingerprint.py",
              "tests/test_parity.py", "tests/operator")


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", action="store_true", help="reuse .lower-bounds/venv if it exists")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (default: the unit tests)")
    args = parser.parse_args()

    work = REPO / ".lower-bounds"
    venv = work / "venv"
    python = venv / "bin" / "python"
    bounds = lower_bounds(REPO / "pyproject.toml", EXTRAS)
    work.mkdir(exist_ok=True)
    constraints = work / "constraints.txt"
    constraints.write_text("".join(f"{name}=={version}\n" for name, version in sorted(bounds.items())))
    print(f"{len(bounds)} lower bounds:", ", ".join(f"{n}=={v}" for n, v in sorted(bounds.items())), flush=True)

    started = time.monotonic()
    if not (args.keep and python.exists()):
        shutil.rmtree(venv, ignore_errors=True)
        run([sys.executable, "-m", "venv", str(venv)])
        run([str(python), "-m", "pip", "install", "--quiet", "--upgrade", "pip"])
        run([str(python), "-m", "pip", "install", "-c", str(constraints), f".[{','.join(EXTRAS)}]"], cwd=REPO)
    listed = subprocess.run([str(python), "-m", "pip", "list", "--format=json"], capture_output=True, text=True,
                            check=True).stdout
    pinned = {canonicalize_name(d["name"]): d["version"] for d in json.loads(listed)}
    # Versions compare as versions ("29" is "29.0.0"); a bound that is not installed at all is drift too.
    drift = {n: (v, pinned.get(n)) for n, v in bounds.items()
             if n not in pinned or Version(pinned[n]) != Version(v)}
    if drift:
        print("not installed at the lower bound:", drift, file=sys.stderr)
        return 1
    install_s = time.monotonic() - started
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'server'}:{REPO / 'operator'}"}
    tests_started = time.monotonic()
    code = subprocess.run([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", *(args.pytest_args or UNIT_TESTS)],
                          cwd=REPO, env=env).returncode
    print(f"lower bounds: install {install_s:.0f}s, tests {time.monotonic() - tests_started:.0f}s, exit {code}")
    return code


if __name__ == "__main__":
    sys.exit(main())

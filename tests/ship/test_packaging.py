"""The package's metadata builds without setuptools deprecation warnings, with an SPDX license,
and every requirement has a lower bound that `make test-lower-bounds` installs and tests.

The build backend runs for real (setuptools' PEP 517 hook in a subprocess, as pip calls it).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tomllib
from pathlib import Path
from types import ModuleType

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]


def test_metadata_has_an_spdx_license_and_no_deprecation_warning(tmp_path: Path) -> None:
    code = ("import sys; from setuptools import build_meta; "
            "print(build_meta.prepare_metadata_for_build_wheel(sys.argv[1]))")
    proc = subprocess.run([sys.executable, "-W", "always", "-c", code, str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    # Setuptools 77-80.4 warn that they import their own pkg_resources: not about this metadata.
    ours = [line for line in output.splitlines() if "Deprecat" in line and "pkg_resources is deprecated" not in line]
    assert ours == [], output[-3000:]
    metadata = (tmp_path / proc.stdout.strip().splitlines()[-1] / "METADATA").read_text()
    assert "License-Expression: Apache-2.0" in metadata
    assert "License-File: LICENSE" in metadata


def _lower_bounds_job() -> ModuleType:
    """hack/lower_bounds.py (`make test-lower-bounds`), imported from its file: hack/ is no package."""
    spec = importlib.util.spec_from_file_location("lower_bounds", REPO / "hack" / "lower_bounds.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_every_requirement_has_a_lower_bound_the_lower_bounds_job_pins() -> None:
    job = _lower_bounds_job()
    extras: dict[str, list[str]] = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    # A reference to the project's own extra (`reranker-fleet[openvino]`) takes no version.
    unbounded = [f"{extra}: {line}" for extra, lines in extras.items() for line in lines
                 if canonicalize_name(Requirement(line).name) != "reranker-fleet"
                 and not any(spec.operator == ">=" for spec in Requirement(line).specifier)]
    assert unbounded == []
    assert {extra for step in job.PASSES for extra in step.extras} == set(extras)  # each is installed
    for step in job.PASSES:
        pinned = job.lower_bounds(REPO / "pyproject.toml", step.extras)
        for extra in step.extras:
            for line in extras[extra]:
                req = Requirement(line)
                if canonicalize_name(req.name) == "reranker-fleet":
                    assert req.extras <= set(step.extras), line  # its extras are pinned here
                elif req.marker is None or req.marker.evaluate():
                    assert canonicalize_name(req.name) in pinned, line
        missing = [path for path in step.tests if not (REPO / path).exists()]
        assert missing == []


def test_a_name_in_several_extras_is_pinned_at_the_highest_bound(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text(
        '[project]\nname = "x"\nversion = "0"\n[project.optional-dependencies]\n'
        'a = ["Kubernetes>=30.1", "PyYAML>=6"]\nb = ["kubernetes>=29", "never>=1; sys_platform == \'no-such-os\'"]\n')
    assert _lower_bounds_job().lower_bounds(tmp_path / "pyproject.toml", ("a", "b")) == \
        {"kubernetes": "30.1", "pyyaml": "6"}

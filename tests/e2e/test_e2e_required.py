"""CI's green means the end-to-end tests ran: with RERANKER_E2E_REQUIRED=1 (what `.ci/run`
sets) a skip of a test under tests/e2e (the test's own, or its fixture's, as `node_cluster`
skips without a node) fails the run; without it the same tests skip.

A pytest run in a subprocess on two tests that skip, with tests/e2e/e2e_required.py loaded as
tests/e2e/conftest.py loads it; no node is needed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

E2E = Path(__file__).resolve().parent
REPO = E2E.parents[1]

SKIPPING = '''
import pytest

@pytest.fixture
def node():
    pytest.skip("no Kubernetes node: not root")

def test_needs_a_node(node):
    pass

def test_skips_itself():
    pytest.skip("this machine's node is in use")
'''


def run(tmp_path: Path, required: str | None) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_skipping.py").write_text(SKIPPING)
    env = {k: v for k, v in os.environ.items() if k != "RERANKER_E2E_REQUIRED"}
    if required is not None:
        env["RERANKER_E2E_REQUIRED"] = required
    env["PYTHONPATH"] = os.pathsep.join([str(E2E), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "e2e_required", "-q", "-rA",
                           "-p", "no:cacheprovider", "--rootdir", str(tmp_path),
                           str(tmp_path / "test_skipping.py")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("required", [None, "0"])
def test_without_the_variable_the_tests_skip(tmp_path: Path, required: str | None) -> None:
    r = run(tmp_path, required)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 skipped" in r.stdout, r.stdout


def test_with_it_every_skip_fails_with_its_reason(tmp_path: Path) -> None:
    r = run(tmp_path, "1")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "1 failed" in r.stdout and "1 error" in r.stdout, r.stdout  # the fixture's: setup
    assert "skipped" not in r.stdout.splitlines()[-1], r.stdout
    for reason in ("no Kubernetes node: not root", "this machine's node is in use"):
        assert (f"skipped, but RERANKER_E2E_REQUIRED=1 (the end-to-end tests must run here): "
                f"{reason}") in r.stdout, r.stdout


def test_ci_requires_the_end_to_end_tests() -> None:
    ci = (REPO / ".ci" / "run").read_text()
    assert "export RERANKER_E2E_REQUIRED=1" in ci, ci
    assert ci.index("export RERANKER_E2E_REQUIRED=1") < ci.index("make test"), ci

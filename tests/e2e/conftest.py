"""End-to-end tests on a real node (tests/kubecluster.py's `node_cluster`): images built by
`make images`, the chart's operator running as a pod, server pods serving through a Service.

Tests marked `own_node` bring up and tear down a node of their own, so they run first, before
the session's node exists (the node is one per machine). Where the machine has no node these
tests skip, unless RERANKER_E2E_REQUIRED=1 (`.ci/run`) makes every skip a failure
(e2e_required.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from e2e_required import pytest_runtest_makereport  # noqa: F401  (a skip fails in CI)
from kubecluster import KubeCluster
from operator_process import Operator, bind_rbac

REPO = Path(__file__).resolve().parents[2]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "own_node: brings up a node of its own; runs before the session's node")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.get_closest_marker("own_node") is None)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Build (or find cached) Prometheus and prometheus-adapter before any test runs when a
    collected test uses the metrics path: a cold build takes minutes (docs/autoscaling.md) and
    must not count against a test's timeout. A failure shows in `metrics_path`'s setup."""
    if session.config.option.collectonly or not any(
            "metrics_path" in getattr(item, "fixturenames", ()) for item in session.items):
        return
    capman = session.config.pluginmanager.getplugin("capturemanager")
    with capman.global_and_fixture_disabled() if capman else contextlib.nullcontext():
        subprocess.run([sys.executable, str(REPO / "hack" / "cluster"), "metrics", "build"],
                       stdout=subprocess.DEVNULL)


# --- fixtures of the fleet tests that run the operator on the host ------------------------------
# (tests/e2e/test_autoscaling.py, test_macs_in_service.py: the operator process is what the
# tests/kube tests run, with short probe periods; the chart-installed operator pod is
# tests/e2e/test_fleet.py's subject)

SERVER_IMAGE = "reranker-fleet/server:dev"  # `make images`
CRDS = sorted((REPO / "crds").glob("*.yaml"))
#: A dead external endpoint is not ready after 2 failed probes 0.5 s apart, each given 1 s.
PROBE_ENV = {"RERANKER_OPERATOR_PROBE_PERIOD_SECONDS": "0.5",
             "RERANKER_OPERATOR_PROBE_TIMEOUT_SECONDS": "1",
             "RERANKER_OPERATOR_PROBE_FAILURE_THRESHOLD": "2",
             "RERANKER_OPERATOR_PROBE_SUCCESS_THRESHOLD": "1"}


@pytest.fixture
def e2e_namespace(node_cluster: KubeCluster, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace on the node's cluster, deleted (without waiting) afterwards."""
    stem = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    name = f"e2e-{stem}-{secrets.token_hex(3)}"
    node_cluster.kubectl("create", "namespace", name)
    try:
        yield name
    finally:
        node_cluster.kubectl("delete", "namespace", name, "--wait=false", "--ignore-not-found",
                             check=False)


@pytest.fixture
def host_operator(node_cluster: KubeCluster, e2e_namespace: str, tmp_path: Path,
                  monkeypatch: pytest.MonkeyPatch) -> Iterator[Operator]:
    """reranker-operator for `e2e_namespace` as a host process, as the ServiceAccount bound
    to operator/rbac/, rendering pods from the `make images` server image."""
    for path in CRDS:
        node_cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(path))
    node_cluster.wait_established(*(a for p in CRDS for a in ("-f", str(p))))
    for key, value in {**PROBE_ENV, "RERANKER_OPERATOR_SERVER_IMAGE": SERVER_IMAGE}.items():
        monkeypatch.setenv(key, value)
    kubeconfig, cleanup = bind_rbac(node_cluster, e2e_namespace)
    with Operator(node_cluster, e2e_namespace, kubeconfig,
                  tmp_path / "operator.log").running(cleanup, tail=4000) as op:
        yield op


@pytest.fixture(scope="session")
def metrics_path(node_cluster: KubeCluster) -> Iterator[dict[str, Any]]:
    """Prometheus and prometheus-adapter serving custom.metrics.k8s.io for the node's cluster
    (`hack/cluster metrics up`, hack/devcluster/metrics.py); stopped at the end."""
    env = dict(os.environ, RERANKER_CLUSTER_DIR=str(node_cluster.dir))
    r = subprocess.run([sys.executable, str(REPO / "hack" / "cluster"), "metrics", "up"],
                       env=env, capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        pytest.fail(f"hack/cluster metrics up exited {r.returncode}:\n{r.stderr[-3000:]}",
                    pytrace=False)
    try:
        yield dict(json.loads(r.stdout))
    finally:
        subprocess.run([sys.executable, str(REPO / "hack" / "cluster"), "metrics", "down"],
                       env=env, capture_output=True, text=True, timeout=120)

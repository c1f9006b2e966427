"""The operator most tests/kube modules run: a real subprocess for `kube_namespace`, as the
ServiceAccount bound to exactly operator/rbac/'s rules, with the RerankerDeployment CRD installed.
(test_operator.py and test_external_endpoints.py define their own `operator`, which wins there.)
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from operator_process import Operator, bind_rbac

CRD = Path(__file__).resolve().parents[2] / "crds" / "rerankerdeployments.reranker.dev.yaml"


@pytest.fixture
def operator(kube_cluster: Any, kube_namespace: str, tmp_path: Path) -> Iterator[Operator]:
    kube_cluster.install_crd(CRD, "rerankerdeployments.reranker.dev")
    kubeconfig, cleanup = bind_rbac(kube_cluster, kube_namespace)
    with Operator(kube_cluster, kube_namespace, kubeconfig,
                  tmp_path / "operator.log").running(cleanup) as op:
        yield op

"""spec.model.servedNames on a real control plane: the API server's rules, the operator's status
and `kubectl get rrd`'s Models column (what a user and a gateway see).

The operator runs as a real subprocess with exactly operator/rbac/'s rules; there is no node,
so no pod runs: the names come from the spec, as the pods would get them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from operator_process import Operator

REPO = Path(__file__).resolve().parents[2]
CRD = REPO / "crds" / "rerankerdeployments.reranker.dev.yaml"


def rrd(name: str, model: dict[str, Any]) -> str:
    return json.dumps({"apiVersion": "reranker.dev/v1alpha1", "kind": "RerankerDeployment",
                       "metadata": {"name": name}, "spec": {"model": model}})


def test_served_names_reach_the_status_the_column_and_the_pods(
        operator: Operator, kube_cluster: Any, kube_namespace: str) -> None:
    ns = kube_namespace
    kube_cluster.apply(rrd("bge", {"id": "BAAI/bge-reranker-v2-m3",
                                   "servedNames": ["bge-m3", "multilingual"]}), namespace=ns)
    kube_cluster.apply(rrd("plain", {"id": "cross-encoder/ms-marco-MiniLM-L-6-v2"}), namespace=ns)

    def names(name: str) -> list[str] | None:
        return kube_cluster.get_json("rrd", name, "-n", ns).get("status", {}).get("servedNames")

    assert kube_cluster.eventually(lambda: names("bge"), timeout=20) == [
        "BAAI/bge-reranker-v2-m3", "bge-m3", "multilingual"]
    assert kube_cluster.eventually(lambda: names("plain"), timeout=20) == [
        "cross-encoder/ms-marco-MiniLM-L-6-v2"]
    table = kube_cluster.kubectl("get", "rrd", "-n", ns).stdout
    print(table)
    header, *rows = table.splitlines()
    assert header.split()[:2] == ["NAME", "MODELS"]
    row = next(r for r in rows if r.startswith("bge "))
    assert '["BAAI/bge-reranker-v2-m3","bge-m3","multilingual"]' in row
    config = kube_cluster.get_json("configmap", "bge-config", "-n", ns)["data"]
    assert config["RERANKER_SERVED_MODEL_NAMES"] == "BAAI/bge-reranker-v2-m3,bge-m3,multilingual"
    assert "RERANKER_SERVED_MODEL_NAMES" not in kube_cluster.get_json(
        "configmap", "plain-config", "-n", ns)["data"]

    # An alias change reaches the pods (settings hash: a rollout) and the status.
    kube_cluster.kubectl("patch", "rrd", "bge", "-n", ns, "--type=merge", "-p",
                         json.dumps({"spec": {"model": {"servedNames": ["bge-m3"]}}}))
    assert kube_cluster.eventually(lambda: names("bge") == ["BAAI/bge-reranker-v2-m3", "bge-m3"],
                                   timeout=20)


@pytest.mark.parametrize(("aliases", "message"), [
    (["a", "a"], "Duplicate value"),
    ([""], "should be at least 1 chars long"),
    (["a,b"], "should match"),
    ([f"n{i}" for i in range(17)], "must have at most 16 items"),
])
def test_the_api_server_refuses_bad_aliases(kube_cluster: Any, kube_namespace: str,
                                            aliases: list[str], message: str) -> None:
    kube_cluster.install_crd(CRD, "rerankerdeployments.reranker.dev")
    r = kube_cluster.kubectl("apply", "-n", kube_namespace, "-f", "-", check=False,
                             input=rrd("bad", {"id": "m", "servedNames": aliases}))
    assert r.returncode != 0 and message in r.stderr, r.stderr

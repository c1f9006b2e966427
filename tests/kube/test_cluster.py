"""The development control plane behaves like a real cluster, driven by kubectl as a user would.

Covers: CRD served (Established), schema + CEL validation messages from the API server,
printer columns in `kubectl get`, RBAC for a ServiceAccount, garbage collection by the
controller-manager, and a warm `hack/cluster up` / `down` cycle (timed).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

HACK_CLUSTER = Path(__file__).resolve().parents[2] / "hack" / "cluster"

GROUP = "clustertest.reranker.dev"
CRD_NAME = f"widgets.{GROUP}"

CRD = f"""
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: {CRD_NAME}
spec:
  group: {GROUP}
  scope: Namespaced
  names: {{plural: widgets, singular: widget, kind: Widget, shortNames: [wdg]}}
  versions:
  - name: v1
    served: true
    storage: true
    additionalPrinterColumns:
    - {{name: Size, type: string, jsonPath: .spec.size}}
    - {{name: Replicas, type: integer, jsonPath: .spec.replicas}}
    - {{name: Age, type: date, jsonPath: .metadata.creationTimestamp}}
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            required: [size]
            properties:
              size: {{type: string, enum: [small, large]}}
              replicas: {{type: integer, minimum: 0, maximum: 10}}
              minReplicas: {{type: integer, minimum: 0}}
              maxReplicas: {{type: integer, minimum: 0}}
            x-kubernetes-validations:
            - rule: >-
                !has(self.minReplicas) || !has(self.maxReplicas) ||
                self.minReplicas <= self.maxReplicas
              message: minReplicas must not exceed maxReplicas
"""


def widget(name: str, **spec) -> str:
    return json.dumps({"apiVersion": f"{GROUP}/v1", "kind": "Widget",
                       "metadata": {"name": name}, "spec": spec})


@pytest.fixture(scope="module")
def widget_crd(kube_cluster) -> Iterator[str]:
    kube_cluster.apply(CRD)
    kube_cluster.wait_established(f"crd/{CRD_NAME}")
    yield CRD_NAME
    kube_cluster.kubectl("delete", "crd", CRD_NAME, "--wait=false", "--ignore-not-found",
                         check=False)


def test_kubectl_matches_server_version(kube_cluster):
    v = json.loads(kube_cluster.kubectl("version", "-o", "json").stdout)
    assert v["clientVersion"]["gitVersion"] == v["serverVersion"]["gitVersion"], v
    assert v["serverVersion"]["gitVersion"].startswith("v1."), v
    assert kube_cluster.server.startswith("https://127.0.0.1:")
    assert kube_cluster.kubectl("get", "--raw", "/readyz").stdout.strip() == "ok"


def test_crd_is_established_and_served(kube_cluster, widget_crd: str):
    crd = kube_cluster.get_json("crd", widget_crd)
    conds = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
    assert conds.get("Established") == "True", conds
    assert conds.get("NamesAccepted") == "True", conds
    # discovery serves it: kubectl resolves the plural, kind and short name
    res = kube_cluster.kubectl("api-resources", f"--api-group={GROUP}", "-o", "name").stdout
    assert f"widgets.{GROUP}" in res.split()


def test_get_uses_printer_columns(kube_cluster, widget_crd: str,
                                  kube_namespace: str):
    ns = kube_namespace
    kube_cluster.apply(widget("alpha", size="small", replicas=3), namespace=ns)
    kube_cluster.apply(widget("beta", size="large", replicas=7), namespace=ns)
    out = kube_cluster.kubectl("get", "widgets", "-n", ns).stdout
    lines = [line.split() for line in out.strip().splitlines()]
    assert lines[0] == ["NAME", "SIZE", "REPLICAS", "AGE"], out
    rows = {cols[0]: cols[1:3] for cols in lines[1:]}
    assert rows == {"alpha": ["small", "3"], "beta": ["large", "7"]}, out
    # short name works too
    assert "alpha" in kube_cluster.kubectl("get", "wdg", "alpha", "-n", ns).stdout


def test_schema_violation_is_rejected_with_server_message(kube_cluster,
                                                          widget_crd: str, kube_namespace: str):
    r = kube_cluster.kubectl("apply", "-n", kube_namespace, "-f", "-",
                             input=widget("too-big", size="small", replicas=50), check=False)
    assert r.returncode != 0
    assert 'Widget "too-big" is invalid' in r.stderr, r.stderr
    assert "spec.replicas: Invalid value: 50" in r.stderr, r.stderr
    assert "should be less than or equal to 10" in r.stderr, r.stderr

    r = kube_cluster.kubectl("apply", "-n", kube_namespace, "-f", "-",
                             input=widget("bad-enum", size="medium"), check=False)
    assert r.returncode != 0
    assert 'spec.size: Unsupported value: "medium"' in r.stderr, r.stderr

    r = kube_cluster.kubectl("apply", "-n", kube_namespace, "-f", "-",
                             input=widget("no-size", replicas=1), check=False)
    assert r.returncode != 0
    assert "spec.size: Required value" in r.stderr, r.stderr
    # nothing was stored
    assert kube_cluster.kubectl("get", "widgets", "-n", kube_namespace, "-o", "name"
                                ).stdout.strip() == ""


def test_cel_rule_is_enforced(kube_cluster, widget_crd: str, kube_namespace: str):
    r = kube_cluster.kubectl("apply", "-n", kube_namespace, "-f", "-",
                             input=widget("inverted", size="small", minReplicas=5, maxReplicas=2),
                             check=False)
    assert r.returncode != 0
    assert "minReplicas must not exceed maxReplicas" in r.stderr, r.stderr
    # the same rule lets a valid object through
    kube_cluster.apply(widget("ok", size="small", minReplicas=1, maxReplicas=2),
                       namespace=kube_namespace)


def test_rbac_refuses_then_allows_service_account(kube_cluster, kube_namespace: str):
    ns = kube_namespace
    kube_cluster.kubectl("create", "serviceaccount", "reader", "-n", ns)
    kube_cluster.kubectl("create", "configmap", "settings", "-n", ns, "--from-literal=a=1")
    sa_cfg = kube_cluster.mint_kubeconfig(ns, "reader")

    who = kube_cluster.kubectl("auth", "whoami", "-o", "jsonpath={.status.userInfo.username}",
                               kubeconfig=sa_cfg).stdout
    assert who == f"system:serviceaccount:{ns}:reader"

    r = kube_cluster.kubectl("get", "configmaps", "-n", ns, kubeconfig=sa_cfg, check=False)
    assert r.returncode != 0
    assert "Forbidden" in r.stderr, r.stderr
    assert (f'User "system:serviceaccount:{ns}:reader" cannot list resource "configmaps" '
            f'in API group "" in the namespace "{ns}"') in r.stderr, r.stderr

    kube_cluster.kubectl("create", "role", "cm-reader", "-n", ns, "--verb=get,list,watch",
                         "--resource=configmaps")
    kube_cluster.kubectl("create", "rolebinding", "reader-cm-reader", "-n", ns,
                         "--role=cm-reader", f"--serviceaccount={ns}:reader")

    def allowed():
        return kube_cluster.kubectl("get", "configmap", "settings", "-n", ns, "-o", "name",
                                    kubeconfig=sa_cfg).stdout.strip() == "configmap/settings"
    kube_cluster.eventually(allowed, timeout=30, desc="the RoleBinding to take effect")

    # the Role grants only reads, and only in this namespace
    r = kube_cluster.kubectl("delete", "configmap", "settings", "-n", ns, kubeconfig=sa_cfg,
                             check=False)
    assert r.returncode != 0 and "Forbidden" in r.stderr, r.stderr
    r = kube_cluster.kubectl("get", "configmaps", "-n", "default", kubeconfig=sa_cfg, check=False)
    assert r.returncode != 0 and "Forbidden" in r.stderr, r.stderr
    assert kube_cluster.kubectl("auth", "can-i", "list", "configmaps", "-n", ns,
                                kubeconfig=sa_cfg, check=False).stdout.strip() == "yes"
    assert kube_cluster.kubectl("auth", "can-i", "create", "configmaps", "-n", ns,
                                kubeconfig=sa_cfg, check=False).stdout.strip() == "no"


def test_garbage_collector_deletes_owned_objects(kube_cluster, kube_namespace: str):
    assert kube_cluster.controller_manager, (
        "kube-controller-manager is not running (KUBEBUILDER_ASSETS without it?): "
        "no garbage collector")
    ns = kube_namespace
    kube_cluster.kubectl("create", "configmap", "owner", "-n", ns)
    uid = kube_cluster.get_json("configmap", "owner", "-n", ns)["metadata"]["uid"]
    kube_cluster.apply(json.dumps({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "owned", "ownerReferences": [{
            "apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": uid}]},
        "data": {"k": "v"},
    }), namespace=ns)
    kube_cluster.kubectl("create", "configmap", "bystander", "-n", ns)

    kube_cluster.kubectl("delete", "configmap", "owner", "-n", ns)

    def owned_gone():
        r = kube_cluster.kubectl("get", "configmap", "owned", "-n", ns, check=False)
        return r.returncode != 0 and "NotFound" in r.stderr
    kube_cluster.eventually(owned_gone, timeout=90, interval=0.5,
                            desc="the garbage collector to delete configmap/owned")
    kube_cluster.kubectl("get", "configmap", "bystander", "-n", ns)


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_warm_up_and_down(kube_cluster, tmp_path: Path):
    """A second control plane in its own state dir: warm `up` is fast; `down` leaves nothing."""
    env = dict(os.environ, RERANKER_CLUSTER_DIR=str(tmp_path / "c2"))
    hack = [sys.executable, str(HACK_CLUSTER)]
    t0 = time.monotonic()
    r = subprocess.run(hack + ["up", "--no-node"], env=env, capture_output=True, text=True,
                       timeout=300)
    elapsed = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    print(f"warm hack/cluster up: {elapsed:.1f}s (another control plane already running)")
    info = json.loads((tmp_path / "c2" / "cluster.json").read_text())
    try:
        assert info["server"] != kube_cluster.server
        out = subprocess.run([info["kubectl"], "get", "ns", "-o", "name"], capture_output=True,
                             text=True, env=dict(env, KUBECONFIG=info["kubeconfig"]))
        assert "namespace/default" in out.stdout.split(), out
        budget = float(os.environ.get("RERANKER_WARM_START_BUDGET_S", "15"))
        assert elapsed < budget, f"warm start took {elapsed:.1f}s (budget {budget}s)"
        # `up` again is a no-op while running
        again = subprocess.run(hack + ["up", "--no-node"], env=env, capture_output=True,
                               text=True, timeout=60)
        assert again.returncode == 0 and "already up" in again.stderr, again.stderr
    finally:
        pids = {}
        for f in (tmp_path / "c2" / "run").glob("*.pid"):
            pids[f.stem] = int(f.read_text())
        down = subprocess.run(hack + ["down"], env=env, capture_output=True, text=True,
                              timeout=120)
    assert down.returncode == 0, down.stderr
    assert set(pids) == {"etcd", "kube-apiserver", "kube-controller-manager"} or \
        not info["controller_manager"], pids
    for name, pid in pids.items():
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
        except OSError:
            continue
        assert state == "Z", f"{name} (pid {pid}) still running after down"
    for port in (info["ports"]["apiserver"], info["ports"]["etcd"]):
        assert not _port_open(port), f"port {port} still listening after down"
    assert not (tmp_path / "c2" / "etcd-data").exists()
    assert not (tmp_path / "c2" / "kubeconfig").exists()

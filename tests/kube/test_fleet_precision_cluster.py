"""One precision per fleet on a real control plane, with real servers: the operator polls the
server pods' /health, records what `auto` measured in the NAME-precision ConfigMap (the record
byte for byte as the server wrote it on disk) and in status.precision (and the Precision column),
and a later server that reads that ConfigMap's folder times nothing.

The control plane here has no node (`kube_cluster`): no pod runs. The server pods are therefore
real `reranker serve` processes on loopback (tests/servers.py), each represented by a Pod
object with the fleet's labels whose status (Ready, podIP 127.0.0.1) the test writes through
the API, as a kubelet would: the operator, on this machine, reaches the real server at that
address. The operator runs with exactly operator/rbac/'s rules.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from operator_process import Operator
from servers import ServerFactory, ServerProcess

from reranker_operator import manifests

REPO = Path(__file__).resolve().parents[2]
CRD = REPO / "crds" / "rerankerdeployments.reranker.dev.yaml"
NAME = "fleet"


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[ServerFactory]:
    factory = ServerFactory(tmp_path)
    yield factory
    factory.close()


def auto_server(servers: ServerFactory, cache: Path, **env: str) -> ServerProcess:
    """A server as the operator configures one: OpenVINO, RERANKER_QUANTIZATION=auto."""
    return servers({"RERANKER_RUNTIME": "openvino", "RERANKER_QUANTIZATION": "auto",
                    "RERANKER_MODEL_CACHE_DIR": str(cache), **env})


def precision_of(server: ServerProcess) -> dict[str, Any]:
    return dict(httpx.get(server.url + "/health", timeout=5).json()["model"]["precision_record"])


def stand_in_pod(cluster: Any, ns: str, pod: str, server: ServerProcess, owner_uid: str) -> None:
    """A Pod of the fleet whose address is the real server's (see the module's docstring), with
    the labels and annotations (config hash) of the Deployment's template, as its ReplicaSet
    would make it. Its controller is the RerankerDeployment, so that the fleet's ReplicaSet does
    not adopt (and then delete) it."""
    port = int(server.url.rsplit(":", 1)[1])
    template = cluster.get_json("deployment", NAME, "-n", ns)["spec"]["template"]["metadata"]
    cluster.apply(json.dumps({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": pod, "labels": template["labels"],
                     "annotations": template.get("annotations") or {}, "ownerReferences": [{
            "apiVersion": "reranker.dev/v1alpha1", "kind": "RerankerDeployment", "name": NAME,
            "uid": owner_uid, "controller": True}]},
        "spec": {"containers": [{
            "name": manifests.CONTAINER_NAME, "image": "reranker-fleet/server:dev",
            "ports": [{"name": manifests.PORT_NAME, "containerPort": port}]}]}}),
        namespace=ns)
    ready = {"status": {"phase": "Running", "podIP": "127.0.0.1", "podIPs": [{"ip": "127.0.0.1"}],
                        "conditions": [{"type": "Ready", "status": "True"}]}}
    cluster.kubectl("patch", "pod", pod, "-n", ns, "--subresource=status", "--type=merge",
                    "-p", json.dumps(ready))


def test_the_fleet_records_its_pick_and_a_later_server_reads_it(
        operator: Operator, kube_cluster: Any, kube_namespace: str, servers: ServerFactory,
        tmp_path: Path) -> None:
    ns = kube_namespace
    first_cache = tmp_path / "cache-a"
    first = auto_server(servers, first_cache)  # converts, then measures auto's candidates
    measured = precision_of(first)
    assert measured["origin"] == "measured"
    key = measured["key"]
    on_disk = (first_cache / "openvino" / f"precision-{key}.json").read_text()

    kube_cluster.apply(json.dumps({
        "apiVersion": "reranker.dev/v1alpha1", "kind": "RerankerDeployment",
        "metadata": {"name": NAME},
        "spec": {"model": {"id": "sentence-transformers/all-MiniLM-L6-v2"}, "device": "cpu",
                 "replicas": 1}}),
        namespace=ns)
    uid = kube_cluster.eventually(
        lambda: kube_cluster.get_json("rrd", NAME, "-n", ns)["metadata"].get("uid"), timeout=20)
    # Every server pod mounts the (optional) ConfigMap and is told where, from the start.
    template = kube_cluster.eventually(lambda: kube_cluster.get_json(
        "deployment", NAME, "-n", ns)["spec"]["template"]["spec"], timeout=20)
    assert {"name": "precision", "configMap": {"name": f"{NAME}-precision", "optional": True,
                                               "defaultMode": 420}} in template["volumes"]
    assert {"name": "precision", "mountPath": "/etc/reranker/precision",
            "readOnly": True} in template["containers"][0]["volumeMounts"]
    settings = kube_cluster.get_json("configmap", f"{NAME}-config", "-n", ns)["data"]
    assert settings["RERANKER_PRECISION_RECORD_DIR"] == "/etc/reranker/precision"
    assert kube_cluster.kubectl("get", "configmap", f"{NAME}-precision", "-n", ns,
                                check=False).returncode != 0, "no record yet, no ConfigMap"

    # The controller-manager creates the namespace's default ServiceAccount, which a pod needs.
    kube_cluster.eventually(lambda: kube_cluster.kubectl(
        "get", "serviceaccount", "default", "-n", ns, check=False).returncode == 0,
        timeout=30, desc="the default ServiceAccount")
    t0 = time.monotonic()
    stand_in_pod(kube_cluster, ns, f"{NAME}-a", first, uid)

    def records() -> dict[str, str] | None:
        r = kube_cluster.kubectl("get", "configmap", f"{NAME}-precision", "-n", ns, "-o", "json",
                                 check=False)
        return json.loads(r.stdout).get("data") if r.returncode == 0 else None
    data = kube_cluster.eventually(records, timeout=30, desc="the NAME-precision ConfigMap")
    print(f"ConfigMap {NAME}-precision {time.monotonic() - t0:.1f}s after the pod turned Ready")
    assert data == {f"{key}.json": on_disk}, "the record exactly as the server wrote it on disk"
    cm = kube_cluster.get_json("configmap", f"{NAME}-precision", "-n", ns)
    assert cm["metadata"]["ownerReferences"][0]["uid"] == uid
    # Each record with the config hash of the pods that serve it (a spec change drops the rest).
    config_hash = kube_cluster.get_json("rrd", NAME, "-n", ns)["status"]["configHash"]
    assert json.loads(cm["metadata"]["annotations"]["reranker.dev/precision-config-hashes"]) == {
        key: config_hash}

    def entries() -> list[dict[str, Any]] | None:
        return kube_cluster.get_json("rrd", NAME, "-n", ns).get("status", {}).get("precision")
    (entry,) = kube_cluster.eventually(entries, timeout=30, desc="status.precision")
    print("status.precision:", entry)
    assert entry["key"] == key and entry["pick"] == measured["plan"]
    assert (entry["measuredBy"], entry["measuredAt"]) == (measured["measured_by"],
                                                          measured["measured_at"])
    assert entry["cpu"].startswith(measured["cpu"]["model"])
    [row] = kube_cluster.table("rrd", NAME, "-n", ns)
    assert row["PRECISION"] == measured["plan"], row

    # A later server, its folder holding the ConfigMap's files as the kubelet mounts them, and
    # the converted graph from a seed folder without any record: it reads the fleet's pick.
    records_dir, seed = tmp_path / "precision", tmp_path / "seed"
    records_dir.mkdir()
    for file, text in data.items():
        (records_dir / file).write_text(text)
    shutil.copytree(first_cache / "openvino", seed / "openvino",
                    ignore=shutil.ignore_patterns("precision-*.json"))
    later = auto_server(servers, tmp_path / "cache-b",
                        RERANKER_PRECISION_RECORD_DIR=str(records_dir),
                        RERANKER_MODEL_SEED_DIRS=str(seed))
    read = precision_of(later)
    assert read["key"] == key and "RERANKER_PRECISION_RECORD_DIR" in read["origin"], read["origin"]
    assert (read["measured_by"], read["measured_at"]) == (measured["measured_by"],
                                                          measured["measured_at"])

    # It joins the fleet: still one entry, the same record. Then every pod goes (scaled to
    # zero): the record and the entry stay for the next pod.
    stand_in_pod(kube_cluster, ns, f"{NAME}-b", later, uid)
    time.sleep(12)  # two poll periods
    assert records() == data and entries() == [entry]
    kube_cluster.kubectl("delete", "pod", f"{NAME}-a", f"{NAME}-b", "-n", ns, "--wait=false",
                         "--grace-period=0", "--force")
    time.sleep(12)
    assert records() == data and entries() == [entry]

"""spec.model.cache on a real node, without the hub: a fleet of a small cross-encoder the test
makes (model.pvc, a hostPath PersistentVolume) with a cache volume (another hostPath PV, the
claim given as model.cache.claimName). The operator's fill Job (the torch image, `reranker
convert`) converts it into the volume and measures the precision; until then the fleet has no
pods; then its pods run the slim image (no PyTorch: they could not convert) and load the IR
from the volume, converting nothing.

Figures (run with -s): the Job's own report (seconds per phase, the precision pick) and the
pod's start parts from /health.
"""

from __future__ import annotations

import datetime
import json
import os
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import httpx
import pytest
from fleet import cluster_ip, condition, dump, wait_pods_ready
from kubecluster import KubeCluster
from models import build_tiny_bert

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ship"))
from helm_render import CHART, adopt_crds  # noqa: E402

IMAGES = {"operator": "reranker-fleet/operator:dev", "server": "reranker-fleet/server:dev",
          "server-torch": "reranker-fleet/server:dev-torch", "redis": "reranker-fleet/redis:dev"}
RELEASE = "rmc"


@pytest.fixture(scope="module")
def folders() -> Iterator[tuple[Path, Path]]:
    """(the tiny model's folder, the empty cache folder), readable and writable by the pods'
    user (10001): hostPath volumes on the node, which is this machine (fsGroup does not apply
    to hostPath)."""
    model = Path(tempfile.mkdtemp(prefix="e2e-cache-model-"))
    cache = Path(tempfile.mkdtemp(prefix="e2e-cache-volume-"))
    build_tiny_bert(model / "tiny-ce")
    for path in [model, *model.rglob("*")]:
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    os.chmod(cache, 0o777)
    yield model, cache
    shutil.rmtree(model, ignore_errors=True)
    shutil.rmtree(cache, ignore_errors=True)


def _t(stamp: str) -> float:
    """An RFC 3339 time of the API (whole seconds, UTC) as a Unix time."""
    return datetime.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(
        tzinfo=datetime.timezone.utc).timestamp()


def pv(name: str, path: Path, mode: str, ns: str, claim: str) -> str:
    return json.dumps({
        "apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": name},
        "spec": {"capacity": {"storage": "1Gi"}, "accessModes": [mode], "storageClassName": "",
                 "hostPath": {"path": str(path), "type": "Directory"},
                 "claimRef": {"namespace": ns, "name": claim}}})


def pvc(name: str, volume: str, mode: str) -> str:
    return json.dumps({
        "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": name},
        "spec": {"accessModes": [mode], "storageClassName": "", "volumeName": volume,
                 "resources": {"requests": {"storage": "1Gi"}}}})


def test_a_hubless_fill_then_slim_pods_that_convert_nothing(
        node_cluster: KubeCluster, folders: tuple[Path, Path]) -> None:
    model_dir, cache_dir = folders
    op_ns, ns = f"e2e-mcop-{secrets.token_hex(3)}", f"e2e-mc-{secrets.token_hex(3)}"
    pvs = (f"{ns}-model", f"{ns}-cache")
    for n in (op_ns, ns):
        node_cluster.kubectl("create", "namespace", n)
    config = helm.Config(kubeconfig_path=node_cluster.kubeconfig, namespace=op_ns)
    repo, tag = IMAGES["operator"].split(":")
    values = {"image": {"repository": repo, "tag": tag, "pullPolicy": "Never"},
              "serverImage": IMAGES["server"], "serverTorchImage": IMAGES["server-torch"],
              "redisImage": IMAGES["redis"], "watchNamespaces": [ns]}
    adopt_crds(node_cluster, RELEASE, op_ns)
    config.install(str(CHART), RELEASE, values, namespace=op_ns, timeout=120)
    try:
        wait_pods_ready(node_cluster, op_ns, "app.kubernetes.io/name=reranker-operator", 1,
                        timeout=180)
        node_cluster.apply(pv(pvs[0], model_dir, "ReadOnlyMany", ns, "tiny-model"))
        node_cluster.apply(pv(pvs[1], cache_dir, "ReadWriteOnce", ns, "tiny-cache"))
        node_cluster.apply(pvc("tiny-model", pvs[0], "ReadOnlyMany"), ns)
        node_cluster.apply(pvc("tiny-cache", pvs[1], "ReadWriteOnce"), ns)
        node_cluster.apply(json.dumps({
            "apiVersion": "reranker.dev/v1alpha1", "kind": "RerankerDeployment",
            "metadata": {"name": "tiny"},
            "spec": {"model": {"pvc": {"claimName": "tiny-model", "path": "tiny-ce"},
                               "cache": {"claimName": "tiny-cache"}},
                     "replicas": 1, "imagePullPolicy": "Never",
                     "resources": {"requests": {"cpu": "100m", "memory": "512Mi"},
                                   "limits": {"memory": "2Gi"}}}}), ns)

        def cached() -> dict[str, Any] | None:
            body = node_cluster.get_json("rrd", "tiny", "-n", ns)
            mc = condition(body, "ModelCached")
            assert mc.get("reason") != "Failed", dump(body)
            if mc.get("status") != "True":
                # no pods while the Job fills the volume
                assert (body.get("status") or {}).get("replicas", 0) == 0, dump(body)
                return None
            return body
        t0 = time.monotonic()
        body = node_cluster.eventually(cached, timeout=420, interval=1, desc="ModelCached")
        fill = time.monotonic() - t0
        result = body["status"]["modelCache"].get("result") or {}
        print(f"fill: ModelCached after {fill:.0f} s; the Job reported "
              f"{json.dumps(result, sort_keys=True)[:600]}")
        assert result, dump(body)

        def ready() -> dict[str, Any] | None:
            b = node_cluster.get_json("rrd", "tiny", "-n", ns)
            return b if condition(b, "Ready").get("status") == "True" else None
        node_cluster.eventually(ready, timeout=300, interval=1, desc="tiny Ready")
        (pod,) = node_cluster.get_json("pods", "-n", ns, "-l", "app.kubernetes.io/instance=tiny,"
                                       "app.kubernetes.io/component=server")["items"]
        assert pod["spec"]["containers"][0]["image"] == IMAGES["server"]  # the slim image
        ip, port = cluster_ip(node_cluster, ns, "tiny")
        url = f"http://{ip}:{port}"
        health = httpx.get(f"{url}/health", timeout=10).json()
        seconds = (health.get("startup") or {}).get("seconds") or {}
        print(f"slim pod start parts: {json.dumps(seconds, sort_keys=True)}")
        assert seconds.get("convert", 0) == 0  # the IR came from the volume
        # Fast Ready: the pod's Ready condition follows the server's own ready_at within the
        # readiness probe's 1 s period (+1 s: the condition's time has whole seconds).
        pod = node_cluster.get_json("pod", pod["metadata"]["name"], "-n", ns)
        started = pod["status"]["containerStatuses"][0]["state"]["running"]["startedAt"]
        ready_at = _t(condition(pod, "Ready")["lastTransitionTime"])
        server_ready = float(health["startup"]["ready_at"])
        print(f"slim pod: container started -> Ready {ready_at - _t(started):.0f} s; server "
              f"ready -> pod Ready {ready_at - server_ready:+.2f} s")
        assert ready_at - server_ready <= 2.0
        answer = httpx.post(f"{url}/rerank", json={"query": "q", "documents": ["a", "b"]},
                            timeout=60)
        assert answer.status_code == 200, answer.text
    finally:
        log = node_cluster.kubectl("logs", "-n", op_ns, "-l",
                                   "app.kubernetes.io/name=reranker-operator", "--tail=40",
                                   check=False).stdout
        print(f"--- operator log (tail) ---\n{log}")
        print(node_cluster.kubectl("get", "pods,jobs", "-n", ns, "-o", "wide",
                                   check=False).stdout)
        config.uninstall(RELEASE, ignore_not_found=True, timeout=60)
        for n in (ns, op_ns):
            node_cluster.kubectl("delete", "namespace", n, "--wait=false", check=False)
        for name in pvs:
            node_cluster.kubectl("delete", "pv", name, "--wait=false", check=False)

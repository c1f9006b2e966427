"""Model delivery against a real control plane: spec.model.cache (PVC, fill Job, Deployment
held at 0 until the Job succeeds, the ModelCached condition) and spec.model.image (the API
server is asked whether it keeps image volumes; this one, 1.34 without the ImageVolume gate,
does not, so the init container copies).

The operator runs as the ServiceAccount bound to exactly operator/rbac/ (so the rules for PVCs
and Jobs are proven). This control plane has no node, so the Job's pod never runs: the test
writes that pod's status through the API as the kubelet would (the container ended, with
`reranker convert`'s JSON as its termination message); the real Job controller then marks the
Job Complete, and the operator reads only those two.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from operator_process import Operator

REPO = Path(__file__).resolve().parents[2]
CRD = REPO / "crds" / "rerankerdeployments.reranker.dev.yaml"
RESULT = {"model": "org/model", "fingerprint": "f1",
          "precision": {"key": "k1", "plan": "int8-dynamic", "spearman": 0.9993, "speedup": 1.8},
          "seconds": {"download": 3.0, "convert": 20.5, "precision": 9.1, "total": 33.0}}


def rrd(name: str, model: dict[str, Any], **spec: Any) -> str:
    return json.dumps({"apiVersion": "reranker.dev/v1alpha1", "kind": "RerankerDeployment",
                       "metadata": {"name": name}, "spec": {"model": model, **spec}})


def conditions(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in (obj.get("status") or {}).get("conditions") or ()}


def rfc3339(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def test_cache_fill_job_holds_the_fleet_at_zero_until_it_succeeds(
        operator: Operator, kube_cluster: Any, kube_namespace: str) -> None:
    ns, name = kube_namespace, "cached"
    kube_cluster.apply(rrd(name, {"id": "org/model", "cache": {"size": "1Gi"}}, replicas=2),
                       namespace=ns)

    def filling() -> dict[str, Any] | None:
        obj = kube_cluster.get_json("rrd", name, "-n", ns)
        c = conditions(obj)
        ok = c.get("ModelCached", {}).get("reason") == "Filling" and c["Ready"]["reason"] == (
            "ModelCacheFilling")
        return obj if ok else None
    obj = kube_cluster.eventually(filling, timeout=30, desc="ModelCached=False Filling")
    assert conditions(obj)["ModelCached"]["status"] == "False"
    assert conditions(obj)["Degraded"]["status"] == "False"

    uid = obj["metadata"]["uid"]
    pvc = kube_cluster.get_json("pvc", f"{name}-model-cache", "-n", ns)
    assert pvc["spec"]["resources"]["requests"]["storage"] == "1Gi"
    jobs = kube_cluster.get_json("jobs", "-n", ns, "-l",
                                 f"app.kubernetes.io/instance={name}")["items"]
    assert len(jobs) == 1
    job = jobs[0]
    job_name = job["metadata"]["name"]
    assert job_name.startswith(f"{name}-model-cache-")
    assert obj["status"]["modelCache"]["job"] == job_name
    for child in (pvc, job):
        (ref,) = child["metadata"]["ownerReferences"]
        assert (ref["uid"], ref["controller"]) == (uid, True)
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["command"][:2] == ["reranker", "convert"]
    dep = kube_cluster.get_json("deployment", name, "-n", ns)
    assert dep["spec"]["replicas"] == 0  # nothing to serve until the volume is filled
    volumes = dep["spec"]["template"]["spec"]["volumes"]
    assert {"name": "model-cache-pvc", "persistentVolumeClaim": {
        "claimName": f"{name}-model-cache", "readOnly": True}} in volumes

    # The Job's pod ends: its termination message is what `reranker convert` wrote (the
    # kubelet would set it; there is no node here, so the test writes the pod's status).
    def job_pod() -> dict[str, Any] | None:
        items = kube_cluster.get_json("pods", "-n", ns, "-l", f"job-name={job_name}")["items"]
        return items[0] if items else None
    pod = kube_cluster.eventually(job_pod, timeout=30, desc="the Job controller's pod")
    now = time.time()
    kube_cluster.kubectl(
        "patch", "pod", pod["metadata"]["name"], "-n", ns, "--subresource=status",
        "--type=merge", "-p", json.dumps({"status": {"phase": "Succeeded", "containerStatuses": [{
            "name": "convert", "image": container["image"], "imageID": "", "ready": False,
            "restartCount": 0, "started": False,
            "state": {"terminated": {"exitCode": 0, "reason": "Completed",
                                     "message": json.dumps(RESULT),
                                     "startedAt": rfc3339(now - 33), "finishedAt": rfc3339(now)}},
        }]}}))
    # The real Job controller counts the pod and marks the Job Complete.
    kube_cluster.eventually(
        lambda: any(c["type"] == "Complete" and c["status"] == "True" for c in (
            kube_cluster.get_json("job", job_name, "-n", ns).get("status") or {}).get(
                "conditions") or ()), timeout=60, desc="the Job Complete")
    kube_cluster.eventually(
        lambda: kube_cluster.get_json("deployment", name, "-n", ns)["spec"]["replicas"] == 2,
        timeout=30, desc="the Deployment scaled to spec.replicas")
    obj = kube_cluster.get_json("rrd", name, "-n", ns)
    c = conditions(obj)
    assert (c["ModelCached"]["status"], c["ModelCached"]["reason"]) == ("True", "Succeeded")
    assert obj["status"]["modelCache"]["state"] == "Succeeded"
    assert obj["status"]["modelCache"]["result"] == RESULT
    assert c["Ready"]["reason"] != "ModelCacheFilling"


def test_model_image_is_copied_where_the_api_server_drops_image_volumes(
        operator: Operator, kube_cluster: Any, kube_namespace: str) -> None:
    ns, name = kube_namespace, "imaged"
    kube_cluster.apply(rrd(name, {"image": {"reference": "models/minilm:1",
                                            "path": "/model"}}), namespace=ns)
    dep = kube_cluster.eventually(
        lambda: kube_cluster.get_json("deployments", "-n", ns)["items"], timeout=30,
        desc="the Deployment")[0]
    spec = dep["spec"]["template"]["spec"]
    (copier,) = spec["initContainers"]
    assert copier["image"] == "models/minilm:1"
    assert copier["command"] == ["cp", "-a", "/model/.", "/models/"]
    assert {"name": "model", "emptyDir": {}} in spec["volumes"]
    # The operator asked the API server (a dry run: nothing was created); this one accepts
    # the Deployment but drops the image volume (no ImageVolume gate), which the operator saw.
    operator.wait_log("image volumes: not kept by the API server (its ImageVolume feature")
    assert [d["metadata"]["name"] for d in
            kube_cluster.get_json("deployments", "-n", ns)["items"]] == [name]

"""reranker-operator against a real control plane (etcd, kube-apiserver, controller-manager).

The operator runs as a real subprocess (`reranker-operator --namespace NS`), driven through
kubectl as a user would, once with the cluster-admin kubeconfig and once as a ServiceAccount
bound to exactly the rules in operator/rbac/ (the `identity` parameter). There are no nodes,
so pods never run: Ready must stay False, and the status must say why.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from operator_process import Operator, bind_rbac

REPO = Path(__file__).resolve().parents[2]
CRD = REPO / "crds" / "rerankerdeployments.reranker.dev.yaml"
CHILD_KINDS = "configmaps,deployments,services,horizontalpodautoscalers,poddisruptionbudgets"


# --- helpers --------------------------------------------------------------------------------


def rrd(name: str, **spec: Any) -> str:
    body = {"apiVersion": "reranker.dev/v1alpha1", "kind": "RerankerDeployment",
            "metadata": {"name": name},
            "spec": {"model": {"id": "cross-encoder/ms-marco-MiniLM-L-6-v2"}, **spec}}
    return json.dumps(body)


def children(cluster: Any, ns: str, name: str) -> dict[tuple[str, str], dict[str, Any]]:
    items = cluster.get_json(CHILD_KINDS, "-n", ns, "-l",
                             f"app.kubernetes.io/instance={name}")["items"]
    return {(i["kind"], i["metadata"]["name"]): i for i in items}


def conditions(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in (obj.get("status") or {}).get("conditions") or ()}


def _written_part(obj: dict[str, Any]) -> str:
    """What the operator writes of an HPA (its spec, labels, annotations): the HPA controller
    rewrites the status every sync period (15 s) whatever the operator does, so neither the
    resourceVersion nor (unset on HPAs) the generation tells whether the operator wrote."""
    meta = obj["metadata"]
    return json.dumps({"spec": obj["spec"], "labels": meta.get("labels"),
                       "annotations": meta.get("annotations")}, sort_keys=True)


def versions(cluster: Any, ns: str, name: str) -> dict[str, str]:
    """Each child's resourceVersion (an HPA's written part: `_written_part`)."""
    out = {f"{k}/{n}": _written_part(o) if k == "HorizontalPodAutoscaler"
           else o["metadata"]["resourceVersion"]
           for (k, n), o in children(cluster, ns, name).items()}
    out["RerankerDeployment"] = cluster.get_json("rrd", name, "-n", ns)["metadata"][
        "resourceVersion"]
    return out


def settled_versions(cluster: Any, ns: str, name: str, quiet: float = 3.0,
                     timeout: float = 60) -> dict[str, str]:
    """Resource versions once nothing (controllers included) has changed for `quiet` s."""
    deadline = time.monotonic() + timeout
    last, since = versions(cluster, ns, name), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = versions(cluster, ns, name)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return now
    raise AssertionError(f"objects kept changing for {timeout}s: {last}")


# --- fixtures -------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def crd_installed(kube_cluster: Any) -> None:
    kube_cluster.kubectl("apply", "-f", str(CRD))
    kube_cluster.wait_established("crd/rerankerdeployments.reranker.dev")


@pytest.fixture(params=["admin", "rbac"])
def operator(request: pytest.FixtureRequest, kube_cluster: Any, kube_namespace: str,
             crd_installed: None, tmp_path: Path) -> Iterator[Operator]:
    """A running operator for `kube_namespace`: as cluster-admin, or as the ServiceAccount
    bound to operator/rbac/."""
    cleanup: Callable[[], None] = lambda: None  # noqa: E731
    kubeconfig = kube_cluster.kubeconfig
    if request.param == "rbac":
        kubeconfig, cleanup = bind_rbac(kube_cluster, kube_namespace)
        # The identity really is restricted.
        denied = kube_cluster.kubectl("auth", "can-i", "get", "secrets", "-n", kube_namespace,
                                      kubeconfig=kubeconfig, check=False)
        assert denied.stdout.strip() == "no"
    with Operator(kube_cluster, kube_namespace, kubeconfig, tmp_path / "operator.log").running(cleanup) as op:
        yield op


# --- tests ----------------------------------------------------------------------------------

def test_apply_creates_owned_children_within_two_seconds(operator: Operator, kube_cluster: Any,
                                                         kube_namespace: str) -> None:
    ns, name = kube_namespace, "fleet"
    kube_cluster.apply(rrd(name, device="cpu", quantization="int8",
                           parallelism={"maxParallel": 3, "maxQueue": 128, "batchSize": 16,
                                        "microBatching": {"enabled": True, "windowMs": 4}},
                           autoscaling={"enabled": True, "minReplicas": 1, "maxReplicas": 4}),
                       namespace=ns)
    t0 = time.monotonic()
    expected = {("ConfigMap", f"{name}-config"), ("Deployment", name), ("Service", name),
                ("HorizontalPodAutoscaler", name), ("PodDisruptionBudget", name)}
    objs = kube_cluster.eventually(
        lambda: (lambda got: got if set(got) == expected else None)(
            children(kube_cluster, ns, name)),
        timeout=2, interval=0.05, desc="all children")
    elapsed = time.monotonic() - t0
    assert elapsed < 2.0, f"children took {elapsed:.2f}s"

    owner = kube_cluster.get_json("rrd", name, "-n", ns)
    for key, obj in objs.items():
        refs = obj["metadata"]["ownerReferences"]
        assert refs == [{"apiVersion": "reranker.dev/v1alpha1", "kind": "RerankerDeployment",
                         "name": name, "uid": owner["metadata"]["uid"], "controller": True,
                         "blockOwnerDeletion": True}], key

    # The pod template carries the settings (each from the ConfigMap) and the config hash.
    data = objs[("ConfigMap", f"{name}-config")]["data"]
    template = objs[("Deployment", name)]["spec"]["template"]
    env = {e["name"]: e for e in template["spec"]["containers"][0]["env"]}
    expected_settings = {"RERANKER_DEVICE": "cpu", "RERANKER_QUANTIZATION": "int8",
                         "RERANKER_MAX_PARALLEL": "3", "RERANKER_MAX_QUEUE": "128",
                         "RERANKER_BATCH_SIZE": "16", "MICRO_BATCH_ENABLED": "true",
                         "MICRO_BATCH_WINDOW_MS": "4"}
    for key, value in expected_settings.items():
        assert data[key] == value
        assert env[key]["valueFrom"]["configMapKeyRef"] == {"name": f"{name}-config",
                                                           "key": key}
    assert template["metadata"]["annotations"]["reranker.dev/config-hash"]

    # No nodes: the pods never become ready, and the status says so.
    def not_ready_status() -> dict[str, Any] | None:
        obj = kube_cluster.get_json("rrd", name, "-n", ns)
        ready = conditions(obj).get("Ready")
        if ready and ready["reason"] == "ReplicasNotReady":
            return obj
        return None
    obj = kube_cluster.eventually(not_ready_status, timeout=30, desc="Ready=False with reason")
    st, c = obj["status"], conditions(obj)
    assert c["Ready"]["status"] == "False"
    assert "0/1 replicas ready" in c["Ready"]["message"]
    assert c["Ready"]["observedGeneration"] == obj["metadata"]["generation"]
    assert c["Available"]["status"] == "False"
    assert c["Progressing"]["status"] == "True"
    assert c["Degraded"]["status"] == "False"
    assert st["observedGeneration"] == obj["metadata"]["generation"]
    assert st["selector"] == (f"app.kubernetes.io/component=server,"
                              f"app.kubernetes.io/instance={name},app.kubernetes.io/name=reranker")
    assert st["url"] == f"http://{name}.{ns}.svc:8000"
    assert (st["replicas"], st["readyReplicas"]) == (1, 0)
    assert "phase" not in st

    # kubectl shows the printer columns, the Ready condition included.
    table = kube_cluster.kubectl("get", "rrd", name, "-n", ns).stdout.splitlines()
    assert table[0].split() == ["NAME", "MODELS", "DEVICE", "QUANTIZATION", "PRECISION",
                                "REPLICAS", "READY", "EXTERNAL", "STATUS", "AGE"]
    # PRECISION is empty (no pod has measured: tests/kube/test_fleet_precision_cluster.py fills it).
    assert table[1].split()[:8] == [name, '["cross-encoder/ms-marco-MiniLM-L-6-v2"]', "cpu",
                                    "int8", "1", "0", "0", "False"]
    # An Event records the creation of the children.
    events = kube_cluster.get_json("events", "-n", ns,
                                   "--field-selector", f"involvedObject.name={name},"
                                   "involvedObject.kind=RerankerDeployment")["items"]
    assert any(e["reason"] == "Created" and "Deployment" in e["message"] for e in events)


def test_cuda_example_gets_gpus_placement_and_secrets(operator: Operator, kube_cluster: Any,
                                                      kube_namespace: str) -> None:
    ns = kube_namespace
    kube_cluster.kubectl("apply", "-n", ns, "-f", str(REPO / "examples" / "cuda-bf16.yaml"))
    name = "bge-large-gpu"
    dep = kube_cluster.eventually(
        lambda: children(kube_cluster, ns, name).get(("Deployment", name)), timeout=10,
        desc="Deployment")
    pod = dep["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
        "tolerations"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    env = {e["name"]: e for e in c["env"]}
    assert env["RERANKER_API_KEYS_FILE"]["value"] == "/etc/reranker/api-keys/api-keys"
    assert {"name": "api-keys", "secret": {"secretName": "reranker-api-keys", "items": [
        {"key": "api-keys", "path": "api-keys"}], "defaultMode": 420}} in pod["volumes"]
    assert env["REDIS_URL"]["valueFrom"]["secretKeyRef"] == {"name": "reranker-redis",
                                                            "key": "url"}
    data = kube_cluster.get_json("configmap", f"{name}-config", "-n", ns)["data"]
    assert (data["RERANKER_DEVICE"], data["RERANKER_QUANTIZATION"]) == ("cuda", "bf16")
    assert "REDIS_URL" not in data and data["REDIS_ENABLED"] == "true"
    assert dep["spec"]["replicas"] == 2


def test_scale_goes_through_the_reranker_deployment(operator: Operator, kube_cluster: Any,
                                                     kube_namespace: str) -> None:
    ns, name = kube_namespace, "scaled"
    kube_cluster.apply(rrd(name, autoscaling={"enabled": True, "minReplicas": 1,
                                              "maxReplicas": 5}), namespace=ns)
    kube_cluster.eventually(lambda: ("Deployment", name) in children(kube_cluster, ns, name),
                            timeout=10, desc="Deployment")
    hpa = kube_cluster.get_json("hpa", name, "-n", ns)
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "reranker.dev/v1alpha1",
                                             "kind": "RerankerDeployment", "name": name}
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "reranker_queue_depth"

    kube_cluster.kubectl("scale", "rrd", name, "-n", ns, "--replicas=3")
    kube_cluster.eventually(
        lambda: kube_cluster.get_json("deployment", name, "-n", ns)["spec"]["replicas"] == 3,
        timeout=10, desc="Deployment replicas 3")
    # The scale subresource reads back through the RerankerDeployment's status.
    scale = json.loads(kube_cluster.kubectl(
        "get", "--raw",
        f"/apis/reranker.dev/v1alpha1/namespaces/{ns}/rerankerdeployments/{name}/scale").stdout)
    assert scale["spec"]["replicas"] == 3
    kube_cluster.eventually(
        lambda: json.loads(kube_cluster.kubectl("get", "--raw",
                                                f"/apis/reranker.dev/v1alpha1/namespaces/{ns}/"
                                                f"rerankerdeployments/{name}/scale").stdout)
        ["status"].get("replicas") == 3, timeout=20, desc="scale status replicas 3")
    assert "app.kubernetes.io/instance=" + name in scale["status"]["selector"]
    # The operator copied replicas down and never wrote them back up.
    assert kube_cluster.get_json("rrd", name, "-n", ns)["spec"]["replicas"] == 3


def test_settings_change_rolls_the_pods(operator: Operator, kube_cluster: Any,
                                        kube_namespace: str) -> None:
    ns, name = kube_namespace, "tuned"
    kube_cluster.apply(rrd(name, parallelism={"maxParallel": 2}), namespace=ns)

    def template_hash() -> str | None:
        dep = children(kube_cluster, ns, name).get(("Deployment", name))
        return dep and dep["spec"]["template"]["metadata"]["annotations"][
            "reranker.dev/config-hash"]
    before = kube_cluster.eventually(template_hash, timeout=10, desc="Deployment")
    kube_cluster.kubectl("patch", "rrd", name, "-n", ns, "--type", "merge", "-p",
                         json.dumps({"spec": {"parallelism": {"maxParallel": 6}}}))
    after = kube_cluster.eventually(lambda: (h := template_hash()) != before and h,
                                    timeout=10, desc="a new config hash")
    assert after != before
    cm = kube_cluster.get_json("configmap", f"{name}-config", "-n", ns)
    assert cm["data"]["RERANKER_MAX_PARALLEL"] == "6"
    # Scaling alone does not roll the pods.
    kube_cluster.kubectl("scale", "rrd", name, "-n", ns, "--replicas=2")
    kube_cluster.eventually(
        lambda: kube_cluster.get_json("deployment", name, "-n", ns)["spec"]["replicas"] == 2,
        timeout=10, desc="replicas 2")
    assert template_hash() == after


def test_deleted_or_edited_children_come_back(operator: Operator, kube_cluster: Any,
                                              kube_namespace: str) -> None:
    ns, name = kube_namespace, "drift"
    kube_cluster.apply(rrd(name), namespace=ns)
    objs = kube_cluster.eventually(
        lambda: (lambda got: got if len(got) == 4 else None)(children(kube_cluster, ns, name)),
        timeout=10, desc="children")
    old_uids = {k: o["metadata"]["uid"] for k, o in objs.items()}

    kube_cluster.kubectl("delete", "service", name, "-n", ns, "--ignore-not-found")
    kube_cluster.kubectl("delete", "configmap", f"{name}-config", "-n", ns,
                         "--ignore-not-found")
    kube_cluster.kubectl("delete", "pdb", name, "-n", ns, "--ignore-not-found")

    def restored() -> bool:
        got = children(kube_cluster, ns, name)
        return set(got) == set(old_uids) and all(
            got[k]["metadata"]["uid"] != old_uids[k]
            for k in [("Service", name), ("ConfigMap", f"{name}-config"),
                      ("PodDisruptionBudget", name)])
    kube_cluster.eventually(restored, timeout=10, desc="deleted children recreated")

    # Hand edits of fields the operator owns are reverted.
    kube_cluster.kubectl("patch", "deployment", name, "-n", ns, "--type", "merge", "-p",
                         json.dumps({"spec": {"replicas": 5}}))
    kube_cluster.kubectl("patch", "configmap", f"{name}-config", "-n", ns, "--type", "merge",
                         "-p", json.dumps({"data": {"RERANKER_DEVICE": "cuda"}}))
    kube_cluster.eventually(
        lambda: kube_cluster.get_json("deployment", name, "-n", ns)["spec"]["replicas"] == 1
        and kube_cluster.get_json("configmap", f"{name}-config", "-n", ns)["data"][
            "RERANKER_DEVICE"] == "cpu",
        timeout=10, desc="edits reverted")


def test_deleting_the_resource_garbage_collects_everything(operator: Operator,
                                                           kube_cluster: Any,
                                                           kube_namespace: str) -> None:
    ns, name = kube_namespace, "doomed"
    kube_cluster.apply(rrd(name, autoscaling={"enabled": True}), namespace=ns)
    kube_cluster.eventually(lambda: len(children(kube_cluster, ns, name)) == 5, timeout=10,
                            desc="children")
    assert not kube_cluster.get_json("rrd", name, "-n", ns)["metadata"].get("finalizers")
    kube_cluster.kubectl("delete", "rrd", name, "-n", ns, "--timeout", "30s")
    kube_cluster.eventually(lambda: children(kube_cluster, ns, name) == {}, timeout=60,
                            desc="children garbage-collected")
    pods = kube_cluster.get_json("pods", "-n", ns, "-l",
                                 f"app.kubernetes.io/instance={name}")["items"]
    kube_cluster.eventually(
        lambda: not kube_cluster.get_json("replicasets,pods", "-n", ns, "-l",
                                          f"app.kubernetes.io/instance={name}")["items"],
        timeout=60, desc=f"ReplicaSets and {len(pods)} pods garbage-collected")
    time.sleep(2)  # nothing is recreated behind the collector's back
    assert children(kube_cluster, ns, name) == {}


def test_restart_creates_nothing_and_writes_nothing(operator: Operator, kube_cluster: Any,
                                                    kube_namespace: str) -> None:
    ns, name = kube_namespace, "steady"
    kube_cluster.apply(rrd(name, autoscaling={"enabled": True},
                           cache={"redis": {"managed": {"enabled": True}}}), namespace=ns)
    kube_cluster.eventually(
        lambda: conditions(kube_cluster.get_json("rrd", name, "-n", ns)).get(
            "Ready", {}).get("reason") == "ReplicasNotReady",
        timeout=30, desc="converged status")
    before = settled_versions(kube_cluster, ns, name)
    assert len(before) == 8  # cm, deploy, svc, hpa, pdb, redis deploy + svc, the rrd
    assert len(operator.writes()) >= 8  # 7 children and the status, at least
    # The managed Redis' password: a Secret owned by the fleet, and its NetworkPolicy.
    uid = kube_cluster.get_json("rrd", name, "-n", ns)["metadata"]["uid"]
    secret = kube_cluster.get_json("secret", f"{name}-redis-auth", "-n", ns)
    assert secret["metadata"]["ownerReferences"][0]["uid"] == uid
    assert len(secret["data"]["password"]) > 40
    policy = kube_cluster.get_json("networkpolicy", f"{name}-redis", "-n", ns)
    assert policy["metadata"]["ownerReferences"][0]["uid"] == uid

    operator.stop()
    operator.start()
    operator.wait_log("Resuming is processed", timeout=30)
    time.sleep(3)  # let any late write land
    assert operator.writes() == []
    assert versions(kube_cluster, ns, name) == before
    again = kube_cluster.get_json("secret", f"{name}-redis-auth", "-n", ns)
    assert again["metadata"]["resourceVersion"] == secret["metadata"]["resourceVersion"]
    kinds = [k for k, _ in children(kube_cluster, ns, name)]
    assert sorted(kinds) == ["ConfigMap", "Deployment", "Deployment", "HorizontalPodAutoscaler",
                             "PodDisruptionBudget", "Service", "Service"]


def test_spec_the_schema_cannot_catch_becomes_degraded(operator: Operator, kube_cluster: Any,
                                                       kube_namespace: str) -> None:
    ns = kube_namespace
    # requests > limits: valid for the CRD schema, refused by the operator's own checks.
    kube_cluster.apply(rrd("greedy", resources={"requests": {"cpu": "2"},
                                                "limits": {"cpu": "1"}}), namespace=ns)
    # An affinity the CRD passes through but the Deployment API rejects.
    kube_cluster.apply(rrd("lost", affinity={"nodeAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": []}}}),
        namespace=ns)

    def degraded(name: str) -> dict[str, Any] | None:
        obj = kube_cluster.get_json("rrd", name, "-n", ns)
        c = conditions(obj).get("Degraded")
        return obj if c and c["status"] == "True" else None

    greedy = kube_cluster.eventually(lambda: degraded("greedy"), timeout=15, desc="Degraded")
    c = conditions(greedy)
    assert c["Degraded"]["reason"] == "InvalidSpec"
    assert "resources.requests.cpu must be less than or equal to" in c["Degraded"]["message"]
    assert c["Ready"]["status"] == "False" and c["Ready"]["reason"] == "InvalidSpec"
    assert children(kube_cluster, ns, "greedy") == {}

    lost = kube_cluster.eventually(lambda: degraded("lost"), timeout=15, desc="Degraded")
    c = conditions(lost)
    assert c["Degraded"]["reason"] == "ChildRejected"
    assert "Deployment lost rejected by the API server" in c["Degraded"]["message"]
    assert "nodeSelectorTerms" in c["Degraded"]["message"]
    assert ("Deployment", "lost") not in children(kube_cluster, ns, "lost")

    # Permanent: no retry loop, so nothing changes any more.
    operator.wait_log("failed permanently", count=2, timeout=15)
    before = versions(kube_cluster, ns, "greedy"), versions(kube_cluster, ns, "lost")
    time.sleep(5)
    assert (versions(kube_cluster, ns, "greedy"), versions(kube_cluster, ns, "lost")) == before

    # Fixing the spec recovers.
    kube_cluster.kubectl("patch", "rrd", "greedy", "-n", ns, "--type", "merge", "-p",
                         json.dumps({"spec": {"resources": {"limits": {"cpu": "4"}}}}))
    kube_cluster.eventually(
        lambda: conditions(kube_cluster.get_json("rrd", "greedy", "-n", ns))["Degraded"][
            "status"] == "False" and ("Deployment", "greedy") in children(kube_cluster, ns,
                                                                          "greedy"),
        timeout=15, desc="recovered")


def test_service_monitor_without_its_crd_is_reported(operator: Operator, kube_cluster: Any,
                                                     kube_namespace: str) -> None:
    served = kube_cluster.kubectl("api-resources", "--api-group=monitoring.coreos.com",
                                  "-o", "name").stdout.strip()
    assert served == "", "this test needs a cluster without the Prometheus Operator CRDs"
    ns, name = kube_namespace, "watched"
    kube_cluster.apply(rrd(name, monitoring={"serviceMonitor": {"enabled": True}}),
                       namespace=ns)
    obj = kube_cluster.eventually(
        lambda: (lambda o: o if conditions(o).get("Degraded", {}).get("status") == "True"
                 else None)(kube_cluster.get_json("rrd", name, "-n", ns)),
        timeout=15, desc="Degraded")
    c = conditions(obj)["Degraded"]
    assert c["reason"] == "ServiceMonitorUnavailable"
    assert "ServiceMonitor CRD (monitoring.coreos.com/v1) is not installed" in c["message"]
    # The rest is reconciled normally.
    assert len(children(kube_cluster, ns, name)) == 4


# The Prometheus Operator's own CRD is thousands of lines; the operator only needs the API
# to serve the kind, so a minimal CRD of the same group, version and names stands in for it.
SERVICE_MONITOR_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
    "metadata": {"name": "servicemonitors.monitoring.coreos.com"},
    "spec": {"group": "monitoring.coreos.com", "scope": "Namespaced",
             "names": {"kind": "ServiceMonitor", "plural": "servicemonitors",
                       "singular": "servicemonitor", "listKind": "ServiceMonitorList"},
             "versions": [{"name": "v1", "served": True, "storage": True, "schema": {
                 "openAPIV3Schema": {"type": "object", "properties": {"spec": {
                     "type": "object", "x-kubernetes-preserve-unknown-fields": True}}}}}]},
}


def test_service_monitor_with_its_crd(operator: Operator, kube_cluster: Any,
                                      kube_namespace: str) -> None:
    ns, name = kube_namespace, "scraped"
    kube_cluster.apply(json.dumps(SERVICE_MONITOR_CRD))
    try:
        kube_cluster.wait_established("crd/servicemonitors.monitoring.coreos.com")
        operator.stop()  # resources are discovered at startup
        operator.start()
        kube_cluster.apply(rrd(name, monitoring={"serviceMonitor": {
            "enabled": True, "labels": {"release": "prom"}}}), namespace=ns)

        def service_monitor() -> dict[str, Any] | None:
            r = kube_cluster.kubectl("get", "servicemonitor", name, "-n", ns, "-o", "json",
                                     check=False)
            return json.loads(r.stdout) if r.returncode == 0 else None
        sm = kube_cluster.eventually(service_monitor, timeout=10, desc="ServiceMonitor")
        assert sm["metadata"]["labels"]["release"] == "prom"
        assert sm["metadata"]["ownerReferences"][0]["kind"] == "RerankerDeployment"
        assert sm["spec"]["endpoints"] == [{"port": "http", "path": "/metrics",
                                            "interval": "30s"}]
        old_uid = sm["metadata"]["uid"]
        kube_cluster.kubectl("delete", "servicemonitor", name, "-n", ns)
        kube_cluster.eventually(lambda: (s := service_monitor()) and s["metadata"]["uid"]
                                != old_uid, timeout=10, desc="ServiceMonitor recreated")
        assert conditions(kube_cluster.get_json("rrd", name, "-n", ns))["Degraded"][
            "status"] == "False"
        kube_cluster.kubectl("patch", "rrd", name, "-n", ns, "--type", "merge", "-p",
                             json.dumps({"spec": {"monitoring": {"serviceMonitor": {
                                 "enabled": False}}}}))
        kube_cluster.eventually(lambda: service_monitor() is None, timeout=10,
                                desc="ServiceMonitor removed")
    finally:
        operator.stop()
        kube_cluster.kubectl("delete", "crd", "servicemonitors.monitoring.coreos.com",
                             "--ignore-not-found", "--timeout", "60s", check=False)


def test_a_name_held_by_someone_elses_objects_is_never_taken_over(
        operator: Operator, kube_cluster: Any, kube_namespace: str) -> None:
    """A RerankerDeployment named like a Service and a ConfigMap someone else runs: both are
    left exactly as they are (their selector keeps their traffic, no owner reference makes
    them garbage of the RerankerDeployment), the status names them, and no server pod is
    rolled out to read their ConfigMap. Once they are gone, the operator creates its own."""
    ns, name = kube_namespace, "frontend"
    kube_cluster.apply(json.dumps({
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
        "spec": {"selector": {"app": "frontend"}, "ports": [{"name": "web", "port": 80}]}}),
        namespace=ns)
    kube_cluster.apply(json.dumps({
        "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"{name}-config"},
        "data": {"RERANKER_DEVICE": "cuda"}}), namespace=ns)
    theirs = {kind: kube_cluster.get_json(kind, n, "-n", ns)
              for kind, n in (("service", name), ("configmap", f"{name}-config"))}
    kube_cluster.apply(rrd(name), namespace=ns)

    def conflicted() -> dict[str, Any] | None:
        obj = kube_cluster.get_json("rrd", name, "-n", ns)
        ready = conditions(obj).get("Ready")
        return obj if ready and ready["reason"] == "NameConflict" else None
    obj = kube_cluster.eventually(conflicted, timeout=15, desc="Ready=False NameConflict")
    c = conditions(obj)
    assert c["Ready"]["status"] == "False"
    assert c["Degraded"]["status"] == "True" and c["Degraded"]["reason"] == "NameConflict"
    assert "Service frontend already exists and has no controller" in c["Degraded"]["message"]
    assert "ConfigMap frontend-config already exists" in c["Degraded"]["message"]
    time.sleep(2)  # any late write would land by now
    for kind, before in theirs.items():
        now = kube_cluster.get_json(kind, before["metadata"]["name"], "-n", ns)
        assert now["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"], kind
        assert not now["metadata"].get("ownerReferences"), kind
    assert kube_cluster.get_json("service", name, "-n", ns)["spec"]["selector"] == {
        "app": "frontend"}
    # Its pods would read their ConfigMap: no Deployment. What has a free name is created.
    got = children(kube_cluster, ns, name)
    assert ("Deployment", name) not in got and ("PodDisruptionBudget", name) in got

    # Their objects removed: the operator's retry (within 30 s) creates its own.
    kube_cluster.kubectl("delete", "service", name, "-n", ns)
    kube_cluster.kubectl("delete", "configmap", f"{name}-config", "-n", ns)
    kube_cluster.eventually(
        lambda: {("Service", name), ("ConfigMap", f"{name}-config"), ("Deployment", name)}
        <= set(children(kube_cluster, ns, name)), timeout=45, desc="the operator's own")
    kube_cluster.eventually(
        lambda: conditions(kube_cluster.get_json("rrd", name, "-n", ns))["Ready"]["reason"]
        == "ReplicasNotReady", timeout=15, desc="no conflict any more")

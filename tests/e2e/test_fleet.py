"""The fleet on a real node, as a user runs it: the images `make images` built, the chart
installing the operator as a pod, `kubectl apply` of a RerankerDeployment, requests from the
host to the Service's ClusterIP through kube-proxy.

One fleet (`sentence-transformers/all-MiniLM-L6-v2`, served offline from the weights inside the
server image, with a managed Redis) is created once for the module and taken through scaling,
a deleted pod and a rolling spec change, the last two under a continuous load from the host.
Each test scales the fleet to what it needs itself (`scaled`), so any one runs alone or in any
order. The load counts every request sent again (fleet_load.py): the tests print
ok / failed / resent and bound each.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import httpx
import pytest
from fleet import (ServiceClient, condition, dump, is_ready, pod_metric, pods, wait_images,
                   wait_pods_ready)
from fleet_load import Load
from kubecluster import KubeCluster
from servers import running_app

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ship"))
from helm_render import CHART, adopt_crds  # noqa: E402

IMAGES = {"operator": "reranker-fleet/operator:dev", "server": "reranker-fleet/server:dev",
          "redis": "reranker-fleet/redis:dev"}
MODEL = "sentence-transformers/all-MiniLM-L6-v2"
FLEET = "minilm"
SERVER = f"app.kubernetes.io/instance={FLEET},app.kubernetes.io/component=server"
QUERY = "What is machine learning?"
LOAD_CLIENTS = 2  # the pod-deletion and rollout loads' clients, each on a kept-alive connection
DOCS = ["Machine learning is a subset of artificial intelligence.",
        "Python is a programming language.",
        "The weather in Paris is mild in spring.",
        "Deep learning uses neural networks with many layers."]


def rd_manifest(name: str, model: str, replicas: int, **spec: Any) -> str:
    return json.dumps({
        "apiVersion": "reranker.dev/v1alpha1", "kind": "RerankerDeployment",
        "metadata": {"name": name},
        "spec": {"model": {"id": model}, "replicas": replicas,
                 "resources": {"requests": {"cpu": "100m", "memory": "512Mi"},
                               "limits": {"memory": "2Gi"}},
                 **spec}})


@pytest.fixture(scope="module")
def images(node_cluster: KubeCluster) -> dict[str, str]:
    return wait_images(node_cluster, IMAGES)


@pytest.fixture(scope="module")
def operator(node_cluster: KubeCluster, images: dict[str, str]) -> Iterator[dict[str, Any]]:
    """The chart installed (helm-python-sdk) with the operator image; its pod Ready."""
    namespace = f"e2e-op-{secrets.token_hex(3)}"
    release = "rop"
    node_cluster.kubectl("create", "namespace", namespace)
    config = helm.Config(kubeconfig_path=node_cluster.kubeconfig, namespace=namespace)
    repo, tag = images["operator"].split(":")
    values = {"image": {"repository": repo, "tag": tag, "pullPolicy": "Never"},
              "serverImage": images["server"], "redisImage": images["redis"],
              "clusterCIDRs": ["198.18.64.0/24", "198.19.0.0/24"]}
    adopt_crds(node_cluster, release, namespace)
    config.install(str(CHART), release, values, namespace=namespace, timeout=120)
    selector = "app.kubernetes.io/name=reranker-operator"
    try:
        (pod,) = wait_pods_ready(node_cluster, namespace, selector, 1, timeout=180)
        yield {"namespace": namespace, "release": release, "pod": pod}
    finally:
        log = node_cluster.kubectl("logs", "-n", namespace, "-l", selector, "--tail=200",
                                   check=False).stdout
        print(f"--- operator log (tail) ---\n{log}")
        config.uninstall(release, ignore_not_found=True, timeout=60)
        node_cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


@pytest.fixture(scope="module")
def fleet(node_cluster: KubeCluster, operator: dict[str, Any]) -> Iterator[str]:
    """The namespace of one RerankerDeployment, applied with kubectl, Ready with one pod."""
    namespace = f"e2e-fleet-{secrets.token_hex(3)}"
    node_cluster.kubectl("create", "namespace", namespace)
    node_cluster.apply(rd_manifest(FLEET, MODEL, 1, cache={"redis": {"managed": {"enabled": True}}}),
                       namespace)
    try:
        wait_rd_ready(node_cluster, namespace, FLEET, 1)
        yield namespace
    finally:
        node_cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def wait_rd_ready(cluster: KubeCluster, namespace: str, name: str, replicas: int,
                  timeout: float = 420) -> dict[str, Any]:
    def ready() -> dict[str, Any] | None:
        rd = cluster.get_json("rrd", name, "-n", namespace)
        st = rd.get("status", {})
        ok = (condition(rd, "Ready").get("status") == "True"
              and st.get("readyReplicas") == replicas == st.get("updatedReplicas")
              and st.get("observedGeneration") == rd["metadata"]["generation"])
        return rd if ok else None

    try:
        return cluster.eventually(ready, timeout=timeout, interval=1,
                                  desc=f"RerankerDeployment {name} Ready with {replicas} pods")
    except AssertionError:
        print(dump(cluster.get_json("rrd", name, "-n", namespace).get("status")))
        print(cluster.kubectl("get", "pods", "-n", namespace, "-o", "wide").stdout)
        raise


def scaled(cluster: KubeCluster, namespace: str, replicas: int) -> list[dict[str, Any]]:
    """The fleet at `replicas` pods, all Ready (scaled here when it is not): its Ready pods."""
    cluster.kubectl("scale", "rrd", FLEET, "-n", namespace, f"--replicas={replicas}")
    wait_rd_ready(cluster, namespace, FLEET, replicas)
    return wait_pods_ready(cluster, namespace, SERVER, replicas)


def test_the_chart_runs_the_operator_as_a_pod(node_cluster: KubeCluster,
                                              operator: dict[str, Any]) -> None:
    pod = operator["pod"]
    assert pod["spec"]["serviceAccountName"] == "rop-reranker-operator"
    (container,) = pod["spec"]["containers"]
    assert container["image"] == IMAGES["operator"]
    status = pod["status"]["containerStatuses"][0]
    assert status["ready"] and status["restartCount"] == 0, status


def test_a_reranker_deployment_serves_through_its_cluster_ip(node_cluster: KubeCluster,
                                                             fleet: str) -> None:
    replicas = node_cluster.get_json("rrd", FLEET, "-n", fleet)["spec"]["replicas"]
    rd = wait_rd_ready(node_cluster, fleet, FLEET, replicas)  # 1, unless a test scaled it
    assert condition(rd, "Ready")["status"] == "True", dump(rd["status"])
    assert condition(rd, "Degraded")["status"] == "False", dump(rd["status"])
    # printer columns, as a user sees them
    [row] = table = node_cluster.table("rrd", FLEET, "-n", fleet)
    assert json.loads(row["MODELS"]) == [MODEL] and row["REPLICAS"] == row["READY"] == str(replicas), table
    assert row["STATUS"] == "True" and row["DEVICE"] == "cpu", table

    client = ServiceClient(node_cluster, fleet, FLEET)
    try:
        remote = client.rerank(QUERY, DOCS)
        served = client.request("GET", "/health").json()["model"]
    finally:
        client.close()

    async def local() -> tuple[dict[str, Any], dict[str, Any]]:
        # the pod's defaults (auto runtime and precision, measured at start on this same CPU)
        async with running_app(runtime="auto", device="cpu", quantization="auto") as app:
            r = await app.post("/rerank", json={"query": QUERY, "documents": DOCS})
            return dict(r.json()), (await app.get("/health")).json()["model"]

    here, model = asyncio.run(local())
    assert (served["backend"], served["dtype"]) == (model["backend"], model["dtype"]), (served, model)
    assert [r["index"] for r in remote["results"]] == [r["index"] for r in here["results"]]
    for a, b in zip(remote["results"], here["results"]):
        assert abs(a["score"] - b["score"]) < 1e-4, (remote, here)


def test_server_pods_run_non_root_on_a_read_only_root(node_cluster: KubeCluster,
                                                      fleet: str) -> None:
    (pod,) = [p for p in pods(node_cluster, fleet, SERVER) if is_ready(p)][:1]
    name = pod["metadata"]["name"]
    uid = node_cluster.kubectl("exec", "-n", fleet, name, "--", "id", "-u").stdout.strip()
    assert uid != "0", uid
    write = node_cluster.kubectl("exec", "-n", fleet, name, "--", "python3", "-c",
                                 "open('/opt/probe', 'w')", check=False)
    assert write.returncode != 0 and "Read-only file system" in write.stderr, write
    sc = pod["spec"]["containers"][0]["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["runAsNonRoot"] is True, sc


def service_ready_ips(cluster: KubeCluster, namespace: str, service: str) -> set[str]:
    """The ready addresses in a Service's EndpointSlices (what kube-proxy programs)."""
    slices = cluster.get_json("endpointslices", "-n", namespace, "-l", f"kubernetes.io/service-name={service}")
    return {address for s in slices["items"] for ep in s.get("endpoints") or ()
            if ep["conditions"].get("ready") for address in ep["addresses"]}


def test_scaling_to_three_spreads_requests_over_every_pod(node_cluster: KubeCluster,
                                                         fleet: str) -> None:
    ready = scaled(node_cluster, fleet, 3)
    names = [p["metadata"]["name"] for p in ready]
    route = {"route": "/rerank", "status": "200"}
    before = {n: pod_metric(node_cluster, fleet, n, "reranker_requests_total", route)
              for n in names}
    ips = {p["status"]["podIP"] for p in ready}
    node_cluster.eventually(lambda: service_ready_ips(node_cluster, fleet, FLEET) >= ips, timeout=30,
                            desc="the three pods ready in the Service's EndpointSlices")

    def served() -> dict[str, float]:
        return {n: pod_metric(node_cluster, fleet, n, "reranker_requests_total", route) - before[n] for n in names}

    client = ServiceClient(node_cluster, fleet, FLEET)
    sent = 0
    try:
        # 30 requests, each on a new connection (kube-proxy balances connections), then more in tens
        # until every pod has served one: kube-proxy programs a new endpoint a moment after the
        # EndpointSlice lists it (minSyncPeriod 1 s, longer on a loaded node). 1 in 20,000 for a
        # pod to get none of 30 by chance once it is programmed.
        while sent < 30 or (sent < 90 and not all(v > 0 for v in served().values())):
            for _ in range(10):
                r = client.request("POST", "/rerank", headers={"Connection": "close"},
                                   json={"query": f"{QUERY} {sent}", "documents": DOCS[:2]})
                assert r.status_code == 200, r.text
                sent += 1
    finally:
        client.close()
    counts = served()
    assert sum(counts.values()) == sent and all(v > 0 for v in counts.values()), (sent, counts)


def test_the_managed_redis_shares_scores_across_pods(node_cluster: KubeCluster,
                                                     fleet: str) -> None:
    first, second = scaled(node_cluster, fleet, 3)[:2]
    query = {"query": f"redis {secrets.token_hex(4)}", "documents": DOCS}
    scored = "reranker_pairs_scored_total"
    a0 = pod_metric(node_cluster, fleet, first["metadata"]["name"], scored)
    b0 = pod_metric(node_cluster, fleet, second["metadata"]["name"], scored)
    for pod in (first, second):  # straight to each pod's address, not through the Service
        r = httpx.post(f"http://{pod['status']['podIP']}:8000/rerank", json=query, timeout=60)
        assert r.status_code == 200, r.text
    a1 = pod_metric(node_cluster, fleet, first["metadata"]["name"], scored)
    b1 = pod_metric(node_cluster, fleet, second["metadata"]["name"], scored)
    models = {pod["metadata"]["name"]: httpx.get(f"http://{pod['status']['podIP']}:8000/health",
                                                 timeout=30).json().get("model")
              for pod in (first, second)}  # a fleet of mixed precisions shares no scores
    assert a1 - a0 == len(DOCS), (a0, a1, models)
    assert b1 - b0 == 0, f"the second pod scored {b1 - b0} pairs the first already had: {models}"


def test_deleting_a_serving_pod_under_load_fails_no_request(node_cluster: KubeCluster,
                                                            fleet: str) -> None:
    victim = scaled(node_cluster, fleet, 3)[0]["metadata"]["name"]
    client = ServiceClient(node_cluster, fleet, FLEET)
    client.rerank(QUERY, DOCS)  # warm the caches: the load measures routing, not the model
    client.close()
    with Load(client.base, clients=LOAD_CLIENTS, body={"query": QUERY, "documents": DOCS},
              keepalive=True, interval=0.1) as load:
        time.sleep(2)
        node_cluster.kubectl("delete", "pod", "-n", fleet, victim, "--wait=false")
        wait_pods_ready(node_cluster, fleet, SERVER, 3)
        node_cluster.eventually(lambda: victim not in {p["metadata"]["name"] for p in
                                                       pods(node_cluster, fleet, SERVER)},
                                timeout=120, desc=f"pod {victim} gone")
        time.sleep(2)
    outcome = load.outcome
    print(f"load during the pod deletion: {outcome}; {outcome.sent_again}")
    assert outcome.ok > 20 and not outcome.failed, (str(outcome), outcome.failed[:5])
    # a request is resent only when a kept-alive connection was reset before any byte of its
    # answer, as the draining pod closed it: at most once per client (its connection to that
    # pod); a refused connection would be a retry, and there must be none
    assert outcome.resent <= LOAD_CLIENTS and outcome.retried == 0, outcome.sent_again


def test_a_spec_change_rolls_every_pod_under_load(node_cluster: KubeCluster,
                                                  fleet: str) -> None:
    old = {p["metadata"]["name"] for p in scaled(node_cluster, fleet, 3)}
    client = ServiceClient(node_cluster, fleet, FLEET)
    client.rerank(QUERY, DOCS)
    client.close()
    with Load(client.base, clients=LOAD_CLIENTS, body={"query": QUERY, "documents": DOCS},
              keepalive=True, interval=0.1) as load:
        time.sleep(2)
        node_cluster.kubectl("patch", "rrd", FLEET, "-n", fleet, "--type=merge", "-p",
                             json.dumps({"spec": {"env": [{"name": "E2E_ROLL",
                                                           "value": secrets.token_hex(3)}]}}))
        def replaced() -> bool:
            live = pods(node_cluster, fleet, SERVER)
            names = {p["metadata"]["name"] for p in live}
            return len(live) == 3 and not names & old and all(map(is_ready, live))

        node_cluster.eventually(replaced, timeout=600, interval=2, desc="every pod replaced")
        wait_rd_ready(node_cluster, fleet, FLEET, 3)
        time.sleep(2)
    outcome = load.outcome
    print(f"load during the rollout: {outcome}; {outcome.sent_again}")
    assert outcome.ok > 20 and not outcome.failed, (str(outcome), outcome.failed[:5])
    # at most once per client and old pod (its kept-alive connection to it); no retry
    assert outcome.resent <= 3 * LOAD_CLIENTS and outcome.retried == 0, outcome.sent_again


def test_a_model_that_cannot_load_is_degraded_with_the_pods_reason(
        node_cluster: KubeCluster, operator: dict[str, Any]) -> None:
    namespace = f"e2e-broken-{secrets.token_hex(3)}"
    node_cluster.kubectl("create", "namespace", namespace)
    try:
        node_cluster.apply(rd_manifest("broken", "reranker-fleet/no-such-model", 1), namespace)

        def degraded() -> dict[str, Any] | None:
            # the server's own words once its container has run and exited: a kubelet under load
            # may first report a passing CreateContainerConfigError ("failed to sync configmap
            # cache"), which is Degraded too, with the kubelet's words
            rd = node_cluster.get_json("rrd", "broken", "-n", namespace)
            degraded = condition(rd, "Degraded")
            ok = degraded.get("status") == "True" and "reranker-fleet/no-such-model" in degraded.get("message", "")
            return rd if ok else None

        rd = node_cluster.eventually(degraded, timeout=300, interval=2,
                                     desc="the broken fleet Degraded")
        (pod,) = pods(node_cluster, namespace, "app.kubernetes.io/instance=broken,"
                                               "app.kubernetes.io/component=server")
        message = condition(rd, "Degraded")["message"]
        assert pod["metadata"]["name"] in message, message
        assert "reranker-fleet/no-such-model" in message, message  # the server's own words
        assert condition(rd, "Ready")["status"] == "False", dump(rd["status"])
    finally:
        node_cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)

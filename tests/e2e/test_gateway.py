"""The gateway on a real node, as a user runs it: the chart with `gateway.enabled` (the operator
and two gateway pods, images from `make images`), two RerankerDeployments with different models
behind the one gateway Service, requests from the host to its ClusterIP through kube-proxy.

- `minilm`: the embedded all-MiniLM-L6-v2 (slim image), three pods: the fleet that takes the
  load, the pod deleted under it, the fan-out and the cache affinity.
- `tiny`: a small random cross-encoder the test makes and mounts through model.pvc (a hostPath
  PersistentVolume on the one node) and serves as `tiny-ce` (spec.model.servedNames), with
  spec.scaleToZero: it idles to zero, and a burst through the gateway wakes it.

Figures the issue asks for are printed (run with -s): the load's ok / failed / resent, the
time to the first answer from zero and its parts, the fan-out speedup, the affinity hit rates.
"""

from __future__ import annotations

import datetime
import json
import os
import secrets
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import httpx
import pytest
from fleet import cluster_ip, condition, dump, pod_metric, pods, wait_images, wait_pods_ready
from fleet_load import Load
from kubecluster import KubeCluster
from models import build_tiny_bert

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ship"))
from helm_render import CHART, adopt_crds  # noqa: E402

IMAGES = {"operator": "reranker-fleet/operator:dev", "server": "reranker-fleet/server:dev",
          "server-torch": "reranker-fleet/server:dev-torch",
          "gateway": "reranker-fleet/gateway:dev", "redis": "reranker-fleet/redis:dev"}
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
TINY = "tiny-ce"
IDLE_SECONDS = 30  # the CRD's minimum
RELEASE = "rgw"
GATEWAY = f"{RELEASE}-reranker-operator-gateway"
QUERY = "What is machine learning?"
DOCS = ["Machine learning is a subset of artificial intelligence.",
        "Python is a programming language.",
        "The weather in Paris is mild in spring.",
        "Deep learning uses neural networks with many layers."]


def server_selector(name: str) -> str:
    return f"app.kubernetes.io/instance={name},app.kubernetes.io/component=server"


def rd(name: str, replicas: int, model: dict[str, Any], **spec: Any) -> str:
    return json.dumps({
        "apiVersion": "reranker.dev/v1alpha1", "kind": "RerankerDeployment",
        "metadata": {"name": name},
        "spec": {"model": model, "replicas": replicas,
                 "resources": {"requests": {"cpu": "100m", "memory": "512Mi"},
                               "limits": {"memory": "2Gi"}}, **spec}})


def wait_rd(cluster: KubeCluster, ns: str, name: str, replicas: int,
            timeout: float = 420) -> dict[str, Any]:
    def ready() -> dict[str, Any] | None:
        body = cluster.get_json("rrd", name, "-n", ns)
        st = body.get("status", {})
        ok = (st.get("readyReplicas", 0) == replicas == body["spec"]["replicas"]
              and (replicas == 0 or condition(body, "Ready").get("status") == "True"))
        return body if ok else None

    try:
        return cluster.eventually(ready, timeout=timeout, interval=1,
                                  desc=f"RerankerDeployment {name} with {replicas} ready pods")
    except AssertionError:
        print(dump(cluster.get_json("rrd", name, "-n", ns)))
        print(cluster.kubectl("get", "pods", "-n", ns, "-o", "wide").stdout)
        raise


@pytest.fixture(scope="module")
def images(node_cluster: KubeCluster) -> dict[str, str]:
    return wait_images(node_cluster, IMAGES)


@pytest.fixture(scope="module")
def model_volume() -> Iterator[Path]:
    """The tiny cross-encoder in a folder the pods' user (10001) can read: a hostPath on the
    node, which is this machine."""
    folder = Path(tempfile.mkdtemp(prefix="e2e-gateway-model-"))
    build_tiny_bert(folder / "tiny-ce")
    for path in [folder, *folder.rglob("*")]:
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def setup(node_cluster: KubeCluster, images: dict[str, str],
          model_volume: Path) -> Iterator[dict[str, Any]]:
    """The chart (operator + gateway for one namespace) and the two fleets in it, Ready."""
    op_ns = f"e2e-gwop-{secrets.token_hex(3)}"
    ns = f"e2e-gw-{secrets.token_hex(3)}"
    pv = f"{ns}-tiny-model"
    for n in (op_ns, ns):
        node_cluster.kubectl("create", "namespace", n)
    config = helm.Config(kubeconfig_path=node_cluster.kubeconfig, namespace=op_ns)
    repo, tag = images["operator"].split(":")
    gw_repo, gw_tag = images["gateway"].split(":")
    values = {"image": {"repository": repo, "tag": tag, "pullPolicy": "Never"},
              "serverImage": images["server"], "redisImage": images["redis"],
              "watchNamespaces": [ns],
              "gateway": {"enabled": True, "namespaces": [ns], "defaultModel": MINILM,
                          "holdTimeoutSeconds": 300, "logLevel": "INFO",
                          "image": {"repository": gw_repo, "tag": gw_tag,
                                    "pullPolicy": "Never"}}}
    adopt_crds(node_cluster, RELEASE, op_ns)
    config.install(str(CHART), RELEASE, values, namespace=op_ns, timeout=120)
    try:
        wait_pods_ready(node_cluster, op_ns, "app.kubernetes.io/name=reranker-operator", 1,
                        timeout=180)
        node_cluster.apply(json.dumps({
            "apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": pv},
            "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadOnlyMany"],
                     "storageClassName": "", "hostPath": {"path": str(model_volume),
                                                          "type": "Directory"},
                     "claimRef": {"namespace": ns, "name": "tiny-model"}}}))
        node_cluster.apply(json.dumps({
            "apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": "tiny-model"},
            "spec": {"accessModes": ["ReadOnlyMany"], "storageClassName": "", "volumeName": pv,
                     "resources": {"requests": {"storage": "1Gi"}}}}), ns)
        node_cluster.apply(rd("minilm", 3, {"id": MINILM}), ns)
        # no IR for this model anywhere: the torch image serves it
        node_cluster.apply(rd("tiny", 1, {"pvc": {"claimName": "tiny-model", "path": "tiny-ce"},
                                          "servedNames": [TINY]},
                              image=images["server-torch"],
                              scaleToZero={"idleSeconds": IDLE_SECONDS}), ns)
        wait_rd(node_cluster, ns, "minilm", 3)
        wait_pods_ready(node_cluster, op_ns, "app.kubernetes.io/component=gateway", 2,
                        timeout=180)
        yield {"namespace": ns, "operator_namespace": op_ns,
               "gateway": service_url(node_cluster, op_ns, GATEWAY)}
    finally:
        for what, selector in (("operator", "app.kubernetes.io/name=reranker-operator"),
                               ("gateway", "app.kubernetes.io/component=gateway")):
            log = node_cluster.kubectl("logs", "-n", op_ns, "-l", selector, "--tail=60",
                                       "--prefix", check=False).stdout
            print(f"--- {what} log (tail) ---\n{log}")
        config.uninstall(RELEASE, ignore_not_found=True, timeout=60)
        for n in (ns, op_ns):
            node_cluster.kubectl("delete", "namespace", n, "--wait=false", check=False)
        node_cluster.kubectl("delete", "pv", pv, "--wait=false", check=False)


def service_url(cluster: KubeCluster, ns: str, service: str) -> str:
    return "http://%s:%d" % cluster_ip(cluster, ns, service)


def post(url: str, path: str, body: dict[str, Any], timeout: float = 300) -> dict[str, Any]:
    """POST through kube-proxy, retrying refused connections for a few seconds (rules syncing)."""
    deadline = time.monotonic() + 10
    while True:
        try:
            r = httpx.post(url + path, json=body, timeout=timeout)
            break
        except httpx.ConnectError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)
    assert r.status_code == 200, r.text
    return dict(r.json())


def awake(cluster: KubeCluster, ns: str) -> None:
    """The tiny fleet at one ready pod (woken through the gateway when it is at zero)."""
    if cluster.get_json("rrd", "tiny", "-n", ns)["spec"]["replicas"] == 0:
        cluster.kubectl("scale", "rrd", "tiny", "-n", ns, "--replicas=1")
    wait_rd(cluster, ns, "tiny", 1)


def test_clients_reach_each_fleet_by_name_through_one_gateway(node_cluster: KubeCluster,
                                                              setup: dict[str, Any]) -> None:
    import cohere
    import litellm

    url, ns = setup["gateway"], setup["namespace"]
    awake(node_cluster, ns)
    table = node_cluster.kubectl("get", "rrd", "-n", ns).stdout
    print(table)
    assert TINY in table and MINILM in table, table
    models = httpx.get(url + "/v1/models", timeout=30).json()
    assert {MINILM, TINY} <= {m["id"] for m in models["data"]}, models

    co = cohere.ClientV2(base_url=url, api_key="anything", timeout=300)
    answers = {}
    for model in (MINILM, TINY):
        fleet_url = service_url(node_cluster, ns, "minilm" if model == MINILM else "tiny")
        direct = post(fleet_url, "/v2/rerank", {"model": model, "query": QUERY, "documents": DOCS})
        got = co.rerank(model=model, query=QUERY, documents=DOCS, top_n=4)
        answers[model] = [(r.index, round(r.relevance_score, 4)) for r in got.results]
        assert answers[model] == [(r["index"], round(r["relevance_score"], 4))
                                  for r in direct["results"]], (model, got, direct)
        lite = litellm.rerank(model=f"cohere/{model}", query=QUERY, documents=DOCS, top_n=2,
                              api_base=url, api_key="anything")
        assert [(r["index"], round(r["relevance_score"], 4)) for r in lite.results] == \
            answers[model][:2], (model, lite)
    assert answers[MINILM] != answers[TINY]  # two models, not one answering both names
    print(f"cohere + litellm through the gateway: {answers}")
    with pytest.raises(cohere.errors.NotFoundError):
        co.rerank(model="no-such-model", query=QUERY, documents=DOCS)


def test_a_pod_deleted_under_load_through_the_gateway_fails_nothing(
        node_cluster: KubeCluster, setup: dict[str, Any]) -> None:
    url, ns = setup["gateway"], setup["namespace"]
    wait_rd(node_cluster, ns, "minilm", 3)
    victim = pods(node_cluster, ns, server_selector("minilm"))[0]["metadata"]["name"]
    post(url, "/rerank", {"query": QUERY, "documents": DOCS})  # the default model: MiniLM
    with Load(url, clients=4, keepalive=True) as load:
        time.sleep(5)
        before = load.outcome.ok
        node_cluster.kubectl("delete", "pod", victim, "-n", ns, "--wait=false")
        time.sleep(15)
    outcome = load.outcome
    print(f"pod {victim} deleted under load through the gateway: {outcome} "
          f"({before} ok before the deletion)")
    assert outcome.failed == [] and outcome.resent == 0, outcome.failed[:5]
    assert outcome.ok > before > 10, outcome
    wait_rd(node_cluster, ns, "minilm", 3)


def cache_counts(cluster: KubeCluster, ns: str) -> tuple[float, float]:
    names = [p["metadata"]["name"] for p in pods(cluster, ns, server_selector("minilm"))]
    hits = sum(pod_metric(cluster, ns, n, "reranker_cache_hits_total") for n in names)
    misses = sum(pod_metric(cluster, ns, n, "reranker_cache_misses_total") for n in names)
    return hits, misses


def test_fan_out_speedup_and_cache_affinity(node_cluster: KubeCluster,
                                            setup: dict[str, Any]) -> None:
    url, ns = setup["gateway"], setup["namespace"]
    ready = wait_pods_ready(node_cluster, ns, server_selector("minilm"), 3)
    one = f"http://{ready[0]['status']['podIP']}:8000"

    # 1,000 documents: one pod directly vs the gateway splitting it over the three (fresh
    # documents each time: no score cache answers)
    def thousand(tag: str) -> dict[str, Any]:
        return {"query": QUERY, "documents": [
            f"{tag} document {i}: machine learning, rerankers and the weather in spring"
            for i in range(1000)]}

    timings: dict[str, list[float]] = {"one pod": [], "gateway, 3 pods": []}
    for round_ in range(2):
        for what, target in (("one pod", one), ("gateway, 3 pods", url)):
            body = thousand(f"{what}-{round_}-{secrets.token_hex(3)}")
            t0 = time.perf_counter()
            answer = post(target, "/rerank", body)
            timings[what].append(time.perf_counter() - t0)
            assert len(answer["results"]) == 1000
    best = {k: min(v) for k, v in timings.items()}
    print(f"fan-out, 1,000 documents: one pod {best['one pod']:.2f} s, through the gateway on 3 "
          f"pods {best['gateway, 3 pods']:.2f} s: {best['one pod'] / best['gateway, 3 pods']:.2f}x "
          f"(both rounds: {timings}; the node has {os.cpu_count()} cores for all three pods)")

    # cache affinity: 12 queries x 5 rounds over the same 8 documents, through the gateway
    # (same query -> same pod) and through the fleet's Service (kube-proxy: a pod per
    # connection, at random); each its own queries, so each starts cold
    service = service_url(node_cluster, ns, "minilm")
    rates = {}
    for what, target in (("gateway (affinity)", url), ("Service (kube-proxy)", service)):
        tag = secrets.token_hex(3)
        h0, m0 = cache_counts(node_cluster, ns)
        with httpx.Client(timeout=120, headers={"Connection": "close"}) as client:
            for _ in range(5):
                for q in range(12):
                    r = client.post(target + "/v1/rerank", json={
                        "model": MINILM, "query": f"{tag} question {q}",
                        "documents": DOCS + [f"{d} Again." for d in DOCS]})
                    assert r.status_code == 200, r.text
        h1, m1 = cache_counts(node_cluster, ns)
        rates[what] = (h1 - h0) / max(1.0, (h1 - h0) + (m1 - m0))
    print("score-cache hit rate, 12 queries x 5 rounds: " +
          ", ".join(f"{k} {v:.0%}" for k, v in rates.items()))
    # the first round misses, every later one can hit: 80% at best
    assert rates["gateway (affinity)"] >= 0.7, rates
    assert rates["gateway (affinity)"] > rates["Service (kube-proxy)"], rates


def _t(stamp: str) -> float:
    return datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def test_an_idle_fleet_goes_to_zero_and_a_burst_wakes_it(node_cluster: KubeCluster,
                                                         setup: dict[str, Any]) -> None:
    url, ns = setup["gateway"], setup["namespace"]
    awake(node_cluster, ns)
    t_idle = time.monotonic()
    node_cluster.eventually(
        lambda: node_cluster.get_json("rrd", "tiny", "-n", ns)["spec"]["replicas"] == 0,
        timeout=IDLE_SECONDS + 120, interval=2, desc="the idle fleet scaled to zero")
    node_cluster.eventually(lambda: not pods(node_cluster, ns, server_selector("tiny")),
                            timeout=120, interval=1, desc="its pod gone")
    print(f"tiny: at zero {time.monotonic() - t_idle:.0f} s after it was Ready "
          f"(idleSeconds {IDLE_SECONDS})")

    answers: list[tuple[float, int]] = []
    lock = threading.Lock()
    wall0 = time.time()
    t0 = time.monotonic()

    def one(i: int) -> None:
        r = httpx.post(url + "/v1/rerank", json={"model": TINY, "query": f"{QUERY} {i}",
                                                 "documents": DOCS}, timeout=360)
        with lock:
            answers.append((time.monotonic() - t0, r.status_code))

    burst = [threading.Thread(target=one, args=(i,)) for i in range(20)]
    for t in burst:
        t.start()
    for t in burst:
        t.join(400)
    statuses = sorted(s for _, s in answers)
    first = min(t for t, _ in answers)
    assert statuses == [200] * 20, statuses

    body = node_cluster.get_json("rrd", "tiny", "-n", ns)
    woken = _t(body["metadata"]["annotations"]["reranker.dev/woken-at"])
    (pod,) = [p for p in pods(node_cluster, ns, server_selector("tiny"))
              if not p["metadata"].get("deletionTimestamp")]
    created = _t(pod["metadata"]["creationTimestamp"])
    scheduled = _t(condition(pod, "PodScheduled")["lastTransitionTime"])
    started = _t(pod["status"]["containerStatuses"][0]["state"]["running"]["startedAt"])
    ready = _t(condition(pod, "Ready")["lastTransitionTime"])
    health = json.loads(node_cluster.kubectl(
        "get", "--raw",
        f"/api/v1/namespaces/{ns}/pods/{pod['metadata']['name']}:8000/proxy/health").stdout)
    seconds = (health.get("startup") or {}).get("seconds") or {}
    print(f"woken from zero by a burst of 20 through the gateway: 20 ok / 0 failed; first answer "
          f"after {first:.1f} s, last after {max(t for t, _ in answers):.1f} s. Parts (API "
          f"timestamps, 1 s resolution): wake annotation {woken - wall0:+.0f} s, pod created "
          f"{created - wall0:+.0f} s, scheduled {scheduled - created:.0f} s later, container "
          f"started {started - scheduled:.0f} s later, Ready {ready - started:.0f} s later "
          f"(server: {json.dumps(seconds)}), first answer {wall0 + first - ready:.1f} s after "
          f"Ready")

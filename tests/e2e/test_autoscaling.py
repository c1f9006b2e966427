"""The autoscaling closed loop on the real node: queue depth → Prometheus → prometheus-adapter
→ HPA → the RerankerDeployment's scale subresource → the operator → more Ready pods, and back.

A RerankerDeployment with `autoscaling: {minReplicas: 1, maxReplicas: 3, metric: queueDepth}`
serves the embedded MiniLM from the server image. Prometheus scrapes its pods and the adapter
serves `reranker_queue_depth` through custom.metrics.k8s.io (hack/cluster metrics, see
hack/devcluster/metrics.py); the dev cluster's controller-manager syncs HPAs every 5 s and the
RD's HPA behavior keeps scale-down stabilization short, so a whole cycle fits in minutes.

Bounded load from the host through the Service's ClusterIP (kube-proxy) fills the queue: the
HPA raises spec.replicas, the operator follows, the new pods become Ready and serve. Then the
load drops to one light client (below the target) until the fleet is back to one pod. Every
request must succeed, through scale-up and scale-down. The test records a sample a second and
the timeline, prints it, and writes the record (RERANKER_E2E_RECORD=path, else the test's tmp
dir) that bench/autoscaling_plot.py turns into docs/autoscaling.png.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from fleet import ServiceClient, cluster_ip
from fleet_load import ApiReader, Load, Recorder
from kubecluster import KubeCluster

NAME = "scaled"
MODEL = "sentence-transformers/all-MiniLM-L6-v2"  # the server image's embedded model
MIN, MAX = 1, 3
#: Pairs waiting per pod. The heavy load keeps ~HEAVY_CLIENTS x DOCS pairs in flight: with
#: batches of BATCH pairs, about 8x the target waits on one pod and still 2x on three, so the
#: HPA goes to MAX and stays there while the load lasts; the light load keeps it near 0.
TARGET, BATCH = 8, 8
HEAVY_CLIENTS, DOCS = 6, 12
GROUP = "/apis/reranker.dev/v1alpha1"
CUSTOM = "/apis/custom.metrics.k8s.io/v1beta1"


def autoscaled_rd() -> dict[str, Any]:
    return {
        "apiVersion": "reranker.dev/v1alpha1", "kind": "RerankerDeployment",
        "metadata": {"name": NAME},
        "spec": {
            "model": {"id": MODEL},
            "replicas": MIN,
            "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}},
            # Long enough that a queue several batches deep is never refused: the test is
            # about scaling, and a 429 would count as a failed request.
            "parallelism": {"queueTimeoutSeconds": 120, "batchSize": BATCH},
            "autoscaling": {
                "enabled": True, "minReplicas": MIN, "maxReplicas": MAX,
                "metric": "queueDepth", "target": TARGET,
                "behavior": {
                    "scaleUp": {"stabilizationWindowSeconds": 0,
                                "policies": [{"type": "Pods", "value": 2, "periodSeconds": 5}]},
                    "scaleDown": {"stabilizationWindowSeconds": 10,
                                  "policies": [{"type": "Pods", "value": 2, "periodSeconds": 5}]},
                },
            },
        },
    }


def first(samples: list[dict[str, Any]], pred: Any, after: float = -1.0) -> float | None:
    return next((s["t"] for s in samples if s["t"] >= after and pred(s)), None)


def test_queue_depth_scales_the_fleet_up_and_back(node_cluster: KubeCluster, e2e_namespace: str,
                                                  host_operator: Any, metrics_path: dict,
                                                  tmp_path: Path) -> None:
    ns = e2e_namespace
    node_cluster.apply(json.dumps(autoscaled_rd()), namespace=ns)
    node_cluster.kubectl("wait", "rrd", NAME, "-n", ns, "--for=condition=Ready", "--timeout=300s",
                         timeout=330)
    ip, port = cluster_ip(node_cluster, ns, NAME)
    url = f"http://{ip}:{port}"
    # kube-proxy programs the Service's rules a moment after its first endpoint is Ready; until
    # then the ClusterIP refuses (fleet.py). A pod Ready 2 s after it starts (the slim image)
    # beats that, and the load below sends again only once: wait for the ClusterIP to answer.
    reach = ServiceClient(node_cluster, ns, NAME)
    try:
        assert reach.request("GET", "/ready", retry_for=30).status_code == 200
    finally:
        reach.close()
    api = ApiReader(node_cluster.kubeconfig)
    prom = metrics_path["prometheus"]

    def sample() -> dict[str, Any]:
        rd = api.get(f"{GROUP}/namespaces/{ns}/rerankerdeployments/{NAME}")
        hpa = api.get(f"/apis/autoscaling/v2/namespaces/{ns}/horizontalpodautoscalers/{NAME}")
        try:  # the adapter answers an error until it has listed the pods' series
            metric = api.get(f"{CUSTOM}/namespaces/{ns}/pods/*/reranker_queue_depth",
                             labelSelector=rd["status"]["selector"])
        except httpx.HTTPStatusError:
            metric = None
        per_pod = {m["describedObject"]["name"]: _quantity(m["value"])
                   for m in (metric or {}).get("items", ())}
        current = ((hpa or {}).get("status", {}).get("currentMetrics") or [{}])[0]
        raw = httpx.get(f"{prom}/api/v1/query", timeout=5, params={
            "query": f'sum(reranker_queue_depth{{namespace="{ns}",service="{NAME}"}})'}).json()
        result = raw["data"]["result"]
        return {
            "spec_replicas": rd["spec"]["replicas"],
            "ready_replicas": rd["status"].get("readyReplicas", 0),
            "hpa_desired": (hpa or {}).get("status", {}).get("desiredReplicas"),
            "hpa_metric": _quantity(current["pods"]["current"]["averageValue"])
            if current.get("pods") else None,
            "adapter_per_pod": per_pod,
            "queue_depth_total": float(result[0]["value"][1]) if result else None,
        }

    recorder = Recorder(sample).start()
    heavy = Load(url, clients=HEAVY_CLIENTS, docs=DOCS).start()
    light = Load(url, clients=1, docs=2)
    events: dict[str, float | None] = {"load_start": recorder.now()}
    out = Path(os.environ.get("RERANKER_E2E_RECORD") or tmp_path / "autoscaling.json")
    served_before: dict[str, float] = {}
    served_after: dict[str, float] = {}
    try:
        # Up: the HPA asks for more, the operator follows, the new pods get Ready and serve.
        node_cluster.eventually(lambda: recorder.samples and recorder.samples[-1][
            "ready_replicas"] >= MAX, timeout=300, interval=1, desc=f"{MAX} Ready pods")
        served_before = _served_by_pod(prom, ns)
        time.sleep(15)  # the new pods serve their share of the load
        served_after = _served_by_pod(prom, ns)
        heavy.stop()
        events["load_stop"] = recorder.now()
        # Down: one light client keeps requests flowing while pods are removed.
        light.start()
        node_cluster.eventually(
            lambda: recorder.samples[-1]["spec_replicas"] == MIN
            and recorder.samples[-1]["ready_replicas"] == MIN
            and len(_pods(api, ns)) == MIN,
            timeout=240, interval=1, desc="back to one pod")
        time.sleep(3)
    finally:
        heavy_outcome, light_outcome = heavy.stop(), light.stop()
        recorder.stop()
        api.close()
        s = recorder.samples
        events["metric_visible"] = first(s, lambda x: any(v > 0 for v in x["adapter_per_pod"].values()))
        events["scaled_up"] = first(s, lambda x: x["spec_replicas"] > MIN)
        events["pods_ready"] = first(s, lambda x: x["ready_replicas"] >= MAX)
        events["scaled_down"] = first(s, lambda x: x["spec_replicas"] < MAX,
                                      after=events["pods_ready"] or 0)
        events["back_to_min"] = first(s, lambda x: x["spec_replicas"] == MIN
                                      and x["ready_replicas"] == MIN,
                                      after=events.get("load_stop") or 0)
        record = {"namespace": ns, "name": NAME, "min_replicas": MIN, "max_replicas": MAX,
                  "target": TARGET, "heavy_clients": HEAVY_CLIENTS, "docs_per_request": DOCS,
                  "events": events, "samples": s, "recorder_errors": recorder.errors,
                  "requests": {"heavy_ok": heavy_outcome.ok, "light_ok": light_outcome.ok,
                               "failed": heavy_outcome.failed + light_outcome.failed,
                               "retried": heavy_outcome.retried + light_outcome.retried,
                               "resent": heavy_outcome.resent + light_outcome.resent,
                               "served_by_pod_while_scaled": {
                                   p: served_after.get(p, 0) - served_before.get(p, 0)
                                   for p in served_after}}}
        out.write_text(json.dumps(record, indent=1) + "\n")
        print(f"\nautoscaling timeline (s since load start; record in {out}):")
        for name, when in sorted(events.items(), key=lambda kv: (kv[1] is None, kv[1] or 0)):
            print(f"  {name:15s} {when}")
        print(f"  requests: {record['requests']}")
        print(f"  recorder errors: {len(recorder.errors)} {recorder.errors[:3]}")

    print(f"  heavy load: {heavy_outcome}; light load: {light_outcome}")  # before any assert: a failure shows them
    failed = heavy_outcome.failed + light_outcome.failed
    assert not failed, failed[:5]
    # no connection error at all: nothing retried (refused) or resent (reset before an answer)
    sent_again = heavy_outcome.sent_again + light_outcome.sent_again
    assert heavy_outcome.retried + light_outcome.retried == 0, sent_again
    assert heavy_outcome.resent + light_outcome.resent == 0, sent_again
    assert heavy_outcome.ok > 0 and light_outcome.ok > 0
    order = ["load_start", "metric_visible", "scaled_up", "pods_ready", "load_stop",
             "scaled_down", "back_to_min"]
    times = [events.get(e) for e in order]
    assert None not in times, events
    assert times == sorted(times), f"the timeline is out of order: {events}"  # type: ignore[type-var]
    # The HPA never asked for more than max, and the new pods really served.
    assert max(x["spec_replicas"] for x in s) == MAX
    served = {p: served_after.get(p, 0) - served_before.get(p, 0) for p in served_after}
    assert len([p for p, n in served.items() if n > 0]) == MAX, served


def _quantity(text: str) -> float:
    """A Kubernetes quantity as the custom metrics API writes it ("12", "1500m", "2k")."""
    scale = {"m": 1e-3, "k": 1e3, "M": 1e6}.get(text[-1:])
    return float(text[:-1]) * scale if scale else float(text)


def _pods(api: ApiReader, ns: str) -> list[str]:
    pods = api.get(f"/api/v1/namespaces/{ns}/pods",
                   labelSelector=f"app.kubernetes.io/instance={NAME},"
                                 "app.kubernetes.io/component=server")
    return [p["metadata"]["name"] for p in pods["items"]]


def _served_by_pod(prometheus: str, ns: str) -> dict[str, float]:
    r = httpx.get(f"{prometheus}/api/v1/query", timeout=5, params={
        "query": f'sum by (pod) (reranker_requests_total{{namespace="{ns}",service="{NAME}",'
                 f'status="200"}})'}).json()
    return {x["metric"]["pod"]: float(x["value"][1]) for x in r["data"]["result"]}


pytestmark = pytest.mark.timeout(900)

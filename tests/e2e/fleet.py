"""Helpers of the end-to-end tests: pods becoming Ready, reaching a Service's ClusterIP from
the host (through kube-proxy), and per-pod metrics. The load generator is fleet_load.py.

The host reaches ClusterIPs like a pod does: kube-proxy's rules DNAT the connection to a pod on
the node bridge. Right after a rollout a ClusterIP may refuse for about a second until
kube-proxy has synced its rules, hence the retry in `ServiceClient`.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

import httpx
from kubecluster import KubeCluster


def pods(cluster: KubeCluster, namespace: str, selector: str) -> list[dict[str, Any]]:
    return list(cluster.get_json("pods", "-n", namespace, "-l", selector)["items"])


def is_ready(pod: dict[str, Any]) -> bool:
    if pod["metadata"].get("deletionTimestamp"):
        return False
    conds = {c["type"]: c["status"] for c in pod.get("status", {}).get("conditions", [])}
    return conds.get("Ready") == "True"


def wait_pods_ready(cluster: KubeCluster, namespace: str, selector: str, count: int,
                    timeout: float = 300) -> list[dict[str, Any]]:
    """Wait until exactly `count` pods match and all are Ready (terminating ones excluded);
    a pod whose container keeps failing ends the wait early with its reason."""

    def ready() -> list[dict[str, Any]] | None:
        live = [p for p in pods(cluster, namespace, selector)
                if not p["metadata"].get("deletionTimestamp")]
        for p in live:
            for cs in p.get("status", {}).get("containerStatuses", []):
                waiting = cs.get("state", {}).get("waiting") or {}
                if waiting.get("reason") in ("ErrImagePull", "ImagePullBackOff",
                                             "ErrImageNeverPull", "CreateContainerConfigError",
                                             "CreateContainerError", "InvalidImageName"):
                    raise AssertionError(f"pod {p['metadata']['name']}: {waiting}")
        return live if len(live) == count and all(map(is_ready, live)) else None

    return KubeCluster.eventually(ready, timeout=timeout, interval=1,
                                  desc=f"{count} Ready pods {selector} in {namespace}")


def cluster_ip(cluster: KubeCluster, namespace: str, service: str) -> tuple[str, int]:
    svc = cluster.get_json("service", service, "-n", namespace)
    return svc["spec"]["clusterIP"], int(svc["spec"]["ports"][0]["port"])


class ServiceClient:
    """HTTP to a Service's ClusterIP from the host."""

    def __init__(self, cluster: KubeCluster, namespace: str, service: str,
                 timeout: float = 60) -> None:
        ip, port = cluster_ip(cluster, namespace, service)
        self.base = f"http://{ip}:{port}"
        self.client = httpx.Client(base_url=self.base, timeout=timeout)

    def request(self, method: str, path: str, *, retry_for: float = 5,
                **kw: Any) -> httpx.Response:
        """Retries refused/reset connections for `retry_for` seconds (kube-proxy syncing)."""
        deadline = time.monotonic() + retry_for
        while True:
            try:
                return self.client.request(method, path, **kw)
            except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def rerank(self, query: str, documents: list[str], **kw: Any) -> dict[str, Any]:
        r = self.request("POST", "/rerank", json={"query": query, "documents": documents}, **kw)
        assert r.status_code == 200, r.text
        return dict(r.json())

    def close(self) -> None:
        self.client.close()


def pod_metric(cluster: KubeCluster, namespace: str, pod: str, name: str,
               labels: dict[str, str] | None = None) -> float:
    """Sum of a Prometheus sample of one pod's /metrics, read through the API server's pod
    proxy (the kubelet is not asked; the request goes to the pod IP)."""
    raw = cluster.kubectl("get", "--raw",
                          f"/api/v1/namespaces/{namespace}/pods/{pod}:8000/proxy/metrics").stdout
    total = 0.0
    assert re.search(rf"^# TYPE {re.escape(name.removesuffix('_total'))}(_total)? ", raw, re.M), \
        f"{pod} exposes no {name}:\n{raw[:2000]}"
    for line in raw.splitlines():
        m = re.match(rf"^{re.escape(name)}(\{{[^}}]*\}})?\s+(\S+)$", line)
        if not m:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or ""))
        if all(got.get(k) == v for k, v in (labels or {}).items()):
            total += float(m.group(2))
    return total


def wait_images(cluster: KubeCluster, images: dict[str, str], timeout: float = 60) -> dict[str, str]:
    """`images` once the node lists them all (the kubelet lists the node's images in its status
    some seconds after it starts); AssertionError naming the missing ones otherwise: `make
    images` loads them into a running node, `hack/cluster up` imports them."""
    def missing() -> list[str]:
        node = cluster.get_json("node", cluster.info["node"]["name"])
        present = {n for image in node["status"].get("images") or []
                   for n in image.get("names") or []}
        return [i for i in images.values() if f"docker.io/{i}" not in present]

    deadline = time.monotonic() + timeout
    while (left := missing()) and time.monotonic() < deadline:
        time.sleep(2)
    assert not left, (f"images {left} are not on the node: run `make images` "
                      "(it loads them into a running node; `hack/cluster up` imports them)")
    return images


def condition(obj: dict[str, Any], type_: str) -> dict[str, Any]:
    for c in obj.get("status", {}).get("conditions", []):
        if c["type"] == type_:
            return dict(c)
    return {}


def dump(obj: Any) -> str:
    return json.dumps(obj, indent=1)[:4000]

"""Helpers of the end-to-end tests: pods becoming Ready, reaching a Service's ClusterIP from
the host (through kube-proxy), a bounded load generator, and per-pod metrics.

The host reaches ClusterIPs like a pod does: kube-proxy's rules DNAT the connection to a pod on
the node bridge. Right after a rollout a ClusterIP may refuse for about a second until
kube-proxy has synced its rules, hence the retry in `ServiceClient`.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
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


@dataclass
class LoadResult:
    statuses: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    resent: list[str] = field(default_factory=list)  # resets of a reused connection, sent again

    @property
    def failed(self) -> int:
        return sum(n for s, n in self.statuses.items() if s != "200")

    @property
    def total(self) -> int:
        return sum(self.statuses.values())


@contextmanager
def load(base_url: str, body: dict[str, Any], *, clients: int = 2,
         interval: float = 0.1) -> Iterator[LoadResult]:
    """Clients posting `body` to /rerank in a loop (each waits `interval` between requests)
    until the block ends: a bounded, continuous load. Every non-200 answer and every transport
    error counts as a failed request (status "error: ..."), with one exception that HTTP
    clients handle the same way: a kept-alive connection that the server closed (a draining
    pod closes its idle ones) in the instant the request was written on it is reset before
    any answer; that request is sent once more on a new connection (`resent`), and counts by
    the second answer."""
    result = LoadResult()
    stop = threading.Event()
    lock = threading.Lock()

    def post(http: httpx.Client) -> str:
        try:
            return str(http.post("/rerank", json=body).status_code)
        except (httpx.ReadError, httpx.RemoteProtocolError, httpx.WriteError) as e:
            with lock:
                result.resent.append(f"{time.strftime('%H:%M:%S')} {e!r}")
        return str(http.post("/rerank", json=body).status_code)

    def client() -> None:
        with httpx.Client(base_url=base_url, timeout=60) as http:
            while not stop.is_set():
                try:
                    status = post(http)
                except httpx.HTTPError as e:
                    status = f"error: {type(e).__name__}"
                    with lock:
                        result.errors.append(f"{time.strftime('%H:%M:%S')} {e!r}")
                with lock:
                    result.statuses[status] += 1
                stop.wait(interval)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    try:
        yield result
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=90)


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


def condition(obj: dict[str, Any], type_: str) -> dict[str, Any]:
    for c in obj.get("status", {}).get("conditions", []):
        if c["type"] == type_:
            return dict(c)
    return {}


def dump(obj: Any) -> str:
    return json.dumps(obj, indent=1)[:4000]

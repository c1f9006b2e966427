"""Macs in the Service, on the real node: requests to the ClusterIP reach pods and Macs alike,
and a Mac that dies leaves the Service without a failed request.

Two server pods (the embedded MiniLM, from the server image) and two stand-in Macs
(tests/stand_in_macs.py: `reranker serve` with the MLX backend at addresses of their own in a
network namespace) serve one RerankerDeployment. The Macs register themselves; the operator
probes them and lists them in its EndpointSlice next to the pods'; kube-proxy spreads the
Service's connections over all four. Every backend's own /metrics counts what it served.

Then one Mac is killed under load (no deregistration: a crash or a pulled cable). The operator's
probes mark it not ready within the documented bound (probe period x failure threshold +
timeout; the operator here runs with 0.5 s x 2 + 1 s) and kube-proxy stops sending it
connections. Clients follow docs/macs.md's advice (retry a connection error on a new
connection, with backoff, for longer than that bound): 0 requests fail, and afterwards the
pods and the other Mac serve every request.

And one Mac is stopped under load with SIGTERM (launchd's stop): it drains like a pod. It
deletes its RerankerEndpoint, the operator takes it out of the EndpointSlice, and it keeps
accepting and serving until kube-proxy has had time to follow (RERANKER_REGISTER_LEAVE_SECONDS)
before it closes its socket: 0 requests fail and none needs resending.

The operator cannot learn the dev node's pod range (its CNI assigns addresses from a range of
its own and leaves the Node's spec.podCIDRs empty), so it is given the range, as the chart's
clusterCIDRs would; the Service range it reads from the API server's ServiceCIDR.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fleet import cluster_ip
from fleet_load import Load, Outcome
from kubecluster import KubeCluster
from stand_in_macs import Mac, MacNetwork, slice_endpoints

REPO = Path(__file__).resolve().parents[2]
MAC_RBAC = REPO / "deploy" / "mac" / "rbac.yaml"
NAME = "mixed"
MODEL = "sentence-transformers/all-MiniLM-L6-v2"  # the server image's embedded model
PODS = 2
#: The e2e operator's probe settings (tests/e2e/conftest.py) make a dead Mac not ready within
#: period x failures + timeout = 2 s; the bound adds a watch event and the operator's write.
REMOVAL_BOUND = 0.5 * 2 + 1 + 1.5
#: kube-proxy's resync after the EndpointSlice changes (minSyncPeriod 1 s) and its iptables run.
PROXY_SYNC = 2.0
RETRY_WINDOW = 10.0  # > REMOVAL_BOUND + PROXY_SYNC, with room for a loaded machine
#: The dev node's pod range (hack/devcluster/network.py), which its Node does not show.
POD_CIDR = "198.18.64.0/24"
CLIENTS = 4
#: Requests sent again after they went out to a Mac that was then killed (fleet_load's
#: `resent`): per client, the one it had on the Mac at the kill, and one more that the Mac's
#: relay accepted in the instant before it saw its server gone and stopped listening. Later
#: connections are refused before the request goes out (`retried`, not bounded here: they last
#: until kube-proxy follows the operator, which the removal bound covers).
RESENT_AFTER_A_KILL = 2 * CLIENTS
#: A Mac stopped with SIGTERM leaves the Service before it stops accepting: nothing is sent
#: again, neither resent nor refused.
RESENT_AFTER_A_DRAIN = 0
#: How long a draining Mac accepts after deleting its RerankerEndpoint (its default).
LEAVE_SECONDS = 5


@pytest.fixture(autouse=True)
def cluster_cidrs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The pod range for the host operator (autouse: set before `host_operator` starts it)."""
    monkeypatch.setenv("RERANKER_OPERATOR_CLUSTER_CIDRS", POD_CIDR)


def fleet(name: str, *, pods: int, subnet: str, ns: str) -> str:
    return json.dumps({
        "apiVersion": "reranker.dev/v1alpha1", "kind": "RerankerDeployment",
        "metadata": {"name": name},
        "spec": {"model": {"id": MODEL}, "replicas": pods,
                 "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}},
                 "externalEndpoints": {
                     "allowedCIDRs": [subnet],
                     "allowedIdentities": [f"system:serviceaccount:{ns}:reranker-mac"]}}})


def served(url: str) -> float:
    """Rerank requests a backend answered with 200, from its own /metrics."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(s.value for family in text_string_to_metric_families(text)
               if family.name == "reranker_requests"
               for s in family.samples
               if s.name == "reranker_requests_total" and s.labels.get("route") == "/rerank"
               and s.labels.get("status") == "200")


def mac_env(model: Path, ns: str, kubeconfig: str, name: str, address: str) -> dict[str, str]:
    return {"RERANKER_DEVICE": "mlx", "RERANKER_RUNTIME": "mlx", "RERANKER_MODEL": str(model),
            "RERANKER_MODEL_KIND": "cross-encoder", "RERANKER_DRAIN_SECONDS": "30",
            "RERANKER_REGISTER_DEPLOYMENT": NAME, "RERANKER_REGISTER_NAMESPACE": ns,
            "RERANKER_REGISTER_KUBECONFIG": kubeconfig, "RERANKER_REGISTER_NAME": name,
            "RERANKER_REGISTER_ADDRESS": address, "RERANKER_REGISTER_LEASE_SECONDS": "30",
            "RERANKER_REGISTER_LEAVE_SECONDS": str(LEAVE_SECONDS)}


def fleet_with_two_macs(node_cluster: KubeCluster, ns: str, mac_network: MacNetwork, tiny_bert: Path,
                        uvicorn_server: Any, *, pods: int) -> dict[str, Mac]:
    """A fleet of `pods` pods and the two stand-in Macs (by address), all Ready in its Service."""
    addresses = mac_network.addresses
    subnet = addresses[0].rsplit(".", 1)[0] + ".0/24"
    node_cluster.apply(fleet(NAME, pods=pods, subnet=subnet, ns=ns), namespace=ns)
    node_cluster.kubectl("apply", "-n", ns, "-f", str(MAC_RBAC))
    kubeconfig = node_cluster.mint_kubeconfig(ns, "reranker-mac")
    port = mac_network.free_port()
    macs = {addr: Mac(uvicorn_server, mac_network, address=addr, port=port,
                      env=mac_env(tiny_bert, ns, kubeconfig, f"mac-{i}", addr)).start()
            for i, addr in enumerate(addresses)}
    node_cluster.kubectl("wait", "rrd", NAME, "-n", ns, "--for=condition=Ready", "--timeout=300s",
                         timeout=330)
    both = {addr: {"ready": True, "serving": True, "port": port} for addr in macs}
    node_cluster.eventually(lambda: slice_endpoints(node_cluster, ns, NAME) == both,
                           timeout=30, desc="both Macs ready in the Service's EndpointSlice")
    return macs


def report(what: str, outcome: Outcome) -> None:
    print(f"{what}: ok / failed / resent = {outcome.ok} / {len(outcome.failed)} / "
          f"{outcome.resent} ({outcome.retried} refused connections retried)")
    for line in outcome.sent_again[:20]:
        print(f"  {line}")


def test_service_spreads_over_pods_and_macs_and_drops_a_dead_mac(
        node_cluster: KubeCluster, e2e_namespace: str, host_operator: Any,
        mac_network: MacNetwork, tiny_bert: Path, uvicorn_server: Any) -> None:
    ns = e2e_namespace
    addr_a, _ = mac_network.addresses
    macs = fleet_with_two_macs(node_cluster, ns, mac_network, tiny_bert, uvicorn_server, pods=PODS)
    pods = {p["status"]["podIP"]: p["metadata"]["name"] for p in node_cluster.get_json(
        "pods", "-n", ns, "-l", f"app.kubernetes.io/instance={NAME}")["items"]}
    assert len(pods) == PODS
    backends = {**{name: f"http://{ip}:8000" for ip, name in pods.items()},
                **{f"mac {addr}": mac.url for addr, mac in macs.items()}}
    ip, service_port = cluster_ip(node_cluster, ns, NAME)
    url = f"http://{ip}:{service_port}"

    # 1. All four backends serve the Service's traffic.
    before = {b: served(u) for b, u in backends.items()}
    load = Load(url, clients=CLIENTS, docs=4, retry_window=RETRY_WINDOW).start()
    try:
        node_cluster.eventually(
            lambda: all(served(u) - before[b] >= 3 for b, u in backends.items()),
            timeout=120, interval=1, desc="requests served by every pod and Mac")
        spread = {b: served(u) - before[b] for b, u in backends.items()}

        # 2. Mac a dies under load: out of the Service within the bound, no request fails.
        killed = time.monotonic()
        assert macs[addr_a].signal(signal.SIGKILL) == -signal.SIGKILL
        node_cluster.eventually(
            lambda: slice_endpoints(node_cluster, ns, NAME).get(addr_a, {}).get("ready") is False,
            timeout=REMOVAL_BOUND + 5, interval=0.1, desc="the dead Mac not ready")
        not_ready_after = time.monotonic() - killed
        time.sleep(PROXY_SYNC + 3)  # load goes on over the live backends
    finally:
        outcome = load.stop()
    last_error_after = outcome.last_retry - killed if outcome.last_retry else None
    print(f"\nrequests per backend with all four up: {spread}")
    print(f"dead Mac not ready after {not_ready_after:.2f} s (bound {REMOVAL_BOUND} s); "
          f"last connection error {last_error_after} s after the kill")
    report("a Mac killed under load", outcome)
    assert outcome.ok > 20 and len(outcome.failed) == 0, (str(outcome), outcome.failed[:5])
    assert outcome.resent <= RESENT_AFTER_A_KILL, outcome.sent_again
    assert not_ready_after <= REMOVAL_BOUND
    assert last_error_after is None or last_error_after <= REMOVAL_BOUND + PROXY_SYNC

    # 3. Its share goes to the pods and the other Mac: every request of a fresh bounded load
    #    is served by them, and no connection error is left to retry.
    live = {b: u for b, u in backends.items() if b != f"mac {addr_a}"}
    before = {b: served(u) for b, u in live.items()}
    after = Load(url, clients=4, docs=4, max_requests=40).start().wait()
    share = {b: served(u) - before[b] for b, u in live.items()}
    print(f"requests per live backend after the removal: {share}")
    assert after.ok == 40 and not after.failed and after.retried == after.resent == 0, after
    assert sum(share.values()) == 40, share
    assert all(n > 0 for n in share.values()), share


def test_a_mac_stopped_under_load_drains_like_a_pod(
        node_cluster: KubeCluster, e2e_namespace: str, host_operator: Any,
        mac_network: MacNetwork, tiny_bert: Path, uvicorn_server: Any) -> None:
    """SIGTERM (launchd's stop) to a Mac serving the Service's traffic: it deregisters, is out
    of the EndpointSlice at once, keeps accepting while kube-proxy follows, then drains and
    exits 0; no request fails and none is resent."""
    ns = e2e_namespace
    addr_a, _ = mac_network.addresses
    macs = fleet_with_two_macs(node_cluster, ns, mac_network, tiny_bert, uvicorn_server, pods=1)
    ip, service_port = cluster_ip(node_cluster, ns, NAME)
    before = served(macs[addr_a].url)
    load = Load(f"http://{ip}:{service_port}", clients=CLIENTS, docs=4,
                retry_window=RETRY_WINDOW).start()
    try:
        node_cluster.eventually(lambda: served(macs[addr_a].url) - before >= 5, timeout=120,
                                interval=1, desc="the Mac to stop serves the Service's traffic")
        stopped = time.monotonic()
        proc = macs[addr_a].server.proc
        proc.send_signal(signal.SIGTERM)
        node_cluster.eventually(lambda: addr_a not in slice_endpoints(node_cluster, ns, NAME),
                                timeout=10, interval=0.1, desc="the Mac out of the Service")
        out_after = time.monotonic() - stopped
        assert proc.poll() is None, "the Mac stopped accepting before it left the Service"
        code = proc.wait(60)
        exited_after = time.monotonic() - stopped
        time.sleep(PROXY_SYNC)  # load goes on over the pod and the other Mac
    finally:
        outcome = load.stop()
    print(f"\nSIGTERM: out of the EndpointSlice after {out_after:.2f} s, exited {code} after "
          f"{exited_after:.2f} s (leave {LEAVE_SECONDS} s)")
    report("a Mac stopped with SIGTERM under load", outcome)
    assert code == 0
    assert LEAVE_SECONDS <= exited_after
    assert outcome.ok > 20 and len(outcome.failed) == 0, (str(outcome), outcome.failed[:5])
    assert outcome.resent <= RESENT_AFTER_A_DRAIN and outcome.retried == 0, outcome.sent_again
    assert "still accepting for" in macs[addr_a].log()


pytestmark = pytest.mark.timeout(600)

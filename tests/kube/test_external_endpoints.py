"""External endpoints (Apple-silicon Macs) against a real control plane.

Real `reranker serve` processes with the MLX backend (mlx[cpu] here, a tiny random BERT to
keep it fast) stand in for Macs: they register themselves as RerankerEndpoints with a
kubeconfig of the ServiceAccount in deploy/mac/rbac.yaml, and a real `reranker-operator`,
running as the ServiceAccount bound to operator/rbac/, probes them and lists them in the
fleet's Service through its own EndpointSlice.

The API server refuses loopback addresses in EndpointSlices
(`test_the_api_server_refuses_loopback_endpoints` shows it), so the Macs have addresses of
their own in a network namespace the session creates (tests/stand_in_macs.py: the `mac_netns`
and `mac_network` fixtures of tests/conftest.py).
"""

from __future__ import annotations

import ipaddress
import json
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from stand_in_macs import SLICE_MANAGER, Mac, MacNetwork, certificates, slice_endpoints
from operator_process import Operator, bind_rbac
from test_operator import conditions

REPO = Path(__file__).resolve().parents[2]
CRDS = [REPO / "crds" / "rerankerdeployments.reranker.dev.yaml",
        REPO / "crds" / "rerankerendpoints.reranker.dev.yaml"]
MAC_RBAC = REPO / "deploy" / "mac" / "rbac.yaml"
MAC_ADMISSION = REPO / "deploy" / "mac" / "admission.yaml"

# Short periods, so that each behaviour shows within seconds: a dead endpoint is not ready
# after 2 failed probes 0.5 s apart (each given 1 s), and dropped 4 s after its last renewal.
PROBE_ENV = {"RERANKER_OPERATOR_PROBE_PERIOD_SECONDS": "0.5",
             "RERANKER_OPERATOR_PROBE_TIMEOUT_SECONDS": "1",
             "RERANKER_OPERATOR_PROBE_FAILURE_THRESHOLD": "2",
             "RERANKER_OPERATOR_PROBE_SUCCESS_THRESHOLD": "1"}
LEASE_SECONDS = 4
#: A draining Mac accepts connections this long after deleting its RerankerEndpoint.
LEAVE_SECONDS = 3
PROBE_BOUND = 0.5 * 2 + 1 + 1.5  # period x failures + timeout + a pass and a watch event


# --- fixtures -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def crds(kube_cluster: Any) -> None:
    for path in CRDS:
        kube_cluster.kubectl("apply", "-f", str(path))
    kube_cluster.wait_established("crd/rerankerdeployments.reranker.dev",
                                "crd/rerankerendpoints.reranker.dev")


@pytest.fixture
def operator(kube_cluster: Any, kube_namespace: str, crds: None, tmp_path: Path,
             monkeypatch: pytest.MonkeyPatch) -> Iterator[Operator]:
    """The operator for `kube_namespace`, as the ServiceAccount bound to operator/rbac/."""
    for key, value in PROBE_ENV.items():
        monkeypatch.setenv(key, value)
    kubeconfig, cleanup = bind_rbac(kube_cluster, kube_namespace)
    with Operator(kube_cluster, kube_namespace, kubeconfig, tmp_path / "operator.log").running(cleanup, tail=8000) as op:
        yield op


@pytest.fixture
def mac_kubeconfig(kube_cluster: Any, kube_namespace: str, crds: None) -> str:
    """A kubeconfig of the Macs' ServiceAccount (deploy/mac/rbac.yaml, applied as shipped)."""
    kube_cluster.kubectl("apply", "-n", kube_namespace, "-f", str(MAC_RBAC))
    return str(kube_cluster.mint_kubeconfig(kube_namespace, "reranker-mac"))



def mac_env(tiny_bert: Path, namespace: str, kubeconfig: str, name: str,
            address: str) -> dict[str, str]:
    return {"RERANKER_DEVICE": "mlx", "RERANKER_RUNTIME": "mlx", "RERANKER_MODEL": str(tiny_bert),
            "RERANKER_MODEL_KIND": "cross-encoder", "RERANKER_DRAIN_SECONDS": "5",
            "RERANKER_REGISTER_DEPLOYMENT": "fleet", "RERANKER_REGISTER_NAMESPACE": namespace,
            "RERANKER_REGISTER_KUBECONFIG": kubeconfig, "RERANKER_REGISTER_NAME": name,
            "RERANKER_REGISTER_ADDRESS": address,
            "RERANKER_REGISTER_LEASE_SECONDS": str(LEASE_SECONDS),
            "RERANKER_REGISTER_LEAVE_SECONDS": str(LEAVE_SECONDS)}


def rrd(name: str, **spec: Any) -> str:
    return json.dumps({"apiVersion": "reranker.dev/v1alpha1", "kind": "RerankerDeployment",
                       "metadata": {"name": name},
                       "spec": {"model": {"id": "cross-encoder/ms-marco-MiniLM-L-6-v2"},
                                "replicas": 0, **spec}})



def external_status(cluster: Any, ns: str, name: str) -> dict[str, Any]:
    return dict(cluster.get_json("rrd", name, "-n", ns)["status"].get("externalEndpoints") or {})


def rre_status(cluster: Any, ns: str, name: str) -> dict[str, Any] | None:
    r = cluster.kubectl("get", "rre", name, "-n", ns, "-o", "json", check=False)
    return dict(json.loads(r.stdout).get("status") or {}) if r.returncode == 0 else None


# --- the API server's rules (why the design is what it is) ----------------------------------

def test_endpointslice_controllers_leave_the_operators_slice_alone(kube_cluster: Any,
                                                                   kube_namespace: str) -> None:
    """A selector Service keeps its pods in the controller's slices, and an extra slice with
    another managed-by value is neither deleted nor rewritten by the EndpointSlice or the
    EndpointSlice mirroring controller (docs/macs.md, "Architecture")."""
    ns = kube_namespace
    node = f"node-{ns}"[:63]
    kube_cluster.apply(json.dumps({"apiVersion": "v1", "kind": "Node",
                                   "metadata": {"name": node}}))
    try:
        kube_cluster.apply(json.dumps({
            "apiVersion": "v1", "kind": "Service", "metadata": {"name": "fleet"},
            "spec": {"selector": {"app": "fleet"},
                     "ports": [{"name": "http", "port": 8000, "targetPort": "http"}]}}),
            namespace=ns)
        # The controller-manager creates the namespace's default ServiceAccount, which a pod
        # needs, a moment after the namespace.
        kube_cluster.eventually(lambda: kube_cluster.kubectl(
            "get", "serviceaccount", "default", "-n", ns, check=False).returncode == 0,
            timeout=30, desc="the default ServiceAccount")
        kube_cluster.apply(json.dumps({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "fleet-pod", "labels": {"app": "fleet"}},
            "spec": {"nodeName": node, "containers": [
                {"name": "c", "image": "x", "ports": [{"name": "http", "containerPort": 8000}]}]}}),
            namespace=ns)
        ready = {"status": {"phase": "Running", "podIP": "10.1.0.5", "podIPs": [{"ip": "10.1.0.5"}],
                            "conditions": [{"type": "Ready", "status": "True"}]}}
        kube_cluster.kubectl("patch", "pod", "fleet-pod", "-n", ns, "--subresource=status",
                             "--type=merge", "-p", json.dumps(ready))
        ours = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": "fleet-external-ipv4-8000", "labels": {
                    "kubernetes.io/service-name": "fleet",
                    "endpointslice.kubernetes.io/managed-by": SLICE_MANAGER}},
                "addressType": "IPv4", "ports": [{"name": "http", "port": 8000, "protocol": "TCP"}],
                "endpoints": [{"addresses": ["192.0.2.20"],
                               "conditions": {"ready": True, "serving": True, "terminating": False}}]}
        kube_cluster.apply(json.dumps(ours), namespace=ns)

        def slices() -> dict[str, dict[str, Any]]:
            items = kube_cluster.get_json("endpointslices", "-n", ns, "-l",
                                          "kubernetes.io/service-name=fleet")["items"]
            return {s["metadata"]["labels"]["endpointslice.kubernetes.io/managed-by"]: s
                    for s in items}
        both = kube_cluster.eventually(
            lambda: s if "endpointslice-controller.k8s.io" in (s := slices()) else None,
            timeout=20, desc="the controller's slice")
        before = both[SLICE_MANAGER]["metadata"]["resourceVersion"]
        # Wake both controllers: the pod turns unready, the Service changes.
        kube_cluster.kubectl("patch", "pod", "fleet-pod", "-n", ns, "--subresource=status",
                             "--type=merge", "-p", json.dumps(
                                 {"status": {"conditions": [{"type": "Ready", "status": "False"}]}}))
        kube_cluster.kubectl("annotate", "service", "fleet", "-n", ns, "poke=1")
        kube_cluster.eventually(
            lambda: slices()["endpointslice-controller.k8s.io"]["endpoints"][0]["conditions"][
                "ready"] is False, timeout=20, desc="the controller's slice updated")
        time.sleep(2)  # time for any late rewrite
        after = slices()
        assert after[SLICE_MANAGER]["metadata"]["resourceVersion"] == before
        assert after[SLICE_MANAGER]["endpoints"][0]["addresses"] == ["192.0.2.20"]
        assert [e["addresses"] for e in after["endpointslice-controller.k8s.io"]["endpoints"]] == [
            ["10.1.0.5"]]
    finally:
        kube_cluster.kubectl("delete", "node", node, "--ignore-not-found", check=False)


def test_the_api_server_refuses_loopback_endpoints(kube_cluster: Any, kube_namespace: str) -> None:
    bad = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"name": "loopback", "labels": {"kubernetes.io/service-name": "fleet"}},
           "addressType": "IPv4", "ports": [{"name": "http", "port": 8000}],
           "endpoints": [{"addresses": ["127.0.0.1"]}]}
    r = kube_cluster.kubectl("apply", "-n", kube_namespace, "-f", "-", input=json.dumps(bad),
                             check=False)
    assert r.returncode != 0
    assert "may not be in the loopback range" in r.stderr


# --- registration, probes, heartbeats -------------------------------------------------------

def test_macs_register_fail_expire_return_and_leave(operator: Operator, kube_cluster: Any,
                                                    kube_namespace: str, mac_kubeconfig: str,
                                                    mac_network: MacNetwork, tiny_bert: Path,
                                                    uvicorn_server: Any) -> None:
    ns = kube_namespace
    kube_cluster.apply(rrd("fleet"), namespace=ns)
    kube_cluster.eventually(lambda: kube_cluster.kubectl("get", "service", "fleet", "-n", ns,
                                                         check=False).returncode == 0,
                            timeout=15, desc="the fleet's Service")
    addr_a, addr_b = mac_network.addresses
    port = mac_network.free_port()
    env_a = mac_env(tiny_bert, ns, mac_kubeconfig, "mac-a", addr_a)
    env_b = mac_env(tiny_bert, ns, mac_kubeconfig, "mac-b", addr_b)
    mac_a = Mac(uvicorn_server, mac_network, address=addr_a, port=port, env=env_a).start()
    mac_b = Mac(uvicorn_server, mac_network, address=addr_b, port=port, env=env_b).start()

    # The fleet has not said where its Macs may be: both are refused, not even probed.
    kube_cluster.eventually(
        lambda: "refused until the RerankerDeployment sets spec.externalEndpoints.allowedCIDRs"
        in ((rre_status(kube_cluster, ns, "mac-a") or {}).get("message") or ""),
        timeout=20, desc="mac-a refused")
    assert slice_endpoints(kube_cluster, ns, "fleet") == {}
    network = addr_a.rsplit(".", 1)[0] + ".0/24"
    kube_cluster.kubectl("patch", "rrd", "fleet", "-n", ns, "--type", "merge", "-p", json.dumps(
        {"spec": {"externalEndpoints": {"allowedCIDRs": [network]}}}))
    # Their network, but not yet their identity: still refused.
    kube_cluster.eventually(
        lambda: "refused until the RerankerDeployment lists the Macs' identities"
        in ((rre_status(kube_cluster, ns, "mac-b") or {}).get("message") or ""),
        timeout=20, desc="mac-b refused for its identity")
    assert slice_endpoints(kube_cluster, ns, "fleet") == {}
    kube_cluster.kubectl("patch", "rrd", "fleet", "-n", ns, "--type", "merge", "-p", json.dumps(
        {"spec": {"externalEndpoints": {"allowedIdentities": [
            f"system:serviceaccount:{ns}:reranker-mac"]}}}))

    # Allowed: both are probed; the Service's slice lists both, ready; the status counts them.
    want = {addr_a: {"ready": True, "serving": True, "port": port},
            addr_b: {"ready": True, "serving": True, "port": port}}
    kube_cluster.eventually(lambda: slice_endpoints(kube_cluster, ns, "fleet") == want,
                            timeout=20, desc="both Macs ready in the Service's slice")
    ext = kube_cluster.eventually(
        lambda: (e := external_status(kube_cluster, ns, "fleet")).get("ready") == 2 and e,
        timeout=10, desc="status counts 2 ready")
    assert ext["total"] == 2
    device = httpx.get(mac_a.url + "/health", timeout=5).json()["model"]["device"]
    assert device.startswith("mlx")  # "mlx-cpu" here, on Linux
    assert {(e["name"], e["source"], e["address"], e["ready"], e["device"])
            for e in ext["endpoints"]} == {("mac-a", "RerankerEndpoint", addr_a, True, device),
                                           ("mac-b", "RerankerEndpoint", addr_b, True, device)}
    obj = kube_cluster.get_json("rrd", "fleet", "-n", ns)
    assert conditions(obj)["ExternalEndpointsReady"]["status"] == "True"
    assert conditions(obj)["Available"]["reason"] == "ExternalEndpointsAvailable"
    assert kube_cluster.table("rrd", "fleet", "-n", ns)[0]["EXTERNAL"] == "2"
    rres = kube_cluster.kubectl("get", "rre", "-n", ns).stdout
    assert "mac-a" in rres and "mac-b" in rres and addr_a in rres
    # The slice is the operator's, owned by the RerankerDeployment, next to the controller's.
    slices = kube_cluster.get_json("endpointslices", "-n", ns, "-l",
                                   "kubernetes.io/service-name=fleet")["items"]
    managers = sorted(s["metadata"]["labels"]["endpointslice.kubernetes.io/managed-by"]
                      for s in slices)
    assert managers == ["endpointslice-controller.k8s.io", SLICE_MANAGER]
    ours = next(s for s in slices if s["metadata"]["labels"][
        "endpointslice.kubernetes.io/managed-by"] == SLICE_MANAGER)
    assert ours["metadata"]["ownerReferences"][0]["kind"] == "RerankerDeployment"
    # A request through a Mac works (the Service would send one there).
    r = httpx.post(mac_a.url + "/rerank", json={"query": "q", "documents": ["a", "b"]}, timeout=30)
    assert r.status_code == 200

    # Steady: probes keep passing, heartbeats keep coming, the operator writes nothing.
    before = len(operator.writes())
    time.sleep(3)
    assert len(operator.writes()) == before, operator.writes()[before:]

    # mac-a dies without deregistering: not ready within the probe bound...
    killed = time.monotonic()
    mac_a.signal(signal.SIGKILL)
    kube_cluster.eventually(
        lambda: slice_endpoints(kube_cluster, ns, "fleet").get(addr_a, {}).get("ready") is False,
        timeout=PROBE_BOUND + 2, interval=0.1, desc="mac-a not ready")
    assert time.monotonic() - killed < PROBE_BOUND + 2
    st = rre_status(kube_cluster, ns, "mac-a")
    assert st is not None and st["ready"] is False
    assert st["consecutiveFailures"] == 2  # counted up to the threshold
    assert "cannot connect" in st["message"] or st["expired"]  # (a slow check may see both)
    assert slice_endpoints(kube_cluster, ns, "fleet")[addr_b]["ready"] is True
    # ...and out of the Service once its lease runs out.
    kube_cluster.eventually(lambda: addr_a not in slice_endpoints(kube_cluster, ns, "fleet"),
                            timeout=LEASE_SECONDS + 4, interval=0.2, desc="mac-a dropped")
    assert time.monotonic() - killed < LEASE_SECONDS + 4
    kube_cluster.eventually(lambda: (rre_status(kube_cluster, ns, "mac-a") or {}).get("expired"),
                            timeout=5, desc="mac-a expired")
    ext = kube_cluster.eventually(
        lambda: (e := external_status(kube_cluster, ns, "fleet")).get("total") == 1 and e,
        timeout=5, desc="status total 1")
    assert ext["ready"] == 1
    obj = kube_cluster.get_json("rrd", "fleet", "-n", ns)
    assert conditions(obj)["ExternalEndpointsReady"]["status"] == "True"

    # Restarted, it takes its RerankerEndpoint over and is back.
    mac_a = Mac(uvicorn_server, mac_network, address=addr_a, port=port, env=env_a).start()
    kube_cluster.eventually(lambda: slice_endpoints(kube_cluster, ns, "fleet") == want,
                            timeout=20, desc="mac-a back")
    assert "took over the existing object" in mac_a.log()
    kube_cluster.eventually(
        lambda: (rre_status(kube_cluster, ns, "mac-a") or {}).get("expired") is False,
        timeout=5, desc="mac-a's status fresh")

    # A graceful shutdown deregisters at once, and the Mac goes on accepting connections (as
    # kube-proxy may still send it some) for LEAVE_SECONDS, as a pod does during its preStop.
    stopped = time.monotonic()
    mac_b.server.proc.send_signal(signal.SIGTERM)
    kube_cluster.eventually(lambda: rre_status(kube_cluster, ns, "mac-b") is None,
                            timeout=3, interval=0.1, desc="mac-b's RerankerEndpoint deleted")
    kube_cluster.eventually(lambda: addr_b not in slice_endpoints(kube_cluster, ns, "fleet"),
                            timeout=3, interval=0.1, desc="mac-b out of the Service")
    out = time.monotonic() - stopped
    assert mac_b.server.proc.poll() is None, "mac-b stopped before the Service let it go"
    r = httpx.post(mac_b.url + "/rerank", json={"query": "q", "documents": ["a", "b"]},
                   timeout=30)  # a new connection, as from a kube-proxy not yet updated
    assert r.status_code == 200 and r.headers["connection"] == "close"
    assert mac_b.server.proc.wait(30) == 0
    exited = time.monotonic() - stopped
    print(f"mac-b: out of the Service {out:.2f} s after SIGTERM, exited after {exited:.2f} s "
          f"(leave {LEAVE_SECONDS} s)")
    assert out < LEAVE_SECONDS and LEAVE_SECONDS <= exited < LEAVE_SECONDS + 3
    assert "deregistered" in mac_b.log() and "still accepting for" in mac_b.log()
    ext = kube_cluster.eventually(
        lambda: (e := external_status(kube_cluster, ns, "fleet")).get("total") == 1 and e,
        timeout=5, desc="status total 1")
    assert [e["name"] for e in ext["endpoints"]] == ["mac-a"]


def test_the_operator_learns_the_clusters_ranges_and_refuses_until_it_knows_them(
        operator: Operator, kube_cluster: Any, kube_namespace: str) -> None:
    """Nothing configured on the operator: it reads the Service range from the API server's
    own ServiceCIDR and the pod ranges from the Nodes, refuses endpoints inside them, and
    refuses every registration while a node has no pod range to read. The RerankerEndpoints
    are written here as an admin (their addresses need not answer: refusals are never probed)."""
    ns = kube_namespace
    me = "system:serviceaccount:" + ns + ":reranker-mac"
    (service_cidr,) = kube_cluster.get_json("servicecidr", "kubernetes")["spec"]["cidrs"]
    kube_cluster.apply(rrd("fleet", externalEndpoints={"allowedCIDRs": ["0.0.0.0/0"],
                                                       "allowedIdentities": [me]}), namespace=ns)

    def endpoint(name: str, address: str) -> None:
        kube_cluster.apply(json.dumps({
            "apiVersion": "reranker.dev/v1alpha1", "kind": "RerankerEndpoint",
            "metadata": {"name": name},
            "spec": {"deployment": "fleet", "address": address, "port": 8000,
                     "registeredBy": me,
                     "heartbeat": {"renewTime": "2030-01-01T00:00:00Z",
                                   "leaseDurationSeconds": 3600}}}), namespace=ns)

    def message(name: str) -> str:
        return str((rre_status(kube_cluster, ns, name) or {}).get("message") or "")

    in_services = str(next(ipaddress.ip_network(service_cidr).hosts()) + 9)
    endpoint("in-services", in_services)
    endpoint("outside", "192.0.2.40")  # nothing listens: probed, not ready
    kube_cluster.eventually(lambda: f"inside the cluster's pod/Service range {service_cidr}"
                            in message("in-services"), timeout=20, desc="Service range refused")
    kube_cluster.eventually(lambda: "cannot connect" in message("outside") or
                            "no answer" in message("outside"), timeout=20, desc="outside probed")

    node = f"node-{ns}"[:63]
    try:
        # A node with a pod range: learned from its spec.podCIDRs.
        kube_cluster.apply(json.dumps({"apiVersion": "v1", "kind": "Node",
                                       "metadata": {"name": node},
                                       "spec": {"podCIDR": "203.0.113.0/25",
                                                "podCIDRs": ["203.0.113.0/25"]}}))
        endpoint("in-pods", "203.0.113.7")
        kube_cluster.eventually(lambda: "inside the cluster's pod/Service range 203.0.113.0/25"
                                in message("in-pods"), timeout=20, desc="pod range refused")
        # A node whose CNI assigns addresses itself (no spec.podCIDRs): nothing is admitted.
        kube_cluster.kubectl("delete", "node", node)
        kube_cluster.apply(json.dumps({"apiVersion": "v1", "kind": "Node",
                                       "metadata": {"name": node}}))
        kube_cluster.eventually(lambda: f"node {node} has no spec.podCIDRs" in message("outside"),
                                timeout=20, desc="registrations refused while a range is unknown")
        assert message("outside").startswith("registrations are refused until the operator "
                                             "knows the cluster's pod and Service ranges")
        assert rre_status(kube_cluster, ns, "outside")["ready"] is False
        assert slice_endpoints(kube_cluster, ns, "fleet") == {}
    finally:
        kube_cluster.kubectl("delete", "node", node, "--ignore-not-found", check=False)
    kube_cluster.eventually(lambda: "cannot connect" in message("outside") or
                            "no answer" in message("outside"), timeout=20,
                            desc="outside probed again once the node is gone")
    # An identity the fleet does not list: refused.
    kube_cluster.apply(json.dumps({
        "apiVersion": "reranker.dev/v1alpha1", "kind": "RerankerEndpoint",
        "metadata": {"name": "stranger"},
        "spec": {"deployment": "fleet", "address": "192.0.2.41", "port": 8000,
                 "registeredBy": f"system:serviceaccount:{ns}:stranger",
                 "heartbeat": {"renewTime": "2030-01-01T00:00:00Z",
                               "leaseDurationSeconds": 3600}}}), namespace=ns)
    kube_cluster.eventually(lambda: "not in spec.externalEndpoints.allowedIdentities"
                            in message("stranger"), timeout=20, desc="stranger refused")


def test_a_mac_serving_https_is_ready_only_with_a_certificate_the_fleet_trusts(
        operator: Operator, kube_cluster: Any, kube_namespace: str, mac_kubeconfig: str,
        mac_network: MacNetwork, tiny_bert: Path, uvicorn_server: Any, tmp_path: Path) -> None:
    """spec.externalEndpoints.tls: the Mac serves HTTPS (RERANKER_TLS_*), the operator probes it
    over HTTPS and lists it ready only if its certificate chains to the fleet's caBundle and
    names its address; with another CA's bundle the same Mac is not ready, and says why."""
    ns = kube_namespace
    addr, _ = mac_network.addresses
    port = mac_network.free_port()
    crt, key, ca = certificates(tmp_path / "pki", addr, name="fleet")
    _, _, other_ca = certificates(tmp_path / "pki", addr, name="other")
    network = addr.rsplit(".", 1)[0] + ".0/24"
    kube_cluster.apply(rrd("fleet", externalEndpoints={
        "allowedCIDRs": [network],
        "allowedIdentities": [f"system:serviceaccount:{ns}:reranker-mac"],
        "tls": {"caBundle": ca.read_text()}}), namespace=ns)
    mac = Mac(uvicorn_server, mac_network, address=addr, port=port, tls=(crt, key, ca),
              env=mac_env(tiny_bert, ns, mac_kubeconfig, "mac-a", addr)).start()
    assert mac.url.startswith("https://")
    ready = {addr: {"ready": True, "serving": True, "port": port}}
    kube_cluster.eventually(lambda: slice_endpoints(kube_cluster, ns, "fleet") == ready,
                            timeout=20, desc="the HTTPS Mac ready in the Service")
    assert (rre_status(kube_cluster, ns, "mac-a") or {})["message"] == "ready (GET /ready: 200)"

    def patch_bundle(bundle: str) -> None:
        kube_cluster.kubectl("patch", "rrd", "fleet", "-n", ns, "--type", "merge", "-p",
                             json.dumps({"spec": {"externalEndpoints": {"tls": {
                                 "caBundle": bundle}}}}))

    def message() -> str:
        return str((rre_status(kube_cluster, ns, "mac-a") or {}).get("message") or "")

    patch_bundle(other_ca.read_text())  # a certificate this fleet does not trust
    kube_cluster.eventually(
        lambda: slice_endpoints(kube_cluster, ns, "fleet").get(addr, {}).get("ready") is False,
        timeout=PROBE_BOUND + 2, interval=0.1, desc="not ready with another CA")
    assert "the certificate is not verified by spec.externalEndpoints.tls.caBundle for " \
        f"address {addr}" in message(), message()
    patch_bundle("not a certificate")
    kube_cluster.eventually(lambda: "is not a PEM CA certificate bundle" in message(),
                            timeout=10, desc="an unusable bundle reported")
    patch_bundle(ca.read_text())
    kube_cluster.eventually(lambda: slice_endpoints(kube_cluster, ns, "fleet") == ready,
                            timeout=20, desc="ready again with the fleet's CA")


def test_registration_without_the_role_is_refused_and_serving_goes_on(
        kube_cluster: Any, kube_namespace: str, crds: None, tiny_bert: Path,
        uvicorn_server: Any) -> None:
    ns = kube_namespace
    kube_cluster.kubectl("create", "serviceaccount", "stranger", "-n", ns)
    kubeconfig = kube_cluster.mint_kubeconfig(ns, "stranger")
    env = mac_env(tiny_bert, ns, kubeconfig, "stranger", "192.0.2.30")
    server = uvicorn_server(env)  # on 127.0.0.1: this one never reaches a slice
    refusal = kube_cluster.eventually(
        lambda: next((line for line in server.log.read_text().splitlines()
                      if "registration refused" in line), None),
        timeout=20, desc="the refusal in the log")
    message = json.loads(refusal)["message"]
    assert "403 Forbidden" in message
    assert 'cannot create resource "rerankerendpoints"' in message
    assert f"Role in namespace {ns} allowing create, patch, delete" in message
    assert "deploy/mac/rbac.yaml" in message
    assert server.log.read_text().count("registration refused") == 1  # said once
    assert httpx.get(server.url + "/ready", timeout=5).status_code == 200
    r = httpx.post(server.url + "/rerank", json={"query": "q", "documents": ["a", "b"]},
                   timeout=30)
    assert r.status_code == 200
    assert server.stop() == 0
    assert kube_cluster.kubectl("get", "rre", "-n", ns, "-o", "name").stdout.strip() == ""


def test_static_endpoints_are_probed_and_listed(operator: Operator, kube_cluster: Any,
                                                kube_namespace: str, mac_network: MacNetwork,
                                                tiny_bert: Path, uvicorn_server: Any) -> None:
    ns = kube_namespace
    addr_up, addr_down = mac_network.addresses
    port = mac_network.free_port()
    env = {"RERANKER_DEVICE": "mlx", "RERANKER_RUNTIME": "mlx", "RERANKER_MODEL": str(tiny_bert),
           "RERANKER_MODEL_KIND": "cross-encoder"}
    Mac(uvicorn_server, mac_network, address=addr_up, port=port, env=env).start()  # no registration
    static = [{"name": "studio", "address": addr_up, "port": port},
              {"name": "mini", "address": addr_down, "port": port},  # nothing listens there
              {"name": "typo", "address": "127.0.0.1", "port": port}]
    kube_cluster.apply(rrd("fleet", externalEndpoints={"static": static}), namespace=ns)

    want = {addr_up: {"ready": True, "serving": True, "port": port},
            addr_down: {"ready": False, "serving": False, "port": port}}
    kube_cluster.eventually(lambda: slice_endpoints(kube_cluster, ns, "fleet") == want,
                            timeout=20, desc="static endpoints in the slice")
    ext = kube_cluster.eventually(
        lambda: (e := external_status(kube_cluster, ns, "fleet")).get("ready") == 1
        and len(e.get("endpoints", ())) == 3 and e, timeout=10, desc="status")
    by_name = {e["name"]: e for e in ext["endpoints"]}
    assert {n: (e["source"], e["ready"]) for n, e in by_name.items()} == {
        "studio": ("static", True), "mini": ("static", False), "typo": ("static", False)}
    assert "cannot connect" in by_name["mini"]["message"]
    assert "loopback" in by_name["typo"]["message"]
    cond = conditions(kube_cluster.get_json("rrd", "fleet", "-n", ns))["ExternalEndpointsReady"]
    assert cond["status"] == "False" and cond["reason"] == "ExternalEndpointsNotReady"
    assert "1/3 external endpoints ready" in cond["message"]

    # Removing a host from the spec removes it from the Service.
    kube_cluster.kubectl("patch", "rrd", "fleet", "-n", ns, "--type", "merge", "-p",
                         json.dumps({"spec": {"externalEndpoints": {"static": static[:1]}}}))
    kube_cluster.eventually(
        lambda: slice_endpoints(kube_cluster, ns, "fleet") == {addr_up: want[addr_up]},
        timeout=10, desc="only studio left")
    kube_cluster.eventually(
        lambda: conditions(kube_cluster.get_json("rrd", "fleet", "-n", ns))[
            "ExternalEndpointsReady"]["status"] == "True", timeout=10, desc="all ready")
    # Deleting the RerankerDeployment garbage-collects its slice like any child.
    kube_cluster.kubectl("delete", "rrd", "fleet", "-n", ns, "--timeout", "30s")
    kube_cluster.eventually(lambda: slice_endpoints(kube_cluster, ns, "fleet") == {},
                            timeout=30, desc="slice collected")


def test_each_mac_touches_only_the_endpoint_it_registered(
        kube_cluster: Any, kube_namespace: str, crds: None, tiny_bert: Path,
        uvicorn_server: Any) -> None:
    """Identity bound to endpoint: two Macs with one host name get two objects; each records
    its machine and identity; the admission policy lets no other ServiceAccount rewrite or
    delete it; a server of another machine never takes it over, even under the same name and
    identity; a graceful stop deletes only its own. No operator needed: this is the API server,
    deploy/mac/{rbac,admission}.yaml and the registration of real `reranker serve` processes."""
    ns = kube_namespace
    kube_cluster.kubectl("apply", "-f", str(MAC_ADMISSION))
    kube_cluster.kubectl("apply", "-n", ns, "-f", str(MAC_RBAC))
    kubeconfigs = {}
    for sa in ("reranker-mac-a", "reranker-mac-b"):  # one ServiceAccount per Mac
        kube_cluster.kubectl("create", "serviceaccount", sa, "-n", ns)
        kube_cluster.kubectl("create", "rolebinding", sa, "--role", "reranker-mac",
                             f"--serviceaccount={ns}:{sa}", "-n", ns)
        kubeconfigs[sa] = str(kube_cluster.mint_kubeconfig(ns, sa))

    def env(sa: str, machine: str, address: str, **extra: str) -> dict[str, str]:
        return {"RERANKER_DEVICE": "cpu", "RERANKER_MODEL": str(tiny_bert),
                "RERANKER_MODEL_KIND": "cross-encoder", "RERANKER_DRAIN_SECONDS": "2",
                "RERANKER_REGISTER_DEPLOYMENT": "fleet", "RERANKER_REGISTER_NAMESPACE": ns,
                "RERANKER_REGISTER_KUBECONFIG": kubeconfigs[sa],
                "RERANKER_REGISTER_ADDRESS": address, "RERANKER_REGISTER_PORT": "8000",
                "RERANKER_REGISTER_MACHINE_ID": machine, **extra}

    # Two Macs called alike, on the same port: two names, by machine.
    host = socket.gethostname().split(".")[0].lower()
    mac_a = uvicorn_server(env("reranker-mac-a", "aaaa", "192.0.2.10"))
    mac_b = uvicorn_server(env("reranker-mac-b", "bbbb", "192.0.2.11"))

    def endpoints() -> dict[str, dict[str, Any]]:
        items = kube_cluster.get_json("rre", "-n", ns)["items"]
        return {i["metadata"]["name"]: i for i in items}
    found = kube_cluster.eventually(lambda: (e := endpoints()) and len(e) == 2 and e,
                                    timeout=30, desc="two RerankerEndpoints")
    name_a = next(n for n in found if "-aaaa-" in n)
    name_b = next(n for n in found if "-bbbb-" in n)
    assert name_a.endswith("-aaaa-8000") and name_b.endswith("-bbbb-8000")
    assert name_a.startswith(host[:8]) and name_b.startswith(host[:8])
    a = found[name_a]
    assert a["spec"]["registeredBy"] == f"system:serviceaccount:{ns}:reranker-mac-a"
    assert a["metadata"]["annotations"]["reranker.dev/machine-id"] == "aaaa"

    # Mac B's identity may not rewrite, delete or impersonate Mac A's registration.
    as_b = kubeconfigs["reranker-mac-b"]
    hijack = kube_cluster.kubectl("patch", "rre", name_a, "-n", ns, "--type", "merge", "-p",
                                  '{"spec": {"address": "10.0.0.1"}}', kubeconfig=as_b,
                                  check=False)
    assert hijack.returncode != 0
    assert "was registered by another identity" in hijack.stderr, hijack.stderr
    gone = kube_cluster.kubectl("delete", "rre", name_a, "-n", ns, kubeconfig=as_b, check=False)
    assert gone.returncode != 0 and "only it may renew or delete it" in gone.stderr
    forged = {**a, "metadata": {"name": "forged"}, "status": {}}
    impersonate = kube_cluster.kubectl("create", "-n", ns, "-f", "-", input=json.dumps(forged),
                                       kubeconfig=as_b, check=False)
    assert impersonate.returncode != 0
    assert "registers a RerankerEndpoint only as itself" in impersonate.stderr
    assert endpoints()[name_a]["spec"]["address"] == "192.0.2.10"
    # The RBAC that makes the policy necessary: B may patch rerankerendpoints at all.
    assert kube_cluster.kubectl("auth", "can-i", "patch", "rerankerendpoints.reranker.dev",
                                "-n", ns, kubeconfig=as_b, check=False).stdout.strip() == "yes"

    # Another machine under Mac A's name and identity (a clone, a copied config): refused,
    # A's object untouched, and it says why.
    clone = uvicorn_server(env("reranker-mac-a", "cccc", "192.0.2.12",
                               RERANKER_REGISTER_NAME=name_a))
    kube_cluster.eventually(lambda: "registered by another machine or identity"
                            in clone.log.read_text(), timeout=30, desc="the clone refused")
    assert endpoints()[name_a]["spec"]["address"] == "192.0.2.10"
    assert clone.stop() == 0
    assert name_a in endpoints(), "the clone deleted an object it did not register"

    # A graceful stop deletes only its own.
    assert mac_a.stop() == 0
    assert set(endpoints()) == {name_b}
    assert mac_b.stop() == 0
    assert endpoints() == {}

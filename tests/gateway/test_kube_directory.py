"""The gateway's Kubernetes directory against a real API server (`kube_cluster`).

A fleet here is what the operator leaves in the API: a RerankerDeployment, its Service
(labelled as the operator labels it), a pod made Ready by a status patch (there is no node, so
the controller-manager's EndpointSlice controller lists it, as it lists real pods), and an
external endpoints' slice written as the operator writes one for Macs. The directory must see
what the gateway may route to, follow changes through its watches, survive its connection to
the API server being cut (a TCP relay in the test, between it and the API server), list again
when the API server says its resourceVersion is too old, and wake a fleet from zero through
the scale subresource.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import sys
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from kubecluster import KubeCluster

from reranker.gateway import kube
from reranker.gateway.directory import Endpoint, Fleet

REPO = Path(__file__).resolve().parents[2]
CRD = REPO / "crds" / "rerankerdeployments.reranker.dev.yaml"
MODEL = "sentence-transformers/all-MiniLM-L6-v2"
#: The labels the operator puts on a fleet's Service (manifests.labels); Kubernetes copies a
#: Service's labels onto the EndpointSlices it makes.
def fleet_labels(name: str, component: str = "server") -> dict[str, str]:
    return {"app.kubernetes.io/name": "reranker", "app.kubernetes.io/instance": name,
            "app.kubernetes.io/component": component,
            "app.kubernetes.io/managed-by": "reranker-operator"}


class Settings:
    def __init__(self, namespaces: list[str]) -> None:
        self.namespaces = namespaces


@pytest.fixture(scope="module")
def crd(kube_cluster: KubeCluster) -> None:
    kube_cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD))
    kube_cluster.wait_established("crd/rerankerdeployments.reranker.dev", timeout=60)


@pytest.fixture
def node(kube_cluster: KubeCluster) -> Iterator[str]:
    """A Node object for the test's pods to be bound to (no kubelet: their status is patched)."""
    name = f"gw-node-{secrets.token_hex(3)}"
    kube_cluster.apply(json.dumps({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}}))
    yield name
    kube_cluster.kubectl("delete", "node", name, "--wait=false", check=False)


@pytest.fixture
def kubeconfig(kube_cluster: KubeCluster, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("KUBECONFIG", kube_cluster.kubeconfig)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    return kube_cluster.kubeconfig


def rd(name: str, *, replicas: int = 1, **spec: Any) -> str:
    return json.dumps({"apiVersion": "reranker.dev/v1alpha1", "kind": "RerankerDeployment",
                       "metadata": {"name": name},
                       "spec": {"model": {"id": MODEL}, "replicas": replicas, **spec}})


def service(name: str, labels: dict[str, str]) -> str:
    return json.dumps({
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "labels": labels},
        "spec": {"selector": {"app": name},
                 "ports": [{"name": "http", "port": 8000, "targetPort": "http"}]}})


def add_pod(cluster: KubeCluster, ns: str, node: str, app: str, pod: str, ip: str) -> None:
    cluster.apply(json.dumps({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": pod, "labels": {"app": app}},
        "spec": {"nodeName": node, "containers": [
            {"name": "c", "image": "x", "ports": [{"name": "http", "containerPort": 8000}]}]}}),
        namespace=ns)
    set_pod_ready(cluster, ns, pod, ip, True)


def set_pod_ready(cluster: KubeCluster, ns: str, pod: str, ip: str, ready: bool) -> None:
    status = {"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                         "conditions": [{"type": "Ready",
                                         "status": "True" if ready else "False"}]}}
    cluster.kubectl("patch", "pod", pod, "-n", ns, "--subresource=status", "--type=merge",
                    "-p", json.dumps(status))


def mac_slice(fleet: str, endpoints: list[tuple[str, bool]], port: int = 9000) -> str:
    """An external endpoints' slice as manifests.external_endpoint_slices writes one."""
    return json.dumps({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": f"{fleet}-external-ipv4-{port}", "labels": {
            **fleet_labels(fleet, "external-endpoints"), kube.LABEL_SERVICE_NAME: fleet,
            "endpointslice.kubernetes.io/managed-by": "reranker-operator.reranker.dev"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
        "endpoints": [{"addresses": [a], "conditions": {"ready": r, "serving": r,
                                                        "terminating": False},
                       "targetRef": {"apiVersion": "reranker.dev/v1alpha1",
                                     "kind": "RerankerEndpoint", "name": f"mac-{i}"}}
                      for i, (a, r) in enumerate(endpoints)]})


async def until(directory: kube.KubeDirectory, check: Any,
                timeout: float = 30) -> tuple[Fleet, ...]:
    """Wait on directory.changed() until check(fleets()) holds; the fleets then."""
    async def loop() -> tuple[Fleet, ...]:
        while True:
            waiter = asyncio.ensure_future(directory.changed())
            fleets = directory.fleets()
            if check(fleets):
                waiter.cancel()
                return fleets
            await waiter

    try:
        return await asyncio.wait_for(loop(), timeout)
    except asyncio.TimeoutError:
        raise AssertionError(f"fleets never matched: {directory.fleets()}") from None


def by_name(fleets: tuple[Fleet, ...]) -> dict[str, Fleet]:
    return {f.name: f for f in fleets}


@contextlib.asynccontextmanager
async def started(directory: kube.KubeDirectory) -> AsyncIterator[kube.KubeDirectory]:
    await directory.start()
    try:
        yield directory
    finally:
        await directory.stop()


async def test_fleets_are_rds_with_the_ready_endpoints_of_their_services(
        kube_cluster: KubeCluster, kube_namespace: str, crd: None, node: str,
        kubeconfig: str) -> None:
    ns = kube_namespace
    kube_cluster.apply(rd("minilm", replicas=2), ns)
    kube_cluster.apply(service("minilm", fleet_labels("minilm")), ns)
    # another application's Service and pod in the namespace: not a fleet, never listed
    kube_cluster.apply(service("web", {"app": "web"}), ns)
    kube_cluster.eventually(lambda: kube_cluster.kubectl(
        "get", "serviceaccount", "default", "-n", ns, check=False).returncode == 0,
        timeout=30, desc="the default ServiceAccount")
    add_pod(kube_cluster, ns, node, "minilm", "minilm-a", "10.1.0.5")
    add_pod(kube_cluster, ns, node, "web", "web-a", "10.1.0.9")
    kube_cluster.apply(mac_slice("minilm", [("192.0.2.10", True), ("192.0.2.11", False)]), ns)

    async with started(kube.KubeDirectory(Settings([ns]))) as directory:
        fleets = await until(directory, lambda fs: len(
            fs and fs[0].endpoints) == 2)
        assert fleets == (Fleet(
            namespace=ns, name="minilm", served_names=(MODEL,),
            endpoints=(Endpoint("http://10.1.0.5:8000", "minilm-a"),
                       Endpoint("http://192.0.2.10:9000", "mac-0")),
            replicas=2, can_wake=False),)

        # the pod turns unready, the second Mac ready: both seen through the watches
        set_pod_ready(kube_cluster, ns, "minilm-a", "10.1.0.5", False)
        kube_cluster.apply(mac_slice("minilm", [("192.0.2.10", True), ("192.0.2.11", True)]), ns)
        fleets = await until(directory, lambda fs: [e.url for e in fs[0].endpoints] == [
            "http://192.0.2.10:9000", "http://192.0.2.11:9000"])

        # a second fleet with no endpoint yet, scaled to 0; then the first one deleted
        kube_cluster.apply(rd("idle", replicas=0), ns)
        fleets = await until(directory, lambda fs: "idle" in by_name(fs))
        idle = by_name(fleets)["idle"]
        assert (idle.endpoints, idle.replicas) == ((), 0), idle
        kube_cluster.kubectl("delete", "rrd", "minilm", "-n", ns)
        await until(directory, lambda fs: list(by_name(fs)) == ["idle"])


async def test_other_namespaces_are_not_seen(kube_cluster: KubeCluster, kube_namespace: str,
                                             crd: None, kubeconfig: str) -> None:
    """Namespaced: one list and watch per namespace (what a namespaced Role allows)."""
    other = f"{kube_namespace[:50]}-x"
    kube_cluster.kubectl("create", "namespace", other)
    try:
        kube_cluster.apply(rd("here"), kube_namespace)
        kube_cluster.apply(rd("there"), other)
        async with started(kube.KubeDirectory(Settings([kube_namespace]))) as directory:
            assert directory.synced
            assert [f.name for f in directory.fleets()] == ["here"]
        async with started(kube.KubeDirectory(Settings([]))) as directory:  # cluster-wide
            names = {(f.namespace, f.name) for f in directory.fleets()}
            assert {(kube_namespace, "here"), (other, "there")} <= names
    finally:
        kube_cluster.kubectl("delete", "namespace", other, "--wait=false", check=False)


def test_served_names_come_from_the_status_else_the_spec() -> None:
    body: dict[str, Any] = {"metadata": {"name": "a", "namespace": "n"},
                            "spec": {"model": {"id": MODEL, "servedNames": ["mini", "mini"]}}}
    assert kube.served_names(body) == (MODEL, "mini")
    body["status"] = {"servedNames": ["mini", MODEL]}
    assert kube.served_names(body) == ("mini", MODEL)
    assert kube.served_names({"spec": {"model": {"pvc": {"claimName": "m", "path": "ce"}}}}) \
        == ("/models/ce",)
    assert kube.served_names({"spec": {"model": {"localPath": "/m/ce"}}}) == ("/m/ce",)


async def test_wake_scales_zero_to_one_once_and_marks_the_rd(
        kube_cluster: KubeCluster, kube_namespace: str, crd: None, kubeconfig: str) -> None:
    ns = kube_namespace
    kube_cluster.apply(rd("sleepy", replicas=0), ns)
    kube_cluster.apply(rd("busy", replicas=3), ns)
    async with started(kube.KubeDirectory(Settings([ns]))) as directory:
        fleets = by_name(directory.fleets())
        before = kube.now_rfc3339()
        # many held requests wake at once: one patch
        await asyncio.gather(*(directory.wake(fleets["sleepy"]) for _ in range(10)))
        body = kube_cluster.get_json("rrd", "sleepy", "-n", ns, "--show-managed-fields")
        assert body["spec"]["replicas"] == 1
        woken = body["metadata"]["annotations"][kube.ANNOTATION_WOKEN_AT]
        assert woken >= before and woken.endswith("Z"), woken
        # replicas changed once (annotations do not count in a custom resource's generation)
        assert body["metadata"]["generation"] == 2, body["metadata"]
        managers = {m["manager"] for m in body["metadata"]["managedFields"]
                    if m.get("subresource") == "scale"}
        assert managers == {"reranker-gateway"}, body["metadata"]["managedFields"]
        await until(directory, lambda fs: by_name(fs)["sleepy"].replicas == 1)

        # a fleet that is not at zero keeps its replicas (the HPA or a user set them)
        await directory.wake(fleets["busy"])
        body = kube_cluster.get_json("rrd", "busy", "-n", ns)
        assert body["spec"]["replicas"] == 3
        assert kube.ANNOTATION_WOKEN_AT in body["metadata"]["annotations"]

        # scaled to zero again (by the operator): the next wake, past the interval, raises it
        kube_cluster.kubectl("scale", "rrd", "sleepy", "-n", ns, "--replicas=0")
        await until(directory, lambda fs: by_name(fs)["sleepy"].replicas == 0)
        await asyncio.sleep(kube.WAKE_INTERVAL_SECONDS)
        await directory.wake(fleets["sleepy"])
        assert kube_cluster.get_json("rrd", "sleepy", "-n", ns)["spec"]["replicas"] == 1


class Relay:
    """A TCP relay between the directory and the API server (TLS passes through) whose
    connections the test can cut."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.host = upstream[0]  # an address the API server's certificate names
        self.writers: set[asyncio.StreamWriter] = set()
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, self.host, 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        self.writers |= {writer, up_writer}

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            w.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def cut(self) -> int:
        """Abort every relayed connection (a network blip); how many there were."""
        n = len(self.writers)
        for w in self.writers:
            w.transport.abort()
        self.writers.clear()
        return n

    def close(self) -> None:
        self.cut()
        if self.server is not None:
            self.server.close()


async def test_watches_resume_after_a_cut_and_list_again_after_410(
        kube_cluster: KubeCluster, kube_namespace: str, crd: None, kubeconfig: str,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=kube.__name__)
    ns = kube_namespace
    server = urllib.parse.urlsplit(kube_cluster.server)
    relay = Relay((server.hostname or "127.0.0.1", server.port or 443))
    await relay.start()

    def through_relay() -> kube._Connection:
        conn = kube.connect()
        conn.client.base_url = httpx.URL(f"https://{relay.host}:{relay.port}")
        return conn

    kube_cluster.apply(rd("one"), ns)
    directory = kube.KubeDirectory(Settings([ns]), connector=through_relay)
    try:
        async with started(directory):
            assert [f.name for f in directory.fleets()] == ["one"]
            assert relay.cut() >= 2  # both watches were open through it
            kube_cluster.apply(rd("two"), ns)  # while the watches are down
            await until(directory, lambda fs: [f.name for f in fs] == ["one", "two"])
            # resumed from the last resourceVersion: no second list
            assert [i.lists for i in directory._informers] == [1, 1], caplog.text

            # The API server answers a watch from a compacted or too old version with 410
            # Gone: the informer lists again. (Version "1" predates every watch cache.)
            informer = directory._informers[0]
            with pytest.raises(kube.Gone):
                await informer._watch("1")
    finally:
        relay.close()

    # run() itself: a first watch from a too old version lists again, and carries on
    real_list = kube._Informer._list

    async def stale_first(self: kube._Informer) -> str:
        version = await real_list(self)
        return "1" if self.lists == 1 and "rerankerdeployments" in self.path else version

    directory = kube.KubeDirectory(Settings([ns]))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kube._Informer, "_list", stale_first)
        async with started(directory):
            rds = directory._informers[0]
            for _ in range(100):
                if rds.lists == 2:
                    break
                await asyncio.sleep(0.1)
            assert rds.lists == 2 and "listing again" in caplog.text, caplog.text
            kube_cluster.apply(rd("three"), ns)
            await until(directory, lambda fs: [f.name for f in fs] == ["one", "three", "two"])


async def test_the_charts_gateway_rules_are_enough(kube_cluster: KubeCluster,
                                                   kube_namespace: str, crd: None, node: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """As the ServiceAccount the chart binds (its Role in the namespace it sees, rendered by
    Helm): the directory lists, watches and wakes."""
    ns = kube_namespace
    sys.path.insert(0, str(REPO / "tests" / "ship"))
    from helm_render import objects

    rendered = [d for d in objects({"gateway": {"enabled": True, "namespaces": [ns]}},
                                   namespace=ns)
                if d["kind"] in ("ServiceAccount", "Role", "RoleBinding")
                and d["metadata"]["name"].endswith("-gateway")]
    assert sorted(d["kind"] for d in rendered) == ["Role", "RoleBinding", "ServiceAccount"]
    for doc in rendered:
        kube_cluster.apply(json.dumps(doc), ns)
    account = next(d for d in rendered if d["kind"] == "ServiceAccount")["metadata"]["name"]
    monkeypatch.setenv("KUBECONFIG", kube_cluster.mint_kubeconfig(ns, account))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)

    kube_cluster.apply(rd("sleepy", replicas=0), ns)
    kube_cluster.apply(mac_slice("sleepy", [("192.0.2.20", True)]), ns)
    async with started(kube.KubeDirectory(Settings([ns]), start_timeout=20)) as directory:
        assert directory.synced
        (fleet,) = directory.fleets()
        assert fleet.endpoints == (Endpoint("http://192.0.2.20:9000", "mac-0"),)
        await directory.wake(fleet)
        await until(directory, lambda fs: fs[0].replicas == 1)
    body = kube_cluster.get_json("rrd", "sleepy", "-n", ns)
    assert kube.ANNOTATION_WOKEN_AT in body["metadata"]["annotations"]

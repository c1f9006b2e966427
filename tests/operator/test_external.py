"""External endpoints, the pure parts: addresses, probe thresholds, heartbeat expiry, the
statuses, the EndpointSlice builder, and the prober's passes against an in-memory stand-in
for the API (httpx.MockTransport answers the probes: no sockets).

The real thing (servers registering, the API server's and controllers' behaviour) is in
tests/kube/test_external_endpoints.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from reranker import contract
from reranker.registration import endpoint_body, endpoint_spec
from reranker_operator import cluster_ranges, external, manifests, status
from reranker_operator.external import Endpoint, ProbeConfig, ProbeState, Report, Summary
from reranker_operator.prober import (
    ENDPOINTS_INDEX,
    NODES_INDEX,
    RERANKERS_INDEX,
    SERVICE_CIDRS_INDEX,
    Prober,
)
from reranker_operator.reconcile import Reconciler
from reranker_operator.spec import InvalidSpec, StaticEndpoint, parse, static_endpoints
from test_reconcile import DEFAULTS, Events, FakeKube, owner

REPO = Path(__file__).resolve().parents[2]
CONFIG = ProbeConfig(period=1.0, timeout=0.5, failure_threshold=3, success_threshold=2)
T0 = datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)


# --- addresses --------------------------------------------------------------------------------

@pytest.mark.parametrize("address, problem", [
    ("192.0.2.10", None), ("10.1.2.3", None), ("2001:db8::7", None),
    ("127.0.0.1", "loopback"), ("::1", "loopback"), ("169.254.1.1", "link-local"),
    ("fe80::1", "link-local"), ("0.0.0.0", "unspecified"), ("mac.local", "not an IPv4 or IPv6"),
    ("", "not an IPv4 or IPv6"),
])
def test_addresses_an_endpointslice_refuses_are_named(address: str, problem: str | None) -> None:
    got = external.address_problem(address)
    assert (got is None) if problem is None else (got is not None and problem in got)


def test_address_types_and_urls() -> None:
    assert external.address_type("192.0.2.1") == "IPv4"
    assert external.address_type("2001:db8::1") == "IPv6"
    v6 = Endpoint(("ns", "rr"), "m", "static", "2001:db8::1", 8000)
    assert v6.url == "http://[2001:db8::1]:8000/ready"
    assert Endpoint(("ns", "rr"), "m", "static", "192.0.2.1", 9000).url == \
        "http://192.0.2.1:9000/ready"


# --- probes -----------------------------------------------------------------------------------

def test_thresholds_decide_readiness_and_messages_settle() -> None:
    state = ProbeState(target=("192.0.2.1", 8000))
    state.record(True, "GET /ready: 200", config=CONFIG, at="t1")
    assert not state.ready and state.message == "GET /ready: 200 (1/2 successes)"
    state.record(True, "GET /ready: 200", config=CONFIG, at="t2")
    assert state.ready and state.message == "ready (GET /ready: 200)"
    state.record(True, "GET /ready: 200", config=CONFIG, at="t3")
    assert state.message == "ready (GET /ready: 200)"  # unchanged: nothing to write
    for i in (1, 2):
        state.record(False, "GET /ready: 503", config=CONFIG, at="t")
        assert state.ready and state.message == f"GET /ready: 503 ({i}/3 failures)"
    state.record(False, "GET /ready: 503", config=CONFIG, at="t")
    assert not state.ready and state.message == "not ready: GET /ready: 503"
    state.record(False, "GET /ready: 503", config=CONFIG, at="t")
    assert state.failures == 4 and state.message == "not ready: GET /ready: 503"
    # One success is not enough to come back (success threshold 2).
    state.record(True, "GET /ready: 200", config=CONFIG, at="t")
    assert not state.ready and state.failures == 0


def test_endpoint_status_is_written_only_when_something_changes() -> None:
    state = ProbeState(target=("192.0.2.1", 8000), ready=True, successes=5,
                       message="ready (GET /ready: 200)", last_probe="t1")
    first = external.endpoint_status(state, problem=None, is_expired=False, lease_seconds=30,
                                     config=CONFIG)
    assert first == {"ready": True, "expired": False, "consecutiveFailures": 0,
                     "message": "ready (GET /ready: 200)", "lastProbeTime": "t1"}
    state.last_probe = "t2"
    again = external.endpoint_status(state, problem=None, is_expired=False, lease_seconds=30,
                                     config=CONFIG)
    assert not external.status_differs(first, again)  # a newer probe time alone: no write
    state.failures, state.ready = 9, False
    down = external.endpoint_status(state, problem=None, is_expired=False, lease_seconds=30,
                                    config=CONFIG)
    assert down["consecutiveFailures"] == CONFIG.failure_threshold  # counted up to it
    gone = external.endpoint_status(state, problem=None, is_expired=True, lease_seconds=30,
                                    config=CONFIG)
    assert gone["expired"] and not gone["ready"] and "no renewal seen for 30s" in gone["message"]
    bad = external.endpoint_status(None, problem="address 127.0.0.1 is loopback",
                                   is_expired=False, lease_seconds=30, config=CONFIG)
    assert bad == {"ready": False, "expired": False, "consecutiveFailures": 0,
                   "message": "address 127.0.0.1 is loopback"}


def test_a_restart_starts_from_the_last_status() -> None:
    seeded = external.seed(("a", 1), {"ready": True, "message": "ready (GET /ready: 200)",
                                      "lastProbeTime": "t"}, config=CONFIG)
    assert seeded.ready and seeded.successes == CONFIG.success_threshold
    seeded.record(True, "GET /ready: 200", config=CONFIG, at="t2")
    assert seeded.message == "ready (GET /ready: 200)"
    down = external.seed(("a", 1), {"ready": False, "consecutiveFailures": 3}, config=CONFIG)
    assert not down.ready and down.failures == 3
    assert not external.seed(("a", 1), None, config=CONFIG).ready


# --- heartbeats -------------------------------------------------------------------------------

def stamp(moment: datetime.datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def test_a_heartbeat_expires_a_lease_after_the_last_renewal_seen() -> None:
    hb = external.observe(None, stamp(T0), now=100.0, wall=T0)
    assert not external.expired(hb, 4, now=103.9)
    assert external.expires_in(hb, 4, now=101.0) == 3.0
    assert external.observe(hb, stamp(T0), now=103.0, wall=T0) is hb  # no renewal
    renewed = external.observe(hb, stamp(T0 + datetime.timedelta(seconds=2)), now=103.0, wall=T0)
    assert renewed.seen_at == 103.0
    assert not external.expired(renewed, 4, now=106.9)
    assert external.expired(renewed, 4, now=107.1)
    assert not external.expired(renewed, None, now=1e9)  # static endpoints have no lease


def test_first_sight_trusts_the_timestamp_once() -> None:
    # The operator starts and finds an endpoint renewed an hour ago: expired at once.
    old = external.observe(None, stamp(T0), now=50.0, wall=T0 + datetime.timedelta(hours=1))
    assert external.expired(old, 30, now=50.0)
    # A Mac whose clock runs ahead is not given more than a lease.
    ahead = external.observe(None, stamp(T0 + datetime.timedelta(minutes=5)), now=50.0, wall=T0)
    assert ahead.seen_at == 50.0
    # An unreadable timestamp counts from now.
    assert external.observe(None, "yesterday", now=50.0, wall=T0).seen_at == 50.0


def test_a_registered_endpoint_is_read_from_its_object() -> None:
    ep = external.from_resource({
        "metadata": {"name": "mac-1", "namespace": "ns", "uid": "u"},
        "spec": {"deployment": "rr", "address": "192.0.2.5", "device": "mlx",
                 "heartbeat": {"renewTime": "2024-01-01T00:00:00Z", "leaseDurationSeconds": 30}}})
    assert ep == Endpoint(("ns", "rr"), "mac-1", "RerankerEndpoint", "192.0.2.5", 8000,
                          device="mlx", uid="u", renew_time="2024-01-01T00:00:00Z",
                          lease_seconds=30)
    assert ep.key == ("RerankerEndpoint", "ns", "rr", "mac-1")


# --- spec -------------------------------------------------------------------------------------

def test_static_endpoints_in_the_spec() -> None:
    spec = parse({"model": {"id": "m"}, "externalEndpoints": {"static": [
        {"name": "studio", "address": "192.0.2.7"}, {"name": "mini", "address": "::1",
                                                      "port": 9000}]}})
    assert spec.static_endpoints == (StaticEndpoint("studio", "192.0.2.7", 8000),
                                     StaticEndpoint("mini", "::1", 9000))
    assert parse({"model": {"id": "m"}}).static_endpoints == ()
    with pytest.raises(InvalidSpec, match="unique"):
        static_endpoints({"externalEndpoints": {"static": [{"name": "a", "address": "x"},
                                                           {"name": "a", "address": "y"}]}})
    with pytest.raises(InvalidSpec, match="needs a name and an address"):
        static_endpoints({"externalEndpoints": {"static": [{"name": "a"}]}})


# --- the EndpointSlices -----------------------------------------------------------------------

def report(name: str, address: str, *, ready: bool = True, port: int = 8000,
           source: str = "RerankerEndpoint", listable: bool = True) -> Report:
    return Report(name, source, address, port, ready=ready, message="m", device="mlx",
                  listable=listable)


def test_one_slice_per_family_and_port_listing_every_valid_endpoint() -> None:
    summary = external.summarize([
        report("b", "192.0.2.2", ready=False), report("a", "192.0.2.1"),
        report("s", "192.0.2.3", source="static"), report("v6", "2001:db8::1"),
        report("p", "192.0.2.4", port=9000), report("bad", "127.0.0.1", listable=False)])
    slices = {s["metadata"]["name"]: s for s in manifests.external_endpoint_slices("rr", summary)}
    assert sorted(slices) == ["rr-external-ipv4-8000", "rr-external-ipv4-9000",
                              "rr-external-ipv6-8000"]
    main = slices["rr-external-ipv4-8000"]
    assert main["apiVersion"] == "discovery.k8s.io/v1" and main["addressType"] == "IPv4"
    labels = main["metadata"]["labels"]
    assert labels["kubernetes.io/service-name"] == "rr"
    assert labels["endpointslice.kubernetes.io/managed-by"] == "reranker-operator.reranker.dev"
    assert labels["app.kubernetes.io/managed-by"] == "reranker-operator"
    assert main["ports"] == [{"name": "http", "port": 8000, "protocol": "TCP"}]
    assert main["endpoints"] == [
        {"addresses": ["192.0.2.1"], "conditions": {"ready": True, "serving": True,
                                                    "terminating": False},
         "targetRef": {"apiVersion": "reranker.dev/v1alpha1", "kind": "RerankerEndpoint",
                       "name": "a"}},
        {"addresses": ["192.0.2.2"], "conditions": {"ready": False, "serving": False,
                                                    "terminating": False},
         "targetRef": {"apiVersion": "reranker.dev/v1alpha1", "kind": "RerankerEndpoint",
                       "name": "b"}},
        {"addresses": ["192.0.2.3"], "conditions": {"ready": True, "serving": True,
                                                    "terminating": False}},
    ]
    assert slices["rr-external-ipv6-8000"]["addressType"] == "IPv6"
    assert manifests.external_endpoint_slices("rr", Summary()) == []


def test_the_same_host_twice_is_listed_once() -> None:
    summary = external.summarize([report("old", "192.0.2.1", ready=False),
                                  report("new", "192.0.2.1")])
    (s,) = manifests.external_endpoint_slices("rr", summary)
    assert [(e["addresses"], e["conditions"]["ready"]) for e in s["endpoints"]] == [
        (["192.0.2.1"], True)]


def test_slices_are_children_adopted_by_the_reranker_deployment() -> None:
    body = owner({"model": {"id": "m"}})
    spec = parse(body["spec"])
    kinds = [c["kind"] for c in manifests.children(body, spec, DEFAULTS, Summary((report(
        "a", "192.0.2.1"),)))]
    assert kinds.count("EndpointSlice") == 1
    (s,) = [c for c in manifests.children(body, spec, DEFAULTS, Summary((report(
        "a", "192.0.2.1"),))) if c["kind"] == "EndpointSlice"]
    assert s["metadata"]["ownerReferences"][0]["uid"] == "u-1"
    assert "EndpointSlice" not in [c["kind"] for c in manifests.children(body, spec, DEFAULTS)]


# --- the RerankerDeployment's status ----------------------------------------------------------

def build(summary: Summary | None, st: dict[str, Any] | None = None,
          ready_pods: int = 0) -> dict[str, Any]:
    dep = {"metadata": {"generation": 1},
           "status": {"observedGeneration": 1, "replicas": 1, "readyReplicas": ready_pods,
                      "updatedReplicas": 1, "availableReplicas": ready_pods}}
    o = {"metadata": {"name": "rr", "namespace": "ns", "generation": 1},
         "spec": {"replicas": 1}, "status": st or {}}
    return status.build(o, deployment=dep, problems=[], config_hash="h", service_port=8000,
                        now="2024-01-01T00:00:00Z", external=summary)


def conds(st: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in st["conditions"]}


def test_no_external_endpoint_is_not_a_fault() -> None:
    st = build(Summary())
    assert st["externalEndpoints"] == {"ready": 0, "total": 0}
    c = conds(st)["ExternalEndpointsReady"]
    assert (c["status"], c["reason"]) == ("True", "NoExternalEndpoints")


def test_external_endpoints_are_counted_listed_and_conditioned() -> None:
    summary = external.summarize([report("a", "192.0.2.1"),
                                  report("b", "192.0.2.2", ready=False)])
    st = build(summary)
    assert st["externalEndpoints"]["ready"] == 1 and st["externalEndpoints"]["total"] == 2
    assert [e["name"] for e in st["externalEndpoints"]["endpoints"]] == ["a", "b"]
    assert st["externalEndpoints"]["endpoints"][0] == {
        "name": "a", "source": "RerankerEndpoint", "address": "192.0.2.1", "port": 8000,
        "ready": True, "message": "m", "device": "mlx"}
    c = conds(st)
    assert c["ExternalEndpointsReady"]["status"] == "False"
    assert c["ExternalEndpointsReady"]["message"] == "1/2 external endpoints ready; b: m"
    # No pod is ready, but a Mac serves through the Service: Available, not Ready.
    assert (c["Available"]["status"], c["Available"]["reason"]) == ("True",
                                                                    "ExternalEndpointsAvailable")
    assert c["Ready"]["status"] == "False"
    both = conds(build(summary, ready_pods=1))["Available"]
    assert both["message"] == "1 replicas and 1 external endpoints serving"


def test_an_unjudged_fleet_keeps_its_external_status() -> None:
    """Right after a restart the prober has not probed yet: nothing external changes."""
    judged = build(external.summarize([report("a", "192.0.2.1")]))
    again = build(None, st=judged)
    assert again == judged
    assert status.status_patch(judged, again) is None
    assert build(None)["externalEndpoints"] == {"ready": 0, "total": 0}


# --- the reconciler with the prober's view ----------------------------------------------------

async def test_the_pass_applies_and_removes_slices_as_the_summary_says() -> None:
    view: dict[tuple[str, str], Summary | None] = {("ns", "rr"): None}
    kube = FakeKube()
    r = Reconciler(kube, DEFAULTS, clock=lambda: "2024-01-01T00:00:00Z",  # type: ignore[arg-type]
                   events=Events(), external=lambda key: view[key])
    spec = {"model": {"id": "m"}}
    await r.reconcile(owner(spec), {})
    assert ("EndpointSlice", "rr-external-ipv4-8000") not in kube.objects
    view[("ns", "rr")] = external.summarize([report("a", "192.0.2.1")])
    outcome = await r.reconcile(owner(spec, status=kube.status), kube.live())
    assert outcome.created == ["EndpointSlice rr-external-ipv4-8000"]
    assert kube.status["externalEndpoints"]["ready"] == 1
    # Unjudged again (a restart): the slice stays.
    view[("ns", "rr")] = None
    kube.calls.clear()
    outcome = await r.reconcile(owner(spec, status=kube.status), kube.live())
    assert outcome.writes == 0
    # Judged empty: the slice goes.
    view[("ns", "rr")] = Summary()
    outcome = await r.reconcile(owner(spec, status=kube.status), kube.live())
    assert outcome.deleted == ["EndpointSlice rr-external-ipv4-8000"]
    assert kube.status["externalEndpoints"] == {"ready": 0, "total": 0}


# --- the prober's passes ----------------------------------------------------------------------

class Kube(FakeKube):
    """FakeKube, plus the RerankerEndpoints' status writes."""

    def __init__(self) -> None:
        super().__init__()
        self.endpoint_status: dict[str, dict[str, Any]] = {}

    def patch_status(self, namespace: str, name: str, patch: dict[str, Any], *,
                     kind: str = "RerankerDeployment") -> None:
        if kind == "RerankerDeployment":
            super().patch_status(namespace, name, patch)
            return
        self.calls.append(("status", name))
        self.endpoint_status[name] = {k: v for k, v in patch.items() if v is not None}


class Index(dict):  # type: ignore[type-arg]
    """A Kopf index: key -> values."""


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


#: The identity the prober tests' Macs register as.
MAC = "system:serviceaccount:ns:reranker-mac"


def rre(name: str, address: str, renew: str = "2024-01-01T00:00:00Z",
        status: dict[str, Any] | None = None, registered_by: str = MAC) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "ns", "uid": f"uid-{name}"},
            "spec": {"deployment": "rr", "address": address, "port": 8000, "device": "mlx",
                     "registeredBy": registered_by,
                     "heartbeat": {"renewTime": renew, "leaseDurationSeconds": 10}},
            "status": status or {}}


#: The fleet's spec in the prober tests: registered endpoints of 192.0.2.0/24 admitted, from
#: the identity MAC.
FLEET = {"model": {"id": "m"}, "externalEndpoints": {"allowedCIDRs": ["192.0.2.0/24"],
                                                     "allowedIdentities": [MAC]}}
#: What the prober tests' cluster shows: one node with its pod range, the Service range.
NODES = [{"name": "node-a", "podCIDRs": ["10.244.0.0/24"], "addresses": ["172.16.0.10"]}]
SERVICE_CIDRS = [{"name": "kubernetes", "cidrs": ["10.96.0.0/16"]}]


class World:
    """The indices, the probe answers and the writes a prober sees."""

    def __init__(self, config: ProbeConfig = ProbeConfig(period=1.0, timeout=0.5,
                                                         failure_threshold=2,
                                                         success_threshold=1),
                 *, fleet: dict[str, Any] = FLEET,
                 cluster_cidrs: tuple[str, ...] = (),
                 nodes: list[dict[str, Any]] = NODES,
                 service_cidrs: list[dict[str, Any]] = SERVICE_CIDRS) -> None:
        self.kube = Kube()
        self.clock = Clock()
        self.up: dict[str, bool] = {}
        self.changes: list[Summary | None] = []
        self.endpoints = Index()
        self.indices = {RERANKERS_INDEX: Index({("ns", "rr"): [owner(fleet)]}),
                        ENDPOINTS_INDEX: self.endpoints,
                        NODES_INDEX: Index({"cluster": list(nodes)} if nodes else {}),
                        SERVICE_CIDRS_INDEX: Index(
                            {"cluster": list(service_cidrs)} if service_cidrs else {})}
        self.probed: list[str] = []

        async def on_change(key: tuple[str, str]) -> bool:
            self.changes.append(self.prober.summary(key))
            return True

        self.prober = Prober(self.kube, config, on_change=on_change,  # type: ignore[arg-type]
                             monotonic=self.clock, wall=lambda: T0,
                             cluster_cidrs=external.networks(cluster_cidrs))
        self.client = httpx.AsyncClient(transport=httpx.MockTransport(self.answer))

    def answer(self, request: httpx.Request) -> httpx.Response:
        self.probed.append(str(request.url.host))
        if not self.up.get(request.url.host, False):
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(200)

    async def tick(self) -> float:
        return await self.prober.tick(self.client, self.indices)

    def statuses(self) -> list[str]:
        return [name for kind, name in self.kube.calls if kind == "status"]


async def test_the_prober_writes_on_changes_only() -> None:
    w = World()
    w.up["192.0.2.1"] = True
    w.endpoints[("ns", "rr")] = [rre("mac-a", "192.0.2.1")]
    await w.tick()
    assert w.statuses() == ["mac-a"]
    (summary,) = w.changes
    assert summary is not None and (summary.ready, summary.total) == (1, 1)

    # The same answers: no write, no pass.
    w.clock.now += 1.0
    w.kube.calls.clear()
    for _ in range(3):
        w.clock.now += 1.0
        await w.tick()
    assert w.statuses() == [] and len(w.changes) == 1

    # Down: a status write per failure up to the threshold, one pass when it turns not ready.
    w.up["192.0.2.1"] = False
    for _ in range(4):
        w.clock.now += 1.0
        await w.tick()
    assert w.statuses() == ["mac-a", "mac-a"]
    assert [s.ready for s in w.changes if s is not None] == [1, 1, 0]


async def test_the_prober_drops_expired_heartbeats_and_takes_renewals_back() -> None:
    w = World()
    w.up["192.0.2.1"] = True
    w.endpoints[("ns", "rr")] = [rre("mac-a", "192.0.2.1")]
    await w.tick()
    w.clock.now += 10.5  # no renewal for longer than the 10 s lease
    delay = await w.tick()
    assert w.changes[-1] == Summary()
    assert delay <= 1.0
    written = w.kube.endpoint_status["mac-a"]
    assert written["expired"] is True and written["ready"] is False
    # An expired endpoint is not probed.
    w.up["192.0.2.1"] = False
    w.clock.now += 5
    await w.tick()
    assert w.changes[-1] == Summary()
    # Renewed (a restarted Mac): back in the Service.
    w.up["192.0.2.1"] = True
    w.endpoints[("ns", "rr")] = [rre("mac-a", "192.0.2.1", renew="2024-01-01T00:01:00Z")]
    await w.tick()
    assert w.changes[-1] is not None and w.changes[-1].ready == 1
    assert w.kube.endpoint_status["mac-a"]["expired"] is False


async def test_unknown_deployments_and_bad_addresses_are_reported_not_probed() -> None:
    w = World()
    probed: list[str] = []
    original = w.answer

    def answer(request: httpx.Request) -> httpx.Response:
        probed.append(str(request.url.host))
        return original(request)
    w.client = httpx.AsyncClient(transport=httpx.MockTransport(answer))
    lost = rre("lost", "192.0.2.9")
    lost["spec"]["deployment"] = "other"
    w.endpoints[("ns", "other")] = [lost]
    w.endpoints[("ns", "rr")] = [rre("loop", "127.0.0.1")]
    await w.tick()
    assert probed == []
    assert "RerankerDeployment other not found" in w.kube.endpoint_status["lost"]["message"]
    assert "loopback" in w.kube.endpoint_status["loop"]["message"]
    (summary,) = w.changes
    assert summary is not None and [(r.name, r.listable, r.ready) for r in summary.endpoints] == [
        ("loop", False, False)]


async def test_registered_endpoints_are_refused_until_the_fleet_allows_their_network() -> None:
    """Any holder of a Mac identity could register any address (a pod's, a Service's) and
    have the operator put it behind the fleet's Service: a registered endpoint is listed and
    probed only inside the RerankerDeployment's spec.externalEndpoints.allowedCIDRs, which
    is empty (refuse all) until set. Static endpoints are the fleet owner's own word."""
    w = World(fleet={"model": {"id": "m"}, "externalEndpoints": {
        "static": [{"name": "studio", "address": "203.0.113.5"}]}})
    w.up["192.0.2.1"] = w.up["203.0.113.5"] = True
    w.endpoints[("ns", "rr")] = [rre("mac-a", "192.0.2.1")]
    await w.tick()
    assert w.probed == ["203.0.113.5"]  # the registered one is not even probed
    message = w.kube.endpoint_status["mac-a"]["message"]
    assert "spec.externalEndpoints.allowedCIDRs" in message and "refused" in message
    (summary,) = w.changes
    assert summary is not None and [(r.name, r.listable) for r in summary.endpoints] == [
        ("mac-a", False), ("studio", True)]

    w = World(fleet={"model": {"id": "m"}, "externalEndpoints": {
        "allowedCIDRs": ["198.51.100.0/24", "2001:db8::/32"], "allowedIdentities": [MAC]}})
    w.up["192.0.2.1"] = w.up["198.51.100.7"] = True
    w.endpoints[("ns", "rr")] = [rre("mac-a", "192.0.2.1"), rre("mac-b", "198.51.100.7")]
    await w.tick()
    assert w.probed == ["198.51.100.7"]
    assert "192.0.2.1 is outside spec.externalEndpoints.allowedCIDRs" in w.kube.endpoint_status[
        "mac-a"]["message"]
    assert w.kube.endpoint_status["mac-b"]["ready"] is True


async def test_the_clusters_pod_and_service_ranges_are_never_listed() -> None:
    """Not even when the fleet allows them, nor as static endpoints: an address there is
    another workload's, and listing it would send the fleet's clients to it."""
    w = World(fleet={"model": {"id": "m"}, "externalEndpoints": {
        "allowedCIDRs": ["0.0.0.0/0"], "allowedIdentities": [MAC],
        "static": [{"name": "svc", "address": "10.96.0.10"}]}},
        cluster_cidrs=("10.96.0.0/12", "10.244.0.0/16"), nodes=[], service_cidrs=[])
    w.up["10.244.1.7"] = w.up["10.96.0.10"] = w.up["192.0.2.1"] = True
    w.endpoints[("ns", "rr")] = [rre("pod", "10.244.1.7"), rre("mac-a", "192.0.2.1")]
    await w.tick()
    assert w.probed == ["192.0.2.1"]
    assert "inside the cluster's pod/Service range 10.244.0.0/16" in w.kube.endpoint_status[
        "pod"]["message"]
    (summary,) = w.changes
    assert summary is not None
    by_name = {r.name: r for r in summary.endpoints}
    assert "inside the cluster's pod/Service range 10.96.0.0/12" in by_name["svc"].message
    assert (by_name["svc"].listable, by_name["pod"].listable, by_name["mac-a"].listable) == (
        False, False, True)


async def test_the_operator_learns_the_clusters_ranges_and_never_lists_them() -> None:
    """Nothing configured: the nodes' spec.podCIDRs and addresses and the ServiceCIDRs are the
    ranges no endpoint may be in, even where the fleet allows everything."""
    w = World(fleet={"model": {"id": "m"}, "externalEndpoints": {
        "allowedCIDRs": ["0.0.0.0/0"], "allowedIdentities": [MAC]}})
    for address in ("10.244.0.7", "10.96.0.1", "172.16.0.10", "192.0.2.1"):
        w.up[address] = True
    w.endpoints[("ns", "rr")] = [rre("pod", "10.244.0.7"), rre("svc", "10.96.0.1"),
                                 rre("node", "172.16.0.10"), rre("mac-a", "192.0.2.1")]
    await w.tick()
    assert w.probed == ["192.0.2.1"]
    st = w.kube.endpoint_status
    assert "inside the cluster's pod/Service range 10.244.0.0/24" in st["pod"]["message"]
    assert "inside the cluster's pod/Service range 10.96.0.0/16" in st["svc"]["message"]
    assert "inside the cluster's pod/Service range 172.16.0.10/32" in st["node"]["message"]
    assert st["mac-a"]["ready"] is True


async def test_registrations_are_refused_while_the_clusters_ranges_are_unknown() -> None:
    """Fail closed: with no ServiceCIDR to read (an API server before 1.33) or a node whose CNI
    leaves spec.podCIDRs empty, and nothing configured, no registered endpoint is listed, and
    its status says why. Static endpoints (the fleet owner's word) are still probed. Once the
    ranges are known (learned, or configured), the same endpoint is admitted."""
    w = World(nodes=[], service_cidrs=[],
              fleet={**FLEET, "externalEndpoints": {**FLEET["externalEndpoints"],
                                                    "static": [{"name": "studio",
                                                                "address": "203.0.113.5"}]}})
    w.up["192.0.2.1"] = w.up["203.0.113.5"] = True
    w.endpoints[("ns", "rr")] = [rre("mac-a", "192.0.2.1")]
    await w.tick()
    assert w.probed == ["203.0.113.5"]
    message = w.kube.endpoint_status["mac-a"]["message"]
    assert message.startswith("registrations are refused until the operator knows the "
                              "cluster's pod and Service ranges: no ServiceCIDR")
    assert "RERANKER_OPERATOR_CLUSTER_CIDRS" in message
    assert w.prober.ranges.unknown == message

    # A ServiceCIDR appears, and a node without pod ranges: still refused, naming the node.
    w.indices[SERVICE_CIDRS_INDEX]["cluster"] = list(SERVICE_CIDRS)
    w.indices[NODES_INDEX]["cluster"] = [{"name": "node-b", "podCIDRs": [], "addresses": []}]
    w.clock.now += 1
    await w.tick()
    assert "node node-b has no spec.podCIDRs" in w.kube.endpoint_status["mac-a"]["message"]
    assert w.kube.endpoint_status["mac-a"]["ready"] is False

    # The node gets its range (the node IPAM controller): learned, admitted, probed.
    w.indices[NODES_INDEX]["cluster"] = [{"name": "node-b", "podCIDRs": ["10.244.1.0/24"],
                                          "addresses": []}]
    w.clock.now += 1
    await w.tick()
    assert w.kube.endpoint_status["mac-a"]["ready"] is True
    assert [str(n) for n in w.prober.ranges.networks] == ["10.244.1.0/24", "10.96.0.0/16"]

    # Nothing to learn, but the ranges configured on the operator: known, united.
    w = World(nodes=[{"name": "node-c", "podCIDRs": [], "addresses": ["172.16.0.11"]}],
              service_cidrs=[], cluster_cidrs=("10.0.0.0/16",))
    w.up["192.0.2.1"] = True
    w.endpoints[("ns", "rr")] = [rre("mac-a", "192.0.2.1")]
    await w.tick()
    assert w.kube.endpoint_status["mac-a"]["ready"] is True
    assert [str(n) for n in w.prober.ranges.networks] == ["10.0.0.0/16", "172.16.0.11/32"]


async def test_only_the_identities_a_fleet_lists_may_register_for_it() -> None:
    """A Mac's identity could otherwise register for any RerankerDeployment of its namespace:
    the fleet lists who may (spec.externalEndpoints.allowedIdentities; empty: no one), and an
    endpoint registered by anyone else (or by no one the admission policy vouched for) is
    refused, not probed."""
    w = World()
    w.up["192.0.2.1"] = w.up["192.0.2.2"] = w.up["192.0.2.3"] = True
    w.endpoints[("ns", "rr")] = [
        rre("mac-a", "192.0.2.1"),
        rre("other", "192.0.2.2", registered_by="system:serviceaccount:ns:reranker-mac-other"),
        rre("anon", "192.0.2.3", registered_by="")]
    await w.tick()
    assert w.probed == ["192.0.2.1"]
    st = w.kube.endpoint_status
    assert st["mac-a"]["ready"] is True
    assert st["other"]["message"] == (
        "registered by system:serviceaccount:ns:reranker-mac-other, which is not in "
        "spec.externalEndpoints.allowedIdentities: refused")
    assert "an unknown identity (no spec.registeredBy)" in st["anon"]["message"]

    w = World(fleet={"model": {"id": "m"}, "externalEndpoints": {
        "allowedCIDRs": ["192.0.2.0/24"]}})
    w.up["192.0.2.1"] = True
    w.endpoints[("ns", "rr")] = [rre("mac-a", "192.0.2.1")]
    await w.tick()
    assert w.probed == []
    assert "refused until the RerankerDeployment lists the Macs' identities in " \
        "spec.externalEndpoints.allowedIdentities" in w.kube.endpoint_status["mac-a"]["message"]


def test_nodes_and_service_cidrs_are_read_for_their_ranges_only() -> None:
    node = {"metadata": {"name": "node-a", "labels": {"x": "y"}},
            "spec": {"podCIDR": "10.244.0.0/24", "podCIDRs": ["10.244.0.0/24", "fd00:10::/64"]},
            "status": {"addresses": [{"type": "InternalIP", "address": "172.16.0.10"},
                                     {"type": "Hostname", "address": "node-a"},
                                     {"type": "ExternalIP", "address": "203.0.113.10"}]}}
    assert cluster_ranges.node_facts(node) == {
        "name": "node-a", "podCIDRs": ["10.244.0.0/24", "fd00:10::/64"],
        "addresses": ["172.16.0.10", "203.0.113.10"]}
    old = {"metadata": {"name": "n"}, "spec": {"podCIDR": "10.1.0.0/24"}}
    assert cluster_ranges.node_facts(old)["podCIDRs"] == ["10.1.0.0/24"]
    sc = {"metadata": {"name": "kubernetes"}, "spec": {"cidrs": ["10.96.0.0/12", "fd00::/108"]}}
    assert cluster_ranges.service_cidr_facts(sc) == {"name": "kubernetes",
                                                     "cidrs": ["10.96.0.0/12", "fd00::/108"]}
    known = cluster_ranges.learn(nodes=[cluster_ranges.node_facts(node)],
                                 service_cidrs=[cluster_ranges.service_cidr_facts(sc)])
    assert known.unknown is None
    assert [str(n) for n in known.networks] == [
        "10.244.0.0/24", "fd00:10::/64", "172.16.0.10/32", "203.0.113.10/32", "10.96.0.0/12",
        "fd00::/108"]
    # No node at all: no pod has an address yet, so there is no pod range to protect.
    services = [{"cidrs": ["10.96.0.0/12"]}]
    assert cluster_ranges.learn(nodes=[], service_cidrs=services).unknown is None
    many = [{"name": f"n{i}", "podCIDRs": []} for i in range(5)]
    unknown = cluster_ranges.learn(nodes=many, service_cidrs=[{"cidrs": ["10.96.0.0/12"]}]).unknown
    assert unknown is not None and "nodes n0, n1, n2 and 2 more have no spec.podCIDRs" in unknown
    long_names = [{"name": c * 253, "podCIDRs": []} for c in "abcd"]
    unknown = cluster_ranges.learn(nodes=long_names, service_cidrs=[]).unknown
    assert unknown is not None and len(unknown) <= 1024  # the status' message field's bound
    crd = yaml.safe_load((REPO / "crds" / "rerankerendpoints.reranker.dev.yaml").read_text())
    (version,) = crd["spec"]["versions"]
    status = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    assert status["message"]["maxLength"] == 1024


async def test_a_fleet_with_tls_probes_https_and_reports_an_unusable_bundle() -> None:
    """spec.externalEndpoints.tls.caBundle: every endpoint of the fleet is probed over HTTPS
    (the handshake against a real server: tests/kube/test_external_endpoints.py); a bundle that
    is no PEM certificate is reported on each endpoint, which is then not probed."""
    ep = external.from_resource(rre("mac-a", "192.0.2.1"))
    assert ep.url == "http://192.0.2.1:8000/ready"
    tls = {**FLEET["externalEndpoints"], "tls": {"caBundle": "not a certificate"}}
    assert external.tls_ca_bundle({"externalEndpoints": tls}) == "not a certificate"
    assert external.tls_ca_bundle({"externalEndpoints": {"tls": {}}}) is None
    w = World(fleet={"model": {"id": "m"}, "externalEndpoints": tls})
    w.up["192.0.2.1"] = True
    w.endpoints[("ns", "rr")] = [rre("mac-a", "192.0.2.1")]
    await w.tick()
    await w.prober.aclose()
    assert w.probed == []
    assert w.kube.endpoint_status["mac-a"]["message"].startswith(
        "spec.externalEndpoints.tls.caBundle is not a PEM CA certificate bundle")
    assert dataclasses.replace(ep, ca_bundle="PEM").url == "https://192.0.2.1:8000/ready"


def test_allowed_cidrs_are_parsed_and_checked() -> None:
    spec = parse({"model": {"id": "m"}, "externalEndpoints": {
        "allowedCIDRs": ["192.168.1.0/24", "fd00::/8"]}})
    assert [str(n) for n in spec.allowed_cidrs] == ["192.168.1.0/24", "fd00::/8"]
    with pytest.raises(InvalidSpec, match=r"externalEndpoints.allowedCIDRs\[1\]: '192.168.1.7/24'"):
        parse({"model": {"id": "m"}, "externalEndpoints": {
            "allowedCIDRs": ["10.0.0.0/8", "192.168.1.7/24"]}})  # host bits set: a typo?
    assert parse({"model": {"id": "m"}}).allowed_cidrs == ()


async def test_a_restarted_operator_writes_nothing_for_a_steady_endpoint() -> None:
    w = World()
    w.up["192.0.2.1"] = True
    w.endpoints[("ns", "rr")] = [rre("mac-a", "192.0.2.1", status={
        "ready": True, "expired": False, "consecutiveFailures": 0,
        "message": "ready (GET /ready: 200)", "lastProbeTime": "2024-01-01T00:00:00Z"})]
    await w.tick()
    assert w.statuses() == []


async def test_a_wake_ends_the_sleep_at_once() -> None:
    w = World(ProbeConfig(period=60.0, timeout=0.5, failure_threshold=2, success_threshold=1))
    w.up["192.0.2.1"] = True
    w.prober.indexed.set()
    task = asyncio.create_task(w.prober.run(w.indices, transport=httpx.MockTransport(w.answer)))
    try:
        for _ in range(100):  # the first pass: no endpoint yet
            if w.changes:
                break
            await asyncio.sleep(0.01)
        assert w.changes == [Summary()]
        w.endpoints[("ns", "rr")] = [rre("mac-a", "192.0.2.1")]
        w.prober.wake()  # as the RerankerEndpoint's ADDED event does
        for _ in range(100):
            if len(w.changes) == 2:
                break
            await asyncio.sleep(0.01)
        assert w.changes[-1] is not None and w.changes[-1].ready == 1  # not 60 s later
    finally:
        task.cancel()


# --- the RerankerEndpoint CRD -----------------------------------------------------------------

def test_the_endpoint_crd_follows_the_contract_and_the_registration() -> None:
    crd = yaml.safe_load((REPO / "crds" / "rerankerendpoints.reranker.dev.yaml").read_text())
    assert crd["spec"]["group"] == contract.API_GROUP
    names = crd["spec"]["names"]
    assert (names["kind"], names["plural"], names["shortNames"]) == (
        contract.KIND_ENDPOINT, contract.PLURAL_ENDPOINT, ["rre"])
    (version,) = crd["spec"]["versions"]
    assert version["name"] == contract.API_VERSION and version["subresources"] == {"status": {}}
    schema = version["schema"]["openAPIV3Schema"]["properties"]
    # What a Mac writes fits the schema exactly...
    spec = endpoint_spec(deployment="rr", address="192.0.2.1", port=8000, info=None,
                         lease_seconds=30, renew_time="2024-01-01T00:00:00.000001Z")
    assert set(spec) == set(schema["spec"]["properties"])
    assert set(spec["heartbeat"]) == set(schema["spec"]["properties"]["heartbeat"]["properties"])
    body = endpoint_body(name="mac", namespace="ns", spec=spec, machine="0a1b2c3d4e5f")
    assert set(body["spec"]) >= set(schema["spec"]["required"])
    # ...and so does what the operator writes in the status.
    state = ProbeState(target=("a", 1), last_probe="t")
    written = external.endpoint_status(state, problem=None, is_expired=False, lease_seconds=30,
                                       config=CONFIG)
    assert set(written) <= set(schema["status"]["properties"])
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns["Ready"] == ".status.ready" and columns["Deployment"] == ".spec.deployment"


async def test_liveness_fails_once_the_prober_died() -> None:
    import types

    import kopf

    from reranker_operator import handlers

    async def crash() -> None:
        raise RuntimeError("a bug")

    memo = types.SimpleNamespace(prober_task=asyncio.create_task(asyncio.sleep(10)))
    assert handlers.external_prober(memo=memo) == "running"
    memo.prober_task.cancel()
    memo.prober_task = asyncio.create_task(crash())
    await asyncio.gather(memo.prober_task, return_exceptions=True)
    with pytest.raises(kopf.PermanentError, match="prober stopped"):
        handlers.external_prober(memo=memo)


def test_the_cluster_ranges_come_from_the_operators_environment() -> None:
    from reranker_operator.settings import OperatorConfig

    config = OperatorConfig.from_env({"RERANKER_OPERATOR_CLUSTER_CIDRS": "10.244.0.0/16, fd00:10::/64"})
    assert [str(n) for n in config.cluster_cidrs] == ["10.244.0.0/16", "fd00:10::/64"]
    assert OperatorConfig.from_env({}).cluster_cidrs == ()
    with pytest.raises(SystemExit, match="RERANKER_OPERATOR_CLUSTER_CIDRS"):
        OperatorConfig.from_env({"RERANKER_OPERATOR_CLUSTER_CIDRS": "10.244.0.0/33"})

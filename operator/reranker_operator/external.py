"""External endpoints (Apple-silicon Macs) of a RerankerDeployment: who they are, whether they
pass their probes, whether their heartbeat is fresh, and what the status says about them.

Pure: no API calls, no HTTP, no clock (times are arguments), so that the thresholds, the
heartbeat expiry and the status texts are unit-tested without a cluster. `prober` does the
effectful part (the /ready requests, the RerankerEndpoint status writes) with these.

Two sources, one treatment: a RerankerEndpoint that a Mac registered (it has a heartbeat) and
an entry of spec.externalEndpoints.static (no heartbeat). Both are probed the same way and
listed the same way in the Service's EndpointSlice (`manifests.external_endpoint_slices`).

Heartbeats are judged by when the operator *saw* a renewal, not by the Mac's clock (like
Kubernetes' leader election): a renewal is a change of spec.heartbeat.renewTime, and the
endpoint expires when no change has been seen for leaseDurationSeconds. Only the first sight
(operator start) trusts the timestamp, so that a Mac dead for hours is not given a new lease.

The status texts are stable between probes that agree (no counter or time in them beyond the
failure threshold), so a steady fleet rebuilds identical statuses and the operator writes
nothing.
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
from collections.abc import Iterable, Mapping
from typing import Any

from reranker import contract
from reranker_operator.spec import DEFAULT_SERVICE_PORT, StaticEndpoint

OwnerKey = tuple[str, str]  # (namespace, name) of a RerankerDeployment
EndpointKey = tuple[str, str, str, str]  # (source, namespace, deployment, name)

SOURCE_REGISTERED = contract.KIND_ENDPOINT
SOURCE_STATIC = "static"


@dataclasses.dataclass(frozen=True)
class ProbeConfig:
    """How the operator probes external endpoints (operator-wide settings)."""

    period: float = 5.0
    timeout: float = 2.0
    failure_threshold: int = 3
    success_threshold: int = 1


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """One external endpoint as declared: a RerankerEndpoint's spec or a static entry."""

    owner: OwnerKey
    name: str
    source: str
    address: str
    port: int
    device: str | None = None
    uid: str | None = None  # of the RerankerEndpoint
    renew_time: str | None = None
    lease_seconds: int | None = None
    registered_by: str | None = None  # spec.registeredBy (the admission policy vouches for it)
    #: PEM CA bundle of the fleet's spec.externalEndpoints.tls: probed over HTTPS, verified.
    ca_bundle: str | None = None

    @property
    def key(self) -> EndpointKey:
        return (self.source, self.owner[0], self.owner[1], self.name)

    @property
    def url(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        scheme = "https" if self.ca_bundle else "http"
        return f"{scheme}://{host}:{self.port}{contract.ROUTE_READY}"


def from_resource(body: Mapping[str, Any]) -> Endpoint:
    """The Endpoint a RerankerEndpoint object declares."""
    meta, spec = body.get("metadata") or {}, body.get("spec") or {}
    heartbeat = spec.get("heartbeat") or {}
    lease = heartbeat.get("leaseDurationSeconds")
    return Endpoint(
        owner=(str(meta.get("namespace")), str(spec.get("deployment") or "")),
        name=str(meta.get("name")),
        source=SOURCE_REGISTERED,
        address=str(spec.get("address") or ""),
        port=int(spec.get("port") or DEFAULT_SERVICE_PORT),
        device=spec.get("device"),
        uid=meta.get("uid"),
        renew_time=heartbeat.get("renewTime"),
        lease_seconds=int(lease) if lease else None,
        registered_by=spec.get("registeredBy") or None,
    )


def from_static(owner: OwnerKey, entries: Iterable[StaticEndpoint]) -> list[Endpoint]:
    return [Endpoint(owner=owner, name=e.name, source=SOURCE_STATIC, address=e.address,
                     port=e.port) for e in entries]


def address_problem(address: str) -> str | None:
    """Why an address cannot be listed in an EndpointSlice (the API server refuses loopback,
    link-local and unspecified addresses), or None."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return f"address {address!r} is not an IPv4 or IPv6 address"
    for bad, what in ((ip.is_loopback, "loopback"), (ip.is_link_local, "link-local"),
                      (ip.is_unspecified, "unspecified"), (ip.is_multicast, "multicast")):
        if bad:
            return (f"address {address} is {what}: an EndpointSlice may not list it "
                    "(advertise an address the cluster reaches the host at)")
    return None


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def networks(cidrs: Iterable[str]) -> tuple[Network, ...]:
    """CIDRs as networks; ValueError names the first that is not one (host bits set count:
    "10.0.0.7/8" is more likely a typo than a wish to allow 10.0.0.0/8)."""
    return tuple(ipaddress.ip_network(c.strip()) for c in cidrs if c.strip())


def trust_problem(endpoint: Endpoint, *, allowed: tuple[Network, ...],
                  cluster: tuple[Network, ...], identities: tuple[str, ...] = (),
                  cluster_unknown: str | None = None) -> str | None:
    """Why an endpoint with a valid address may not join the Service, or None.

    Nothing inside the cluster's pod or Service ranges is ever listed: such an address is
    another workload's, and listing it would send the fleet's clients there (and the probes
    would scan it). A registered endpoint (written by a Mac's identity, not by the fleet's
    owner) is refused while those ranges are not known (`cluster_unknown` says why), and must
    be inside the fleet's allowedCIDRs and registered by one of its allowedIdentities; both
    refuse everything until set."""
    ip = ipaddress.ip_address(endpoint.address)
    for net in cluster:
        if ip in net:
            return (f"address {endpoint.address} is inside the cluster's pod/Service range "
                    f"{net}: never listed (it would send the fleet's traffic to another workload)")
    if endpoint.source != SOURCE_REGISTERED:
        return None
    if cluster_unknown is not None:
        return cluster_unknown
    if not allowed:
        return ("registered endpoints are refused until the RerankerDeployment sets "
                "spec.externalEndpoints.allowedCIDRs (the networks its Macs live in)")
    if not any(ip in net for net in allowed):
        return (f"address {endpoint.address} is outside spec.externalEndpoints.allowedCIDRs "
                f"({', '.join(str(n) for n in allowed)}): refused")
    if not identities:
        return ("registered endpoints are refused until the RerankerDeployment lists the Macs' "
                "identities in spec.externalEndpoints.allowedIdentities (user names, e.g. "
                "system:serviceaccount:NAMESPACE:reranker-mac-studio-1)")
    if endpoint.registered_by not in identities:
        who = endpoint.registered_by or "an unknown identity (no spec.registeredBy)"
        return (f"registered by {who}, "
                "which is not in spec.externalEndpoints.allowedIdentities: refused")
    return None


def allowed_identities(spec: Mapping[str, Any]) -> tuple[str, ...]:
    """spec.externalEndpoints.allowedIdentities: who may register for the fleet (empty: no one)."""
    entries = ((spec.get("externalEndpoints") or {}).get("allowedIdentities")) or ()
    if not isinstance(entries, (list, tuple)):
        return ()
    return tuple(str(e).strip() for e in entries if str(e).strip())


def tls_ca_bundle(spec: Mapping[str, Any]) -> str | None:
    """spec.externalEndpoints.tls.caBundle (PEM), or None: probes then use plain HTTP."""
    tls = (spec.get("externalEndpoints") or {}).get("tls") or {}
    bundle = tls.get("caBundle") if isinstance(tls, Mapping) else None
    return str(bundle) if bundle and str(bundle).strip() else None


def address_type(address: str) -> str:
    """EndpointSlice addressType of a valid address."""
    return "IPv6" if ipaddress.ip_address(address).version == 6 else "IPv4"


# --- heartbeats -------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Heartbeat:
    """The last renewal the operator saw, and when (its monotonic clock)."""

    renew_time: str | None
    seen_at: float


def _parse_time(value: str | None) -> datetime.datetime | None:
    if not value:
        return None
    try:
        parsed = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=datetime.timezone.utc)


def observe(previous: Heartbeat | None, renew_time: str | None, *, now: float,
            wall: datetime.datetime) -> Heartbeat:
    """The heartbeat after looking at the endpoint's renewTime again."""
    if previous is not None:
        return previous if previous.renew_time == renew_time else Heartbeat(renew_time, now)
    # First sight (a new endpoint, or the operator started): trust the timestamp once, so an
    # endpoint renewed long ago is not given a whole new lease.
    renewed = _parse_time(renew_time)
    age = (wall - renewed).total_seconds() if renewed is not None else 0.0
    return Heartbeat(renew_time, now - max(0.0, age))


def expired(heartbeat: Heartbeat, lease_seconds: int | None, *, now: float) -> bool:
    return lease_seconds is not None and now - heartbeat.seen_at > lease_seconds


def expires_in(heartbeat: Heartbeat, lease_seconds: int | None, *, now: float) -> float | None:
    if lease_seconds is None:
        return None
    return heartbeat.seen_at + lease_seconds - now


# --- probes -----------------------------------------------------------------------------------

@dataclasses.dataclass
class ProbeState:
    """What the probes of one endpoint have shown (mutable: one per endpoint, in memory)."""

    target: tuple[str, int]
    ready: bool = False
    successes: int = 0
    failures: int = 0
    message: str = "not probed yet"
    last_probe: str | None = None
    next_probe: float = 0.0  # monotonic

    def record(self, ok: bool, outcome: str, *, config: ProbeConfig, at: str) -> None:
        """One probe's result: `outcome` says what happened ("GET /ready: 200", ...)."""
        self.last_probe = at
        if ok:
            self.successes, self.failures = self.successes + 1, 0
            if self.successes >= config.success_threshold:
                self.ready = True
        else:
            self.failures, self.successes = self.failures + 1, 0
            if self.failures >= config.failure_threshold:
                self.ready = False
        self.message = probe_message(self, ok, outcome, config=config)


def probe_message(state: ProbeState, ok: bool, outcome: str, *, config: ProbeConfig) -> str:
    """Stable while the probes agree: counts only while they move toward a threshold."""
    if ok:
        if state.ready:
            return f"ready ({outcome})"
        return f"{outcome} ({state.successes}/{config.success_threshold} successes)"
    if state.ready:
        return f"{outcome} ({state.failures}/{config.failure_threshold} failures)"
    return f"not ready: {outcome}"


def seed(target: tuple[str, int], status: Mapping[str, Any] | None, *,
         config: ProbeConfig) -> ProbeState:
    """The state a restarted operator starts from: what the status last said, so that a
    restart changes nothing while the probes keep agreeing with it."""
    status = status or {}
    state = ProbeState(target=target)
    if status.get("ready") is True:
        state.ready, state.successes = True, config.success_threshold
    if isinstance(status.get("message"), str):
        state.message = status["message"]
    if isinstance(status.get("lastProbeTime"), str):
        state.last_probe = status["lastProbeTime"]
    failures = status.get("consecutiveFailures")
    if isinstance(failures, int) and not state.ready:
        state.failures = failures
    return state


# --- what is reported -------------------------------------------------------------------------

def endpoint_status(state: ProbeState | None, *, problem: str | None, is_expired: bool,
                    lease_seconds: int | None, config: ProbeConfig) -> dict[str, Any]:
    """The status of a RerankerEndpoint (see `status_differs` for when it is written)."""
    if problem is not None:
        return {"ready": False, "expired": False, "consecutiveFailures": 0, "message": problem}
    state = state or ProbeState(target=("", 0))
    failures = min(state.failures, config.failure_threshold)
    out: dict[str, Any] = {"ready": state.ready and not is_expired, "expired": is_expired,
                           "consecutiveFailures": failures}
    if is_expired:
        out["message"] = (f"heartbeat expired (no renewal seen for {lease_seconds}s): "
                          "not in the Service until the server renews it")
    else:
        out["message"] = state.message
    if state.last_probe is not None:
        out["lastProbeTime"] = state.last_probe
    return out


def status_differs(current: Mapping[str, Any] | None, new: Mapping[str, Any]) -> bool:
    """Whether a write is due: lastProbeTime alone never causes one."""
    def essence(st: Mapping[str, Any] | None) -> dict[str, Any]:
        return {k: v for k, v in (st or {}).items() if k != "lastProbeTime"}
    return essence(current) != essence(new)


@dataclasses.dataclass(frozen=True)
class Report:
    """One external endpoint as the RerankerDeployment's status and Service list it."""

    name: str
    source: str
    address: str
    port: int
    ready: bool
    message: str
    device: str | None = None
    listable: bool = True  # a valid address: in the EndpointSlice

    def as_status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "source": self.source,
                               "address": self.address, "port": self.port,
                               "ready": self.ready, "message": self.message}
        if self.device:
            out["device"] = self.device
        return out


@dataclasses.dataclass(frozen=True)
class Summary:
    """The external endpoints of one RerankerDeployment that are in its Service (fresh
    heartbeat, or static), sorted; equal summaries mean nothing to write."""

    endpoints: tuple[Report, ...] = ()

    @property
    def total(self) -> int:
        return len(self.endpoints)

    @property
    def ready(self) -> int:
        return sum(1 for e in self.endpoints if e.ready)

    def as_status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"ready": self.ready, "total": self.total}
        if self.endpoints:
            out["endpoints"] = [e.as_status() for e in self.endpoints]
        return out


def report(endpoint: Endpoint, state: ProbeState | None, problem: str | None) -> Report:
    if problem is not None:
        return Report(endpoint.name, endpoint.source, endpoint.address, endpoint.port,
                      ready=False, message=problem, device=endpoint.device, listable=False)
    state = state or ProbeState(target=(endpoint.address, endpoint.port))
    return Report(endpoint.name, endpoint.source, endpoint.address, endpoint.port,
                  ready=state.ready, message=state.message, device=endpoint.device)


def summarize(reports: Iterable[Report]) -> Summary:
    return Summary(tuple(sorted(reports, key=lambda r: (r.name, r.source))))

"""The prober: one operator-wide background task that probes every external endpoint.

Kubernetes does not health-check endpoints outside the cluster, so the operator does: every
`period` it sends GET /ready to each external endpoint (registered RerankerEndpoints and
spec.externalEndpoints.static) that is due, counts successes and failures against the
thresholds, watches the RerankerEndpoints' heartbeats, and then:

- refuses, without probing, what may not join: a registered endpoint while the cluster's
  pod and Service ranges are unknown (`cluster_ranges`, learned from the Nodes and
  ServiceCIDRs that Kopf indexes), or outside its fleet's allowedCIDRs and allowedIdentities;
  any endpoint inside those ranges (`external.trust_problem`);
- probes over HTTPS, trusting only the fleet's CA bundle, where the fleet sets
  spec.externalEndpoints.tls (one client per bundle);
- writes a RerankerEndpoint's status only when it changed (`external.status_differs`);
- when a fleet's summary changed, runs that fleet's reconciliation pass (`on_change`), which
  applies the EndpointSlices and the RerankerDeployment's status: one writer for both.

Why a task started by `@kopf.on.startup` and not `@kopf.timer`/`@kopf.daemon`: Kopf puts a
finalizer on every object that has a timer or daemon, and a finalizer makes deletion wait for
the operator. RerankerDeployments must stay deletable by plain garbage collection, and
RerankerEndpoints are deleted by the Macs themselves (a Mac shutting down must not hang, nor
its next registration meet a half-deleted object) while the operator may be down. The task
reads Kopf's indices (the same in-memory view the handlers use), so it makes no API reads.
Kopf's event handlers wake it at once when an endpoint appears, changes or goes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import logging
import ssl
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import httpx
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

from reranker import contract
from reranker_operator import cluster_ranges, external
from reranker_operator.external import Endpoint, EndpointKey, OwnerKey, ProbeConfig
from reranker_operator.kube import Kube, error_message
from reranker_operator.spec import InvalidSpec, allowed_cidrs, static_endpoints

logger = logging.getLogger(__name__)

#: Index names (see handlers): RerankerDeployments and RerankerEndpoints by (namespace, name).
RERANKERS_INDEX = "rerankers"
ENDPOINTS_INDEX = "reranker_endpoints"
#: Cluster-scoped indices (see handlers): the Nodes' and ServiceCIDRs' facts, one key.
NODES_INDEX = "reranker_nodes"
SERVICE_CIDRS_INDEX = "reranker_servicecidrs"
#: Concurrent probes (each bounded by the probe timeout).
MAX_CONCURRENT_PROBES = 64

OnChange = Callable[[OwnerKey], Awaitable[bool]]


def _wall() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _stamp(moment: datetime.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


class Prober:
    """Holds the probe state, heartbeats and last reported summaries (event loop only)."""

    def __init__(self, kube: Kube, config: ProbeConfig, *, on_change: OnChange,
                 monotonic: Callable[[], float] | None = None,
                 wall: Callable[[], datetime.datetime] = _wall,
                 cluster_cidrs: tuple[external.Network, ...] = ()) -> None:
        self.kube = kube
        self.config = config
        self.cluster_cidrs = cluster_cidrs
        self.on_change = on_change
        self._monotonic = monotonic
        self._wall = wall
        self._states: dict[EndpointKey, external.ProbeState] = {}
        self._heartbeats: dict[EndpointKey, external.Heartbeat] = {}
        self._summaries: dict[OwnerKey, external.Summary] = {}  # judged
        self._reported: dict[OwnerKey, external.Summary] = {}  # reconciled
        self._written: dict[str, dict[str, Any]] = {}  # RerankerEndpoint uid -> status
        self._bodies: dict[EndpointKey, Mapping[str, Any]] = {}  # RerankerEndpoints, this pass
        #: HTTPS clients by CA bundle (spec.externalEndpoints.tls), or why a bundle is unusable.
        self._tls: dict[str, httpx.AsyncClient | str] = {}
        self._transport: httpx.AsyncBaseTransport | None = None
        self.ranges = cluster_ranges.ClusterRanges(networks=cluster_cidrs)
        self._wake = asyncio.Event()
        #: Set by the first non-indexing handler: Kopf has filled every index by then.
        self.indexed = asyncio.Event()

    def now(self) -> float:
        return self._monotonic() if self._monotonic else asyncio.get_running_loop().time()

    # --- for the handlers and the reconciler ----------------------------------------------

    def summary(self, key: OwnerKey) -> external.Summary | None:
        """What the probes found for a fleet; None until judged (status and slices then stay)."""
        return self._summaries.get(key)

    def wake(self) -> None:
        self._wake.set()

    def forget_endpoint(self, uid: str | None) -> None:
        self._written.pop(str(uid), None)

    # --- the loop -------------------------------------------------------------------------

    async def run(self, indices: Mapping[str, Any], *,
                  transport: httpx.AsyncBaseTransport | None = None) -> None:
        """Forever: a pass, then sleep until something is due or a handler wakes us.
        (`transport`: the tests' stand-in for the network.)"""
        await self.indexed.wait()
        self._transport = transport
        try:
            async with self._client(verify=True) as client:
                while True:
                    self._wake.clear()
                    delay = await self.tick(client, indices)
                    try:
                        await asyncio.wait_for(self._wake.wait(), timeout=delay)
                    except asyncio.TimeoutError:
                        pass
        finally:
            await self.aclose()

    def _client(self, *, verify: ssl.SSLContext | bool) -> httpx.AsyncClient:
        limits = httpx.Limits(max_connections=MAX_CONCURRENT_PROBES, max_keepalive_connections=0)
        return httpx.AsyncClient(timeout=self.config.timeout, limits=limits, trust_env=False,
                                 verify=verify, transport=self._transport)

    def _tls_client(self, ca_bundle: str) -> httpx.AsyncClient | str:
        """The HTTPS client that trusts only CA_BUNDLE (and checks the endpoint's address
        against the certificate), or why the bundle cannot be used."""
        if ca_bundle not in self._tls:
            try:
                context = ssl.create_default_context(cadata=ca_bundle)
                self._tls[ca_bundle] = self._client(verify=context)
            except (ssl.SSLError, ValueError) as e:
                self._tls[ca_bundle] = ("spec.externalEndpoints.tls.caBundle is not a PEM CA "
                                        f"certificate bundle ({e}): not probed")
        return self._tls[ca_bundle]

    async def aclose(self) -> None:
        """Close the HTTPS clients."""
        for client in self._tls.values():
            if isinstance(client, httpx.AsyncClient):
                await client.aclose()
        self._tls.clear()

    async def tick(self, client: httpx.AsyncClient, indices: Mapping[str, Any]) -> float:
        """One pass over every known endpoint; returns the seconds until the next is due."""
        owners = {key: bodies[0] for key, bodies in _items(indices.get(RERANKERS_INDEX))
                  if bodies}
        declared = self._declared(owners, indices)
        now, wall = self.now(), self._wall()
        self.ranges = ranges = cluster_ranges.learn(
            nodes=_values(indices.get(NODES_INDEX)),
            service_cidrs=_values(indices.get(SERVICE_CIDRS_INDEX)),
            configured=self.cluster_cidrs)

        problems: dict[EndpointKey, str] = {}
        expired: dict[EndpointKey, bool] = {}
        for ep in declared:
            if ep.owner not in owners:
                problems[ep.key] = (f"RerankerDeployment {ep.owner[1]} not found in namespace "
                                    f"{ep.owner[0]}")
            elif (problem := external.address_problem(ep.address)) is not None:
                problems[ep.key] = problem
            elif (problem := external.trust_problem(
                    ep, allowed=_allowed(owners[ep.owner]), cluster=ranges.networks,
                    identities=external.allowed_identities(owners[ep.owner].get("spec") or {}),
                    cluster_unknown=ranges.unknown)) is not None:
                problems[ep.key] = problem
            elif ep.ca_bundle and isinstance(tls := self._tls_client(ep.ca_bundle), str):
                problems[ep.key] = tls
            if ep.source == external.SOURCE_REGISTERED:
                hb = external.observe(self._heartbeats.get(ep.key), ep.renew_time, now=now,
                                      wall=wall)
                self._heartbeats[ep.key] = hb
                expired[ep.key] = external.expired(hb, ep.lease_seconds, now=now)
            self._state(ep, owners)

        due = [ep for ep in declared if ep.key not in problems and not expired.get(ep.key)
               and self._states[ep.key].next_probe <= now]
        if due:
            results = await asyncio.gather(*(self._probe(client, ep) for ep in due))
            at = _stamp(self._wall())
            after = self.now()
            for ep, (ok, outcome) in zip(due, results):
                state = self._states[ep.key]
                state.record(ok, outcome, config=self.config, at=at)
                state.next_probe = after + self.config.period

        await self._write_endpoint_statuses(declared, problems, expired)
        await self._report(owners, declared, problems, expired)
        self._drop_stale({ep.key for ep in declared})
        return self._next_delay(declared, problems, expired)

    # --- the parts of a pass --------------------------------------------------------------

    def _declared(self, owners: Mapping[OwnerKey, Any], indices: Mapping[str, Any]
                  ) -> list[Endpoint]:
        declared: list[Endpoint] = []
        self._bodies = {}
        for key, owner in owners.items():
            try:
                declared += external.from_static(key, static_endpoints(owner.get("spec") or {}))
            except (InvalidSpec, TypeError, ValueError):
                continue  # the reconciliation pass reports an invalid spec
        for _, bodies in _items(indices.get(ENDPOINTS_INDEX)):
            for body in bodies:
                if not (body.get("metadata") or {}).get("deletionTimestamp"):
                    ep = external.from_resource(body)
                    declared.append(ep)
                    self._bodies[ep.key] = body
        # The fleet's TLS setting applies to every one of its endpoints.
        bundles = {key: external.tls_ca_bundle(owner.get("spec") or {})
                   for key, owner in owners.items()}
        return [dataclasses.replace(ep, ca_bundle=bundles.get(ep.owner)) for ep in declared]

    def _state(self, ep: Endpoint, owners: Mapping[OwnerKey, Any]) -> external.ProbeState:
        """The endpoint's probe state; new (or moved to another address) starts afresh, seeded
        from the last status the operator wrote, so that a restart writes nothing."""
        target = (ep.address, ep.port)
        state = self._states.get(ep.key)
        if state is not None and state.target == target:
            return state
        last: Mapping[str, Any] | None = None
        if state is None:
            if ep.source == external.SOURCE_REGISTERED:
                last = self._written.get(str(ep.uid)) or _status_of(self._bodies.get(ep.key))
            else:
                last = _static_status(owners.get(ep.owner), ep)
        state = external.seed(target, last, config=self.config)
        self._states[ep.key] = state
        return state

    async def _probe(self, client: httpx.AsyncClient, ep: Endpoint) -> tuple[bool, str]:
        if ep.ca_bundle:
            tls = self._tls[ep.ca_bundle]
            assert isinstance(tls, httpx.AsyncClient)  # an unusable bundle is a problem: no probe
            client = tls
        try:
            response = await client.get(ep.url)
        except httpx.TimeoutException:
            return False, f"GET {contract.ROUTE_READY}: no answer within {self.config.timeout:g}s"
        except httpx.ConnectError as e:
            if ep.ca_bundle and _tls_failure(e):
                return False, (f"GET {contract.ROUTE_READY} over HTTPS: the certificate is not "
                               "verified by spec.externalEndpoints.tls.caBundle for address "
                               f"{ep.address} ({_tls_failure(e)})")
            return False, f"GET {contract.ROUTE_READY}: cannot connect"
        except httpx.HTTPError as e:
            return False, f"GET {contract.ROUTE_READY}: {e.__class__.__name__}"
        return response.status_code == 200, f"GET {contract.ROUTE_READY}: {response.status_code}"

    async def _write_endpoint_statuses(self, declared: list[Endpoint],
                                       problems: Mapping[EndpointKey, str],
                                       expired: Mapping[EndpointKey, bool]) -> None:
        writes: list[tuple[Endpoint, dict[str, Any]]] = []
        for ep in declared:
            if ep.source != external.SOURCE_REGISTERED:
                continue
            new = external.endpoint_status(
                self._states.get(ep.key), problem=problems.get(ep.key),
                is_expired=bool(expired.get(ep.key)), lease_seconds=ep.lease_seconds,
                config=self.config)
            current: Mapping[str, Any] | None = self._written.get(str(ep.uid))
            if current is None:
                current = _status_of(self._bodies.get(ep.key))
            if external.status_differs(current, new):
                writes.append((ep, new))
        if not writes:
            return
        done = await asyncio.to_thread(self._patch_statuses, writes)
        for ep, new in writes:
            if ep.key in done:
                self._written[str(ep.uid)] = new

    def _patch_statuses(self, writes: list[tuple[Endpoint, dict[str, Any]]]
                        ) -> set[EndpointKey]:
        """Blocking: in a worker thread."""
        done: set[EndpointKey] = set()
        for ep, new in writes:
            # Keys the operator no longer sets are removed (merge patch: null).
            patch = {**{k: None for k in ("lastProbeTime",) if k not in new}, **new}
            try:
                self.kube.patch_status(ep.owner[0], ep.name, patch,
                                       kind=contract.KIND_ENDPOINT)
                done.add(ep.key)
            except ApiException as e:
                if e.status == 404:  # deleted meanwhile: its DELETED event follows
                    done.add(ep.key)
                else:
                    logger.warning("cannot write the status of RerankerEndpoint %s/%s: %s",
                                   ep.owner[0], ep.name, error_message(e))
            except HTTPError as e:
                logger.warning("cannot write the status of RerankerEndpoint %s/%s: %s",
                               ep.owner[0], ep.name, e)
        return done

    async def _report(self, owners: Mapping[OwnerKey, Any], declared: list[Endpoint],
                      problems: Mapping[EndpointKey, str],
                      expired: Mapping[EndpointKey, bool]) -> None:
        reports: dict[OwnerKey, list[external.Report]] = {key: [] for key in owners}
        for ep in declared:
            if ep.owner in owners and not expired.get(ep.key):
                reports[ep.owner].append(
                    external.report(ep, self._states.get(ep.key), problems.get(ep.key)))
        for key in list(self._summaries):
            if key not in owners:
                del self._summaries[key]
                self._reported.pop(key, None)
        for key, found in reports.items():
            summary = external.summarize(found)
            self._summaries[key] = summary
            if self._reported.get(key) == summary:
                continue
            # The fleet's pass writes the slices and status; on a transient failure the next
            # tick tries again.
            if await self.on_change(key):
                self._reported[key] = summary

    def _drop_stale(self, keys: set[EndpointKey]) -> None:
        for memory in (self._states, self._heartbeats):
            for key in [k for k in memory if k not in keys]:
                del memory[key]

    def _next_delay(self, declared: list[Endpoint], problems: Mapping[EndpointKey, str],
                    expired: Mapping[EndpointKey, bool]) -> float:
        now = self.now()
        delay = self.config.period
        for ep in declared:
            if ep.key in problems:
                continue
            if not expired.get(ep.key):
                delay = min(delay, self._states[ep.key].next_probe - now)
            hb = self._heartbeats.get(ep.key)
            if hb is not None:
                left = external.expires_in(hb, ep.lease_seconds, now=now)
                if left is not None and left > 0:
                    delay = min(delay, left + 0.01)
        return max(delay, 0.01)


def _allowed(owner: Mapping[str, Any]) -> tuple[external.Network, ...]:
    """The fleet's allowedCIDRs; none (refuse every registration) if they do not parse (the
    fleet's own pass reports that)."""
    try:
        return allowed_cidrs(owner.get("spec") or {})
    except InvalidSpec:
        return ()


def _tls_failure(error: BaseException) -> str | None:
    """The certificate verification failure behind a connection error, if that is what it was."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return str(seen.verify_message or seen.reason or seen)
        if isinstance(seen, ssl.SSLError):
            return str(seen.reason or seen)
        seen = seen.__cause__ or seen.__context__
    text = str(error)
    return text if "CERTIFICATE_VERIFY_FAILED" in text or "certificate" in text.lower() else None


def _values(index: Any) -> list[Mapping[str, Any]]:
    """Every value of a Kopf index, whatever the key."""
    return [body for _, bodies in _items(index) for body in bodies if body]


def _items(index: Any) -> list[tuple[Any, list[Mapping[str, Any]]]]:
    """(key, bodies) of a Kopf index (a mapping of keys to stores of values)."""
    if index is None:
        return []
    return [(key, list(index.get(key, ()))) for key in list(index)]


def _status_of(body: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    return (body or {}).get("status")


def _static_status(owner: Mapping[str, Any] | None, ep: Endpoint) -> Mapping[str, Any] | None:
    """A static endpoint's entry in the RerankerDeployment's status, as a probe status."""
    ext = ((owner or {}).get("status") or {}).get("externalEndpoints") or {}
    for entry in ext.get("endpoints") or ():
        if (entry.get("source"), entry.get("name"), entry.get("address"), entry.get("port")) == (
                ep.source, ep.name, ep.address, ep.port):
            return {"ready": entry.get("ready"), "message": entry.get("message")}
    return None

"""The Kopf handlers: thin entry points that all run one `Reconciler.reconcile` pass.

- create / update / resume of a RerankerDeployment: a pass; an invalid spec becomes
  `kopf.PermanentError` (reported as Degraded, not retried), an API hiccup a `TemporaryError`.
- an event of any child (ConfigMap, Deployment, Service, HPA, PDB, ServiceMonitor): a pass for
  its owner, so a deleted or edited child is restored at once and the Deployment's progress
  reaches the status.

- an event of a RerankerEndpoint (a Mac registered, renewed or left): wakes the prober.
- Nodes and ServiceCIDRs (cluster-scoped) are indexed, not handled: the prober learns the
  cluster's pod and Service ranges from them (`cluster_ranges`), where no Mac may point.
- a server pod starting or stopping to fail (crash loop, image pull, a model that cannot
  load): a pass for its fleet, whose Degraded condition then carries the pod's reason.
- server pods' addresses are indexed for the pod-health poller (`pod_health`), which reads
  each Ready pod's GET /health every few seconds in one operator-wide task; a fleet whose pods
  report another precision record than at its last pass gets a pass (`fleet_precision`: the
  `<rd>-precision` ConfigMap and status.precision).
- idle fleets (spec.scaleToZero) are taken to 0 replicas by one more operator-wide task
  (`scale_to_zero`), from those answers and an index of the server pods' starts.

The live state comes from Kopf indices (in-memory, fed by the watch streams), so a pass reads
nothing from the API server and an idle operator makes no requests beyond its watches.
There is deliberately no timer or daemon: Kopf puts a finalizer on objects that have one, and
deletion must stay plain garbage collection (it must work while the operator is down). The
external endpoints' probes run in one operator-wide task started here (`prober`), reading the
same indices.
Importing this module registers the handlers (`kopf run -m reranker_operator.handlers`).
"""

from __future__ import annotations

import asyncio
import copy
import logging
from collections.abc import Mapping
from typing import Any

import kopf

from reranker import contract
from reranker_operator import (
    cluster_ranges,
    fleet_precision,
    manifests,
    model_delivery,
    pod_health,
    scale_to_zero,
    status,
)
from reranker_operator.kube import Kube, load_config
from reranker_operator.prober import (
    ENDPOINTS_INDEX,
    NODES_INDEX,
    RERANKERS_INDEX,
    SERVICE_CIDRS_INDEX,
    Prober,
)
from reranker_operator.reconcile import (
    SERVICE_MONITOR_GV,
    SERVICE_MONITOR_PLURAL,
    ChildKey,
    Outcome,
    OwnerKey,
    Reconciler,
    owner_key,
    owner_of,
)
from reranker_operator.settings import OperatorConfig, configure_kopf

RRD = (contract.API_GROUP, contract.API_VERSION, contract.PLURAL_DEPLOYMENT)
RRE = (contract.API_GROUP, contract.API_VERSION, contract.PLURAL_ENDPOINT)
MANAGED = {manifests.LABEL_MANAGED_BY: manifests.OPERATOR_NAME}
SLICES = {manifests.LABEL_SLICE_MANAGED_BY: manifests.SLICE_MANAGER}
SERVER_PODS = {**MANAGED, manifests.LABEL_COMPONENT: "server"}
CACHE_PODS = {**MANAGED, manifests.LABEL_COMPONENT: model_delivery.CACHE_COMPONENT}
PODS_INDEX = "reranker_pods"
Logger = logging.Logger | logging.LoggerAdapter[Any]


def _snapshot(body: Mapping[str, Any]) -> dict[str, Any]:
    """A private copy: Kopf's bodies are views that later events replace."""
    return copy.deepcopy(dict(body))


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: Any, logger: Logger,
                  **kwargs: Any) -> None:
    configure_kopf(settings)
    config = getattr(memo, "config", None) or OperatorConfig.from_env()
    kube = Kube(load_config(connections=config.api_workers))
    # Resources are discovered once (Kopf's scanning is off): a ServiceMonitor CRD installed
    # later is used after a restart, and the status says so meanwhile.
    service_monitors = kube.serves(SERVICE_MONITOR_GV, SERVICE_MONITOR_PLURAL)
    # The indices are live views: the prober and its passes read them as the watches fill them.
    indices = {name: kwargs[name] for name in (RERANKERS_INDEX, ENDPOINTS_INDEX, PODS_INDEX,
                                               NODES_INDEX, SERVICE_CIDRS_INDEX,
                                               pod_health.POD_ADDRESSES_INDEX, *CHILD_INDICES)
               if name in kwargs}

    def pod_failures(key: OwnerKey) -> list[Mapping[str, str]]:
        index = indices.get(PODS_INDEX)
        return [f for f in (index.get(key, ()) if index is not None else ()) if f]

    async def external_changed(key: OwnerKey) -> bool:
        """A pass for a fleet whose external endpoints changed; False: try again later."""
        owner = next(iter(indices[RERANKERS_INDEX].get(key, ())), None)
        if owner is None:
            return True
        outcome = await memo.reconciler.reconcile(owner, _live(key, indices))
        return outcome.retry is None

    prober = Prober(kube, config.probe, on_change=external_changed,
                    cluster_cidrs=config.cluster_cidrs)
    memo.kube = kube
    memo.prober = prober
    memo.pod_failures_seen = {}  # pod uid -> its last status.pod_failure (failing pods only)

    def precision_seen(key: OwnerKey) -> list[fleet_precision.Observation | None]:
        """The precision records a fleet's pods report (the pod-health poller's answers)."""
        return [fleet_precision.from_health(h.pod, h.body, config_hash=h.config_hash)
                for h in pod_health.latest(*key)]
    cache_pods_index, runtimes_index = kwargs.get(CACHE_PODS_INDEX), kwargs.get(RUNTIMES_INDEX)

    def cache_pods(key: OwnerKey) -> list[Mapping[str, Any]]:
        return [p for p in (cache_pods_index.get(key, ()) if cache_pods_index is not None
                            else ()) if p]

    def node_runtimes() -> list[str]:
        return [str(v) for v in (runtimes_index.get("cluster", ()) if runtimes_index is not None
                                 else ()) if v]

    memo.reconciler = Reconciler(kube, config.defaults(), precision=precision_seen,
                                 service_monitors=service_monitors,
                                 api_workers=config.api_workers, external=prober.summary,
                                 pod_failures=pod_failures, cache_pods=cache_pods,
                                 node_runtimes=node_runtimes, image_volumes=config.image_volumes)
    memo.prober_task = asyncio.get_running_loop().create_task(prober.run(indices),
                                                              name="external-endpoint prober")
    memo.prober_task.add_done_callback(_prober_ended)
    # Every Ready server pod's /health, for the modules that need what only the pods know.
    poller = pod_health.Poller()
    pod_health.install(poller)
    memo.pod_health = poller
    memo.pod_health_task = asyncio.get_running_loop().create_task(
        poller.run(lambda: indices.get(pod_health.POD_ADDRESSES_INDEX)), name="pod-health poller")
    memo.pod_health_task.add_done_callback(_poller_ended)
    reported: dict[OwnerKey, tuple[Any, ...]] = {}  # fleet -> the records of its last pass

    async def precision_changed(view: Mapping[OwnerKey, tuple[pod_health.PodHealth, ...]]
                                ) -> None:
        """A pass for each fleet whose pods report other precision records than at its last
        pass (a failed pass is tried again after the next poll)."""
        for key, answers in view.items():
            now = fleet_precision.fingerprint(
                fleet_precision.from_health(h.pod, h.body, config_hash=h.config_hash)
                for h in answers)
            if reported.get(key, ()) == now:
                continue
            owner = next(iter(indices[RERANKERS_INDEX].get(key, ())), None)
            if owner is None:
                reported.pop(key, None)
                continue
            outcome = await memo.reconciler.reconcile(owner, _live(key, indices))
            if outcome.retry is None:
                reported[key] = now
        for key in [k for k in reported if k not in view]:
            del reported[key]
    poller.subscribe(precision_changed)
    # Idle fleets to 0 replicas (spec.scaleToZero), from the pods' /health activity.
    scaler = scale_to_zero.Scaler(kube, health=pod_health.latest,
                                  on_scaled=memo.reconciler.scaled_to_zero)
    memo.scale_to_zero_task = asyncio.get_running_loop().create_task(
        scaler.run(lambda: (kwargs.get(RERANKERS_INDEX),
                            kwargs.get(scale_to_zero.POD_STARTS_INDEX)),
                   indexed=prober.indexed),
        name="scale to zero")
    memo.scale_to_zero_task.add_done_callback(_scaler_ended)
    logger.info("reranker-operator: %r; ServiceMonitors %s; external endpoints probed every "
                "%gs", config.defaults(),
                "served" if service_monitors else "not served (no monitoring.coreos.com CRD)",
                config.probe.period)


def _prober_ended(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logging.getLogger(__name__).error("the external-endpoint prober stopped",
                                          exc_info=task.exception())


def _scaler_ended(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logging.getLogger(__name__).error("scale to zero stopped", exc_info=task.exception())


def _poller_ended(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logging.getLogger(__name__).error("the pod-health poller stopped",
                                          exc_info=task.exception())


@kopf.on.cleanup()
async def cleanup(memo: Any, **_: Any) -> None:
    for name in ("prober_task", "pod_health_task", "scale_to_zero_task"):
        task = getattr(memo, name, None)
        if task is not None:
            task.cancel()
    pod_health.install(None)


@kopf.on.probe(id="api_writes")
def api_writes(memo: Any, **_: Any) -> int:
    """Writes the reconciler has sent (the liveness endpoint shows it; idle means constant)."""
    return int(memo.kube.writes)


@kopf.on.probe(id="external_prober")
def external_prober(memo: Any, **_: Any) -> str:
    """The liveness endpoint fails (HTTP 500) if the prober task died, so that the operator is
    restarted rather than leaving the Macs' slices frozen."""
    task = getattr(memo, "prober_task", None)
    if task is not None and task.done():
        raise kopf.PermanentError("the external-endpoint prober stopped (see the log)")
    return "running"


@kopf.on.probe(id="pod_health_poller")
def pod_health_poller(memo: Any, **_: Any) -> str:
    """The liveness endpoint fails if the pod-health poller died (the fleets' precision
    records and idleness would freeze)."""
    task = getattr(memo, "pod_health_task", None)
    if task is not None and task.done():
        raise kopf.PermanentError("the pod-health poller stopped (see the log)")
    return "running"


# --- indices: the in-memory view of the RerankerDeployments and their children --------------

@kopf.index(*RRD)
def rerankers(namespace: str | None, name: str, body: kopf.Body, **_: Any) -> dict[OwnerKey, Any]:
    return {(str(namespace), name): _snapshot(body)}


# Keyed by the RerankerDeployment they serve.
@kopf.index(*RRE)
def reranker_endpoints(namespace: str | None, body: kopf.Body, **_: Any) -> dict[OwnerKey, Any]:
    return {(str(namespace), str((body.get("spec") or {}).get("deployment") or "")):
            _snapshot(body)}


# The cluster's own ranges (cluster-scoped, watched whatever namespaces are served): only the
# few fields `cluster_ranges` reads are kept.
@kopf.index("v1", "nodes")
def reranker_nodes(body: kopf.Body, **_: Any) -> dict[str, Any]:
    return {"cluster": cluster_ranges.node_facts(body)}


@kopf.index("networking.k8s.io", "v1", "servicecidrs")
def reranker_servicecidrs(body: kopf.Body, **_: Any) -> dict[str, Any]:
    return {"cluster": cluster_ranges.service_cidr_facts(body)}


def _child(body: kopf.Body, api_version: str, kind: str) -> dict[OwnerKey, Any] | None:
    key = owner_of(body)
    if key is None:
        return None
    return {key: {**_snapshot(body), "apiVersion": api_version, "kind": kind}}


@kopf.index("v1", "configmaps", labels=MANAGED)
def reranker_configmaps(body: kopf.Body, **_: Any) -> dict[OwnerKey, Any] | None:
    return _child(body, "v1", "ConfigMap")


@kopf.index("v1", "services", labels=MANAGED)
def reranker_services(body: kopf.Body, **_: Any) -> dict[OwnerKey, Any] | None:
    return _child(body, "v1", "Service")


@kopf.index("apps", "v1", "deployments", labels=MANAGED)
def reranker_deployments(body: kopf.Body, **_: Any) -> dict[OwnerKey, Any] | None:
    return _child(body, "apps/v1", "Deployment")


@kopf.index("autoscaling", "v2", "horizontalpodautoscalers", labels=MANAGED)
def reranker_hpas(body: kopf.Body, **_: Any) -> dict[OwnerKey, Any] | None:
    return _child(body, "autoscaling/v2", "HorizontalPodAutoscaler")


@kopf.index("policy", "v1", "poddisruptionbudgets", labels=MANAGED)
def reranker_pdbs(body: kopf.Body, **_: Any) -> dict[OwnerKey, Any] | None:
    return _child(body, "policy/v1", "PodDisruptionBudget")


@kopf.index("networking.k8s.io", "v1", "networkpolicies", labels=MANAGED)
def reranker_networkpolicies(body: kopf.Body, **_: Any) -> dict[OwnerKey, Any] | None:
    return _child(body, "networking.k8s.io/v1", "NetworkPolicy")


# Served only where the Prometheus Operator's CRD is installed; elsewhere the index stays
# empty and the reconciler does not ask for ServiceMonitors.
@kopf.index("monitoring.coreos.com", "v1", "servicemonitors", labels=MANAGED)
def reranker_servicemonitors(body: kopf.Body, **_: Any) -> dict[OwnerKey, Any] | None:
    return _child(body, "monitoring.coreos.com/v1", "ServiceMonitor")


# The operator's own EndpointSlices (external endpoints); the built-in controller's slices of
# the same Service carry other managed-by values and are not watched.
@kopf.index("discovery.k8s.io", "v1", "endpointslices", labels=SLICES)
def reranker_endpointslices(body: kopf.Body, **_: Any) -> dict[OwnerKey, Any] | None:
    return _child(body, "discovery.k8s.io/v1", "EndpointSlice")


# spec.model.cache: the PVC the operator creates and the Job that fills it.
@kopf.index("v1", "persistentvolumeclaims", labels=MANAGED)
def reranker_pvcs(body: kopf.Body, **_: Any) -> dict[OwnerKey, Any] | None:
    return _child(body, "v1", "PersistentVolumeClaim")


@kopf.index("batch", "v1", "jobs", labels=MANAGED)
def reranker_jobs(body: kopf.Body, **_: Any) -> dict[OwnerKey, Any] | None:
    return _child(body, "batch/v1", "Job")


# The fill Jobs' pods (the Job owns them): what each one that ended wrote to its termination
# log (`reranker convert`'s JSON result, or why it failed).
@kopf.index("v1", "pods", labels=CACHE_PODS)
def reranker_cache_pods(namespace: str | None, labels: Mapping[str, str], body: kopf.Body,
                        **_: Any) -> dict[OwnerKey, Any] | None:
    fleet = labels.get(manifests.LABEL_INSTANCE)
    return {(str(namespace), fleet): model_delivery.terminated_pod(body)} if fleet else None


# Which container runtimes the nodes run: image volumes need containerd 2.1+ or CRI-O 1.31+.
@kopf.index("v1", "nodes")
def reranker_node_runtimes(body: kopf.Body, **_: Any) -> dict[str, Any]:
    info = (body.get("status") or {}).get("nodeInfo") or {}
    return {"cluster": info.get("containerRuntimeVersion") or ""}


# Server pods are no children (the ReplicaSet owns them): indexed by their fleet's name label,
# only why they fail (None while they do not).
@kopf.index("v1", "pods", labels=SERVER_PODS)
def reranker_pods(namespace: str | None, labels: Mapping[str, str], body: kopf.Body,
                  **_: Any) -> dict[OwnerKey, Any] | None:
    fleet = labels.get(manifests.LABEL_INSTANCE)
    return {(str(namespace), fleet): status.pod_failure(body)} if fleet else None


# The same pods' addresses and readiness, for the pod-health poller.
@kopf.index("v1", "pods", labels=SERVER_PODS)
def reranker_pod_addresses(namespace: str | None, body: kopf.Body,
                           **_: Any) -> dict[OwnerKey, Any] | None:
    address = pod_health.pod_address(body)
    return {(str(namespace), address.deployment): address} if address is not None else None


# The same pods' starts (created, or last became Ready), for scale to zero's idleness.
@kopf.index("v1", "pods", labels=SERVER_PODS)
def reranker_pod_starts(body: kopf.Body, **_: Any) -> dict[OwnerKey, Any] | None:
    found = scale_to_zero.pod_start(body)
    if found is None:
        return None
    return {(str(body.metadata.namespace), found[0]): found[1]}


CHILD_INDICES = ("reranker_configmaps", "reranker_services", "reranker_deployments",
                 "reranker_hpas", "reranker_pdbs", "reranker_networkpolicies",
                 "reranker_servicemonitors", "reranker_endpointslices", "reranker_pvcs",
                 "reranker_jobs")
CACHE_PODS_INDEX = "reranker_cache_pods"
RUNTIMES_INDEX = "reranker_node_runtimes"


def _live(key: OwnerKey, indices: Mapping[str, Any]) -> dict[ChildKey, Mapping[str, Any]]:
    live: dict[ChildKey, Mapping[str, Any]] = {}
    for index_name in CHILD_INDICES:
        index = indices.get(index_name)
        for child in (index.get(key, ()) if index is not None else ()):
            live[(child["kind"], child["metadata"]["name"])] = child
    return live


def _raise_for(outcome: Outcome) -> None:
    permanent = outcome.permanent
    if permanent is not None:
        raise kopf.PermanentError(permanent.message)
    if outcome.retry is not None:
        raise kopf.TemporaryError(outcome.retry, delay=outcome.retry_delay)


# --- the RerankerDeployment itself ----------------------------------------------------------

@kopf.on.resume(*RRD)
@kopf.on.create(*RRD)
@kopf.on.update(*RRD)
async def reconcile_reranker(body: kopf.Body, memo: Any, **kwargs: Any) -> None:
    memo.prober.indexed.set()  # Kopf calls this only once every index is filled
    owner = _snapshot(body)
    outcome = await memo.reconciler.reconcile(owner, _live(owner_key(owner), kwargs))
    _raise_for(outcome)


@kopf.on.event(*RRD)
async def forget_deleted(type: str, body: kopf.Body, memo: Any, **_: Any) -> None:
    if type == "DELETED":
        memo.reconciler.forget(body.metadata.uid)
    memo.prober.wake()  # spec.externalEndpoints may have changed


# --- external endpoints: the prober does the work -------------------------------------------

@kopf.on.event(*RRE)
async def endpoint_changed(type: str, body: kopf.Body, memo: Any, **_: Any) -> None:
    memo.prober.indexed.set()
    if type == "DELETED":
        memo.prober.forget_endpoint(body.metadata.uid)
    memo.prober.wake()


# --- children: any change (or deletion) re-runs the owner's pass ----------------------------

async def _child_changed(body: kopf.Body, memo: Any, kwargs: Mapping[str, Any]) -> None:
    """A pass for the owner of a changed child (`kwargs`: the handler's, indices included)."""
    key = owner_of(body)
    if key is None:
        return
    owner = next(iter(kwargs["rerankers"].get(key, ())), None)
    if owner is None:
        return  # the owner is gone: garbage collection handles its children
    if kwargs.get("type") == "DELETED":
        memo.reconciler.child_deleted(owner["metadata"].get("uid"), body.get("kind"),
                                      body.metadata.name)
    await memo.reconciler.reconcile(owner, _live(key, kwargs))


@kopf.on.event("v1", "configmaps", labels=MANAGED)
async def configmap_changed(body: kopf.Body, memo: Any, **kwargs: Any) -> None:
    await _child_changed(body, memo, kwargs)


@kopf.on.event("v1", "services", labels=MANAGED)
async def service_changed(body: kopf.Body, memo: Any, **kwargs: Any) -> None:
    await _child_changed(body, memo, kwargs)


@kopf.on.event("apps", "v1", "deployments", labels=MANAGED)
async def deployment_changed(body: kopf.Body, memo: Any, **kwargs: Any) -> None:
    await _child_changed(body, memo, kwargs)


@kopf.on.event("autoscaling", "v2", "horizontalpodautoscalers", labels=MANAGED)
async def hpa_changed(body: kopf.Body, memo: Any, **kwargs: Any) -> None:
    await _child_changed(body, memo, kwargs)


@kopf.on.event("policy", "v1", "poddisruptionbudgets", labels=MANAGED)
async def pdb_changed(body: kopf.Body, memo: Any, **kwargs: Any) -> None:
    await _child_changed(body, memo, kwargs)


@kopf.on.event("networking.k8s.io", "v1", "networkpolicies", labels=MANAGED)
async def networkpolicy_changed(body: kopf.Body, memo: Any, **kwargs: Any) -> None:
    await _child_changed(body, memo, kwargs)


@kopf.on.event("monitoring.coreos.com", "v1", "servicemonitors", labels=MANAGED)
async def servicemonitor_changed(body: kopf.Body, memo: Any, **kwargs: Any) -> None:
    await _child_changed(body, memo, kwargs)


@kopf.on.event("discovery.k8s.io", "v1", "endpointslices", labels=SLICES)
async def endpointslice_changed(body: kopf.Body, memo: Any, **kwargs: Any) -> None:
    await _child_changed(body, memo, kwargs)


@kopf.on.event("v1", "persistentvolumeclaims", labels=MANAGED)
async def pvc_changed(body: kopf.Body, memo: Any, **kwargs: Any) -> None:
    await _child_changed(body, memo, kwargs)


@kopf.on.event("batch", "v1", "jobs", labels=MANAGED)
async def job_changed(body: kopf.Body, memo: Any, **kwargs: Any) -> None:
    await _child_changed(body, memo, kwargs)


@kopf.on.event("v1", "pods", labels=CACHE_PODS)
async def cache_pod_changed(type: str | None, body: kopf.Body, labels: Mapping[str, str],
                            memo: Any, **kwargs: Any) -> None:
    """A pass for the fleet when a fill pod ends (its result or failure reaches the status)."""
    if type == "DELETED" or model_delivery.terminated_pod(body) is None:
        return
    key = (str(body.metadata.namespace), str(labels.get(manifests.LABEL_INSTANCE)))
    owner = next(iter(kwargs["rerankers"].get(key, ())), None)
    if owner is not None:
        await memo.reconciler.reconcile(owner, _live(key, kwargs))


# --- server pods: only a change of whether (and why) one fails runs a pass --------------------

@kopf.on.event("v1", "pods", labels=SERVER_PODS)
async def server_pod_changed(type: str | None, body: kopf.Body, labels: Mapping[str, str],
                             memo: Any, **kwargs: Any) -> None:
    """A pass for the fleet when one of its pods starts or stops failing; the Deployment's
    events already cover pods becoming ready, so ordinary pod updates cost nothing."""
    uid = str(body.metadata.uid)
    failure = None if type == "DELETED" else status.pod_failure(body)
    seen: dict[str, Any] = memo.pod_failures_seen
    if seen.get(uid) == failure:
        return
    if failure is None:
        seen.pop(uid, None)
    else:
        seen[uid] = failure
    key = (str(body.metadata.namespace), str(labels.get(manifests.LABEL_INSTANCE)))
    owner = next(iter(kwargs["rerankers"].get(key, ())), None)
    if owner is not None:
        await memo.reconciler.reconcile(owner, _live(key, kwargs))

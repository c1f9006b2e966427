"""One reconciliation pass for one RerankerDeployment: build, compare, apply, report.

Every handler (create, update, resume, a child's event) ends here, so the operator has one
behaviour however it was woken up. The pass is level-triggered and
idempotent: it builds all desired children (`manifests`), compares each with the live object
from Kopf's in-memory indices (`drift`), writes only the differences (server-side apply,
delete), then writes the status only if it changed. An idle operator therefore makes no API
writes, and a restart re-checks everything without touching anything.

It never takes over what it does not own (`ownership`): the indices hold only children that
carry a RerankerDeployment's controller reference, and those are applied with force; a child
the indices do not hold is first read (one GET, only then) and created only if its name is free
(applied without force: an object created in between with other values is a 409, not
overwritten). A name held by someone else's object is a NameConflict on the status, looked at
again every CONFLICT_RETRY_SECONDS in case it was removed, and the pods that would read a
ConfigMap or Secret of that name are not rolled.

Passes for the same RerankerDeployment are serialised by a per-owner lock; the blocking API
calls run in a worker thread so that the event loop keeps serving the watch streams. The
indices lag behind the operator's own writes by one watch event, so the reconciler remembers
what it wrote until the index has caught up (`Reconciler._fresh`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import datetime
import functools
import logging
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar, cast

import kopf
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

from reranker import contract
from reranker_operator import (
    drift,
    external,
    manifests,
    model_delivery,
    ownership,
    served_names,
    status,
)
from reranker_operator import fleet_precision
from reranker_operator.kube import Kube, error_message
from reranker_operator.spec import DEFAULT_SERVICE_PORT, InvalidSpec, RerankerSpec, parse

logger = logging.getLogger(__name__)

_T = TypeVar("_T")
OwnerKey = tuple[str, str]  # (namespace, name) of a RerankerDeployment
ChildKey = tuple[str, str]  # (kind, name) of a child
Live = Mapping[ChildKey, Mapping[str, Any]]

SERVICE_MONITOR_GV, SERVICE_MONITOR_PLURAL = "monitoring.coreos.com/v1", "servicemonitors"

#: Problems that another attempt with the same spec cannot fix (no retry loop).
PERMANENT_REASONS = frozenset({"InvalidSpec", "ChildRejected"})
#: After a transient failure, a child is not applied again for this long.
RETRY_SECONDS = 10.0
#: A name held by an object the operator does not control is looked at again after this long
#: (it does not watch objects without its labels, so it cannot hear of their removal).
CONFLICT_RETRY_SECONDS = 30.0


def utcnow() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def owner_key(owner: Mapping[str, Any]) -> OwnerKey:
    meta = owner["metadata"]
    return (str(meta.get("namespace")), str(meta["name"]))


def owner_of(child: Mapping[str, Any]) -> OwnerKey | None:
    """The RerankerDeployment controlling a child, from its owner references."""
    meta = child.get("metadata") or {}
    for ref in meta.get("ownerReferences") or ():
        if (ref.get("kind") == contract.KIND_DEPLOYMENT and ref.get("controller")
                and str(ref.get("apiVersion", "")).split("/")[0] == contract.API_GROUP):
            return (str(meta.get("namespace")), str(ref["name"]))
    return None


def _owned_by(child: Mapping[str, Any], uid: str | None) -> bool:
    """Any owner reference to `uid` (what the operator may delete: it wrote it)."""
    refs = (child.get("metadata") or {}).get("ownerReferences") or ()
    return any(ref.get("uid") == uid for ref in refs)


def _older(seen: Mapping[str, Any], mine: Mapping[str, Any]) -> bool:
    """Whether the indexed object predates the operator's write. Resource versions are
    etcd revisions (integers) on every API server the operator targets; anything else is
    treated as up to date (the index wins)."""
    a = str((seen.get("metadata") or {}).get("resourceVersion", ""))
    b = str((mine.get("metadata") or {}).get("resourceVersion", ""))
    return a.isdigit() and b.isdigit() and int(a) < int(b)


def _raw_port(owner: Mapping[str, Any]) -> int:
    """The Service port of a spec that did not parse (for the status URL only)."""
    try:
        return int(((owner.get("spec") or {}).get("service") or {}).get("port")
                   or DEFAULT_SERVICE_PORT)
    except (TypeError, ValueError, AttributeError):
        return DEFAULT_SERVICE_PORT


def _ref(obj: Mapping[str, Any]) -> str:
    return f"{obj['kind']} {obj['metadata']['name']}"


@dataclasses.dataclass
class Outcome:
    """What one pass did and what stands in its way."""

    problems: list[status.Problem] = dataclasses.field(default_factory=list)
    created: list[str] = dataclasses.field(default_factory=list)
    updated: list[str] = dataclasses.field(default_factory=list)
    deleted: list[str] = dataclasses.field(default_factory=list)
    status_written: bool = False
    retry: str | None = None  # a transient failure: worth another try later
    retry_delay: float = RETRY_SECONDS  # when (seconds): the soonest of the reasons to retry
    deployment: Mapping[str, Any] | None = None  # the server Deployment as last applied
    # (kind, name, applied hash, message) of manifests the API server refused, and
    # (kind, name) of the ones it accepted: remembered by the reconciler after the pass.
    rejected: list[tuple[str, str, str, str]] = dataclasses.field(default_factory=list)
    accepted: list[tuple[str, str, Mapping[str, Any]]] = dataclasses.field(default_factory=list)
    removed: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    failed: list[tuple[str, str, str, str]] = dataclasses.field(default_factory=list)
    # (kind, name, applied hash, problem) of names held by objects the operator does not own.
    conflicts: list[tuple[str, str, str, status.Problem]] = dataclasses.field(
        default_factory=list)
    redis_secret_ours: bool = False  # created by this pass, or known to be the operator's

    def retry_after(self, message: str, seconds: float = RETRY_SECONDS) -> None:
        """Ask for another pass in `seconds` (the first reason names it; the soonest wins)."""
        if self.retry is None:
            self.retry, self.retry_delay = message, seconds
        else:
            self.retry_delay = min(self.retry_delay, seconds)

    @property
    def permanent(self) -> status.Problem | None:
        return next((p for p in self.problems if p.reason in PERMANENT_REASONS), None)

    @property
    def writes(self) -> int:
        return len(self.created) + len(self.updated) + len(self.deleted) + self.status_written


@dataclasses.dataclass
class _Plan:
    spec: RerankerSpec | None
    desired: list[dict[str, Any]]
    apply: list[dict[str, Any]]
    delete: list[Mapping[str, Any]]
    problems: list[status.Problem]
    live_keys: frozenset[ChildKey] = frozenset()
    retry: str | None = None
    retry_delay: float = RETRY_SECONDS
    #: The managed Redis' Secret is known to be the operator's (a 409 on creating it is fine).
    redis_secret_ours: bool = False
    #: Where the fill of spec.model.cache stands (None: no cache volume).
    model_cache: model_delivery.CacheState | None = None


EventPoster = Callable[[Mapping[str, Any], str, str, str], None]
#: The prober's view of a fleet's external endpoints (None: not judged yet).
ExternalView = Callable[[OwnerKey], external.Summary | None]


#: The failures of a fleet's server pods (status.pod_failure of each failing one).
PodFailures = Callable[[OwnerKey], Sequence[Mapping[str, str]]]
#: The precision records a fleet's pods report serving (fleet_precision.from_health).
PrecisionView = Callable[[OwnerKey], Sequence[fleet_precision.Observation | None]]
#: The ended pods of a fleet's model-cache Jobs (model_delivery.terminated_pod of each).
CachePods = Callable[[OwnerKey], Sequence[Mapping[str, Any]]]
#: The container runtimes of the cluster's nodes (status.nodeInfo.containerRuntimeVersion).
NodeRuntimes = Callable[[], Sequence[str]]


def _no_external(_key: OwnerKey) -> external.Summary | None:
    return None


def _no_pod_failures(_key: OwnerKey) -> Sequence[Mapping[str, str]]:
    return ()


def _no_precision(_key: OwnerKey) -> Sequence[fleet_precision.Observation | None]:
    return ()


def post_event(owner: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
    """A Kubernetes Event on the RerankerDeployment (through Kopf's background poster)."""
    try:
        kopf.event(kopf.Body(cast(kopf.RawBody, dict(owner))), type=type_, reason=reason,
                   message=message)
    except LookupError:  # outside a Kopf context (unit tests): log only
        logger.info("event %s %s: %s", type_, reason, message)


class Reconciler:
    """Holds what must outlive one pass: the locks, the last written statuses, the writes
    the indices have not seen yet, and the manifests that failed.

    `service_monitors` says whether the API server served ServiceMonitors when the operator
    started (and so whether their watch stream, and their index, exist). `external` gives the
    prober's summary of a fleet's external endpoints: their EndpointSlices and status;
    `pod_failures` why its server pods fail (Degraded); `precision` the precision records its
    pods report (the `<rd>-precision` ConfigMap and status.precision: `fleet_precision`).
    """

    def __init__(self, kube: Kube, defaults: manifests.Defaults, *,
                 service_monitors: bool = False,
                 api_workers: int = 16,
                 clock: Callable[[], str] = utcnow,
                 events: EventPoster = post_event,
                 external: ExternalView = _no_external,
                 precision: PrecisionView = _no_precision,
                 pod_failures: PodFailures = _no_pod_failures,
                 cache_pods: CachePods = lambda _key: (),
                 node_runtimes: NodeRuntimes = lambda: (),
                 image_volumes: str = "auto") -> None:
        self.kube = kube
        self.cache_pods = cache_pods
        self.node_runtimes = node_runtimes
        #: RERANKER_OPERATOR_IMAGE_VOLUMES, and whether the API server kept an image volume in
        #: a dry run (asked once, when a spec first has model.image; None: not asked).
        self.image_volumes = image_volumes
        self._api_image_volumes: bool | None = None
        self.external = external
        self.pod_failures = pod_failures
        self.precision = precision
        # Blocking API calls run here, not in the loop's default executor, so that a burst
        # of creations cannot starve (or be starved by) anything else.
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=api_workers, thread_name_prefix="reranker-api")
        self.defaults = defaults
        self.service_monitors = service_monitors
        self.clock = clock
        self.events = events
        self._locks: dict[OwnerKey, asyncio.Lock] = {}
        # The operator is the only writer of status: what it last wrote is the current status,
        # even before the watch stream delivers it (keeps lastTransitionTime stable).
        self._last_status: dict[str, dict[str, Any]] = {}
        # (owner uid, kind, name) -> (applied hash, message) of a manifest the API refused.
        self._rejected: dict[tuple[str, str, str], tuple[str, str]] = {}
        # (owner uid, kind, name) -> (applied hash, retry after (monotonic), problem) of a
        # manifest whose apply failed for a transient reason, or whose name another object
        # holds (NameConflict): not retried by every event before then (Kopf's
        # TemporaryError retries the pass after the same delay).
        self._failing: dict[tuple[str, str, str], tuple[str, float, status.Problem]] = {}
        # (owner uid, Secret name) of the managed Redis' Secrets this process created.
        self._redis_secrets: set[tuple[str, str]] = set()
        # owner uid -> when `scale_to_zero` took the idle fleet to 0 (for its status), until
        # spec.replicas is more than 0 again.
        self._scaled_to_zero: dict[str, str] = {}
        # owner uid -> child -> what the API server returned for the operator's last write
        # (None: deleted), until the watch stream delivers it. Without this, each child's
        # event during a creation would see its siblings missing and apply them again.
        self._written: dict[str, dict[ChildKey, Mapping[str, Any] | None]] = {}

    def forget(self, uid: str | None) -> None:
        """Drop the memory of a deleted RerankerDeployment (call from the event loop)."""
        self._last_status.pop(str(uid), None)
        self._written.pop(str(uid), None)
        for key in [k for k in self._rejected if k[0] == str(uid)]:
            del self._rejected[key]
        for key in [k for k in self._failing if k[0] == str(uid)]:
            del self._failing[key]
        self._redis_secrets = {k for k in self._redis_secrets if k[0] != str(uid)}
        self._scaled_to_zero.pop(str(uid), None)

    def child_deleted(self, owner_uid: str | None, kind: str, name: str) -> None:
        """A child's deletion reached the watch stream: whatever was written before is gone."""
        self._written.get(str(owner_uid), {}).pop((kind, name), None)

    def scaled_to_zero(self, uid: str, at: str) -> None:
        """`scale_to_zero` took the fleet to 0 replicas at `at` (call from the event loop); the
        pass its spec change triggers records it in the status."""
        self._scaled_to_zero[str(uid)] = at

    def _fresh(self, uid: str, live: Live) -> dict[ChildKey, Mapping[str, Any]]:
        """The indexed children, with the operator's own writes the index has not seen yet."""
        out = dict(live)
        written = self._written.get(uid, {})
        for child_key, mine in list(written.items()):
            seen = live.get(child_key)
            if mine is None:  # deleted by the operator
                if seen is None:
                    del written[child_key]
                else:
                    out.pop(child_key)
            elif seen is not None and not _older(seen, mine):
                del written[child_key]  # the index caught up
            else:
                out[child_key] = mine
        return out

    async def reconcile(self, owner: Mapping[str, Any], live: Live) -> Outcome:
        """One pass. `owner` is the RerankerDeployment, `live` its indexed children."""
        if (owner.get("metadata") or {}).get("deletionTimestamp"):
            return Outcome()  # garbage collection removes the children
        key = owner_key(owner)
        uid = str(owner["metadata"].get("uid"))
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            live = self._fresh(uid, live)
            if (owner.get("spec") or {}).get("replicas") != 0:
                self._scaled_to_zero.pop(uid, None)
            plan = self._plan(owner, live, await self._pass_defaults(owner))
            outcome = Outcome(problems=list(plan.problems), retry=plan.retry,
                              retry_delay=plan.retry_delay)
            current = self._last_status.get(uid) or dict(owner.get("status") or {})
            if plan.apply or plan.delete:
                # One trip to a worker thread: the children, then the status they produce.
                new = await self._in_thread(self._execute, owner, plan, live, outcome, current)
                written = self._written.setdefault(uid, {})
                for kind, name, result in outcome.accepted:
                    self._rejected.pop((uid, kind, name), None)
                    self._failing.pop((uid, kind, name), None)
                    written[(kind, name)] = result
                now = time.monotonic()
                for kind, name, digest, message in outcome.failed:
                    self._failing[(uid, kind, name)] = (
                        digest, now + RETRY_SECONDS, status.Problem("ApplyFailed", message))
                for kind, name, digest, problem in outcome.conflicts:
                    self._failing[(uid, kind, name)] = (
                        digest, now + CONFLICT_RETRY_SECONDS, problem)
                if outcome.redis_secret_ours:
                    secret = manifests.redis_secret_name(owner["metadata"]["name"])
                    self._redis_secrets.add((uid, secret))
                    self._failing.pop((uid, "Secret", secret), None)
                for kind, name in outcome.removed:
                    written[(kind, name)] = None
                for kind, name, digest, message in outcome.rejected:
                    self._rejected[(uid, kind, name)] = (digest, message)
            else:
                new = self._status(owner, plan, live, outcome, current)
                patch = status.status_patch(current, new)
                if patch is not None:
                    await self._in_thread(self._write_status, owner, patch, outcome)
            if outcome.status_written:
                self._last_status[uid] = new
            self._post_events(owner, outcome, current, new)
            return outcome

    async def _in_thread(self, fn: Callable[..., _T], *args: Any) -> _T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args))

    async def _pass_defaults(self, owner: Mapping[str, Any]) -> manifests.Defaults:
        """The operator's defaults, with whether pods mount spec.model.image as an image volume
        (model_delivery.image_volumes_decision); the API server is asked once, in a dry run."""
        model = (owner.get("spec") or {}).get("model")
        if not isinstance(model, Mapping) or not model.get("image"):
            return self.defaults
        runtimes = tuple(self.node_runtimes())
        decision = model_delivery.image_volumes_decision(
            self.image_volumes, runtimes=runtimes, api_server=self._api_image_volumes)
        if decision is None:
            try:
                self._api_image_volumes = await self._in_thread(
                    self.kube.keeps_image_volumes, owner_key(owner)[0])
            except HTTPError as e:  # unreachable for now: copy (works everywhere), ask again
                logger.warning("image volumes: cannot ask the API server (%s): copying", e)
                return self.defaults
            decision = bool(self._api_image_volumes)
        return dataclasses.replace(self.defaults, image_volumes=decision)

    # --- planning (pure) ------------------------------------------------------------------

    def _plan(self, owner: Mapping[str, Any], live: Live,
              defaults: manifests.Defaults | None = None) -> _Plan:
        uid = owner["metadata"].get("uid")
        defaults = defaults or self.defaults
        try:
            spec = parse(owner.get("spec") or {})
        except InvalidSpec as e:
            # Touch nothing: the children keep running the last valid spec.
            return _Plan(None, [], [], [], [status.Problem("InvalidSpec", f"invalid spec: {e}")])
        summary = self.external(owner_key(owner))
        cache = self._model_cache(owner, spec, defaults, live)
        desired = [drift.stamp(obj) for obj in manifests.children(
            owner, spec, defaults, summary, model_cache=cache)]
        problems: list[status.Problem] = []
        records, stamped = self._precision_records(owner, spec, live)
        if records:  # only once there is a record: a fleet that never measures has none
            desired.append(drift.stamp(manifests.precision_config_map(owner, records,
                                                                      stamped=stamped)))
        held_as_is: set[ChildKey] = set()
        if cache is not None and cache.state == model_delivery.FAILED:
            problems.append(status.Problem("ModelCacheFailed", cache.message))
        name = owner["metadata"]["name"]
        running = live.get(("Deployment", name))
        if cache is not None and not cache.ready and running is not None and int(
                (running.get("spec") or {}).get("replicas") or 0) > 0:
            # A new fill for a fleet that serves: its pods (and the settings they read) stay
            # as they are until the volume holds the new model, then they roll.
            held_as_is = {("Deployment", name), ("ConfigMap", manifests.config_map_name(name))}
            desired = [obj for obj in desired
                       if (obj["kind"], obj["metadata"]["name"]) not in held_as_is]
        if spec.service_monitor.enabled and not self.service_monitors:
            desired = [obj for obj in desired if obj["apiVersion"] != SERVICE_MONITOR_GV]
            problems.append(status.Problem(
                "ServiceMonitorUnavailable",
                "spec.monitoring.serviceMonitor.enabled, but the ServiceMonitor CRD "
                f"({SERVICE_MONITOR_GV}) is not installed: no ServiceMonitor created (restart "
                "the operator after installing it)", blocking=False))
        to_apply = []
        retry: str | None = None
        delays: list[float] = []
        now = time.monotonic()
        # Names held by objects this RerankerDeployment does not control: nothing that reads
        # them (a ConfigMap, a Secret) is rolled out meanwhile.
        held: set[ChildKey] = set()
        secret = ("Secret", manifests.redis_secret_name(owner["metadata"]["name"]))
        waiting = self._failing.get((str(uid), *secret))
        if waiting is not None and waiting[1] > now:
            problems.append(waiting[2])
            held.add(secret)
            retry = retry or waiting[2].message
            delays.append(waiting[1] - now)
        for obj in desired:
            child_key = (obj["kind"], obj["metadata"]["name"])
            seen = live.get(child_key)
            if seen is not None and not ownership.controlled_by(seen, uid):
                # Indexed under this name, but controlled by an earlier RerankerDeployment of
                # the same name (garbage collection removes it, and its event runs a pass).
                problems.append(ownership.conflict(obj, seen))
                held.add(child_key)
                continue
            if not drift.needs_apply(obj, seen):
                continue
            rejected = self._rejected.get((str(uid), *child_key))
            digest = obj["metadata"]["annotations"][drift.ANNOTATION_APPLIED_HASH]
            if rejected is not None and rejected[0] == digest:
                # The API server refused exactly this manifest: do not ask again.
                problems.append(status.Problem("ChildRejected", rejected[1]))
                continue
            failing = self._failing.get((str(uid), *child_key))
            if failing is not None and failing[0] == digest and failing[1] > now:
                problems.append(failing[2])
                retry = retry or failing[2].message
                delays.append(failing[1] - now)
                if failing[2].reason == ownership.NAME_CONFLICT:
                    held.add(child_key)
                continue
            to_apply.append(obj)
        to_apply = [obj for obj in to_apply if not ownership.consumed(obj) & held]
        redis_secret_ours = (str(uid), secret[1]) in self._redis_secrets or any(
            ownership.controlled_by(child, uid) and secret in ownership.consumed(child)
            for child in live.values())
        wanted = {(obj["kind"], obj["metadata"]["name"]) for obj in desired}
        # Until the prober has judged the external endpoints, their slices stay as they are.
        keep = {"EndpointSlice"} if summary is None else set()
        to_delete = [child for child_key, child in live.items()
                     if child_key not in wanted and child_key[0] not in keep
                     and child_key not in held_as_is and _owned_by(child, uid)]
        return _Plan(spec, desired, to_apply, to_delete, problems, frozenset(live), retry,
                     max(min(delays), 1.0) if delays else RETRY_SECONDS, redis_secret_ours,
                     cache)

    def _model_cache(self, owner: Mapping[str, Any], spec: RerankerSpec,
                     defaults: manifests.Defaults, live: Live
                     ) -> model_delivery.CacheState | None:
        """Where the fill of spec.model.cache stands: its current Job (live), that Job's ended
        pods, and the last reported status.modelCache (which keeps the result)."""
        job = manifests.model_cache_job(owner["metadata"]["name"], spec, defaults)
        if job is None:
            return None
        name = job["metadata"]["name"]
        uid = str(owner["metadata"].get("uid"))
        previous = (self._last_status.get(uid) or owner.get("status") or {}).get("modelCache")
        return model_delivery.job_state(name, live.get(("Job", name)),
                                        self.cache_pods(owner_key(owner)), previous)

    # --- execution (blocking, in a worker thread) -----------------------------------------

    def _execute(self, owner: Mapping[str, Any], plan: _Plan, live: Live, outcome: Outcome,
                 current: Mapping[str, Any]) -> dict[str, Any]:
        """Applies and deletes children, then writes the status; returns the new status.

        Runs in a worker thread: touches only `outcome` and the API, never `self`'s memory
        (the event loop owns that)."""
        namespace = owner["metadata"]["namespace"]
        conflicted: set[ChildKey] = set()  # names found held by someone else's objects
        if plan.spec is not None and any(
                (o["kind"], o["metadata"]["name"]) == ("Deployment", manifests.redis_name(
                    owner["metadata"]["name"])) for o in plan.apply):
            if not self._ensure_redis_secret(owner, plan, outcome, conflicted):
                return self._status(owner, plan, live, outcome, current)
        for obj in plan.apply:
            name = obj["metadata"]["name"]
            digest = obj["metadata"]["annotations"][drift.ANNOTATION_APPLIED_HASH]
            if ownership.consumed(obj) & conflicted:
                continue  # its pods would read an object the operator does not own
            was_live = (obj["kind"], name) in plan.live_keys
            try:
                if not was_live:
                    existing = self._claim(owner, obj, outcome, conflicted)
                    if existing is False:
                        continue
                    was_live = existing is True
                # Force only over what is known to be this RerankerDeployment's.
                result = self.kube.apply(obj, force=was_live)
            except (ApiException, HTTPError) as e:
                if isinstance(e, ApiException) and e.status in (400, 422):
                    message = f"{_ref(obj)} rejected by the API server: {error_message(e)}"
                    outcome.rejected.append((obj["kind"], name, digest, message))
                    outcome.problems.append(status.Problem("ChildRejected", message))
                else:
                    detail = error_message(e) if isinstance(e, ApiException) else str(e)
                    message = f"cannot apply {_ref(obj)}: {detail}"
                    outcome.failed.append((obj["kind"], name, digest, message))
                    outcome.problems.append(status.Problem("ApplyFailed", message))
                    outcome.retry_after(message)
                continue
            outcome.accepted.append((obj["kind"], name, result))
            (outcome.updated if was_live else outcome.created).append(_ref(obj))
            if obj["kind"] == "Deployment" and name == owner["metadata"]["name"]:
                outcome.deployment = result
        for child in plan.delete:
            meta = child["metadata"]
            try:
                self.kube.delete(child["apiVersion"], child["kind"], namespace, meta["name"])
                outcome.deleted.append(_ref(child))
                outcome.removed.append((child["kind"], meta["name"]))
            except (ApiException, HTTPError) as e:
                message = f"cannot delete {_ref(child)}: {e}"
                outcome.problems.append(status.Problem("DeleteFailed", message, blocking=False))
                outcome.retry_after(message)
        new = self._status(owner, plan, live, outcome, current)
        patch = status.status_patch(current, new)
        if patch is not None:
            self._write_status(owner, patch, outcome)
        return new

    def _claim(self, owner: Mapping[str, Any], obj: Mapping[str, Any], outcome: Outcome,
               conflicted: set[ChildKey]) -> bool | None:
        """Whether a child the indices do not hold may be written (blocking; raises the API's
        errors): None: the name is free (create it); True: the object is this
        RerankerDeployment's (its labels were edited away, or the watch lags); False: someone
        else's, reported as a NameConflict and left untouched."""
        meta = obj["metadata"]
        existing = self.kube.get(obj["apiVersion"], obj["kind"], meta["namespace"], meta["name"])
        if existing is None:
            return None
        if ownership.controlled_by(existing, owner["metadata"].get("uid")):
            return True
        problem = ownership.conflict(obj, existing)
        outcome.conflicts.append((obj["kind"], meta["name"],
                                  meta["annotations"][drift.ANNOTATION_APPLIED_HASH], problem))
        outcome.problems.append(problem)
        outcome.retry_after(problem.message, CONFLICT_RETRY_SECONDS)
        conflicted.add((obj["kind"], meta["name"]))
        return False

    def _ensure_redis_secret(self, owner: Mapping[str, Any], plan: _Plan, outcome: Outcome,
                             conflicted: set[ChildKey]) -> bool:
        """Create the managed Redis' password Secret unless it exists (blocking; False: not
        now). Asked for whenever the Redis Deployment is applied, so before Redis first starts.
        The operator may create Secrets but not read them, so an existing one (409) is known to
        be its own only if this process created it or a child it controls already reads it;
        otherwise it is a NameConflict, left untouched and given to no pod."""
        secret = manifests.redis_password_secret(owner, secrets.token_hex(24))
        try:
            created = self.kube.create(secret)
        except (ApiException, HTTPError) as e:
            detail = error_message(e) if isinstance(e, ApiException) else str(e)
            message = f"cannot create {_ref(secret)}: {detail}"
            outcome.problems.append(status.Problem("ApplyFailed", message))
            outcome.retry_after(message)
            return False
        if created:
            outcome.created.append(_ref(secret))
        if created or plan.redis_secret_ours:
            outcome.redis_secret_ours = True
            return True
        name = secret["metadata"]["name"]
        problem = status.Problem(
            ownership.NAME_CONFLICT,
            f"Secret {name} already exists and was not created for this RerankerDeployment: "
            "left untouched, and no pod is given it (delete or rename it, or give the "
            "RerankerDeployment another name)")
        outcome.conflicts.append(("Secret", name, "", problem))
        outcome.problems.append(problem)
        outcome.retry_after(problem.message, CONFLICT_RETRY_SECONDS)
        conflicted.add(("Secret", name))
        return True

    # --- the fleet's precision records (fleet_precision) ---------------------------------

    def _precision_records(self, owner: Mapping[str, Any], spec: RerankerSpec, live: Live
                           ) -> tuple[dict[str, str], dict[str, str]]:
        """The `<rd>-precision` ConfigMap's data: its live records (if it is this
        RerankerDeployment's), then the keys the pods report first, less the records of an
        earlier spec no pod serves any more; and the config hash of each record's pods."""
        name, uid = owner["metadata"]["name"], owner["metadata"].get("uid")
        cm = live.get(("ConfigMap", fleet_precision.config_map_name(name)))
        if cm is not None and not ownership.controlled_by(cm, uid):
            cm = None
        current = manifests.config_hash(name, spec)
        stamped = fleet_precision.stamps(fleet_precision.live_stamps(cm),
                                         self.precision(owner_key(owner)), current=current)
        data = fleet_precision.records((cm or {}).get("data"), self._precision_seen(owner),
                                       stamped=stamped, current=current)
        return data, stamped

    def _precision_seen(self, owner: Mapping[str, Any],
                        cache: Mapping[str, Any] | None = None
                        ) -> dict[str, fleet_precision.Observation]:
        """What the pods report now, and the model-cache Job's measurement (`cache`: this
        pass's status.modelCache)."""
        seen = list(self.precision(owner_key(owner)))
        if isinstance(cache, Mapping) and isinstance(cache.get("result"), Mapping):
            seen.append(fleet_precision.from_conversion(str(cache.get("job") or "model-cache"),
                                                        cache["result"]))
        return fleet_precision.observed(seen)

    def _precision_status(self, owner: Mapping[str, Any], plan: _Plan,
                          current: Mapping[str, Any]) -> list[dict[str, Any]] | None:
        """status.precision from the ConfigMap this pass wants (None: a spec that does not
        parse; the last entries stay)."""
        if plan.spec is None:
            return None
        name = fleet_precision.config_map_name(owner["metadata"]["name"])
        cm = next((o for o in plan.desired if (o["kind"], o["metadata"]["name"]) == (
            "ConfigMap", name)), None)
        # spec.model.cache's fill: its Job's report, until a pod reports the same key
        cache = plan.model_cache.as_status() if plan.model_cache is not None else None
        return fleet_precision.entries((cm or {}).get("data") or {},
                                       self._precision_seen(owner, cache),
                                       current.get("precision"))

    # --- status and events ----------------------------------------------------------------

    def _status(self, owner: Mapping[str, Any], plan: _Plan, live: Live, outcome: Outcome,
                current: Mapping[str, Any]) -> dict[str, Any]:
        name = owner["metadata"]["name"]
        spec = plan.spec
        return status.build(
            {**owner, "status": current},
            deployment=outcome.deployment or live.get(("Deployment", name)),
            problems=outcome.problems,
            config_hash=(manifests.config_hash(name, spec) if spec is not None
                         else current.get("configHash")),
            service_port=spec.service.port if spec is not None else _raw_port(owner),
            now=self.clock(),
            external=self.external(owner_key(owner)),
            pod_failures=self.pod_failures(owner_key(owner)),
            precision=self._precision_status(owner, plan, current),
            model_cache=plan.model_cache,
            served_names=(served_names.from_settings(manifests.server_settings(spec))
                          if spec is not None else None),
            scaled_to_zero_at=self._scaled_to_zero.get(str(owner["metadata"].get("uid"))),
        )

    def _write_status(self, owner: Mapping[str, Any], patch: Mapping[str, Any],
                      outcome: Outcome) -> None:
        """Blocking: in a worker thread."""
        namespace, name = owner_key(owner)
        try:
            self.kube.patch_status(namespace, name, patch)
        except ApiException as e:
            if e.status != 404:  # 404: deleted meanwhile
                outcome.retry_after(f"cannot write status: {error_message(e)}")
            return
        except HTTPError as e:
            outcome.retry_after(f"cannot write status: {e}")
            return
        outcome.status_written = True

    def _post_events(self, owner: Mapping[str, Any], outcome: Outcome,
                     current: Mapping[str, Any], new: Mapping[str, Any]) -> None:
        # One Event per kind of change and pass (Events are API writes too). The external
        # endpoints' slices follow the probes: their changes show as ExternalEndpointsReady
        # transitions instead.
        def children(refs: list[str]) -> list[str]:
            return [ref for ref in refs if not ref.startswith("EndpointSlice ")]
        if created := children(outcome.created):
            self.events(owner, "Normal", "Created", "created " + ", ".join(created))
        if updated := children(outcome.updated):
            self.events(owner, "Normal", "Applied",
                        "applied " + ", ".join(updated) + " (spec change or drift)")
        if deleted := children(outcome.deleted):
            self.events(owner, "Normal", "Deleted",
                        "deleted " + ", ".join(deleted) + " (no longer in the spec)")
        if not outcome.status_written:
            return
        known = {c.get("type") for c in current.get("conditions") or () if isinstance(c, Mapping)}
        for type_, cond_status, reason, message in status.transitions(current, new):
            if type_ == status.EXTERNAL_ENDPOINTS_READY:
                if type_ in known:  # not on the first report
                    self.events(owner, "Normal" if cond_status == "True" else "Warning", reason,
                                f"{type_}={cond_status}: {message}")
                continue
            if type_ == status.READY or (type_ == status.DEGRADED and cond_status == "True"):
                warn = (type_ == status.DEGRADED) or (
                    type_ == status.READY and cond_status == "False" and
                    any(p.blocking for p in outcome.problems))
                self.events(owner, "Warning" if warn else "Normal", reason,
                            f"{type_}={cond_status}: {message}")

"""One reconciliation pass for one RerankerDeployment: build, compare, apply, report.

Every handler (create, update, resume, a child's event) ends here, so the operator has one
behaviour however it was woken up. The pass is level-triggered and
idempotent: it builds all desired children (`manifests`), compares each with the live object
from Kopf's in-memory indices (`drift`), writes only the differences (server-side apply,
delete), then writes the status only if it changed. An idle operator therefore makes no API
writes, and a restart re-checks everything without touching anything.

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
from reranker_operator import drift, external, manifests, status
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
    deployment: Mapping[str, Any] | None = None  # the server Deployment as last applied
    # (kind, name, applied hash, message) of manifests the API server refused, and
    # (kind, name) of the ones it accepted: remembered by the reconciler after the pass.
    rejected: list[tuple[str, str, str, str]] = dataclasses.field(default_factory=list)
    accepted: list[tuple[str, str, Mapping[str, Any]]] = dataclasses.field(default_factory=list)
    removed: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    failed: list[tuple[str, str, str, str]] = dataclasses.field(default_factory=list)

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


EventPoster = Callable[[Mapping[str, Any], str, str, str], None]
#: The prober's view of a fleet's external endpoints (None: not judged yet).
ExternalView = Callable[[OwnerKey], external.Summary | None]


#: The failures of a fleet's server pods (status.pod_failure of each failing one).
PodFailures = Callable[[OwnerKey], Sequence[Mapping[str, str]]]


def _no_external(_key: OwnerKey) -> external.Summary | None:
    return None


def _no_pod_failures(_key: OwnerKey) -> Sequence[Mapping[str, str]]:
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
    `pod_failures` why its server pods fail (Degraded).
    """

    def __init__(self, kube: Kube, defaults: manifests.Defaults, *,
                 service_monitors: bool = False,
                 api_workers: int = 16,
                 clock: Callable[[], str] = utcnow,
                 events: EventPoster = post_event,
                 external: ExternalView = _no_external,
                 pod_failures: PodFailures = _no_pod_failures) -> None:
        self.kube = kube
        self.external = external
        self.pod_failures = pod_failures
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
        # (owner uid, kind, name) -> (applied hash, retry after (monotonic), message) of a
        # manifest whose apply failed for a transient reason: not retried by every event
        # before then (Kopf's TemporaryError retries the pass after the same delay).
        self._failing: dict[tuple[str, str, str], tuple[str, float, str]] = {}
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

    def child_deleted(self, owner_uid: str | None, kind: str, name: str) -> None:
        """A child's deletion reached the watch stream: whatever was written before is gone."""
        self._written.get(str(owner_uid), {}).pop((kind, name), None)

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
            plan = self._plan(owner, live)
            outcome = Outcome(problems=list(plan.problems), retry=plan.retry)
            current = self._last_status.get(uid) or dict(owner.get("status") or {})
            if plan.apply or plan.delete:
                # One trip to a worker thread: the children, then the status they produce.
                new = await self._in_thread(self._execute, owner, plan, live, outcome, current)
                written = self._written.setdefault(uid, {})
                for kind, name, result in outcome.accepted:
                    self._rejected.pop((uid, kind, name), None)
                    self._failing.pop((uid, kind, name), None)
                    written[(kind, name)] = result
                retry_at = time.monotonic() + RETRY_SECONDS
                for kind, name, digest, message in outcome.failed:
                    self._failing[(uid, kind, name)] = (digest, retry_at, message)
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

    # --- planning (pure) ------------------------------------------------------------------

    def _plan(self, owner: Mapping[str, Any], live: Live) -> _Plan:
        uid = owner["metadata"].get("uid")
        try:
            spec = parse(owner.get("spec") or {})
        except InvalidSpec as e:
            # Touch nothing: the children keep running the last valid spec.
            return _Plan(None, [], [], [], [status.Problem("InvalidSpec", f"invalid spec: {e}")])
        summary = self.external(owner_key(owner))
        desired = [drift.stamp(obj)
                   for obj in manifests.children(owner, spec, self.defaults, summary)]
        problems: list[status.Problem] = []
        if spec.service_monitor.enabled and not self.service_monitors:
            desired = [obj for obj in desired if obj["apiVersion"] != SERVICE_MONITOR_GV]
            problems.append(status.Problem(
                "ServiceMonitorUnavailable",
                "spec.monitoring.serviceMonitor.enabled, but the ServiceMonitor CRD "
                f"({SERVICE_MONITOR_GV}) is not installed: no ServiceMonitor created (restart "
                "the operator after installing it)", blocking=False))
        to_apply = []
        retry: str | None = None
        for obj in desired:
            if not drift.needs_apply(obj, live.get((obj["kind"], obj["metadata"]["name"]))):
                continue
            rejected = self._rejected.get((str(uid), obj["kind"], obj["metadata"]["name"]))
            digest = obj["metadata"]["annotations"][drift.ANNOTATION_APPLIED_HASH]
            if rejected is not None and rejected[0] == digest:
                # The API server refused exactly this manifest: do not ask again.
                problems.append(status.Problem("ChildRejected", rejected[1]))
                continue
            failing = self._failing.get((str(uid), obj["kind"], obj["metadata"]["name"]))
            if failing is not None and failing[0] == digest and failing[1] > time.monotonic():
                problems.append(status.Problem("ApplyFailed", failing[2]))
                retry = failing[2]
                continue
            to_apply.append(obj)
        wanted = {(obj["kind"], obj["metadata"]["name"]) for obj in desired}
        # Until the prober has judged the external endpoints, their slices stay as they are.
        keep = {"EndpointSlice"} if summary is None else set()
        to_delete = [child for child_key, child in live.items()
                     if child_key not in wanted and child_key[0] not in keep
                     and _owned_by(child, uid)]
        return _Plan(spec, desired, to_apply, to_delete, problems, frozenset(live), retry)

    # --- execution (blocking, in a worker thread) -----------------------------------------

    def _execute(self, owner: Mapping[str, Any], plan: _Plan, live: Live, outcome: Outcome,
                 current: Mapping[str, Any]) -> dict[str, Any]:
        """Applies and deletes children, then writes the status; returns the new status.

        Runs in a worker thread: touches only `outcome` and the API, never `self`'s memory
        (the event loop owns that)."""
        namespace = owner["metadata"]["namespace"]
        if plan.spec is not None and any(
                (o["kind"], o["metadata"]["name"]) == ("Deployment", manifests.redis_name(
                    owner["metadata"]["name"])) for o in plan.apply):
            if not self._ensure_redis_secret(owner, outcome):
                return self._status(owner, plan, live, outcome, current)
        for obj in plan.apply:
            name = obj["metadata"]["name"]
            try:
                result = self.kube.apply(obj)
            except (ApiException, HTTPError) as e:
                digest = obj["metadata"]["annotations"][drift.ANNOTATION_APPLIED_HASH]
                if isinstance(e, ApiException) and e.status in (400, 422):
                    message = f"{_ref(obj)} rejected by the API server: {error_message(e)}"
                    outcome.rejected.append((obj["kind"], name, digest, message))
                    outcome.problems.append(status.Problem("ChildRejected", message))
                else:
                    detail = error_message(e) if isinstance(e, ApiException) else str(e)
                    message = f"cannot apply {_ref(obj)}: {detail}"
                    outcome.failed.append((obj["kind"], name, digest, message))
                    outcome.problems.append(status.Problem("ApplyFailed", message))
                    outcome.retry = message
                continue
            outcome.accepted.append((obj["kind"], name, result))
            was_live = (obj["kind"], name) in plan.live_keys
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
                outcome.retry = message
        new = self._status(owner, plan, live, outcome, current)
        patch = status.status_patch(current, new)
        if patch is not None:
            self._write_status(owner, patch, outcome)
        return new

    def _ensure_redis_secret(self, owner: Mapping[str, Any], outcome: Outcome) -> bool:
        """Create the managed Redis' password Secret unless it exists (blocking; False: not
        now). Asked for whenever the Redis Deployment is applied, so before Redis first starts;
        an existing Secret (409) is kept as it is: the operator cannot and need not read it."""
        secret = manifests.redis_password_secret(owner, secrets.token_hex(24))
        try:
            if self.kube.create(secret):
                outcome.created.append(_ref(secret))
        except (ApiException, HTTPError) as e:
            detail = error_message(e) if isinstance(e, ApiException) else str(e)
            message = f"cannot create {_ref(secret)}: {detail}"
            outcome.problems.append(status.Problem("ApplyFailed", message))
            outcome.retry = message
            return False
        return True

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
        )

    def _write_status(self, owner: Mapping[str, Any], patch: Mapping[str, Any],
                      outcome: Outcome) -> None:
        """Blocking: in a worker thread."""
        namespace, name = owner_key(owner)
        try:
            self.kube.patch_status(namespace, name, patch)
        except ApiException as e:
            if e.status != 404:  # 404: deleted meanwhile
                outcome.retry = f"cannot write status: {error_message(e)}"
            return
        except HTTPError as e:
            outcome.retry = f"cannot write status: {e}"
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

"""Scale to zero: an idle fleet (spec.scaleToZero) is taken to 0 replicas; a gateway wakes it.

This is KEDA's split of the work: the 0 <-> 1 step is separate from the 1 <-> N step, which an
HorizontalPodAutoscaler keeps doing. The operator only ever writes 0, through the
RerankerDeployment's scale subresource (spec.replicas: what the HPA and `kubectl scale` write
too); the gateway writes 1 (and the `reranker.dev/woken-at` annotation) when a request arrives
for a fleet with no ready endpoint, as Knative's activator does for a revision at zero. The HPA
stays in place: its controller does not act on a target at 0 replicas (condition ScalingActive
False, reason ScalingDisabled) and takes over again once the gateway has written 1
(docs/autoscaling.md, "Scale to zero").

Idle means, for idleSeconds (`decide`, pure):
- no Ready pod answered a request: each Ready pod's GET /health `activity` (read by the
  `pod_health` poller) has not changed; the pod's own `last_request_at`, and the time the
  operator saw its request count move (so a skewed pod clock cannot make it look idle);
- no pod was created or became Ready (a pod that was just woken gets time for its first request);
- the `reranker.dev/woken-at` annotation is older.
A fleet whose Ready pods cannot all be read (no fresh /health answer, or a server too old to
report `activity`) is busy: unknown never scales anything down. Pods that are not Ready serve
nothing through the Service, so only their start counts.

The write carries the RerankerDeployment's resourceVersion as a precondition: a wake (or any
edit) that landed after the operator's view is a 409, and the fleet stays up. Like the prober,
this runs as one operator-wide task, not a Kopf timer: a timer puts a finalizer on every object.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

from reranker import contract
from reranker_operator import manifests
from reranker_operator.kube import Kube, error_message
from reranker_operator.spec import InvalidSpec, parse

logger = logging.getLogger(__name__)

#: Set by the gateway when it asks a fleet at zero for one replica (RFC 3339).
WOKEN_AT = f"{contract.API_GROUP}/woken-at"
#: The Kopf index of the server pods' starts (see handlers), keyed by (namespace, fleet).
POD_STARTS_INDEX = "reranker_pod_starts"
PERIOD_SECONDS = 5.0
#: A /health answer older than this does not tell what a pod does now (the poller asks every 5 s).
FRESH_SECONDS = 30.0

FleetKey = tuple[str, str]


class Reading(Protocol):
    """What is used of a `pod_health.PodHealth`."""

    @property
    def pod(self) -> str: ...
    @property
    def body(self) -> Mapping[str, Any]: ...
    @property
    def at(self) -> float: ...


@dataclasses.dataclass(frozen=True)
class PodStart:
    """A server pod as idleness sees it: Ready or not, and when it last started."""

    pod: str
    ready: bool
    started_at: float  # unix: its creation, or when it last became Ready, whichever is later


@dataclasses.dataclass(frozen=True)
class Decision:
    idle: bool
    reason: str  # why not (or, when idle, since when): logs, the Event and the status message
    last_active: float | None = None  # the latest of the times that keep the fleet up


def parse_time(value: Any) -> float | None:
    """An RFC 3339 timestamp (as Kubernetes writes them, or a gateway) as unix time, or None."""
    if not isinstance(value, str) or not value:
        return None
    text = value.strip().replace("z", "Z")
    if text.endswith("Z"):
        text = text[:-1] + "+00:00"
    try:
        parsed = datetime.datetime.fromisoformat(text)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=datetime.timezone.utc)
    return parsed.timestamp()


def format_time(unix: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(unix))


def pod_start(pod: Mapping[str, Any]) -> tuple[str, PodStart] | None:
    """(fleet, PodStart) of a server pod, or None for a pod of no fleet."""
    meta = pod.get("metadata") or {}
    fleet = (meta.get("labels") or {}).get(manifests.LABEL_INSTANCE)
    if not fleet:
        return None
    created = parse_time(meta.get("creationTimestamp")) or 0.0
    ready_since = None
    for cond in (pod.get("status") or {}).get("conditions") or ():
        if (isinstance(cond, Mapping) and cond.get("type") == "Ready"
                and cond.get("status") == "True"):
            ready_since = parse_time(cond.get("lastTransitionTime"))
    ready = ready_since is not None and not meta.get("deletionTimestamp")
    return str(fleet), PodStart(pod=str(meta.get("name")), ready=ready,
                                started_at=max(created, ready_since or 0.0))


def activity(reading: Reading) -> tuple[int, float | None] | None:
    """(requests, last_request_at) from a /health body, or None if it has no `activity`."""
    act = reading.body.get("activity")
    if not isinstance(act, Mapping) or not isinstance(act.get("requests"), int):
        return None
    last = act.get("last_request_at")
    return int(act["requests"]), float(last) if isinstance(last, (int, float)) else None


def decide(*, now: float, idle_seconds: float, woken_at: float | None,
           pods: Sequence[PodStart], active_at: Mapping[str, float | None],
           created_at: float | None = None) -> Decision:
    """Whether a fleet is idle. `active_at` maps each pod whose activity is known to the last
    time it answered a request (None: never since it started); a Ready pod missing from it is
    unknown, and unknown is busy. `created_at` (the RerankerDeployment's creation) holds like a
    wake: a new fleet whose pods do not exist yet is not idle."""
    unknown = sorted(p.pod for p in pods if p.ready and p.pod not in active_at)
    if unknown:
        return Decision(False, f"cannot read the activity of pod {', '.join(unknown[:3])}")
    times: list[tuple[float, str]] = []
    if created_at is not None:
        times.append((created_at, "created"))
    if woken_at is not None:
        times.append((woken_at, "woken"))
    times += [(p.started_at, f"pod {p.pod} started") for p in pods]
    times += [(t, f"pod {p.pod} answered a request") for p in pods
              if p.ready and (t := active_at.get(p.pod)) is not None]
    if not times:
        return Decision(True, "no pod and no wake recorded")
    last, what = max(times)
    if now - last < idle_seconds:
        return Decision(False, f"{what} {now - last:.0f}s ago (idleSeconds {idle_seconds:g})",
                        last)
    return Decision(True, f"idle for {now - last:.0f}s (last: {what} at {format_time(last)}; "
                          f"idleSeconds {idle_seconds:g})", last)


class ActivityTracker:
    """When the operator saw each pod's request count move (event loop only).

    A pod's `last_request_at` is its own clock; this is the operator's. The later of the two
    counts, so a pod whose clock runs behind does not look idle while it serves. The first
    answer of a pod is not a change (an operator restart then costs no extra idle time)."""

    def __init__(self) -> None:
        self._seen: dict[tuple[str, str, str], tuple[int, float | None]] = {}

    def active_at(self, namespace: str, fleet: str, readings: Iterable[Reading], *,
                  now: float) -> dict[str, float | None]:
        """Each pod's last activity, for the pods with a fresh, readable answer."""
        out: dict[str, float | None] = {}
        for r in readings:
            act = activity(r)
            if act is None or now - r.at > FRESH_SECONDS:
                continue
            requests, last = act
            key = (namespace, fleet, r.pod)
            before = self._seen.get(key)
            changed = before[1] if before is not None else None
            if before is not None and before[0] != requests:
                changed = r.at
            self._seen[key] = (requests, changed)
            known = [t for t in (last, changed) if t is not None]
            out[r.pod] = max(known) if known else None
        return out

    def forget(self, namespace: str, fleet: str, keep: Iterable[str]) -> None:
        kept = set(keep)
        for key in [k for k in self._seen if k[:2] == (namespace, fleet) and k[2] not in kept]:
            del self._seen[key]


Health = Callable[[str, str], Sequence[Reading]]
#: Told (owner uid, when) after the operator took a fleet to zero (the status records it).
ScaledToZero = Callable[[str, str], None]


class Scaler:
    """Looks at every fleet with spec.scaleToZero each `period` and takes the idle ones to 0."""

    def __init__(self, kube: Kube, *, health: Health, on_scaled: ScaledToZero,
                 period: float = PERIOD_SECONDS, clock: Callable[[], float] = time.time) -> None:
        self.kube, self.health, self.on_scaled = kube, health, on_scaled
        self.period, self.clock = period, clock
        self.tracker = ActivityTracker()
        self._said: dict[FleetKey, str] = {}  # the last reason logged per fleet (no log spam)

    async def run(self, indices: Callable[[], tuple[Any, Any]], *,
                  indexed: asyncio.Event | None = None) -> None:
        """Forever. `indices()` gives the Kopf indices (RerankerDeployments, pod starts);
        nothing is judged before `indexed` is set (every index filled: a fleet whose pods are
        not indexed yet would look podless, hence idle)."""
        if indexed is not None:
            await indexed.wait()
        while True:
            rerankers, starts = indices()
            await self.tick(_values(rerankers), starts)
            await asyncio.sleep(self.period)

    async def tick(self, owners: Iterable[Mapping[str, Any]], starts: Any) -> None:
        for owner in owners:
            try:
                await self.consider(owner, _pod_starts(starts, owner))
            except Exception:  # noqa: BLE001 - one fleet's surprise must not stop the others
                logger.exception("scale to zero: %s", fleet_name(owner))

    async def consider(self, owner: Mapping[str, Any], pods: Sequence[PodStart]) -> bool:
        """One fleet: scale it to zero if idle (True when it did)."""
        meta = owner.get("metadata") or {}
        if meta.get("deletionTimestamp"):
            return False
        try:
            spec = parse(owner.get("spec") or {})
        except InvalidSpec:
            return False
        if spec.scale_to_zero is None or spec.replicas == 0:
            return False
        namespace, name = str(meta.get("namespace")), str(meta["name"])
        now = self.clock()
        active = self.tracker.active_at(namespace, name, self.health(namespace, name), now=now)
        self.tracker.forget(namespace, name, (p.pod for p in pods))
        decision = decide(now=now, idle_seconds=spec.scale_to_zero.idle_seconds,
                          woken_at=parse_time((meta.get("annotations") or {}).get(WOKEN_AT)),
                          pods=pods, active_at=active,
                          created_at=parse_time(meta.get("creationTimestamp")))
        if not decision.idle:
            if (decision.reason.startswith("cannot")
                    and self._said.get((namespace, name)) != decision.reason):
                logger.info("scale to zero: %s/%s stays up: %s", namespace, name, decision.reason)
            self._said[(namespace, name)] = decision.reason
            return False
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(None, self._scale_to_zero, namespace, name,
                                       str(meta.get("resourceVersion") or ""))
        except ApiException as e:
            # 409: the fleet changed after this view (a wake, most likely): look again next time.
            level = logging.INFO if e.status in (404, 409) else logging.WARNING
            logger.log(level, "scale to zero: %s/%s not scaled: %s", namespace, name,
                       error_message(e))
            return False
        except HTTPError as e:
            logger.warning("scale to zero: %s/%s not scaled: %s", namespace, name, e)
            return False
        at = format_time(now)
        logger.info("scale to zero: %s/%s scaled to 0 replicas: %s", namespace, name,
                    decision.reason)
        self.on_scaled(str(meta.get("uid")), at)
        return True

    def _scale_to_zero(self, namespace: str, name: str, resource_version: str) -> None:
        """Blocking: spec.replicas 0 through the scale subresource, on the condition that the
        RerankerDeployment did not change since `resource_version` (a precondition, no retry)."""
        self.kube.patch_scale(namespace, name, 0, resource_version=resource_version or None)


def fleet_name(owner: Mapping[str, Any]) -> str:
    meta = owner.get("metadata") or {}
    return f"{meta.get('namespace')}/{meta.get('name')}"


def _values(index: Any) -> list[Mapping[str, Any]]:
    if index is None:
        return []
    return [value for key in list(index) for value in list(index.get(key, ()))]


def _pod_starts(index: Any, owner: Mapping[str, Any]) -> list[PodStart]:
    if index is None:
        return []
    meta = owner.get("metadata") or {}
    key = (str(meta.get("namespace")), str(meta.get("name")))
    return [v for v in list(index.get(key, ())) if isinstance(v, PodStart)]


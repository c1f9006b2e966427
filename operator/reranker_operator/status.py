"""The status of a RerankerDeployment, built from what the operator observed.

Pure: given the owner, the live server Deployment and the problems the last reconciliation
met, it returns the whole `.status` (no clock: `now` is an argument). Conditions are shaped
like `metav1.Condition`; a condition keeps its `lastTransitionTime` until its status changes,
so rebuilding an unchanged status gives an identical dict and the operator writes nothing.

The status never claims more than the Deployment reports: Ready is True only when every
desired replica of the current spec is ready. There is no `phase` string.

External endpoints (Macs) are reported from the prober's `external.Summary`: counts, one entry
per endpoint, and ExternalEndpointsReady. Ready stays about the pods (spec.replicas); Available
counts whatever serves through the Service, Macs included. While the prober has not judged a
fleet yet (`external=None`, e.g. right after the operator starts), the last reported external
part is kept as it is, so a restart rewrites nothing.

The fleet's precision records (`fleet_precision`: one entry per record key, from what the pods
report) are status.precision, and their picks joined status.precisionSummary (the `Precision`
printer column); `precision=None` keeps the last reported ones.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from reranker_operator import external as ext
from reranker_operator import fleet_precision
from reranker_operator import manifests, model_delivery

READY = "Ready"
AVAILABLE = "Available"
PROGRESSING = "Progressing"
DEGRADED = "Degraded"
EXTERNAL_ENDPOINTS_READY = "ExternalEndpointsReady"
#: Only with spec.model.cache: whether the fleet's cache volume is filled (the fill Job).
MODEL_CACHED = "ModelCached"
CONDITION_TYPES = (READY, AVAILABLE, PROGRESSING, DEGRADED, EXTERNAL_ENDPOINTS_READY)


@dataclasses.dataclass(frozen=True)
class Problem:
    """Something the reconciliation could not do; `blocking` means the pods cannot run the
    current spec (Ready is then False), otherwise only Degraded reports it."""

    reason: str
    message: str
    blocking: bool = True


def _condition(type_: str, ok: bool, reason: str, message: str, *, generation: int,
               previous: Mapping[str, Mapping[str, Any]], now: str) -> dict[str, Any]:
    status = "True" if ok else "False"
    before = previous.get(type_)
    if before is None or before.get("status") != status:
        transition_time = now
    else:
        transition_time = str(before.get("lastTransitionTime") or now)
    return {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message,
        "observedGeneration": generation,
        "lastTransitionTime": transition_time,
    }


def _deployment_condition(deployment: Mapping[str, Any] | None, type_: str
                          ) -> Mapping[str, Any] | None:
    for cond in ((deployment or {}).get("status") or {}).get("conditions") or ():
        if isinstance(cond, Mapping) and cond.get("type") == type_:
            return dict(cond)
    return None


#: Waiting reasons of a server container that do not go away by waiting.
FAILING_WAITING = frozenset({"CrashLoopBackOff", "ErrImagePull", "ImagePullBackOff",
                             "ErrImageNeverPull", "InvalidImageName", "CreateContainerError",
                             "CreateContainerConfigError", "RunContainerError"})


def pod_failure(pod: Mapping[str, Any]) -> dict[str, str] | None:
    """Why a server pod fails, from its container statuses, or None.

    A container fails when it is not ready and either waits for a reason that does not resolve
    itself (FAILING_WAITING) or has exited with an error. The message carries the container's
    termination message: the server writes there why it stopped (e.g. the model that cannot
    load), and the pod template falls back to the log's tail."""
    name = str((pod.get("metadata") or {}).get("name"))
    for cs in (pod.get("status") or {}).get("containerStatuses") or ():
        if cs.get("ready"):
            continue
        state, last = cs.get("state") or {}, cs.get("lastState") or {}
        waiting = state.get("waiting") or {}
        terminated = state.get("terminated") or last.get("terminated") or {}
        exited = int(terminated.get("exitCode") or 0) != 0
        if waiting.get("reason") not in FAILING_WAITING and not exited:
            continue
        reason = str(waiting.get("reason") if waiting.get("reason") in FAILING_WAITING
                     else "ContainerFailed")
        what = [f"exited {terminated['exitCode']}"] if exited else [str(waiting.get("reason"))]
        if cs.get("restartCount"):
            what.append(f"restarted {cs['restartCount']} times")
        detail = str((terminated.get("message") if exited else waiting.get("message")) or "")
        detail = " ".join(detail.split())
        if len(detail) > 400:  # the head names what failed (the server's words), the tail ends a log
            detail = f"{detail[:240]} ... {detail[-150:]}"
        message = f"pod {name}: container {cs.get('name')} {', '.join(what)}"
        return {"pod": name, "reason": reason,
                "message": f"{message}: {detail}" if detail else message}
    return None


def external_condition(summary: ext.Summary) -> tuple[bool, str, str]:
    """(ok, reason, message) of ExternalEndpointsReady. No external endpoint is not a fault."""
    if summary.total == 0:
        return (True, "NoExternalEndpoints", "no external endpoints")
    counts = f"{summary.ready}/{summary.total} external endpoints ready"
    if summary.ready == summary.total:
        return (True, "AllExternalEndpointsReady", counts)
    waiting = "; ".join(f"{e.name}: {e.message}" for e in summary.endpoints if not e.ready)
    return (False, "ExternalEndpointsNotReady", f"{counts}; {waiting}")


def build(owner: Mapping[str, Any], *, deployment: Mapping[str, Any] | None,
          problems: Sequence[Problem], config_hash: str | None, service_port: int,
          now: str, external: ext.Summary | None = None,
          pod_failures: Sequence[Mapping[str, str]] = (),
          precision: Sequence[Mapping[str, Any]] | None = None,
          model_cache: model_delivery.CacheState | None = None,
          served_names: Sequence[str] | None = None,
          scaled_to_zero_at: str | None = None) -> dict[str, Any]:
    """The full status for `owner` (a RerankerDeployment body); `pod_failures` are the
    `pod_failure`s of its server pods; `served_names` the names its servers answer to
    (`served_names.from_settings`; None: a spec that does not parse, the last ones are kept);
    `scaled_to_zero_at` when the operator took the idle fleet to 0 (`scale_to_zero`): kept in
    status.scaledToZeroAt while spec.replicas stays 0."""
    meta = owner["metadata"]
    name, namespace = meta["name"], meta.get("namespace", "default")
    generation = int(meta.get("generation") or 0)
    desired = int((owner.get("spec") or {}).get("replicas", 1))
    previous = {c["type"]: c for c in ((owner.get("status") or {}).get("conditions") or ())
                if isinstance(c, Mapping) and "type" in c}

    # External endpoints: as the prober judged them, else as last reported.
    if external is not None:
        external_status = external.as_status()
        external_c = external_condition(external)
    else:
        external_status = dict((owner.get("status") or {}).get("externalEndpoints")
                               or {"ready": 0, "total": 0})
        before = previous.get(EXTERNAL_ENDPOINTS_READY)
        external_c = ((before.get("status") == "True", str(before.get("reason")),
                       str(before.get("message"))) if before
                      else external_condition(ext.Summary()))
    external_ready = int(external_status.get("ready") or 0)

    dstatus = (deployment or {}).get("status") or {}
    replicas = int(dstatus.get("replicas") or 0)
    ready = int(dstatus.get("readyReplicas") or 0)
    updated = int(dstatus.get("updatedReplicas") or 0)
    available = int(dstatus.get("availableReplicas") or 0)
    observed = deployment is not None and int(dstatus.get("observedGeneration") or 0) >= int(
        (deployment.get("metadata") or {}).get("generation") or 0)

    progress = _deployment_condition(deployment, "Progressing") or {}
    deadline_exceeded = progress.get("reason") == "ProgressDeadlineExceeded"
    replica_failure = _deployment_condition(deployment, "ReplicaFailure") or {}
    failing = replica_failure.get("status") == "True"

    blocking = [p for p in problems if p.blocking]
    rolled_out = observed and updated == desired and replicas == desired
    counts = f"{ready}/{desired} replicas ready"
    # At 0 replicas nothing is wrong: say why there are no pods (idle, or asked for 0).
    idle_at = (scaled_to_zero_at or (owner.get("status") or {}).get("scaledToZeroAt")
               if desired == 0 else None)
    zero = (f"scaled to zero at {idle_at}: idle for spec.scaleToZero.idleSeconds; a request "
            "through the gateway wakes it" if idle_at else "spec.replicas is 0: no server pods")

    # Ready: every desired replica of the current spec is ready, and nothing blocks.
    filling = model_cache is not None and model_cache.state == model_delivery.FILLING
    if blocking:
        ready_c = (False, blocking[0].reason, blocking[0].message)
    elif filling and model_cache is not None:
        ready_c = (False, "ModelCacheFilling", model_cache.message)
    elif deployment is None:
        ready_c = (False, "DeploymentMissing", f"Deployment {name} does not exist yet")
    elif desired == 0:
        ready_c = (False, "ScaledToZero", zero)
    elif rolled_out and ready >= desired:
        ready_c = (True, "AllReplicasReady", counts)
    elif not rolled_out:
        ready_c = (False, "RolloutInProgress",
                   f"{counts}; {updated}/{desired} replicas run the current spec")
    else:
        ready_c = (False, "ReplicasNotReady", f"{counts}; waiting for pods to pass /ready")

    # Available: at least one pod or external endpoint serves through the Service.
    if ready > 0 and external_ready > 0:
        available_c = (True, "ReplicasAvailable",
                       f"{ready} replicas and {external_ready} external endpoints serving")
    elif ready > 0:
        available_c = (True, "ReplicasAvailable", f"{ready} replicas serving")
    elif external_ready > 0:
        available_c = (True, "ExternalEndpointsAvailable",
                       f"{external_ready} external endpoints serving; no server pod is ready "
                       f"({counts})")
    elif desired == 0 and replicas == 0:
        available_c = (False, "ScaledToZero", zero)
    else:
        available_c = (False, "NoReplicasReady", f"no server pod is ready ({counts})")

    # Progressing: the Deployment is still moving toward the current spec.
    if deadline_exceeded:
        progressing_c = (False, "ProgressDeadlineExceeded",
                         str(progress.get("message") or "rollout exceeded its progress deadline"))
    elif filling and model_cache is not None:
        progressing_c = (True, "ModelCacheFilling", model_cache.message)
    elif deployment is not None and not blocking and not (rolled_out and ready >= desired):
        progressing_c = (True, "RolloutInProgress", counts)
    else:
        progressing_c = (False, "RolloutComplete" if not blocking else blocking[0].reason,
                         counts if not blocking else "not rolling out: " + blocking[0].message)

    # Degraded: the operator could not realise the spec, server pods fail (with their own
    # reason: a crash-looping server says why it stopped), or the rollout is failing.
    if problems:
        degraded_c = (True, problems[0].reason, "; ".join(p.message for p in problems))
    elif pod_failures:
        failures = sorted(pod_failures, key=lambda f: f["pod"])
        more = f"; and {len(failures) - 3} more pods" if len(failures) > 3 else ""
        degraded_c = (True, failures[0]["reason"],
                      "; ".join(f["message"] for f in failures[:3]) + more)
    elif failing:
        degraded_c = (True, "ReplicaFailure", str(replica_failure.get("message") or ""))
    elif deadline_exceeded:
        degraded_c = (True, "ProgressDeadlineExceeded", progressing_c[2])
    else:
        degraded_c = (False, "AsExpected", "all children reconciled")

    conditions = [
        _condition(type_, ok, reason, message, generation=generation, previous=previous, now=now)
        for type_, (ok, reason, message) in (
            (READY, ready_c), (AVAILABLE, available_c),
            (PROGRESSING, progressing_c), (DEGRADED, degraded_c),
            (EXTERNAL_ENDPOINTS_READY, external_c))
    ]
    if model_cache is not None:
        conditions.append(_condition(
            MODEL_CACHED, model_cache.ready, model_cache.state, model_cache.message,
            generation=generation, previous=previous, now=now))
    status: dict[str, Any] = {
        "observedGeneration": generation,
        "replicas": replicas,
        "readyReplicas": ready,
        "updatedReplicas": updated,
        "availableReplicas": available,
        "selector": manifests.selector_string(name),
        "url": manifests.service_url(name, namespace, service_port),
        "externalEndpoints": external_status,
        "conditions": conditions,
    }
    if config_hash is not None:
        status["configHash"] = config_hash
    if idle_at:
        status["scaledToZeroAt"] = idle_at
    if model_cache is not None:
        status["modelCache"] = model_cache.as_status()
    names = served_names if served_names is not None else (
        (owner.get("status") or {}).get("servedNames"))
    if names:
        status["servedNames"] = list(names)
    entries = precision if precision is not None else (
        (owner.get("status") or {}).get("precision"))
    if entries:
        status["precision"] = [dict(e) for e in entries]
        status["precisionSummary"] = fleet_precision.summary(entries)
    return status


def status_patch(current: Mapping[str, Any] | None, new: Mapping[str, Any]
                 ) -> dict[str, Any] | None:
    """The merge patch from `current` to `new`, or None when they are equal (no write)."""
    current = current or {}
    patch: dict[str, Any] = {k: v for k, v in new.items() if current.get(k) != v}
    # Keys the operator owns that are no longer set; kopf keeps nothing in status here.
    patch.update({k: None for k in current if k not in new})
    return patch or None


def transitions(current: Mapping[str, Any] | None, new: Mapping[str, Any]
                ) -> list[tuple[str, str, str, str]]:
    """(type, status, reason, message) of each condition whose status changed."""
    before = {c.get("type"): c.get("status")
              for c in ((current or {}).get("conditions") or ()) if isinstance(c, Mapping)}
    return [(c["type"], c["status"], c["reason"], c["message"]) for c in new["conditions"]
            if before.get(c["type"]) != c["status"]]

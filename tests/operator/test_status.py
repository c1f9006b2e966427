"""The status builder: conditions that never claim more than the Deployment reports."""

from __future__ import annotations

from typing import Any

from reranker_operator import manifests, status
from reranker_operator.status import Problem

T0, T1 = "2024-01-01T00:00:00Z", "2024-01-01T00:05:00Z"


def owner(replicas: int = 2, generation: int = 3, st: dict | None = None) -> dict[str, Any]:
    return {"metadata": {"name": "rr", "namespace": "ns", "generation": generation},
            "spec": {"replicas": replicas}, "status": st or {}}


def deployment(*, replicas: int = 2, ready: int = 0, updated: int = 2, observed: int = 1,
               generation: int = 1, conditions: list | None = None) -> dict[str, Any]:
    return {"metadata": {"generation": generation},
            "status": {"observedGeneration": observed, "replicas": replicas,
                       "readyReplicas": ready, "updatedReplicas": updated,
                       "availableReplicas": ready, "conditions": conditions or []}}


def conds(st: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in st["conditions"]}


def build(o: dict, dep: dict | None, problems: list[Problem] | None = None,
          now: str = T0) -> dict[str, Any]:
    return status.build(o, deployment=dep, problems=problems or [], config_hash="h",
                        service_port=8000, now=now)


def test_pods_not_ready_means_not_ready() -> None:
    st = build(owner(), deployment(ready=0))
    c = conds(st)
    assert c["Ready"]["status"] == "False"
    assert c["Ready"]["reason"] == "ReplicasNotReady"
    assert "0/2 replicas ready" in c["Ready"]["message"]
    assert c["Available"]["status"] == "False"
    assert c["Progressing"]["status"] == "True"
    assert c["Degraded"]["status"] == "False"
    assert (st["replicas"], st["readyReplicas"], st["updatedReplicas"]) == (2, 0, 2)


def test_all_ready_means_ready() -> None:
    c = conds(build(owner(), deployment(ready=2)))
    assert c["Ready"]["status"] == "True" and c["Ready"]["message"] == "2/2 replicas ready"
    assert c["Available"]["status"] == "True"
    assert c["Progressing"]["status"] == "False"


def test_rollout_in_progress_is_not_ready_even_with_enough_ready_pods() -> None:
    # Old pods are ready, but not all replicas run the current spec yet.
    c = conds(build(owner(), deployment(replicas=3, ready=2, updated=1)))
    assert c["Ready"]["status"] == "False" and c["Ready"]["reason"] == "RolloutInProgress"
    assert c["Available"]["status"] == "True"
    # The Deployment controller has not seen the new template yet.
    c = conds(build(owner(), deployment(ready=2, observed=1, generation=2)))
    assert c["Ready"]["status"] == "False"


def test_missing_deployment_and_scaled_to_zero() -> None:
    assert conds(build(owner(), None))["Ready"]["reason"] == "DeploymentMissing"
    c = conds(build(owner(replicas=0), deployment(replicas=0, updated=0)))
    assert c["Ready"]["status"] == "False" and c["Ready"]["reason"] == "ScaledToZero"


def test_blocking_problem_is_degraded_and_not_ready() -> None:
    c = conds(build(owner(), deployment(ready=2), [Problem("InvalidSpec", "invalid spec: x")]))
    assert c["Ready"]["status"] == "False" and c["Ready"]["reason"] == "InvalidSpec"
    assert c["Degraded"]["status"] == "True" and c["Degraded"]["message"] == "invalid spec: x"
    assert c["Available"]["status"] == "True"  # the old pods still serve: say so
    assert c["Progressing"]["status"] == "False"


def test_non_blocking_problem_is_degraded_but_ready() -> None:
    c = conds(build(owner(), deployment(ready=2),
                    [Problem("ServiceMonitorUnavailable", "no CRD", blocking=False)]))
    assert c["Ready"]["status"] == "True"
    assert c["Degraded"]["status"] == "True" and c["Degraded"]["reason"] == \
        "ServiceMonitorUnavailable"


def test_progress_deadline_exceeded() -> None:
    dep = deployment(ready=0, conditions=[{"type": "Progressing", "status": "False",
                                           "reason": "ProgressDeadlineExceeded",
                                           "message": "ReplicaSet rr-1 has timed out"}])
    c = conds(build(owner(), dep))
    assert c["Progressing"]["status"] == "False"
    assert c["Degraded"]["status"] == "True" and "timed out" in c["Degraded"]["message"]


def test_condition_shape() -> None:
    for c in build(owner(generation=7), deployment())["conditions"]:
        assert set(c) == {"type", "status", "reason", "message", "lastTransitionTime",
                          "observedGeneration"}
        assert c["observedGeneration"] == 7 and c["status"] in ("True", "False")
        assert c["reason"][0].isupper() and " " not in c["reason"]


def test_identity_fields() -> None:
    st = build(owner(generation=5), deployment())
    assert st["observedGeneration"] == 5
    assert st["selector"] == manifests.selector_string("rr")
    assert st["url"] == "http://rr.ns.svc:8000"
    assert st["externalEndpoints"] == {"ready": 0, "total": 0}
    assert "phase" not in st


def test_unchanged_status_is_identical_and_needs_no_write() -> None:
    first = build(owner(), deployment())
    again = build(owner(st=first), deployment(), now=T1)
    assert again == first
    assert status.status_patch(first, again) is None


def test_transition_time_moves_only_on_a_status_change() -> None:
    first = build(owner(), deployment(ready=0))
    second = build(owner(st=first), deployment(ready=2), now=T1)
    c1, c2 = conds(first), conds(second)
    assert c2["Ready"]["lastTransitionTime"] == T1 and c1["Ready"]["lastTransitionTime"] == T0
    assert c2["Degraded"]["lastTransitionTime"] == T0  # stayed False
    patch = status.status_patch(first, second)
    assert patch is not None and set(patch) >= {"conditions", "readyReplicas"}
    assert [t[:2] for t in status.transitions(first, second)] == [
        ("Ready", "True"), ("Available", "True"), ("Progressing", "False")]


def test_status_patch_removes_stale_keys() -> None:
    assert status.status_patch({"a": 1, "old": 2}, {"a": 1}) == {"old": None}


def server_pod(name: str, **container: Any) -> dict[str, Any]:
    return {"metadata": {"name": name},
            "status": {"containerStatuses": [{"name": "reranker", "ready": False,
                                              "restartCount": 0, **container}]}}


def test_a_crash_looping_server_pod_fails_with_its_termination_message() -> None:
    pod = server_pod("rr-abc", restartCount=3,
                     state={"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 40s"}},
                     lastState={"terminated": {"exitCode": 4, "reason": "Error",
                                               "message": "model load failed: OSError: no-such"}})
    failure = status.pod_failure(pod)
    assert failure == {"pod": "rr-abc", "reason": "CrashLoopBackOff", "message":
                       "pod rr-abc: container reranker exited 4, restarted 3 times: "
                       "model load failed: OSError: no-such"}


def test_a_long_termination_message_keeps_what_failed_and_how_it_ended() -> None:
    hub = "LocalEntryNotFoundError: " + "cannot find the snapshot folder on the local disk. " * 20
    pod = server_pod("rr-abc", state={"terminated": {"exitCode": 4, "message":
                     f"model load failed: could not load 'acme/no-such-model' ({hub}) and the folder is not set"}})
    failure = status.pod_failure(pod)
    assert failure is not None and len(failure["message"]) < 500
    assert "could not load 'acme/no-such-model'" in failure["message"]
    assert failure["message"].endswith("and the folder is not set")


def test_pods_that_start_or_serve_do_not_fail() -> None:
    assert status.pod_failure(server_pod("a", state={"waiting": {"reason": "ContainerCreating"}})) is None
    assert status.pod_failure(server_pod("b", state={"running": {}})) is None  # loading the model
    recovered = server_pod("c", ready=True, state={"running": {}},
                           lastState={"terminated": {"exitCode": 137, "reason": "OOMKilled"}})
    assert status.pod_failure(recovered) is None
    pulling = status.pod_failure(server_pod("d", state={"waiting": {
        "reason": "ImagePullBackOff", "message": "Back-off pulling image \"x:1\""}}))
    assert pulling is not None and pulling["reason"] == "ImagePullBackOff"
    assert "Back-off pulling image" in pulling["message"]


def test_failing_pods_make_the_fleet_degraded_with_their_reason() -> None:
    failures = [status.pod_failure(server_pod(
        f"rr-{i}", state={"waiting": {"reason": "CrashLoopBackOff"}},
        lastState={"terminated": {"exitCode": 4, "message": "model load failed"}}))
        for i in range(5)]
    st = status.build(owner(), deployment=deployment(ready=0), problems=[], config_hash="h",
                      service_port=8000, now=T0, pod_failures=[f for f in failures if f])
    c = conds(st)
    assert c["Ready"]["status"] == "False"
    assert c["Degraded"]["status"] == "True" and c["Degraded"]["reason"] == "CrashLoopBackOff"
    assert c["Degraded"]["message"].startswith("pod rr-0: container reranker exited 4")
    assert c["Degraded"]["message"].endswith("; and 2 more pods")
    # healthy pods again: no longer degraded
    c = conds(status.build(owner(), deployment=deployment(ready=2), problems=[],
                           config_hash="h", service_port=8000, now=T1, pod_failures=[]))
    assert c["Degraded"]["status"] == "False" and c["Ready"]["status"] == "True"

"""One reconciliation pass, with an in-memory stand-in for the operator's `Kube` layer.

These check the pass's logic (what it writes, when it stops); the real API server behaviour
(server-side apply, garbage collection, RBAC) is covered by tests/kube/test_operator*.py.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from reranker_operator import manifests
from reranker_operator.reconcile import CONFLICT_RETRY_SECONDS, Reconciler, owner_of

DEFAULTS = manifests.Defaults(server_image="img:1", redis_image="redis:1")


class FakeResponse:
    def __init__(self, status: int, message: str) -> None:
        self.status = status
        self.reason = "Unprocessable Entity"
        self.data = json.dumps({"kind": "Status", "message": message}).encode()
        self.headers: dict[str, str] = {}

    def getheaders(self) -> dict[str, str]:  # how kubernetes<30's ApiException reads them
        return self.headers


class FakeKube:
    """Stores applied objects like an API server would (minus validation)."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.calls: list[tuple[str, str]] = []
        self.status: dict[str, Any] = {}
        self.reject: dict[str, str] = {}  # kind -> message (422)
        self.version = 0
        self.secrets: dict[tuple[str, str], dict[str, Any]] = {}  # created, never listed
        self.forced: list[bool] = []  # each apply's force

    def apply(self, obj: dict[str, Any], *, force: bool = True) -> dict[str, Any]:
        self.calls.append(("apply", f"{obj['kind']}/{obj['metadata']['name']}"))
        self.forced.append(force)
        if obj["kind"] in self.reject:
            raise ApiException(http_resp=FakeResponse(422, self.reject[obj["kind"]]))
        if not force and (obj["kind"], obj["metadata"]["name"]) in self.objects:
            # What a real server answers when another manager set a field differently.
            raise ApiException(http_resp=FakeResponse(409, "Apply failed with 1 conflict"))
        self.version += 1
        stored = copy.deepcopy(obj)
        stored["metadata"].update(resourceVersion=str(self.version), uid=f"c{self.version}",
                                  creationTimestamp="2024-01-01T00:00:00Z")
        self.objects[(obj["kind"], obj["metadata"]["name"])] = stored
        return copy.deepcopy(stored)

    def create(self, obj: dict[str, Any]) -> bool:
        """POST: False (409 AlreadyExists) when the object exists; never replaces it."""
        self.calls.append(("create", f"{obj['kind']}/{obj['metadata']['name']}"))
        key = (obj["kind"], obj["metadata"]["name"])
        if key in self.secrets:
            return False
        self.secrets[key] = copy.deepcopy(obj)
        return True

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict | None:
        self.calls.append(("get", f"{kind}/{name}"))
        return copy.deepcopy(self.objects.get((kind, name)))

    def delete(self, api_version: str, kind: str, namespace: str, name: str) -> None:
        self.calls.append(("delete", f"{kind}/{name}"))
        self.objects.pop((kind, name), None)

    def patch_status(self, namespace: str, name: str, patch: dict[str, Any]) -> None:
        self.calls.append(("status", name))
        for k, v in patch.items():
            if v is None:
                self.status.pop(k, None)
            else:
                self.status[k] = v

    def live(self) -> dict[tuple[str, str], dict[str, Any]]:
        """What the operator's indices hold: the objects a RerankerDeployment controls."""
        return {k: copy.deepcopy(v) for k, v in self.objects.items() if owner_of(v)}

    def writes(self) -> list[tuple[str, str]]:
        return [c for c in self.calls if c[0] != "get"]

    def gets(self) -> list[tuple[str, str]]:
        return [c for c in self.calls if c[0] == "get"]


class Events(list):
    def __call__(self, owner: Any, type_: str, reason: str, message: str) -> None:
        self.append((type_, reason, message))


def owner(spec: dict[str, Any], status: dict | None = None, generation: int = 1) -> dict:
    return {"apiVersion": "reranker.dev/v1alpha1", "kind": "RerankerDeployment",
            "metadata": {"name": "rr", "namespace": "ns", "uid": "u-1",
                         "generation": generation},
            "spec": spec, "status": status or {}}


def reconciler(kube: FakeKube, events: Events | None = None, *,
               service_monitors: bool = False) -> Reconciler:
    return Reconciler(kube, DEFAULTS, clock=lambda: "2024-01-01T00:00:00Z",  # type: ignore[arg-type]
                      events=events if events is not None else Events(),
                      service_monitors=service_monitors)


SPEC = {"model": {"id": "m"}, "autoscaling": {"enabled": True}}


async def test_first_pass_creates_children_then_idle_passes_write_nothing() -> None:
    kube, events = FakeKube(), Events()
    r = reconciler(kube, events)
    outcome = await r.reconcile(owner(SPEC), {})
    assert sorted(outcome.created) == ["ConfigMap rr-config", "Deployment rr",
                                       "HorizontalPodAutoscaler rr", "PodDisruptionBudget rr",
                                       "Service rr"]
    assert outcome.status_written and outcome.permanent is None
    created = [e for e in events if e[1] == "Created"]
    assert len(created) == 1 and "Deployment rr" in created[0][2]
    ready = next(c for c in kube.status["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "False"  # nothing is running yet

    # Each child was looked up once before it was created (is the name free?), then applied
    # without force; an idle pass asks the API server nothing.
    assert sorted(kube.gets()) == sorted(("get", c.replace(" ", "/")) for c in outcome.created)
    assert kube.forced == [False] * len(outcome.created)
    kube.calls.clear()
    for _ in range(2):
        again = await r.reconcile(owner(SPEC, status=kube.status), kube.live())
        assert again.writes == 0
    assert kube.calls == []
    # A fresh reconciler (an operator restart) agrees: nothing to write.
    again = await reconciler(kube).reconcile(owner(SPEC, status=kube.status), kube.live())
    assert again.writes == 0 and kube.writes() == []


async def test_deleted_and_edited_children_are_restored() -> None:
    kube = FakeKube()
    r = reconciler(kube)
    await r.reconcile(owner(SPEC), {})
    live = kube.live()
    del live[("Service", "rr")]
    del kube.objects[("Service", "rr")]
    r.child_deleted("u-1", "Service", "rr")  # as the handler does on the DELETED event
    live[("Deployment", "rr")]["spec"]["replicas"] = 9
    live[("Deployment", "rr")]["metadata"]["resourceVersion"] = "100"  # someone's edit
    kube.calls.clear()
    outcome = await r.reconcile(owner(SPEC, status=kube.status), live)
    assert outcome.created == ["Service rr"] and outcome.updated == ["Deployment rr"]
    assert kube.objects[("Deployment", "rr")]["spec"]["replicas"] == 1


async def test_replicas_are_copied_down_and_children_patched() -> None:
    kube = FakeKube()
    r = reconciler(kube)
    await r.reconcile(owner(SPEC), {})
    scaled = {**SPEC, "replicas": 3}
    kube.calls.clear()
    outcome = await r.reconcile(owner(scaled, status=kube.status, generation=2), kube.live())
    assert outcome.updated == ["Deployment rr"]
    assert kube.objects[("Deployment", "rr")]["spec"]["replicas"] == 3


async def test_disabled_features_remove_their_children() -> None:
    kube = FakeKube()
    r = reconciler(kube)
    await r.reconcile(owner(SPEC), {})
    spec = {"model": {"id": "m"}, "podDisruptionBudget": {"enabled": False}}
    outcome = await r.reconcile(owner(spec, status=kube.status, generation=2), kube.live())
    assert sorted(outcome.deleted) == ["HorizontalPodAutoscaler rr", "PodDisruptionBudget rr"]
    assert ("HorizontalPodAutoscaler", "rr") not in kube.objects


async def test_invalid_spec_touches_nothing_and_is_permanent() -> None:
    kube = FakeKube()
    r = reconciler(kube)
    await r.reconcile(owner(SPEC), {})
    kube.calls.clear()
    bad = {"model": {"id": "m"}, "resources": {"requests": {"cpu": "2"},
                                               "limits": {"cpu": "1"}}}
    outcome = await r.reconcile(owner(bad, status=kube.status, generation=2), kube.live())
    assert outcome.permanent is not None and outcome.permanent.reason == "InvalidSpec"
    assert kube.writes() == [("status", "rr")]
    degraded = next(c for c in kube.status["conditions"] if c["type"] == "Degraded")
    assert degraded["status"] == "True" and "requests.cpu" in degraded["message"]


async def test_rejected_child_is_not_retried_with_the_same_manifest() -> None:
    kube = FakeKube()
    kube.reject["Deployment"] = "spec.template.spec.affinity: Invalid value"
    r = reconciler(kube)
    outcome = await r.reconcile(owner(SPEC), {})
    assert outcome.permanent is not None and outcome.permanent.reason == "ChildRejected"
    assert "Invalid value" in outcome.permanent.message
    kube.calls.clear()
    again = await r.reconcile(owner(SPEC, status=kube.status), kube.live())
    assert ("apply", "Deployment/rr") not in kube.calls
    assert again.permanent is not None and again.writes == 0
    # A new spec is a new manifest: it is tried.
    del kube.reject["Deployment"]
    fixed = await r.reconcile(owner({**SPEC, "replicas": 2}, status=kube.status, generation=2),
                              kube.live())
    assert fixed.permanent is None and "Deployment rr" in fixed.created


@pytest.mark.parametrize("served", [False, True])
async def test_service_monitor_only_when_its_crd_is_served(served: bool) -> None:
    kube = FakeKube()
    spec = {"model": {"id": "m"}, "monitoring": {"serviceMonitor": {"enabled": True}}}
    r = reconciler(kube, service_monitors=served)
    outcome = await r.reconcile(owner(spec), {})
    degraded = next(c for c in kube.status["conditions"] if c["type"] == "Degraded")
    ready_blockers = [p for p in outcome.problems if p.blocking]
    assert not ready_blockers
    if served:
        assert ("ServiceMonitor", "rr") in kube.objects
        assert degraded["status"] == "False"
    else:
        assert ("ServiceMonitor", "rr") not in kube.objects
        assert degraded["status"] == "True"
        assert "ServiceMonitor CRD" in degraded["message"]
    # Stable: the next pass reports the same and writes nothing.
    kube.calls.clear()
    again = await r.reconcile(owner(spec, status=kube.status), kube.live())
    assert again.writes == 0 and kube.writes() == []


async def test_deleting_owner_is_left_to_garbage_collection() -> None:
    kube = FakeKube()
    o = owner(SPEC)
    o["metadata"]["deletionTimestamp"] = "2024-01-01T00:00:00Z"
    outcome = await reconciler(kube).reconcile(o, {})
    assert outcome.writes == 0 and kube.calls == []


async def test_own_writes_count_before_the_watch_stream_delivers_them() -> None:
    # While the index still lags behind (children missing, or older), a pass triggered by
    # one child's event must not apply the siblings again.
    kube = FakeKube()
    r = reconciler(kube)
    await r.reconcile(owner(SPEC), {})
    kube.calls.clear()
    lagging = {k: v for k, v in kube.live().items() if k == ("ConfigMap", "rr-config")}
    stale = copy.deepcopy(kube.objects[("Deployment", "rr")])
    stale["metadata"]["resourceVersion"] = "0"
    stale["spec"]["replicas"] = 7
    lagging[("Deployment", "rr")] = stale
    outcome = await r.reconcile(owner(SPEC, status=kube.status), lagging)
    assert outcome.writes == 0 and kube.writes() == []
    # Once the index has caught up, it is the truth again (here: someone deleted the PDB).
    caught_up = kube.live()
    del caught_up[("PodDisruptionBudget", "rr")]
    del kube.objects[("PodDisruptionBudget", "rr")]
    r.child_deleted("u-1", "PodDisruptionBudget", "rr")
    outcome = await r.reconcile(owner(SPEC, status=kube.status), caught_up)
    assert outcome.created == ["PodDisruptionBudget rr"]


async def test_transient_failure_is_retried_after_a_delay_not_on_every_event(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from reranker_operator import reconcile as rec

    clock = [1000.0]
    monkeypatch.setattr(rec.time, "monotonic", lambda: clock[0])
    kube = FakeKube()
    original = kube.apply

    def flaky(obj: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        if obj["kind"] == "Service" and clock[0] < 1005:
            kube.calls.append(("apply", "Service/rr"))
            raise ApiException(status=500, reason="range is full")
        return original(obj, **kwargs)
    kube.apply = flaky  # type: ignore[method-assign]
    r = reconciler(kube)
    first = await r.reconcile(owner(SPEC), {})
    assert first.retry is not None and "Service rr" in first.retry
    assert any(p.reason == "ApplyFailed" for p in first.problems)
    kube.calls.clear()
    clock[0] += 1  # another child's event, soon after: no new attempt
    again = await r.reconcile(owner(SPEC, status=kube.status), kube.live())
    assert ("apply", "Service/rr") not in kube.calls and again.retry is not None
    clock[0] += rec.RETRY_SECONDS  # Kopf's retry, after the delay: it works now
    later = await r.reconcile(owner(SPEC, status=kube.status), kube.live())
    assert later.created == ["Service rr"] and later.retry is None


async def test_the_managed_redis_password_is_generated_once_before_redis_starts() -> None:
    kube = FakeKube()
    r = reconciler(kube)
    body = owner({"model": {"id": "m"}, "cache": {"redis": {"managed": {"enabled": True}}}})
    await r.reconcile(body, {})
    writes = kube.writes()
    created = writes.index(("create", "Secret/rr-redis-auth"))
    assert created < writes.index(("apply", "Deployment/rr-redis"))
    secret = kube.secrets[("Secret", "rr-redis-auth")]
    password = secret["stringData"]["password"]
    assert len(password) >= 32 and secret["metadata"]["ownerReferences"][0]["uid"] == "u-1"
    # Idle: nothing written, the Secret not even asked for.
    kube.calls.clear()
    await r.reconcile(body, kube.live())
    assert kube.writes() == []
    # The Redis Deployment deleted (or the operator restarted and it drifted): it is applied
    # again and the Secret asked for again, which keeps the existing password.
    live = kube.live()
    del live[("Deployment", "rr-redis")]
    kube.objects.pop(("Deployment", "rr-redis"))
    await r.reconcile(body, live)
    assert ("create", "Secret/rr-redis-auth") in kube.writes()
    assert kube.secrets[("Secret", "rr-redis-auth")]["stringData"]["password"] == password
    # No managed Redis, no Secret asked for.
    kube2 = FakeKube()
    await reconciler(kube2).reconcile(owner({"model": {"id": "m"}}), {})
    assert not [c for c in kube2.calls if c[0] == "create"]


# --- ownership: the operator never takes over what it does not own ----------------------------

def foreign(kind: str, name: str, **fields: Any) -> dict[str, Any]:
    """An object someone else created (no owner reference), as the API server stores it."""
    api_version = {"Service": "v1", "ConfigMap": "v1", "Secret": "v1"}.get(kind, "apps/v1")
    return {"apiVersion": api_version, "kind": kind,
            "metadata": {"name": name, "namespace": "ns", "resourceVersion": "7",
                         "uid": f"theirs-{kind}"}, **fields}


def condition(kube: FakeKube, type_: str) -> dict[str, Any]:
    return next(c for c in kube.status["conditions"] if c["type"] == type_)


async def test_a_name_held_by_someone_elses_object_is_reported_not_taken_over(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from reranker_operator import reconcile as rec

    clock = [1000.0]
    monkeypatch.setattr(rec.time, "monotonic", lambda: clock[0])
    kube = FakeKube()
    theirs_svc = foreign("Service", "rr", spec={"selector": {"app": "frontend"},
                                                "ports": [{"port": 80}]})
    theirs_cm = foreign("ConfigMap", "rr-config", data={"RERANKER_DEVICE": "cuda"})
    kube.objects[("Service", "rr")] = copy.deepcopy(theirs_svc)
    kube.objects[("ConfigMap", "rr-config")] = copy.deepcopy(theirs_cm)
    r = reconciler(kube)
    outcome = await r.reconcile(owner(SPEC), kube.live())

    # Untouched: neither applied nor adopted.
    assert kube.objects[("Service", "rr")] == theirs_svc
    assert kube.objects[("ConfigMap", "rr-config")] == theirs_cm
    assert ("apply", "Service/rr") not in kube.calls
    assert ("apply", "ConfigMap/rr-config") not in kube.calls
    # The pods would read their ConfigMap: no Deployment either. The rest is created.
    assert ("Deployment", "rr") not in kube.objects
    assert sorted(outcome.created) == ["HorizontalPodAutoscaler rr", "PodDisruptionBudget rr"]
    ready = condition(kube, "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "NameConflict")
    degraded = condition(kube, "Degraded")
    assert degraded["status"] == "True" and degraded["reason"] == "NameConflict"
    assert "Service rr already exists and has no controller" in degraded["message"]
    assert "ConfigMap rr-config already exists" in degraded["message"]
    assert outcome.retry is not None and outcome.retry_delay == CONFLICT_RETRY_SECONDS
    assert outcome.permanent is None

    # Other events before the retry is due ask nothing and write nothing.
    kube.calls.clear()
    clock[0] += 5
    again = await r.reconcile(owner(SPEC, status=kube.status), kube.live())
    assert kube.calls == [] and again.retry is not None
    assert again.retry_delay == CONFLICT_RETRY_SECONDS - 5
    assert [p.reason for p in again.problems] == ["NameConflict", "NameConflict"]

    # Once their Service is gone, the next retry creates the operator's; the ConfigMap is
    # still theirs, so still no Deployment.
    del kube.objects[("Service", "rr")]
    clock[0] += CONFLICT_RETRY_SECONDS
    later = await r.reconcile(owner(SPEC, status=kube.status), kube.live())
    assert later.created == ["Service rr"]
    assert kube.objects[("Service", "rr")]["spec"]["selector"] == manifests.selector_labels("rr")
    assert kube.objects[("ConfigMap", "rr-config")] == theirs_cm
    assert ("Deployment", "rr") not in kube.objects
    assert condition(kube, "Ready")["reason"] == "NameConflict"


async def test_an_own_child_missing_from_the_indices_is_taken_back() -> None:
    # Someone removed the managed-by label: the watch no longer shows the object, but its
    # controller reference says whose it is.
    kube = FakeKube()
    r = reconciler(kube)
    await r.reconcile(owner(SPEC), {})
    live = kube.live()
    del live[("Service", "rr")]
    r.child_deleted("u-1", "Service", "rr")
    kube.objects[("Service", "rr")]["metadata"]["labels"].pop("app.kubernetes.io/managed-by")
    kube.calls.clear()
    kube.forced.clear()
    outcome = await r.reconcile(owner(SPEC, status=kube.status), live)
    assert kube.calls[:2] == [("get", "Service/rr"), ("apply", "Service/rr")]
    assert kube.forced == [True] and outcome.updated == ["Service rr"]
    assert kube.objects[("Service", "rr")]["metadata"]["labels"][
        "app.kubernetes.io/managed-by"] == "reranker-operator"


async def test_a_child_of_an_earlier_resource_with_the_same_name_is_not_taken_over() -> None:
    # A RerankerDeployment deleted and created again under its name: until garbage
    # collection removes the old children, they are the old one's.
    kube = FakeKube()
    await reconciler(kube).reconcile(owner(SPEC), {})
    reborn = owner(SPEC)
    reborn["metadata"]["uid"] = "u-2"
    kube.calls.clear()
    outcome = await reconciler(kube).reconcile(reborn, kube.live())
    assert [c for c in kube.calls if c[0] != "status"] == []
    assert {p.reason for p in outcome.problems} == {"NameConflict"}
    assert "is controlled by RerankerDeployment rr (uid u-1)" in outcome.problems[0].message
    assert kube.objects[("Deployment", "rr")]["metadata"]["ownerReferences"][0]["uid"] == "u-1"


async def test_someone_elses_redis_secret_is_given_to_no_pod() -> None:
    kube = FakeKube()
    kube.secrets[("Secret", "rr-redis-auth")] = foreign("Secret", "rr-redis-auth")
    spec = {"model": {"id": "m"}, "cache": {"redis": {"managed": {"enabled": True}}}}
    outcome = await reconciler(kube).reconcile(owner(spec), {})
    # Both Deployments would read it (REDIS_PASSWORD): neither is created; the rest is.
    assert ("Deployment", "rr-redis") not in kube.objects
    assert ("Deployment", "rr") not in kube.objects
    assert ("Service", "rr-redis") in kube.objects and ("ConfigMap", "rr-config") in kube.objects
    ready = condition(kube, "Ready")
    assert ready["reason"] == "NameConflict"
    assert "Secret rr-redis-auth already exists" in ready["message"]
    assert outcome.retry_delay == CONFLICT_RETRY_SECONDS


async def test_the_operators_own_redis_secret_is_recognised_after_a_restart() -> None:
    kube = FakeKube()
    spec = {"model": {"id": "m"}, "cache": {"redis": {"managed": {"enabled": True}}}}
    await reconciler(kube).reconcile(owner(spec), {})
    password = kube.secrets[("Secret", "rr-redis-auth")]["stringData"]["password"]
    # A restarted operator finds the Redis Deployment deleted: the server Deployment it
    # controls reads the Secret, so the Secret is its own (created by an earlier pass).
    kube.objects.pop(("Deployment", "rr-redis"))
    outcome = await reconciler(kube).reconcile(owner(spec, status=kube.status), kube.live())
    assert outcome.created == ["Deployment rr-redis"] and not outcome.problems
    assert kube.secrets[("Secret", "rr-redis-auth")]["stringData"]["password"] == password

"""Scale to zero's idleness decision (pure: times in, decision out), the activity tracker, the
pods' starts, the status at 0 replicas, and one Scaler pass.

The real API server's side (the scale subresource, its precondition, RBAC, the HPA controller
at 0) is tests/kube/test_scale_to_zero_cluster.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Mapping
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from reranker_operator import scale_to_zero as stz
from reranker_operator import status
from reranker_operator.scale_to_zero import PodStart, decide

NOW = 1_000_000.0
IDLE = 300.0


def pods(*specs: tuple[str, bool, float]) -> list[PodStart]:
    return [PodStart(pod=name, ready=ready, started_at=NOW - ago) for name, ready, ago in specs]


# --- the decision ---------------------------------------------------------------------------

def test_idle_when_nothing_happened_for_idle_seconds() -> None:
    d = decide(now=NOW, idle_seconds=IDLE, woken_at=NOW - 900,
               pods=pods(("a", True, 1000), ("b", True, 1000)),
               active_at={"a": NOW - 301, "b": None})
    assert d.idle and "idle for 301s" in d.reason and d.last_active == NOW - 301


@pytest.mark.parametrize(("what", "kwargs"), [
    ("a request 10 s ago", dict(active_at={"a": NOW - 10})),
    ("a request just under idleSeconds ago", dict(active_at={"a": NOW - IDLE + 1})),
    ("a pod started 60 s ago", dict(pods=pods(("a", True, 1000), ("b", False, 60)))),
    ("a wake 100 s ago", dict(woken_at=NOW - 100)),
])
def test_anything_within_idle_seconds_keeps_the_fleet_up(what: str,
                                                         kwargs: dict[str, Any]) -> None:
    base: dict[str, Any] = dict(now=NOW, idle_seconds=IDLE, woken_at=NOW - 900,
                                pods=pods(("a", True, 1000)), active_at={"a": NOW - 900})
    d = decide(**{**base, **kwargs})
    assert not d.idle, what


def test_a_ready_pod_whose_activity_is_unknown_keeps_the_fleet_up() -> None:
    # Unknown is busy: no answer from pod b (or an old server without `activity`).
    d = decide(now=NOW, idle_seconds=IDLE, woken_at=None,
               pods=pods(("a", True, 1000), ("b", True, 1000)), active_at={"a": NOW - 900})
    assert not d.idle and d.reason == "cannot read the activity of pod b"


def test_pods_that_are_not_ready_count_only_by_their_start() -> None:
    # A pod Pending for longer than idleSeconds serves nothing (the Service lists Ready pods).
    d = decide(now=NOW, idle_seconds=IDLE, woken_at=None, pods=pods(("a", False, 400)),
               active_at={})
    assert d.idle
    assert not decide(now=NOW, idle_seconds=IDLE, woken_at=None, pods=pods(("a", False, 200)),
                      active_at={}).idle


def test_a_new_fleet_whose_pods_do_not_exist_yet_is_not_idle() -> None:
    kw: dict[str, Any] = dict(now=NOW, idle_seconds=IDLE, woken_at=None, pods=[], active_at={})
    assert not decide(created_at=NOW - 2, **kw).idle
    assert decide(created_at=NOW - 400, **kw).idle


def test_an_old_wake_does_not_hold_and_a_new_one_does() -> None:
    kw: dict[str, Any] = dict(now=NOW, idle_seconds=IDLE, pods=pods(("a", True, 1000)),
                              active_at={"a": None})
    assert decide(woken_at=NOW - 301, **kw).idle
    assert not decide(woken_at=NOW - 299, **kw).idle


# --- activity as the pods report it --------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Reading:
    pod: str
    body: Mapping[str, Any]
    at: float


def health(pod: str, requests: int, last: float | None, at: float = NOW) -> Reading:
    return Reading(pod, {"status": "ok", "activity": {"requests": requests,
                                                      "last_request_at": last}}, at)


def test_tracker_uses_the_pods_last_request_and_the_operators_view_of_a_change() -> None:
    t = stz.ActivityTracker()
    # First answer: the pod's own clock (an operator restart adds no idle time).
    assert t.active_at("ns", "f", [health("a", 5, NOW - 500)], now=NOW) == {"a": NOW - 500}
    # The count moved but the pod's clock lags (says 400 s ago): the operator saw it now.
    assert t.active_at("ns", "f", [health("a", 6, NOW - 400, at=NOW + 5)],
                       now=NOW + 5) == {"a": NOW + 5}
    # Nothing moved since: the remembered change stays the latest.
    assert t.active_at("ns", "f", [health("a", 6, NOW - 400, at=NOW + 10)],
                       now=NOW + 10) == {"a": NOW + 5}


def test_tracker_leaves_out_stale_and_activity_less_answers() -> None:
    t = stz.ActivityTracker()
    old_server = Reading("b", {"status": "ok"}, NOW)
    stale = health("c", 1, NOW - 10, at=NOW - stz.FRESH_SECONDS - 1)
    never = health("d", 0, None)
    assert t.active_at("ns", "f", [old_server, stale, never], now=NOW) == {"d": None}


def test_pod_start_is_the_later_of_creation_and_becoming_ready() -> None:
    pod = {"metadata": {"name": "p", "namespace": "ns", "creationTimestamp": "2024-01-01T00:00:00Z",
                        "labels": {"app.kubernetes.io/instance": "fleet"}},
           "status": {"conditions": [{"type": "Ready", "status": "True",
                                      "lastTransitionTime": "2024-01-01T00:02:00Z"}]}}
    fleet, start = stz.pod_start(pod) or ("", None)
    assert fleet == "fleet" and start == PodStart("p", True, 1704067320.0)
    pod["status"] = {"phase": "Pending"}
    assert stz.pod_start(pod) == ("fleet", PodStart("p", False, 1704067200.0))
    assert stz.parse_time("2024-01-01T00:00:00.5Z") == 1704067200.5
    assert stz.parse_time("yesterday") is None


# --- the status at 0 replicas --------------------------------------------------------------

def _status(replicas: int, at: str | None, current: dict[str, Any] | None = None
            ) -> dict[str, Any]:
    owner = {"metadata": {"name": "rr", "namespace": "ns", "generation": 2},
             "spec": {"replicas": replicas}, "status": current or {}}
    dep = {"metadata": {"generation": 1},
           "status": {"observedGeneration": 1, "replicas": replicas, "readyReplicas": replicas,
                      "updatedReplicas": replicas, "availableReplicas": replicas}}
    return status.build(owner, deployment=dep, problems=[], config_hash="h", service_port=8000,
                        now="2024-01-01T00:00:00Z", scaled_to_zero_at=at)


def test_a_fleet_scaled_to_zero_says_why_and_reports_no_error() -> None:
    st = _status(0, "2024-01-01T00:10:00Z")
    conds = {c["type"]: c for c in st["conditions"]}
    assert st["scaledToZeroAt"] == "2024-01-01T00:10:00Z"
    for type_ in ("Ready", "Available"):
        assert (conds[type_]["status"], conds[type_]["reason"]) == ("False", "ScaledToZero")
        assert "scaled to zero at 2024-01-01T00:10:00Z" in conds[type_]["message"]
    assert conds["Degraded"]["status"] == "False"
    assert conds["Progressing"]["status"] == "False"
    # Kept while at 0 (a restarted operator has no memory of it); gone once woken.
    assert _status(0, None, current=st)["scaledToZeroAt"] == "2024-01-01T00:10:00Z"
    assert "scaledToZeroAt" not in _status(1, None, current=st)
    # Asked for 0 by hand: no idle time claimed.
    plain = {c["type"]: c for c in _status(0, None)["conditions"]}
    assert plain["Available"]["reason"] == "ScaledToZero"
    assert plain["Available"]["message"] == "spec.replicas is 0: no server pods"


# --- one Scaler pass -----------------------------------------------------------------------

class ScaleRecorder:
    """Stands in for `Kube.patch_scale` only: the API server's side of it is tested for real in
    tests/kube/test_scale_to_zero_cluster.py; here the pass's choices are checked."""

    def __init__(self, error: ApiException | None = None) -> None:
        self.calls: list[tuple[str, str, int, str | None]] = []
        self.error = error

    def patch_scale(self, namespace: str, name: str, replicas: int, *,
                    resource_version: str | None = None) -> None:
        self.calls.append((namespace, name, replicas, resource_version))
        if self.error is not None:
            raise self.error


def owner(**spec: Any) -> dict[str, Any]:
    return {"metadata": {"name": "f", "namespace": "ns", "uid": "u1", "resourceVersion": "42",
                         "annotations": {}},
            "spec": {"model": {"id": "m"}, "replicas": 1, **spec}}


def run_pass(kube: ScaleRecorder, body: dict[str, Any], starts: list[PodStart],
             readings: list[Reading]) -> tuple[bool, list[tuple[str, str]]]:
    scaled: list[tuple[str, str]] = []
    scaler = stz.Scaler(kube, health=lambda ns, name: readings,  # type: ignore[arg-type]
                        on_scaled=lambda uid, at: scaled.append((uid, at)), clock=lambda: NOW)
    done = asyncio.run(scaler.consider(body, starts))
    return done, scaled


def test_an_idle_fleet_is_scaled_to_zero_on_condition_that_nothing_changed() -> None:
    kube = ScaleRecorder()
    done, scaled = run_pass(kube, owner(scaleToZero={"idleSeconds": 300}),
                            pods(("a", True, 1000)), [health("a", 3, NOW - 400)])
    assert done and kube.calls == [("ns", "f", 0, "42")]
    assert scaled == [("u1", stz.format_time(NOW))]


@pytest.mark.parametrize(("body", "readings"), [
    (owner(), [health("a", 3, NOW - 400)]),  # no spec.scaleToZero
    (owner(scaleToZero={"idleSeconds": 300}, replicas=0), []),  # already at 0
    (owner(scaleToZero={"idleSeconds": 300}), []),  # pod a is Ready but unread
    (owner(scaleToZero={"idleSeconds": 300}), [health("a", 3, NOW - 30)]),  # busy
])
def test_no_write_unless_asked_for_and_known_to_be_idle(body: dict[str, Any],
                                                       readings: list[Reading]) -> None:
    kube = ScaleRecorder()
    done, scaled = run_pass(kube, body, pods(("a", True, 1000)), readings)
    assert not done and kube.calls == [] and scaled == []


def test_nothing_is_judged_before_the_indices_are_filled() -> None:
    """Right after a restart a fleet's pods may not be indexed yet: it would look podless."""
    kube = ScaleRecorder()
    scaler = stz.Scaler(kube, health=lambda ns, name: (),  # type: ignore[arg-type]
                        on_scaled=lambda uid, at: None, clock=lambda: NOW, period=0.01)
    body = owner(scaleToZero={"idleSeconds": 300})
    body["metadata"]["creationTimestamp"] = "1970-01-01T00:00:00Z"  # long before NOW
    index = {("ns", "f"): [body]}

    async def scenario() -> list[Any]:
        indexed = asyncio.Event()
        task = asyncio.create_task(scaler.run(lambda: (index, {}), indexed=indexed))
        await asyncio.sleep(0.05)
        before = list(kube.calls)
        indexed.set()
        await asyncio.sleep(0.05)
        task.cancel()
        return before

    assert asyncio.run(scenario()) == []
    assert kube.calls[0] == ("ns", "f", 0, "42")  # podless and old: idle once indexed


def test_a_wake_that_landed_meanwhile_wins() -> None:
    # The precondition failed (409): the fleet stays up and nothing is recorded.
    kube = ScaleRecorder(ApiException(status=409, reason="Conflict"))
    done, scaled = run_pass(kube, owner(scaleToZero={"idleSeconds": 300}),
                            pods(("a", True, 1000)), [health("a", 3, NOW - 400)])
    assert not done and len(kube.calls) == 1 and scaled == []


# --- the server's side of the contract ------------------------------------------------------

def test_a_real_servers_health_activity_is_read_as_the_server_means_it() -> None:
    """The server (its app through the lifespan, the embedded model) reports `activity` in
    /health; the tracker reads it: never served, then served just now (busy)."""
    import time

    from servers import running_app

    async def scenario() -> tuple[dict[str, Any], dict[str, Any]]:
        async with running_app() as client:
            before = (await client.get("/health")).json()
            r = await client.post("/rerank", json={"query": "q", "documents": ["a", "b"]})
            assert r.status_code == 200, r.text
            return before, (await client.get("/health")).json()

    before, after = asyncio.run(scenario())
    now = time.time()
    t = stz.ActivityTracker()
    assert t.active_at("ns", "f", [Reading("p", before, now)], now=now) == {"p": None}
    active = t.active_at("ns", "f", [Reading("p", after, now)], now=now)
    assert after["activity"]["requests"] == before["activity"]["requests"] + 1
    assert now - 60 < (active["p"] or 0) <= now
    d = decide(now=now, idle_seconds=30, woken_at=None,
               pods=[PodStart("p", True, now - 3600)], active_at=active)
    assert not d.idle and "pod p answered a request" in d.reason


def test_crd_bounds_and_default_are_the_operators() -> None:
    from pathlib import Path

    import yaml

    from reranker_operator import spec as specmod

    crd = yaml.safe_load((Path(__file__).resolve().parents[2] / "crds" /
                          "rerankerdeployments.reranker.dev.yaml").read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]
    idle = schema["spec"]["properties"]["scaleToZero"]["properties"]["idleSeconds"]
    assert (idle["minimum"], idle["maximum"], idle["default"]) == (
        specmod.MIN_IDLE_SECONDS, specmod.MAX_IDLE_SECONDS, specmod.ScaleToZero.idle_seconds)
    assert schema["status"]["properties"]["scaledToZeroAt"]["format"] == "date-time"
    assert specmod.parse({"model": {"id": "m"}, "scaleToZero": {}}).scale_to_zero == \
        specmod.ScaleToZero(idle_seconds=300)
    assert specmod.parse({"model": {"id": "m"}}).scale_to_zero is None
    with pytest.raises(specmod.InvalidSpec, match="between 30 and 86400"):
        specmod.parse({"model": {"id": "m"}, "scaleToZero": {"idleSeconds": 29}})

"""spec.scaleToZero on a real control plane: the operator (a real subprocess, with exactly
operator/rbac/'s rules) takes an idle fleet to 0 through the scale subresource, a wake as the
gateway writes it (the `reranker.dev/woken-at` annotation + replicas 1) holds for idleSeconds,
and the HPA controller of the real kube-controller-manager leaves a target at 0 alone.

This control plane has no node, so no server pod ever runs and none is Ready: the idle fleet is
idle because its pods never served (only their starts count), and no /health activity is
stubbed. The fail-safe case needs a Ready pod whose activity cannot be read: a pod's status is
patched to Ready with an address where nothing answers (192.0.2.1, TEST-NET-1), which is what
the operator would see of a server it cannot reach. Activity that moves (requests answered) is
covered by the unit tests (tests/operator/test_scale_to_zero.py).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from operator_process import Operator

REPO = Path(__file__).resolve().parents[2]
CRD = REPO / "crds" / "rerankerdeployments.reranker.dev.yaml"
IDLE = 30  # the CRD's minimum


def rrd(name: str, **spec: Any) -> str:
    return json.dumps({"apiVersion": "reranker.dev/v1alpha1", "kind": "RerankerDeployment",
                       "metadata": {"name": name},
                       "spec": {"model": {"id": "cross-encoder/ms-marco-MiniLM-L-6-v2"},
                                "scaleToZero": {"idleSeconds": IDLE}, **spec}})


def conditions(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in (obj.get("status") or {}).get("conditions") or ()}


def test_idle_fleet_goes_to_zero_a_wake_holds_and_the_hpa_stays_out(
        operator: Operator, kube_cluster: Any, kube_namespace: str) -> None:
    ns = kube_namespace
    kube = kube_cluster

    def rd(name: str) -> dict[str, Any]:
        return dict(kube.get_json("rrd", name, "-n", ns))

    def replicas(name: str) -> int:
        return int(rd(name)["spec"]["replicas"])

    created = time.time()
    kube.apply(rrd("idle", autoscaling={"enabled": True, "minReplicas": 1, "maxReplicas": 3}),
               namespace=ns)
    kube.apply(rrd("unread"), namespace=ns)
    # The fail-safe fleet: its pod is Ready (as if a kubelet said so) at an address where no
    # server answers, so its activity is unknown.
    pod = kube.eventually(lambda: kube.get_json("pods", "-n", ns, "-l",
                                                "app.kubernetes.io/instance=unread")["items"],
                          timeout=30, desc="the unread fleet's pod")[0]["metadata"]["name"]
    long_ago = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(created - 3600))
    kube.kubectl("patch", "pod", pod, "-n", ns, "--subresource=status", "--type=merge", "-p",
                 json.dumps({"status": {"podIP": "192.0.2.1", "podIPs": [{"ip": "192.0.2.1"}],
                                        "conditions": [{"type": "Ready", "status": "True",
                                                        "lastTransitionTime": long_ago}]}}))

    # Idle: its pods never served and were created idleSeconds ago -> 0, not earlier.
    kube.eventually(lambda: replicas("idle") == 0, timeout=IDLE + 30, interval=0.5,
                    desc="the idle fleet at 0 replicas")
    went = time.time() - created
    print(f"idle fleet scaled to 0 after {went:.1f}s (idleSeconds {IDLE})")
    assert went >= IDLE - 1
    kube.eventually(lambda: kube.get_json("deployment", "idle", "-n", ns)["spec"]["replicas"] == 0,
                    timeout=10, desc="Deployment at 0")
    body = kube.eventually(lambda: (b := rd("idle")).get("status", {}).get("scaledToZeroAt") and b,
                           timeout=10, desc="status.scaledToZeroAt")
    c = conditions(body)
    assert (c["Available"]["status"], c["Available"]["reason"]) == ("False", "ScaledToZero")
    assert (c["Ready"]["status"], c["Ready"]["reason"]) == ("False", "ScaledToZero")
    assert c["Degraded"]["status"] == "False", c["Degraded"]
    assert "scale to zero: {}/idle scaled to 0 replicas: idle for".format(ns) in operator.log(
        current=True)

    # Unknown is busy: the Ready pod whose /health nobody answers keeps its fleet up.
    assert replicas("unread") == 1
    assert "cannot read the activity of pod " + pod in operator.log(current=True)

    # The HPA controller (a real kube-controller-manager, syncing every 5 s) leaves a target
    # at 0 replicas alone: ScalingActive False, ScalingDisabled, and minReplicas 1 is not applied.
    def hpa_condition() -> dict[str, Any] | None:
        hpa = kube.get_json("hpa", "idle", "-n", ns)
        return next((x for x in (hpa.get("status") or {}).get("conditions") or ()
                     if x["type"] == "ScalingActive"), None)

    cond = kube.eventually(lambda: (x := hpa_condition()) and x["reason"] == "ScalingDisabled"
                           and x, timeout=30, desc="HPA ScalingActive=False ScalingDisabled")
    print(f"HPA at 0: {cond}")
    assert cond["status"] == "False"
    time.sleep(12)  # two more HPA syncs
    assert replicas("idle") == 0

    # A wake, as the gateway writes it: the annotation, then 1 replica through /scale.
    woken = time.time()
    kube.kubectl("annotate", "rrd", "idle", "-n", ns, "--overwrite",
                 "reranker.dev/woken-at=" + time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                          time.gmtime(woken)))
    kube.kubectl("scale", "rrd", "idle", "-n", ns, "--replicas=1")
    # The HPA takes over again from 1 (no metrics here, so it says why it cannot scale).
    kube.eventually(lambda: (x := hpa_condition()) and x["reason"] != "ScalingDisabled",
                    timeout=30, desc="HPA acting again at 1 replica")
    assert "scaledToZeroAt" not in kube.eventually(
        lambda: (b := rd("idle"))["status"].get("scaledToZeroAt") is None and b["status"],
        timeout=10, desc="scaledToZeroAt cleared")
    # Held for idleSeconds after the wake, then idle again.
    while time.time() - woken < IDLE - 3:
        assert replicas("idle") == 1, f"scaled down {time.time() - woken:.1f}s after a wake"
        time.sleep(1)
    kube.eventually(lambda: replicas("idle") == 0, timeout=40, interval=0.5,
                    desc="the woken fleet idle again")
    again = time.time() - woken
    print(f"woken fleet back at 0 after {again:.1f}s")
    assert again >= IDLE - 1
    assert replicas("unread") == 1


def test_a_scale_write_with_an_old_resource_version_is_refused(
        kube_cluster: Any, kube_namespace: str) -> None:
    """The precondition the operator's write carries: a wake that landed after its view wins."""
    kube_cluster.install_crd(CRD, "rerankerdeployments.reranker.dev")
    ns = kube_namespace
    kube_cluster.apply(rrd("raced"), namespace=ns)
    seen = kube_cluster.get_json("rrd", "raced", "-n", ns)["metadata"]["resourceVersion"]
    kube_cluster.kubectl("annotate", "rrd", "raced", "-n", ns,
                         "reranker.dev/woken-at=2030-01-01T00:00:00Z")  # the wake, meanwhile
    r = kube_cluster.kubectl("patch", "rrd", "raced", "-n", ns, "--subresource=scale",
                             "--type=merge", "-p", json.dumps(
                                 {"metadata": {"resourceVersion": seen},
                                  "spec": {"replicas": 0}}), check=False)
    assert r.returncode != 0 and "the object has been modified" in r.stderr, r.stderr
    assert kube_cluster.get_json("rrd", "raced", "-n", ns)["spec"]["replicas"] == 1

"""When does the operator write a child? Only when the desired manifest changed or someone
changed a field the operator sets; never because the API server normalised or added fields."""

from __future__ import annotations

import copy
from typing import Any

from reranker_operator import drift, manifests
from reranker_operator.spec import parse

DEFAULTS = manifests.Defaults(server_image="img:1", redis_image="redis:1")


def desired_deployment(spec: dict[str, Any] | None = None) -> dict[str, Any]:
    spec = spec or {"model": {"id": "m"}, "resources": {"requests": {"cpu": "0.5",
                                                                     "memory": "1024Mi"}}}
    owner = {"apiVersion": "reranker.dev/v1alpha1", "kind": "RerankerDeployment",
             "metadata": {"name": "rr", "namespace": "ns", "uid": "u1"}, "spec": spec}
    objs = manifests.children(owner, parse(spec), DEFAULTS)
    return drift.stamp(next(o for o in objs if o["kind"] == "Deployment"))


def as_stored(desired: dict[str, Any]) -> dict[str, Any]:
    """Roughly what the API server returns: defaults added, quantities canonical, empty
    values dropped."""
    live = copy.deepcopy(desired)
    live["metadata"].update(resourceVersion="42", uid="child", generation=1,
                            creationTimestamp="2024-01-01T00:00:00Z", managedFields=[])
    live["status"] = {"replicas": 1}
    pod = live["spec"]["template"]["spec"]
    pod.update(restartPolicy="Always", dnsPolicy="ClusterFirst", schedulerName="default")
    c = pod["containers"][0]
    c.update(terminationMessagePath="/dev/termination-log", imagePullPolicy="IfNotPresent")
    c["livenessProbe"]["httpGet"]["scheme"] = "HTTP"
    c["livenessProbe"]["successThreshold"] = 1
    c["resources"]["requests"] = {"cpu": "500m", "memory": "1Gi"}
    for volume in pod["volumes"]:
        if volume.get("emptyDir") == {}:
            volume["emptyDir"] = {}
    return live


def test_absent_child_needs_apply() -> None:
    assert drift.needs_apply(desired_deployment(), None)


def test_stored_copy_needs_no_apply() -> None:
    desired = desired_deployment()
    assert not drift.needs_apply(desired, as_stored(desired))


def test_edited_field_needs_apply() -> None:
    desired = desired_deployment()
    live = as_stored(desired)
    live["spec"]["replicas"] = 5
    assert drift.needs_apply(desired, live)
    live = as_stored(desired)
    live["spec"]["template"]["spec"]["containers"][0]["image"] = "evil:1"
    assert drift.needs_apply(desired, live)
    live = as_stored(desired)
    live["spec"]["template"]["spec"]["containers"][0]["env"].pop()
    assert drift.needs_apply(desired, live)
    live = as_stored(desired)
    live["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]["cpu"] = "2"
    assert drift.needs_apply(desired, live)


def test_spec_change_needs_apply_even_when_only_a_field_is_removed() -> None:
    with_selector = desired_deployment({"model": {"id": "m"}, "nodeSelector": {"a": "b"}})
    without = desired_deployment({"model": {"id": "m"}})
    # The live object still holds the old field: containment alone would miss the removal.
    assert drift.contained(without, as_stored(with_selector)) is False  # hash annotation differs
    live = as_stored(with_selector)
    assert drift.needs_apply(without, live)


def test_other_owners_and_labels_are_tolerated() -> None:
    desired = desired_deployment()
    live = as_stored(desired)
    live["metadata"]["ownerReferences"].append({"apiVersion": "v1", "kind": "X", "name": "x",
                                                "uid": "other"})
    live["metadata"]["labels"]["added-by"] = "someone"
    assert not drift.needs_apply(desired, live)


def test_empty_values_equal_absent() -> None:
    assert drift.contained({"a": {}, "b": [], "c": "", "d": None, "e": False}, {})
    assert not drift.contained({"a": 0}, {})
    assert drift.contained({"emptyDir": {}}, {"emptyDir": {}})


def test_quantities_compare_by_value_only_where_the_api_has_quantities() -> None:
    assert drift.contained({"limits": {"memory": "1024Mi"}}, {"limits": {"memory": "1Gi"}})
    assert drift.contained({"averageValue": "1000m"}, {"averageValue": "1"})
    assert not drift.contained({"limits": {"memory": "1Gi"}}, {"limits": {"memory": "2Gi"}})
    assert not drift.contained({"value": "1000m"}, {"value": "1"})  # env values are strings


def test_list_lengths_must_match() -> None:
    assert not drift.contained({"args": ["a"]}, {"args": ["a", "b"]})
    assert drift.contained({"args": ["a", "b"]}, {"args": ["a", "b"]})


def test_stamp_is_stable_and_ignores_its_own_annotation() -> None:
    d1, d2 = desired_deployment(), desired_deployment()
    assert d1 == d2
    h = d1["metadata"]["annotations"][drift.ANNOTATION_APPLIED_HASH]
    assert drift.applied_hash(d1) == h
    assert drift.stamp(d1) == d1

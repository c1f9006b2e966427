"""The chart's gateway (`gateway.*` values), statically: what it renders, that each value
reaches the gateway's own settings class, and that its rules are exactly what the Kubernetes
directory needs, cluster-wide or per namespace. (Lint and the Kubernetes schemas cover it
through helm_render.EVERYTHING; tests/gateway/test_kube_directory.py runs the directory as
the ServiceAccount these rules bind; tests/e2e/test_gateway.py installs it on a real node.)
"""

from __future__ import annotations

from typing import Any

import pytest

from helm_render import objects, render

ON = {"gateway": {"enabled": True}}
NAME = "rel-reranker-operator-gateway"
RULES = [
    {"apiGroups": ["reranker.dev"], "resources": ["rerankerdeployments"],
     "verbs": ["get", "list", "watch", "patch"]},
    {"apiGroups": ["reranker.dev"], "resources": ["rerankerdeployments/scale"],
     "verbs": ["get", "patch"]},
    {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
     "verbs": ["get", "list", "watch"]},
]


def gateway_objects(values: dict[str, Any]) -> dict[tuple[str, str | None], dict[str, Any]]:
    """(kind, namespace) -> object, of the objects named like the gateway."""
    return {(d["kind"], d["metadata"].get("namespace")): d for d in objects(values)
            if d["metadata"]["name"] == NAME}


def container(values: dict[str, Any]) -> dict[str, Any]:
    dep = gateway_objects(values)[("Deployment", "reranker-system")]
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    return dict(c)


def env(values: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container(values)["env"]}


def test_the_gateway_is_off_by_default() -> None:
    assert gateway_objects({}) == {}
    assert "Gateway" not in next(v for k, v in render({}).items() if k.endswith("NOTES.txt"))


def test_two_locked_down_replicas_behind_a_service_and_a_pdb() -> None:
    objs = gateway_objects(ON)
    assert set(objs) == {("ServiceAccount", "reranker-system"), ("Service", "reranker-system"),
                         ("Deployment", "reranker-system"),
                         ("PodDisruptionBudget", "reranker-system"), ("ClusterRole", None),
                         ("ClusterRoleBinding", None)}
    dep = objs[("Deployment", "reranker-system")]
    assert dep["spec"]["replicas"] == 2
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pod = dep["spec"]["template"]["spec"]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert pod["serviceAccountName"] == NAME
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (c,) = pod["containers"]
    assert c["image"] == "reranker-fleet/gateway:dev"  # the operator image's tag
    assert c["command"] == ["reranker-gateway"]
    assert c["securityContext"] == {"allowPrivilegeEscalation": False,
                                    "readOnlyRootFilesystem": True,
                                    "capabilities": {"drop": ["ALL"]}}
    assert c["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
    assert c["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]

    selector = dep["spec"]["selector"]["matchLabels"]
    svc = objs[("Service", "reranker-system")]
    pdb = objs[("PodDisruptionBudget", "reranker-system")]
    assert svc["spec"]["selector"] == selector == pdb["spec"]["selector"]["matchLabels"]
    assert svc["spec"]["ports"] == [{"name": "http", "port": 8000, "targetPort": "http",
                                     "protocol": "TCP"}]
    assert selector.items() <= labels.items()
    # the operator's selector never matches a gateway pod (kubectl logs deployment/OPERATOR)
    operator = next(d for d in objects(ON) if d["kind"] == "Deployment"
                    and d["metadata"]["name"] == "rel-reranker-operator")
    assert not operator["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_image_and_settings_reach_the_gateways_settings_class(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from reranker.gateway.settings import GatewaySettings

    values = {"gateway": {"enabled": True, "defaultModel": "mini", "holdTimeoutSeconds": 0,
                          "fanoutThreshold": 100, "fanoutMaxWidth": 3, "cacheAffinity": False,
                          "requestTimeoutSeconds": 30, "logLevel": "DEBUG",
                          "image": {"repository": "r.example/gateway", "tag": "1.2"},
                          "extraEnv": [{"name": "RERANKER_GATEWAY_MAX_RETRIES", "value": "1"}]}}
    assert container(values)["image"] == "r.example/gateway:1.2"
    rendered = env(values)
    for key, value in rendered.items():
        monkeypatch.setenv(key, value)
    s = GatewaySettings()
    assert (s.discovery, s.namespaces, s.default_model, s.hold_timeout_seconds) == (
        "kubernetes", "", "mini", 0)
    assert (s.fanout_threshold, s.fanout_max_width, s.affinity) == (100, 3, False)
    assert (s.request_timeout_seconds, s.log_level, s.max_retries, s.port) == (
        30, "DEBUG", 1, 8000)
    # unset values leave the gateway's own defaults
    assert set(env(ON)) == {"PORT", "RERANKER_GATEWAY_DISCOVERY", "RERANKER_GATEWAY_NAMESPACES"}
    digest = "sha256:" + "b" * 64
    assert container({"gateway": {"enabled": True, "image": {"digest": digest}}})[
        "image"] == f"reranker-fleet/gateway@{digest}"


def test_cluster_wide_rules_are_exactly_what_the_directory_needs() -> None:
    objs = gateway_objects(ON)
    assert objs[("ClusterRole", None)]["rules"] == RULES
    binding = objs[("ClusterRoleBinding", None)]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io",
                                  "kind": "ClusterRole", "name": NAME}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": NAME,
                                    "namespace": "reranker-system"}]
    assert env(ON)["RERANKER_GATEWAY_NAMESPACES"] == ""


@pytest.mark.parametrize("values, namespaces", [
    ({"gateway": {"enabled": True, "namespaces": ["search", "ranking"]}}, ["search", "ranking"]),
    # the operator's namespaces when the gateway names none
    ({"gateway": {"enabled": True}, "watchNamespaces": ["search"]}, ["search"]),
], ids=["gateway.namespaces", "watchNamespaces"])
def test_namespaced_rules_are_roles_in_those_namespaces_only(
        values: dict[str, Any], namespaces: list[str]) -> None:
    objs = gateway_objects(values)
    assert ("ClusterRole", None) not in objs and ("ClusterRoleBinding", None) not in objs
    assert sorted(str(ns) for kind, ns in objs if kind == "Role") == sorted(namespaces)
    for ns in namespaces:
        assert objs[("Role", ns)]["rules"] == RULES
        assert objs[("RoleBinding", ns)]["subjects"] == [
            {"kind": "ServiceAccount", "name": NAME, "namespace": "reranker-system"}]
    assert env(values)["RERANKER_GATEWAY_NAMESPACES"] == ",".join(namespaces)


def test_notes_give_the_gateways_url() -> None:
    text = next(v for k, v in render(ON).items() if k.endswith("NOTES.txt"))
    assert f"http://{NAME}.reranker-system.svc:8000" in text
    assert "in the cluster" in text

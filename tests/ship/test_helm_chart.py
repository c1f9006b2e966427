"""The Helm chart, statically: `helm lint` and `helm template` through Helm's own Go SDK
(helm-python-sdk), the rendered objects against the Kubernetes OpenAPI schemas of every version
the chart claims (kubernetes-validate, strict), and the copies the chart ships (CRDs, RBAC
rules, dashboards, alert and adapter rules) against their single sources in the repository.

Installing the chart into a real control plane is tests/kube/test_chart.py.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from helm_render import CHART, EVERYTHING, REPO, VALUE_SETS, notes, notes_sample, objects, render

#: The Kubernetes versions the chart claims (Chart.yaml kubeVersion >=1.30) that
#: kubernetes-validate has schemas for (1.30 to 1.37 with kubernetes-validate 1.37).
KUBE_VERSIONS = tuple(sorted({v for v in kubernetes_validate.utils.all_versions()
                              if tuple(map(int, v.split(".")[:2])) >= (1, 30)},
                             key=lambda v: tuple(map(int, v.split(".")))))

#: Kinds kubernetes-validate has no schema for (custom resources of other projects, and Kopf's
#: peering objects): rendered, parsed, and checked by the assertions below, but not by schema.
NOT_IN_SCHEMAS = {("monitoring.coreos.com/v1", "ServiceMonitor"),
                  ("monitoring.coreos.com/v1", "PrometheusRule"),
                  ("kopf.dev/v1", "ClusterKopfPeering"),
                  ("kopf.dev/v1", "KopfPeering")}

#: Files the chart ships that must stay identical to their source in the repository
#: (a chart cannot read files outside its own directory, so it carries copies).
COPIES = {
    "files/crds": REPO / "crds",
    "files/rbac/cluster_role.yaml": REPO / "operator" / "rbac" / "cluster_role.yaml",
    "files/dashboards": REPO / "dashboards",
    "files/macs/admission.yaml": REPO / "deploy" / "mac" / "admission.yaml",
    "files/prometheus/reranker-rules.yaml": REPO / "deploy" / "prometheus" / "reranker-rules.yaml",
    "files/prometheus/prometheus-adapter-values.yaml":
        REPO / "deploy" / "prometheus" / "prometheus-adapter-values.yaml",
}


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = by_kind(docs, kind)
    assert len(found) == 1, f"{len(found)} {kind} objects"
    return found[0]


# --- helm lint ------------------------------------------------------------------------------

@pytest.mark.parametrize("values_name", sorted(VALUE_SETS))
@pytest.mark.parametrize("kube_version", [KUBE_VERSIONS[0], KUBE_VERSIONS[-1]])
def test_helm_lint_is_clean(values_name: str, kube_version: str) -> None:
    report = helm.lint(str(CHART), VALUE_SETS[values_name] or None, strict=True,
                       kube_version=f"v{kube_version}")
    assert report["total_charts_linted"] == 1
    assert report["errors"] == []
    # Severity 1 is INFO; the only one is "icon is recommended" (the project has no icon URL).
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert problems == [], problems
    assert {m["error"] for m in report["messages"]} <= {"icon is recommended"}


def test_chart_claims_the_versions_tested() -> None:
    meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert meta["apiVersion"] == "v2"
    assert meta["kubeVersion"] == ">=1.30.0-0"
    assert meta["appVersion"] == "0.1.0"
    known = kubernetes_validate.utils.all_versions()
    for version in KUBE_VERSIONS:
        assert version.rsplit(".", 1)[0] in {v.rsplit(".", 1)[0] for v in known}, version


# --- kubernetes-validate --------------------------------------------------------------------

@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_rendered_objects_pass_the_kubernetes_schemas_strictly(kube_version: str) -> None:
    skipped: set[tuple[str, str]] = set()
    validated: set[str] = set()
    for name, values in VALUE_SETS.items():
        for doc in objects(values):
            try:
                kubernetes_validate.validate(doc, kube_version, strict=True)
            except kubernetes_validate.SchemaNotFoundError:
                skipped.add((doc["apiVersion"], doc["kind"]))
                continue
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{name}: {doc['kind']}/{doc['metadata']['name']} is invalid for "
                            f"Kubernetes {kube_version}: {exc.message} at {list(exc.path)}")
            validated.add(doc["kind"])
    assert skipped == NOT_IN_SCHEMAS, "a kind kubernetes-validate cannot check appeared"
    assert validated == {"CustomResourceDefinition", "ServiceAccount", "ClusterRole",
                         "ClusterRoleBinding", "RoleBinding", "Role", "Deployment", "Service",
                         "Secret", "ConfigMap", "NetworkPolicy", "ValidatingAdmissionPolicy",
                         "ValidatingAdmissionPolicyBinding", "PodDisruptionBudget"}


# --- copies of the repository's single sources ----------------------------------------------

def test_chart_copies_are_identical_to_their_sources() -> None:
    for rel, source in COPIES.items():
        copy = CHART / rel
        if source.is_dir():
            names = sorted(p.name for p in source.iterdir() if p.is_file())
            assert sorted(p.name for p in copy.iterdir()) == names, (
                f"{copy} must hold exactly the files of {source}: cp {source}/* {copy}/")
            pairs = [(copy / n, source / n) for n in names]
        else:
            pairs = [(copy, source)]
        for ours, theirs in pairs:
            assert ours.read_bytes() == theirs.read_bytes(), (
                f"{ours.relative_to(REPO)} drifted from {theirs.relative_to(REPO)}: "
                f"cp {theirs.relative_to(REPO)} {ours.relative_to(REPO)}")


def test_rendered_crds_are_the_repository_crds() -> None:
    sources = [d for p in sorted((REPO / "crds").glob("*.yaml"))
               for d in yaml.safe_load_all(p.read_text()) if d]
    rendered = by_kind(objects(), "CustomResourceDefinition")
    assert sorted(c["metadata"]["name"] for c in rendered) == sorted(
        c["metadata"]["name"] for c in sources)
    by_name = {c["metadata"]["name"]: c for c in rendered}
    for source in sources:
        ours = by_name[source["metadata"]["name"]]
        assert ours["spec"] == source["spec"]
        # Kept on uninstall, labelled like every chart object, the source's labels kept.
        assert ours["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
        assert ours["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"
        for key, value in (source["metadata"].get("labels") or {}).items():
            assert ours["metadata"]["labels"][key] == value
    assert "annotations" not in by_kind(objects({"crds": {"keep": False}}),
                                        "CustomResourceDefinition")[0]["metadata"]
    assert by_kind(objects({"crds": {"install": False}}), "CustomResourceDefinition") == []


def test_rbac_is_exactly_the_operators_rules() -> None:
    """The chart grants what tests/kube/test_operator.py runs the operator under, no more."""
    source = {yaml.safe_load(p.read_text())["kind"]: yaml.safe_load(p.read_text())
              for p in (REPO / "operator" / "rbac").glob("*.yaml")}
    assert set(source) == {"ServiceAccount", "ClusterRole", "ClusterRoleBinding"}
    docs = objects()
    # The peering rules only for peering: a standalone operator never reads a peering object.
    peering = [rule for rule in source["ClusterRole"]["rules"] if rule["apiGroups"] == ["kopf.dev"]]
    assert len(peering) == 1
    assert one(docs, "ClusterRole")["rules"] == [
        rule for rule in source["ClusterRole"]["rules"] if rule not in peering]
    assert one(objects({"peering": {"enabled": True}, "replicaCount": 2}), "ClusterRole")[
        "rules"] == source["ClusterRole"]["rules"]
    assert {d["kind"] for d in docs} == {"CustomResourceDefinition", "ServiceAccount",
                                         "ClusterRole", "ClusterRoleBinding", "Deployment"}
    sa = one(docs, "ServiceAccount")
    binding = one(docs, "ClusterRoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": one(docs, "ClusterRole")["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"],
                                    "namespace": "reranker-system"}]
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == sa["metadata"]["name"]
    # Namespaced: the same rules as a Role in each watched namespace, bound there, and no
    # cluster-wide grant of them: nothing that grants list/watch of every ConfigMap (or any
    # other kind) in the cluster exists to be bound by mistake. Cluster-scoped kinds cannot be
    # granted by a Role: the cluster peering object is left out, and the reads of the
    # cluster's address ranges (nodes, servicecidrs) are the only ClusterRole.
    docs = objects({"watchNamespaces": ["search", "ranking"]})
    ranges = [rule for rule in source["ClusterRole"]["rules"]
              if {"nodes", "servicecidrs"} & set(rule["resources"])]
    assert [r["resources"] for r in ranges] == [["nodes"], ["servicecidrs"]]
    assert all(r["verbs"] == ["list", "watch"] for r in ranges)
    assert one(docs, "ClusterRole")["rules"] == ranges
    assert one(docs, "ClusterRoleBinding")["roleRef"]["name"] == one(
        docs, "ClusterRole")["metadata"]["name"]
    namespaced_rules = [
        {**rule, "resources": [r for r in rule["resources"] if r != "clusterkopfpeerings"]}
        for rule in source["ClusterRole"]["rules"] if rule not in ranges and rule not in peering]
    roles = by_kind(docs, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["ranking", "search"]
    for role in roles:
        assert role["rules"] == namespaced_rules
    bindings = by_kind(docs, "RoleBinding")
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["ranking", "search"]
    for binding in bindings:
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                      "name": roles[0]["metadata"]["name"]}
    container = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert container["args"] == ["--namespace=search", "--namespace=ranking"]
    # Without rbac.create the chart grants nothing.
    assert not by_kind(objects({"rbac": {"create": False}}), "ClusterRole")


def test_secrets_are_granted_only_where_rbac_secret_namespaces_says() -> None:
    """Only the managed Redis' password needs a Secret: `create`, nowhere else than listed."""
    secret_rule = {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]}
    assert secret_rule in one(objects(), "ClusterRole")["rules"]  # "*": where it serves
    for values in ({"rbac": {"secretNamespaces": ["search"]}},
                   {"rbac": {"secretNamespaces": ["search"]},
                    "watchNamespaces": ["search", "ranking"]}):
        docs = objects(values)
        for role in by_kind(docs, "ClusterRole") + by_kind(docs, "Role"):
            if role["metadata"]["name"].endswith("-secrets"):
                assert role["metadata"]["namespace"] == "search"
                assert role["rules"] == [secret_rule]
            else:
                assert not [r for r in role["rules"] if "secrets" in r["resources"]], role
        (binding,) = [b for b in by_kind(docs, "RoleBinding")
                      if b["metadata"]["name"].endswith("-secrets")]
        assert binding["metadata"]["namespace"] == "search"
        assert binding["roleRef"]["name"] == binding["metadata"]["name"]
    docs = objects({"rbac": {"secretNamespaces": []}})
    assert not [r for d in docs if d["kind"] in ("ClusterRole", "Role")
                for r in d["rules"] if "secrets" in r["resources"]]


def test_admission_policy_is_opt_in_and_says_what_it_allows() -> None:
    assert not [d for d in objects() if "Admission" in d["kind"]
                and d["metadata"]["name"].endswith("-rerankerdeployments")]
    docs = objects({"admissionPolicy": {"enabled": True,
                                        "allowedImagePrefixes": ["reg.example/rr/", "mirror/"],
                                        "namespaceSelector": {"matchLabels": {"team": "search"}}}})
    (policy,) = [d for d in by_kind(docs, "ValidatingAdmissionPolicy")
                 if d["metadata"]["name"] == "rel-reranker-operator-rerankerdeployments"]
    (binding,) = [d for d in by_kind(docs, "ValidatingAdmissionPolicyBinding")
                  if d["spec"]["policyName"] == policy["metadata"]["name"]]
    assert binding["spec"]["validationActions"] == ["Deny"]
    assert binding["spec"]["matchResources"] == {
        "namespaceSelector": {"matchLabels": {"team": "search"}}}
    variables = {v["name"]: v["expression"] for v in policy["spec"]["variables"]}
    assert variables["prefixes"] == '["reg.example/rr/","mirror/"]'
    messages = [v["messageExpression"] for v in policy["spec"]["validations"]]
    assert len(messages) == 4 and "reg.example/rr/, mirror/" in messages[0]
    assert "spec.model.image.reference" in messages[2]  # a model image's cp runs too
    assert "spec.serviceAccountName" in messages[3]
    # ServiceAccounts allowed: no such rule.
    docs = objects({"admissionPolicy": {"enabled": True, "allowServiceAccounts": True}})
    (policy,) = [d for d in by_kind(docs, "ValidatingAdmissionPolicy")
                 if d["metadata"]["name"].endswith("-rerankerdeployments")]
    assert len(policy["spec"]["validations"]) == 3
    assert "is empty" in policy["spec"]["validations"][0]["messageExpression"]


def test_mac_role_allows_rerankerendpoints_only() -> None:
    docs = objects({"macs": {"enabled": True, "namespaces": ["search", "ranking"]}})
    roles = by_kind(docs, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["ranking", "search"]
    for role in roles:
        assert role["rules"] == [{"apiGroups": ["reranker.dev"],
                                  "resources": ["rerankerendpoints"],
                                  "verbs": ["get", "create", "update", "patch", "delete"]}]
    accounts = [a for a in by_kind(docs, "ServiceAccount") if a["metadata"]["name"] == "reranker-mac"]
    assert len(accounts) == 2 and all(a["automountServiceAccountToken"] is False for a in accounts)
    assert len(by_kind(docs, "RoleBinding")) == 2
    assert not by_kind(objects(), "Role")

    # The admission policy, exactly deploy/mac/admission.yaml but for its names.
    source = {d["kind"]: d for d in yaml.safe_load_all(
        (REPO / "deploy" / "mac" / "admission.yaml").read_text()) if d}
    policy = one(docs, "ValidatingAdmissionPolicy")
    binding = one(docs, "ValidatingAdmissionPolicyBinding")
    assert policy["spec"] == source["ValidatingAdmissionPolicy"]["spec"]
    assert policy["metadata"]["name"] == "rel-reranker-operator-rerankerendpoints"
    assert binding["spec"] == {**source["ValidatingAdmissionPolicyBinding"]["spec"],
                               "policyName": policy["metadata"]["name"]}
    assert not by_kind(objects({"macs": {"enabled": True, "admissionPolicy": False}}),
                       "ValidatingAdmissionPolicy")


def test_one_service_account_per_mac() -> None:
    docs = objects({"macs": {"enabled": True, "namespaces": ["search"],
                             "machines": ["studio-1", "mini-2"]}})
    names = sorted(a["metadata"]["name"] for a in by_kind(docs, "ServiceAccount")
                   if a["metadata"]["name"].startswith("reranker-mac"))
    assert names == ["reranker-mac-mini-2", "reranker-mac-studio-1"]
    (binding,) = [b for b in by_kind(docs, "RoleBinding") if b["metadata"]["name"].endswith("-macs")]
    assert sorted(s["name"] for s in binding["subjects"]) == names


# --- the operator Deployment ----------------------------------------------------------------

def test_operator_pod_is_locked_down_and_probed_on_kopfs_liveness_endpoint() -> None:
    dep = one(objects({"liveness": {"port": 9090}}), "Deployment")
    assert dep["spec"]["strategy"] == {"type": "Recreate"}  # standalone: never two at once
    pod = dep["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    (container,) = pod["containers"]
    assert container["command"] == ["reranker-operator"]
    assert "args" not in container
    sec = container["securityContext"]
    assert sec["readOnlyRootFilesystem"] is True
    assert sec["allowPrivilegeEscalation"] is False
    assert sec["capabilities"] == {"drop": ["ALL"]}
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["RERANKER_OPERATOR_LIVENESS"] == "http://0.0.0.0:9090/healthz"
    assert container["ports"] == [{"name": "liveness", "containerPort": 9090, "protocol": "TCP"}]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "liveness"}
    assert container["image"] == "reranker-fleet/operator:dev"  # what `make images` builds
    assert {m["mountPath"] for m in container["volumeMounts"]} == {"/tmp"}


def test_operator_options_reach_the_container() -> None:
    dep = one(objects({"serverImage": "registry.local/reranker:1", "redisImage": "redis:8",
                       "serverTorchImage": "registry.local/reranker:1-torch",
                       "imageVolumes": False,
                       "logLevel": "verbose", "image": {"digest": "sha256:" + "a" * 64},
                       "clusterCIDRs": ["10.244.0.0/16", "10.96.0.0/12"]}),
              "Deployment")
    container = dep["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["RERANKER_OPERATOR_SERVER_IMAGE"] == "registry.local/reranker:1"
    assert env["RERANKER_OPERATOR_SERVER_TORCH_IMAGE"] == "registry.local/reranker:1-torch"
    assert env["RERANKER_OPERATOR_IMAGE_VOLUMES"] == "false"
    assert env["RERANKER_OPERATOR_REDIS_IMAGE"] == "redis:8"
    assert env["RERANKER_OPERATOR_CLUSTER_CIDRS"] == "10.244.0.0/16,10.96.0.0/12"
    assert container["args"] == ["--verbose"]
    assert container["image"].endswith("@sha256:" + "a" * 64)


def test_several_replicas_need_peering() -> None:
    with pytest.raises(helm.HelmError, match="peering.enabled"):
        render({"replicaCount": 2})
    with pytest.raises(helm.HelmError, match="logLevel"):
        render({"logLevel": "loud"})
    docs = objects(EVERYTHING)
    (dep,) = [d for d in by_kind(docs, "Deployment") if d["metadata"]["name"] == "rel-reranker-operator"]
    assert "strategy" not in dep["spec"]
    env = {e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["RERANKER_OPERATOR_PEERING"] == "reranker-operator"
    peering = one(docs, "ClusterKopfPeering")
    assert peering["metadata"]["name"] == "reranker-operator"
    assert peering["metadata"]["annotations"]["helm.sh/hook"] == "post-install,post-upgrade"
    namespaced = objects(VALUE_SETS["everything-namespaced"])
    assert sorted(p["metadata"]["namespace"] for p in by_kind(namespaced, "KopfPeering")) == [
        "ranking", "search"]


# --- optional parts ---------------------------------------------------------------------------

def test_monitoring_objects() -> None:
    docs = objects({**EVERYTHING, "dashboards": {"enabled": True, "namespace": "grafana",
                                                 "annotations": {"grafana_folder": "Reranker"}},
                    "prometheusRule": {"enabled": True, "labels": {"release": "kps"}}})
    (cm,) = [c for c in by_kind(docs, "ConfigMap") if c["metadata"]["labels"].get("grafana_dashboard")]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["namespace"] == "grafana"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "Reranker"}
    assert cm["data"]["reranker-fleet.json"] == (REPO / "dashboards" / "reranker-fleet.json").read_text().rstrip("\n")

    rule = one(docs, "PrometheusRule")
    source = yaml.safe_load((REPO / "deploy" / "prometheus" / "reranker-rules.yaml").read_text())
    assert rule["spec"]["groups"] == source["groups"]
    assert rule["metadata"]["labels"]["release"] == "kps"

    sm = one(docs, "ServiceMonitor")
    # Selects the Services the operator makes (operator/reranker_operator/manifests.py labels).
    assert sm["spec"]["selector"]["matchLabels"] == {
        "app.kubernetes.io/name": "reranker", "app.kubernetes.io/component": "server",
        "app.kubernetes.io/managed-by": "reranker-operator"}
    assert sm["spec"]["namespaceSelector"] == {"any": True}
    assert sm["spec"]["endpoints"][0]["port"] == "http"
    assert sm["spec"]["endpoints"][0]["path"] == "/metrics"

    (adapter,) = [c for c in by_kind(docs, "ConfigMap") if "config.yaml" in c["data"]]
    config = yaml.safe_load(adapter["data"]["config.yaml"])
    values = yaml.safe_load((REPO / "deploy" / "prometheus" / "prometheus-adapter-values.yaml").read_text())
    assert config == {"rules": values["rules"]["custom"]}
    assert {r["name"]["as"] for r in config["rules"]} == {"reranker_queue_depth",
                                                         "reranker_inflight_requests"}


def test_shared_redis_is_cache_only_and_locked_down() -> None:
    docs = objects({"redis": {"enabled": True}})
    redis = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("-redis")][0]
    container = redis["spec"]["template"]["spec"]["containers"][0]
    assert container["args"][:4] == ["--save", "", "--appendonly", "no"]
    assert "allkeys-lru" in container["args"]
    assert container["image"] == "reranker-fleet/redis:dev"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert redis["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    # A password, generated, in the Secret the fleets use; only the fleets' pods admitted.
    (secret,) = [d for d in by_kind(docs, "Secret") if d["metadata"]["name"].endswith("-redis")]
    password = secret["stringData"]["password"]
    assert len(password) == 40 and password.isalnum()
    assert secret["stringData"]["url"].startswith(f"redis://:{password}@")
    assert container["args"][container["args"].index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    assert container["env"] == [{"name": "REDIS_PASSWORD", "valueFrom": {"secretKeyRef": {
        "name": secret["metadata"]["name"], "key": "password"}}}]
    (policy,) = by_kind(docs, "NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"] == redis["spec"]["selector"]["matchLabels"]
    assert policy["spec"]["ingress"] == [{"from": [{"podSelector": {"matchLabels": {
        "app.kubernetes.io/name": "reranker", "app.kubernetes.io/component": "server"}}}],
        "ports": [{"protocol": "TCP", "port": 6379}]}]
    secret = one(docs, "Secret")
    service = one(docs, "Service")
    assert secret["stringData"]["url"] == (
        f"redis://:{password}@{service['metadata']['name']}.reranker-system.svc:6379/0")
    # The Service selects the Redis pod and nothing else.
    assert service["spec"]["selector"] == {
        k: v for k, v in redis["spec"]["template"]["metadata"]["labels"].items()
        if k in service["spec"]["selector"]}
    assert service["spec"]["selector"]["app.kubernetes.io/component"] == "redis"


def test_notes_show_a_sample_that_the_crd_accepts() -> None:
    sample = notes_sample()
    assert sample["apiVersion"] == "reranker.dev/v1alpha1"
    assert sample["kind"] == "RerankerDeployment"
    crd = yaml.safe_load((REPO / "crds" / "rerankerdeployments.reranker.dev.yaml").read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    assert set(sample["spec"]) <= set(schema)
    with_redis = notes_sample({"redis": {"enabled": True}})
    assert with_redis["spec"]["cache"]["redis"]["urlSecretRef"] == {
        "name": "rel-reranker-operator-redis", "key": "url"}
    text = notes({"macs": {"enabled": True}})
    assert "kubectl -n $NS create token reranker-mac" in text


# --- values.yaml: every value documented and used -------------------------------------------

def _values_tree() -> list[tuple[str, bool, int]]:
    """(dotted path, documented by a `# --` comment on itself or an ancestor, line)."""
    out: list[tuple[str, bool, int]] = []
    stack: list[tuple[int, str, bool]] = []
    lines = (CHART / "values.yaml").read_text().splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"^( *)([A-Za-z_][\w-]*):(.*)$", line)
        if not m:
            continue
        indent, key, rest = len(m.group(1)), m.group(2), m.group(3).strip()
        while stack and stack[-1][0] >= indent:
            stack.pop()
        j = i - 1
        while j >= 0 and lines[j].strip().startswith("#") and not lines[j].strip().startswith("# --"):
            j -= 1
        own_doc = j >= 0 and lines[j].strip().startswith("# --") and all(
            lines[k].strip().startswith("#") for k in range(j, i))
        inherited = bool(stack) and stack[-1][2]
        path = ".".join([s[1] for s in stack] + [key])
        documented = own_doc or inherited
        stack.append((indent, key, documented))
        leaf = rest != ""
        if leaf:
            out.append((path, documented, i + 1))
    return out


def test_every_value_is_documented_and_used() -> None:
    tree = _values_tree()
    assert len(tree) > 40
    undocumented = [f"values.yaml:{line} {path}" for path, doc, line in tree if not doc]
    assert undocumented == [], "values without a `# --` comment (on them or a parent)"
    templates = "\n".join(p.read_text() for p in (CHART / "templates").iterdir())
    unused = []
    for path, _, line in tree:
        parts = path.split(".")
        if not any(f".Values.{'.'.join(parts[:n])}" in templates for n in range(len(parts), 0, -1)):
            unused.append(f"values.yaml:{line} {path}")
    assert unused == [], "values no template reads"

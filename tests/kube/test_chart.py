"""The Helm chart installed into a real control plane (etcd, kube-apiserver, controller-manager)
with Helm's own Go SDK (helm-python-sdk), then the operator run as the chart deploys it.

There are no kubelets, so the chart's operator pod never starts: the test runs the same
program (`reranker-operator` with the container's command, args and env from the installed
release) as a local subprocess, authenticated as the chart's ServiceAccount (a token minted for
it), and checks that it reconciles the RerankerDeployment that NOTES.txt shows: the RBAC the
chart grants is enough. `kubectl auth can-i` checks that it is no more than that.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml
from servers import free_port, stop_process_group

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ship"))
from helm_render import CHART, CRDS, adopt_crds, notes_sample, render  # noqa: E402

VENV_BIN = Path(sys.executable).parent
CRD_DIR = Path(__file__).resolve().parents[2] / "crds"
CHILD_KINDS = "configmaps,deployments,services,horizontalpodautoscalers,poddisruptionbudgets"


class Release:
    """One installed release of the chart, and the operator process it describes."""

    def __init__(self, cluster: Any, namespace: str, values: dict[str, Any], log: Path) -> None:
        self.cluster, self.namespace, self.values, self.log_path = cluster, namespace, values, log
        self.name = f"rop-{secrets.token_hex(3)}"
        self.config = helm.Config(kubeconfig_path=cluster.kubeconfig, namespace=namespace)
        self.summary: dict[str, Any] = {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    def install(self) -> Release:
        adopt_crds(self.cluster, self.name, self.namespace)
        self.summary = self.config.install(str(CHART), self.name, self.values,
                                           namespace=self.namespace, timeout=120)
        return self

    def uninstall(self) -> None:
        self.config.uninstall(self.name, ignore_not_found=True, timeout=60)

    def objects(self) -> list[dict[str, Any]]:
        return [d for d in yaml.safe_load_all(self.summary["manifest"]) if d]

    def operator_deployment(self) -> dict[str, Any]:
        (dep,) = [d for d in self.objects() if d["kind"] == "Deployment"
                  and d["metadata"]["name"] == f"{self.name}-reranker-operator"]
        return dep

    def service_account(self) -> str:
        return str(self.operator_deployment()["spec"]["template"]["spec"]["serviceAccountName"])

    def start_operator(self, kubeconfig: str) -> None:
        """The operator container, as a local process: its command, args and env, with the
        liveness endpoint moved to a free loopback port."""
        (container,) = self.operator_deployment()["spec"]["template"]["spec"]["containers"]
        env = {e["name"]: e["value"] for e in container.get("env", [])}
        assert env["RERANKER_OPERATOR_LIVENESS"] == "http://0.0.0.0:8080/healthz"
        self.port = free_port()
        env["RERANKER_OPERATOR_LIVENESS"] = f"http://127.0.0.1:{self.port}/healthz"
        command = [str(VENV_BIN / container["command"][0]), *container["command"][1:],
                   *container.get("args", [])]
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **env, "KUBECONFIG": kubeconfig},
                                     start_new_session=True)
        log.close()
        deadline = time.monotonic() + 60
        while True:
            assert self.proc.poll() is None, f"operator exited {self.proc.returncode}:\n{self.log()}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=2):
                    return
            except OSError:
                assert time.monotonic() < deadline, f"operator not live after 60s:\n{self.log()}"
                time.sleep(0.2)

    def stop_operator(self) -> None:
        stop_process_group(self.proc)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@pytest.fixture(params=["cluster-wide", "namespaced"])
def release(request: pytest.FixtureRequest, kube_cluster: Any, kube_namespace: str,
            tmp_path: Path) -> Iterator[Release]:
    """The chart with every part the API server can take without other projects' CRDs
    (no ServiceMonitor, PrometheusRule): operator, CRDs, RBAC, shared Redis, dashboards,
    adapter rules, the Macs' Role. `namespaced`: watchNamespaces = [the release namespace]."""
    values: dict[str, Any] = {"redis": {"enabled": True}, "dashboards": {"enabled": True},
                              "prometheusAdapter": {"rulesConfigMap": True},
                              "macs": {"enabled": True}}
    if request.param == "namespaced":
        values["watchNamespaces"] = [kube_namespace]
    rel = Release(kube_cluster, kube_namespace, values, tmp_path / "operator.log")
    try:
        yield rel.install()
    finally:
        rel.stop_operator()
        print(f"----- operator log (tail) -----\n{rel.log()[-6000:]}")
        rel.uninstall()
        kube_cluster.kubectl("delete", "rrd", "--all", "-n", kube_namespace, "--wait=false",
                             check=False)


def test_crds_are_stored_as_written(kube_cluster: Any) -> None:
    """A CRD installed with `kubectl apply -f crds/` (as the README says) and later by the
    chart (Helm applies server-side) must not conflict. spec.versions is an atomic list: if the
    API server stores it differently from the file (a field it drops, like a printer column's
    `priority: 0`), every other field manager's apply of the very same file conflicts with
    kubectl's ownership. So the stored CRDs must equal the files, and a server-side apply by
    another manager must go through without --force-conflicts."""
    for path in sorted(CRD_DIR.glob("*.yaml")):
        kube_cluster.kubectl("apply", "-f", str(path))
        for doc in (d for d in yaml.safe_load_all(path.read_text()) if d):
            live = kube_cluster.get_json("crd", doc["metadata"]["name"])
            assert live["spec"]["versions"] == doc["spec"]["versions"], path.name
        dry = kube_cluster.kubectl("apply", "--server-side", "--dry-run=server",
                                   "--field-manager=another-manager", "-f", str(path),
                                   check=False)
        assert dry.returncode == 0, dry.stderr


def can_i(cluster: Any, kubeconfig: str, verb: str, resource: str, *flags: str) -> bool:
    """`kubectl auth can-i VERB RESOURCE[.GROUP][/SUB] [-n NS | --all-namespaces]
    [--subresource=SUB]`, asked as a SelfSubjectAccessReview: kubectl's own can-i answers "no"
    for resources whose CRD is not installed yet (RerankerEndpoint), whatever RBAC says."""
    resource, _, sub = resource.partition("/")
    name, _, group = resource.partition(".")
    attrs = {"verb": verb, "resource": name, "group": group}
    args = list(flags)
    while args:
        flag = args.pop(0)
        if flag == "-n":
            attrs["namespace"] = args.pop(0)
        elif flag.startswith("--subresource="):
            sub = flag.split("=", 1)[1]
        else:
            assert flag == "--all-namespaces", flag
    if sub:
        attrs["subresource"] = sub
    review = {"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
              "spec": {"resourceAttributes": attrs}}
    out = cluster.kubectl("create", "--validate=false", "-f", "-", "-o", "json", input=json.dumps(review),
                          kubeconfig=kubeconfig).stdout
    return bool(json.loads(out)["status"].get("allowed"))


def test_chart_installs_an_operator_that_reconciles_the_notes_sample(
        release: Release, kube_cluster: Any, kube_namespace: str) -> None:
    ns = kube_namespace
    namespaced = bool(release.values.get("watchNamespaces"))
    for crd in CRDS:
        kube_cluster.wait_established(f"crd/{crd}")
    kinds = {(d["kind"], d["metadata"]["name"]) for d in release.objects()}
    full = f"{release.name}-reranker-operator"
    assert {("ServiceAccount", full), ("Deployment", full),
            ("Deployment", f"{full}-redis"), ("Secret", f"{full}-redis"),
            ("Role", f"{full}-macs")} <= kinds
    assert {(("Role" if namespaced else "ClusterRole"), full),
            (("RoleBinding" if namespaced else "ClusterRoleBinding"), full)} <= kinds
    live = kube_cluster.get_json("deployment", full, "-n", ns)
    assert live["spec"]["template"]["spec"]["containers"][0]["securityContext"][
        "readOnlyRootFilesystem"] is True

    # The chart's ServiceAccount: what it may and may not do.
    kubeconfig = kube_cluster.mint_kubeconfig(ns, release.service_account())
    allowed = [
        ("list", "rerankerdeployments.reranker.dev", "-n", ns),
        ("watch", "rerankerdeployments.reranker.dev", "-n", ns),
        ("patch", "rerankerdeployments.reranker.dev", "-n", ns),
        ("patch", "rerankerdeployments.reranker.dev", "--subresource=status", "-n", ns),
        ("create", "deployments.apps", "-n", ns), ("delete", "services", "-n", ns),
        ("patch", "configmaps", "-n", ns), ("create", "horizontalpodautoscalers.autoscaling", "-n", ns),
        ("create", "poddisruptionbudgets.policy", "-n", ns), ("create", "events", "-n", ns),
        # A child the watch does not show is read before it is created (is the name free?).
        ("get", "deployments.apps", "-n", ns), ("get", "services", "-n", ns),
    ]
    denied = [
        ("get", "secrets", "-n", ns), ("list", "secrets", "--all-namespaces"),
        ("delete", "namespaces"), ("create", "namespaces"), ("create", "pods", "-n", ns),
        ("create", "pods/exec", "-n", ns), ("get", "nodes"), ("delete", "nodes"),
        ("create", "rerankerdeployments.reranker.dev", "-n", ns),
        ("delete", "rerankerdeployments.reranker.dev", "-n", ns),
        ("update", "customresourcedefinitions.apiextensions.k8s.io"),
        ("create", "clusterrolebindings.rbac.authorization.k8s.io"),
        ("create", "rolebindings.rbac.authorization.k8s.io", "-n", ns),
        ("bind", "clusterroles.rbac.authorization.k8s.io"),
        ("escalate", "clusterroles.rbac.authorization.k8s.io"),
        ("impersonate", "serviceaccounts", "-n", ns), ("create", "serviceaccounts/token", "-n", ns),
        ("create", "rerankerendpoints.reranker.dev", "-n", ns),  # the Macs' right, not its own
    ]
    if namespaced:  # nothing outside the watched namespace
        denied += [("list", "rerankerdeployments.reranker.dev", "-n", "default"),
                   ("create", "deployments.apps", "-n", "default"),
                   ("list", "rerankerdeployments.reranker.dev", "--all-namespaces"),
                   ("list", "configmaps", "--all-namespaces"), ("watch", "configmaps", "-n", "default"),
                   ("list", "clusterkopfpeerings.kopf.dev")]
        allowed += [("list", "configmaps", "-n", ns), ("watch", "configmaps", "-n", ns)]
    else:
        allowed += [("list", "rerankerdeployments.reranker.dev", "--all-namespaces")]
    assert [a for a in allowed if not can_i(kube_cluster, kubeconfig, *a)] == []
    assert [d for d in denied if can_i(kube_cluster, kubeconfig, *d)] == []

    # The Macs' ServiceAccount: RerankerEndpoints in its namespace, nothing else.
    macs = kube_cluster.mint_kubeconfig(ns, "reranker-mac")
    assert can_i(kube_cluster, macs, "create", "rerankerendpoints.reranker.dev", "-n", ns)
    assert can_i(kube_cluster, macs, "delete", "rerankerendpoints.reranker.dev", "-n", ns)
    for d in [("list", "rerankerendpoints.reranker.dev", "-n", ns),
              ("create", "rerankerendpoints.reranker.dev", "-n", "default"),
              ("get", "rerankerdeployments.reranker.dev", "-n", ns),
              ("get", "secrets", "-n", ns), ("get", "configmaps", "-n", ns)]:
        assert not can_i(kube_cluster, macs, *d), d

    # The operator as the chart runs it, under that identity, reconciles the NOTES sample.
    release.start_operator(kubeconfig)
    sample = notes_sample(release.values, release=release.name, namespace=ns)
    kube_cluster.apply(json.dumps(sample), namespace=ns)
    name = sample["metadata"]["name"]

    def children() -> dict[tuple[str, str], dict[str, Any]]:
        items = kube_cluster.get_json(CHILD_KINDS, "-n", ns, "-l",
                                      f"app.kubernetes.io/instance={name}")["items"]
        return {(i["kind"], i["metadata"]["name"]): i for i in items}

    expected = {("ConfigMap", f"{name}-config"), ("Deployment", name), ("Service", name),
                ("PodDisruptionBudget", name)}
    objs = kube_cluster.eventually(lambda: (lambda got: got if set(got) == expected else None)(
        children()), timeout=30, desc="the sample's children")
    uid = kube_cluster.get_json("rrd", name, "-n", ns)["metadata"]["uid"]
    for obj in objs.values():
        assert obj["metadata"]["ownerReferences"][0]["uid"] == uid
    dep = objs[("Deployment", name)]
    assert dep["spec"]["replicas"] == sample["spec"]["replicas"]
    env = {e["name"]: e for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    # The shared Redis of the chart, through its Secret (never in the ConfigMap).
    assert env["REDIS_URL"]["valueFrom"]["secretKeyRef"] == {"name": f"{full}-redis", "key": "url"}
    # The status is written (no nodes: never Ready).
    obj = kube_cluster.eventually(
        lambda: (lambda o: o if any(c["type"] == "Ready" for c in
                                    (o.get("status") or {}).get("conditions", ())) else None)(
            kube_cluster.get_json("rrd", name, "-n", ns)),
        timeout=30, desc="status conditions")
    ready = next(c for c in obj["status"]["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "False"

    release.stop_operator()
    log = release.log()
    # An RBAC denial names the identity ('... is forbidden: User "system:serviceaccount:..." cannot
    # ...'). A cluster-wide operator also meets other tests' namespaces while they terminate
    # ('forbidden: unable to create new content in namespace ...'): that is no RBAC denial.
    denials = re.findall(r'forbidden: User "[^"]+" cannot [^\n]*', log)
    assert not denials, f"the chart's RBAC denied the operator something: {denials[:3]}"
    assert "Traceback" not in log

    # Uninstall removes the operator and its permissions, and keeps the CRDs (and with them,
    # every fleet).
    release.uninstall()
    assert kube_cluster.kubectl("get", "deployment", full, "-n", ns, check=False).returncode != 0
    assert kube_cluster.kubectl("get", "clusterrole", full, check=False).returncode != 0
    for crd in CRDS:
        kube_cluster.kubectl("get", "crd", crd)
    kube_cluster.get_json("rrd", name, "-n", ns)


def test_peering_objects_are_created_after_the_crds(kube_cluster: Any, kube_namespace: str,
                                                    tmp_path: Path) -> None:
    """HA: the peering object is a post-install hook, so its CRD (same release) exists first."""
    rel = Release(kube_cluster, kube_namespace,
                  {"peering": {"enabled": True}, "replicaCount": 2,
                   "watchNamespaces": [kube_namespace]}, tmp_path / "operator.log")
    try:
        rel.install()
        peering = kube_cluster.get_json("kopfpeering", "reranker-operator", "-n", kube_namespace)
        assert peering["metadata"]["annotations"]["helm.sh/hook"] == "post-install,post-upgrade"
        dep = kube_cluster.get_json("deployment", f"{rel.name}-reranker-operator", "-n",
                                    kube_namespace)
        assert dep["spec"]["replicas"] == 2
        env = {e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert env["RERANKER_OPERATOR_PEERING"] == "reranker-operator"
    finally:
        rel.uninstall()


def test_admission_policy_limits_what_a_reranker_deployment_grants(kube_cluster: Any,
                                                                     kube_namespace: str) -> None:
    """The chart's admissionPolicy, rendered by Helm and applied to the real API server: an
    image outside the allowed prefixes, or another ServiceAccount, is refused with the policy's
    message; an allowed image, or none (the operator's default), is admitted; a resource created
    before the policy can still be updated as long as it keeps its image."""
    ns = kube_namespace
    kube_cluster.kubectl("apply", "-f", str(CRD_DIR / "rerankerdeployments.reranker.dev.yaml"))
    kube_cluster.wait_established("crd/rerankerdeployments.reranker.dev")
    values = {"admissionPolicy": {
        "enabled": True, "allowedImagePrefixes": ["registry.example.com/reranker/"],
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}}}}
    release = f"vap-{secrets.token_hex(3)}"
    (text,) = [t for p, t in render(values, release=release, namespace=ns).items()
               if p.endswith("templates/admission-policy.yaml")]
    policy = f"{release}-reranker-operator-rerankerdeployments"

    def rd(name: str, **spec: Any) -> str:
        return json.dumps({"apiVersion": "reranker.dev/v1alpha1", "kind": "RerankerDeployment",
                           "metadata": {"name": name, "namespace": ns},
                           "spec": {"model": {"id": "m"}, **spec}})

    def create(manifest: str) -> subprocess.CompletedProcess[str]:
        return kube_cluster.kubectl("create", "-f", "-", input=manifest, check=False)

    # Before the policy: an image from anywhere.
    assert create(rd("older", image="elsewhere.example/server:1")).returncode == 0
    kube_cluster.kubectl("apply", "-f", "-", input=text)
    try:
        # The API server enforces a new policy within a moment: wait for it on a dry run.
        kube_cluster.eventually(
            lambda: kube_cluster.kubectl(
                "create", "--dry-run=server", "-f", "-", check=False,
                input=rd("probe", image="elsewhere.example/server:1")).returncode != 0,
            timeout=30, desc="the policy enforced")
        refused = create(rd("miner", image="elsewhere.example/miner:1"))
        assert refused.returncode != 0
        assert (f"spec.image elsewhere.example/miner:1 is not allowed by {policy}: images must "
                "start with one of: registry.example.com/reranker/") in refused.stderr
        redis = create(rd("cache", cache={"redis": {"managed": {
            "enabled": True, "image": "docker.io/redis:7"}}}))
        assert redis.returncode != 0
        assert "spec.cache.redis.managed.image docker.io/redis:7 is not allowed" in redis.stderr
        # The model image too: where image volumes are not kept, its `cp` runs in the pod.
        model_image = create(json.dumps({
            "apiVersion": "reranker.dev/v1alpha1", "kind": "RerankerDeployment",
            "metadata": {"name": "imaged", "namespace": ns},
            "spec": {"model": {"image": {"reference": "elsewhere.example/model:1"}}}}))
        assert model_image.returncode != 0
        assert ("spec.model.image.reference elsewhere.example/model:1 is not allowed"
                in model_image.stderr)
        account = create(rd("admin", serviceAccountName="cluster-admin-sa"))
        assert account.returncode != 0
        assert (f"spec.serviceAccountName cluster-admin-sa is not allowed by {policy}"
                in account.stderr)
        # Admitted: an allowed prefix, the default image, the default ServiceAccount.
        assert create(rd("allowed", image="registry.example.com/reranker/server:1.2",
                         serviceAccountName="default")).returncode == 0
        assert create(rd("plain")).returncode == 0
        # An update may not bring in another image...
        moved = kube_cluster.kubectl("patch", "rrd", "allowed", "-n", ns, "--type", "merge",
                                     "-p", json.dumps({"spec": {"image": "elsewhere.example/x"}}),
                                     check=False)
        assert moved.returncode != 0 and "is not allowed by" in moved.stderr
        # ...but one that keeps it passes (the operator's own annotation patches, say).
        kube_cluster.kubectl("annotate", "rrd", "older", "-n", ns, "reranker.dev/touched=1")
        kube_cluster.kubectl("patch", "rrd", "older", "-n", ns, "--type", "merge",
                             "-p", json.dumps({"spec": {"replicas": 2}}))
    finally:
        kube_cluster.kubectl("delete", "-f", "-", "--ignore-not-found", input=text, check=False)
        kube_cluster.kubectl("delete", "rrd", "--all", "-n", ns, "--wait=false", check=False)

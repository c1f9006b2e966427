"""Render the Helm chart with Helm's own Go SDK (helm-python-sdk: no helm binary), as
`helm template` would, and split the result into Kubernetes objects.

Shared by tests/ship/test_helm_chart.py (lint, schemas, copies), tests/kube/test_chart.py
(install into a real control plane) and tests/e2e (the operator as a pod on a real node).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import helm_python as helm
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "reranker-operator"

#: Every optional part of the chart switched on (operator HA included).
EVERYTHING: dict[str, Any] = {
    "redis": {"enabled": True},
    "serviceMonitor": {"enabled": True},
    "dashboards": {"enabled": True},
    "prometheusRule": {"enabled": True},
    "prometheusAdapter": {"rulesConfigMap": True},
    "macs": {"enabled": True},
    "peering": {"enabled": True},
    "replicaCount": 2,
    "admissionPolicy": {"enabled": True, "allowedImagePrefixes": ["registry.example.com/"]},
    "gateway": {"enabled": True},
}
#: The value sets the static tests render: defaults, everything cluster-wide, everything
#: limited to two namespaces.
VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "everything": EVERYTHING,
    "everything-namespaced": {**EVERYTHING, "watchNamespaces": ["search", "ranking"],
                              "macs": {"enabled": True, "namespaces": ["search"]}},
}


def render(values: dict[str, Any] | None = None, *, release: str = "rel",
           namespace: str = "reranker-system") -> dict[str, str]:
    """Template path -> rendered text (NOTES.txt included), like `helm template`."""
    chart = helm.Chart.load(str(CHART))
    try:
        return chart.render(values or None, name=release, namespace=namespace, is_install=True)
    finally:
        chart.close()


def objects(values: dict[str, Any] | None = None, **kw: Any) -> list[dict[str, Any]]:
    """The rendered Kubernetes objects (hooks included), in template order."""
    docs: list[dict[str, Any]] = []
    for path, text in sorted(render(values, **kw).items()):
        if path.endswith("NOTES.txt"):
            continue
        docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def manifest_text(values: dict[str, Any] | None = None, **kw: Any) -> str:
    """All objects as one multi-document YAML stream (for kubectl apply)."""
    return yaml.safe_dump_all(objects(values, **kw), sort_keys=False)


def notes(values: dict[str, Any] | None = None, **kw: Any) -> str:
    return next(t for p, t in render(values, **kw).items() if p.endswith("NOTES.txt"))


def notes_sample(values: dict[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
    """The sample RerankerDeployment that NOTES.txt shows (between <<'YAML' and YAML)."""
    text = notes(values, **kw)
    body = text.split("<<'YAML'\n", 1)[1].split("\n  YAML\n", 1)[0]
    sample = yaml.safe_load("\n".join(line[2:] for line in body.splitlines()))
    assert isinstance(sample, dict)
    return sample


#: The CRDs the chart ships (every file of crds/).
CRDS = tuple(d["metadata"]["name"] for d in objects() if d["kind"] == "CustomResourceDefinition")


def adopt_crds(cluster: Any, release: str, namespace: str) -> None:
    """CRDs outlive releases (helm.sh/resource-policy: keep) and other tests apply them with
    kubectl: mark existing ones as this release's, as Helm documents for adopting objects."""
    for crd in CRDS:
        if cluster.kubectl("get", "crd", crd, check=False).returncode != 0:
            continue
        cluster.kubectl("annotate", "crd", crd, "--overwrite",
                        f"meta.helm.sh/release-name={release}",
                        f"meta.helm.sh/release-namespace={namespace}")
        cluster.kubectl("label", "crd", crd, "--overwrite", "app.kubernetes.io/managed-by=Helm")

"""The API server refuses invalid RerankerDeployments with the CRD's schema or CEL message.

No operator needed: this is the CRD alone (crds/rerankerdeployments.reranker.dev.yaml)
installed into a real kube-apiserver, driven by `kubectl apply` as a user would.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
CRD = REPO / "crds" / "rerankerdeployments.reranker.dev.yaml"
MODEL = {"id": "cross-encoder/ms-marco-MiniLM-L-6-v2"}


@pytest.fixture(scope="module")
def crd(kube_cluster: Any) -> None:
    kube_cluster.kubectl("apply", "-f", str(CRD))
    kube_cluster.kubectl("wait", "--for", "condition=Established", "--timeout", "60s",
                         "crd/rerankerdeployments.reranker.dev")


def manifest(spec: dict[str, Any], name: str = "bad") -> str:
    return json.dumps({"apiVersion": "reranker.dev/v1alpha1", "kind": "RerankerDeployment",
                       "metadata": {"name": name}, "spec": spec})


# (id, spec, metadata.name, a fragment of the API server's message)
CASES = [
    ("fp16-on-cpu", {"model": MODEL, "device": "cpu", "quantization": "fp16"}, "bad",
     "quantization fp16 needs device cuda: the server rejects fp16 on cpu"),
    ("int8-on-cuda", {"model": MODEL, "device": "cuda", "quantization": "int8"}, "bad",
     "the server rejects them on cuda"),
    ("int8-dynamic-on-torch", {"model": MODEL, "runtime": "torch", "quantization": "int8-dynamic"}, "bad",
     "quantization int8 and int8-dynamic run on the openvino runtime"),
    ("mps-device", {"model": MODEL, "device": "mps"}, "bad",
     'spec.device: Unsupported value: "mps"'),
    ("mlx-device", {"model": MODEL, "device": "mlx"}, "bad",
     'spec.device: Unsupported value: "mlx"'),
    ("unknown-quantization", {"model": MODEL, "quantization": "int4"}, "bad",
     'spec.quantization: Unsupported value: "int4"'),
    ("min-above-max", {"model": MODEL, "autoscaling": {"enabled": True, "minReplicas": 5,
                                                       "maxReplicas": 2}}, "bad",
     "autoscaling.minReplicas must be less than or equal to autoscaling.maxReplicas"),
    ("cpu-metric-without-request", {"model": MODEL, "autoscaling": {"enabled": True,
                                                                    "metric": "cpu"}}, "bad",
     "autoscaling on cpu needs resources.requests.cpu"),
    ("unknown-metric", {"model": MODEL, "autoscaling": {"metric": "latency"}}, "bad",
     'spec.autoscaling.metric: Unsupported value: "latency"'),
    ("gpus-on-cpu", {"model": MODEL, "gpus": 1}, "bad", "gpus applies only to device cuda"),
    ("no-model", {"model": {}}, "bad", "model needs id, localPath or pvc"),
    ("missing-model", {"device": "cpu"}, "bad", 'spec.model: Required value'),
    ("path-and-pvc", {"model": {"localPath": "/m", "pvc": {"claimName": "c"}}}, "bad",
     "set model.localPath or model.pvc, not both"),
    ("image-and-path", {"model": {"image": {"reference": "m:1"}, "localPath": "/m"}}, "bad",
     "set one of model.image, model.localPath and model.pvc"),
    ("relative-image-path", {"model": {"image": {"reference": "m:1", "path": "m"}}}, "bad",
     "spec.model.image.path: Invalid value"),
    ("cache-claim-and-size", {"model": {**MODEL, "cache": {"claimName": "c", "size": "1Gi"}}},
     "bad", "model.cache needs claimName (an existing PVC) or size"),
    ("cache-neither", {"model": {**MODEL, "cache": {}}}, "bad",
     "model.cache needs claimName (an existing PVC) or size"),
    ("two-redis", {"model": MODEL, "cache": {"redis": {"urlSecretRef": {"name": "r"},
                                                       "managed": {"enabled": True}}}}, "bad",
     "set cache.redis.urlSecretRef or cache.redis.managed.enabled, not both"),
    ("two-budgets", {"model": MODEL, "podDisruptionBudget": {"minAvailable": 1,
                                                             "maxUnavailable": 1}}, "bad",
     "set podDisruptionBudget.minAvailable or maxUnavailable, not both"),
    ("negative-replicas", {"model": MODEL, "replicas": -1}, "bad",
     "spec.replicas: Invalid value: -1: spec.replicas in body should be greater than or "
     "equal to 0"),
    ("bad-quantity", {"model": MODEL, "resources": {"limits": {"memory": "lots"}}}, "bad",
     "spec.resources.limits.memory: Invalid value"),
    ("bad-port", {"model": MODEL, "service": {"port": 70000}}, "bad",
     "spec.service.port: Invalid value: 70000"),
    ("unknown-service-type", {"model": MODEL, "service": {"type": "ExternalName"}}, "bad",
     'spec.service.type: Unsupported value: "ExternalName"'),
    # The server's own bounds (RERANKER_* settings): refused here, not in a crash-looping pod.
    ("max-length-below-8", {"model": {**MODEL, "maxLength": 4}}, "bad",
     "spec.model.maxLength: Invalid value: 4"),
    ("empty-queue", {"model": MODEL, "parallelism": {"maxQueue": 0}}, "bad",
     "spec.parallelism.maxQueue: Invalid value: 0"),
    ("no-queue-timeout", {"model": MODEL, "parallelism": {"queueTimeoutSeconds": 0}}, "bad",
     "spec.parallelism.queueTimeoutSeconds: Invalid value: 0"),
    ("too-parallel", {"model": MODEL, "parallelism": {"maxParallel": 65}}, "bad",
     "spec.parallelism.maxParallel: Invalid value: 65"),
    ("huge-batch", {"model": MODEL, "parallelism": {"batchSize": 4097}}, "bad",
     "spec.parallelism.batchSize: Invalid value: 4097"),
    ("long-window", {"model": MODEL, "parallelism": {"microBatching": {"windowMs": 1001}}},
     "bad", "spec.parallelism.microBatching.windowMs: Invalid value: 1001"),
    ("free-form-log-level", {"model": MODEL, "logLevel": "chatty"}, "bad",
     'spec.logLevel: Unsupported value: "chatty"'),
    ("rollout-that-cannot-move", {"model": MODEL, "rollout": {"maxSurge": 0,
                                                              "maxUnavailable": 0}}, "bad",
     "rollout.maxSurge and rollout.maxUnavailable may not both be 0"),
    ("name-starts-with-digit", {"model": MODEL}, "1abc",
     "metadata.name must start with a letter"),
    ("name-too-long", {"model": MODEL}, "a" * 58, "metadata.name must be at most 57 characters"),
]


@pytest.mark.parametrize("spec,name,message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_invalid_resource_is_refused_with_its_message(kube_cluster: Any, kube_namespace: str,
                                                      crd: None, spec: dict, name: str,
                                                      message: str) -> None:
    result = kube_cluster.kubectl("apply", "-n", kube_namespace, "-f", "-",
                                  input=manifest(spec, name), check=False)
    assert result.returncode != 0, result.stdout
    assert message in result.stderr, result.stderr
    listed = kube_cluster.get_json("rrd", "-n", kube_namespace)["items"]
    assert listed == []


def test_valid_resource_is_accepted_with_defaults(kube_cluster: Any, kube_namespace: str,
                                                  crd: None) -> None:
    kube_cluster.kubectl("apply", "-n", kube_namespace, "-f", "-",
                         input=manifest({"model": MODEL}, "good"))
    spec = kube_cluster.get_json("rrd", "good", "-n", kube_namespace)["spec"]
    assert spec["replicas"] == 1 and spec["device"] == "cpu" and spec["quantization"] == "auto"
    assert spec["autoscaling"] == {"enabled": False, "minReplicas": 1, "maxReplicas": 5,
                                   "metric": "queueDepth"}
    assert spec["service"] == {"type": "ClusterIP", "port": 8000}


@pytest.mark.parametrize("path", sorted((REPO / "examples").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_examples_pass_server_side_validation(kube_cluster: Any, kube_namespace: str,
                                              crd: None, path: Path) -> None:
    if path.name.startswith("operator-"):
        # Not a RerankerDeployment (needs crds/kopf-peering.yaml): validate as it is.
        kube_cluster.kubectl("apply", "-f", str(REPO / "crds" / "kopf-peering.yaml"))
        kube_cluster.kubectl("wait", "--for", "condition=Established", "--timeout", "60s",
                             "crd/clusterkopfpeerings.kopf.dev")
    kube_cluster.kubectl("apply", "--dry-run=server", "-n", kube_namespace, "-f", str(path))

"""The pure builders: every child of a RerankerDeployment, checked field by field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from reranker import contract
from reranker_operator import manifests
from reranker_operator.spec import parse

DEFAULTS = manifests.Defaults(server_image="example.com/reranker:1", redis_image="redis:test")
UID = "1b9f8a3e-0000-4000-8000-000000000001"


def owner(spec: dict[str, Any], name: str = "rr", labels: dict | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "reranker.dev/v1alpha1",
        "kind": "RerankerDeployment",
        "metadata": {"name": name, "namespace": "ns1", "uid": UID, "generation": 1,
                     "labels": labels or {}},
        "spec": spec,
    }


def build(spec: dict[str, Any], **kw: Any) -> dict[tuple[str, str], dict[str, Any]]:
    o = owner(spec, **kw)
    objs = manifests.children(o, parse(spec), DEFAULTS)
    return {(obj["kind"], obj["metadata"]["name"]): obj for obj in objs}


def container(objs: dict, name: str = "rr") -> dict[str, Any]:
    return objs[("Deployment", name)]["spec"]["template"]["spec"]["containers"][0]


def env_of(objs: dict) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container(objs)["env"]}


BASE = {"model": {"id": "cross-encoder/ms-marco-MiniLM-L-6-v2"}}


def test_minimal_spec_builds_configmap_deployment_service_pdb() -> None:
    objs = build(BASE)
    assert set(objs) == {("ConfigMap", "rr-config"), ("Deployment", "rr"), ("Service", "rr"),
                         ("PodDisruptionBudget", "rr")}


@pytest.mark.parametrize("extra,kinds", [
    ({"autoscaling": {"enabled": True}}, {"HorizontalPodAutoscaler"}),
    ({"podDisruptionBudget": {"enabled": False}}, set()),
    ({"monitoring": {"serviceMonitor": {"enabled": True}}}, {"ServiceMonitor"}),
    ({"cache": {"redis": {"managed": {"enabled": True}}}}, {"Deployment", "Service", "NetworkPolicy"}),
])
def test_optional_children(extra: dict, kinds: set) -> None:
    base = {k for k, _ in build(BASE)}
    got = {k for k, _ in build({**BASE, **extra})}
    if kinds:
        assert kinds <= got
    expected = base | kinds
    if extra.get("podDisruptionBudget") == {"enabled": False}:
        expected = base - {"PodDisruptionBudget"}
    assert got == expected


def test_every_child_is_adopted_and_labelled() -> None:
    objs = build({**BASE, "autoscaling": {"enabled": True},
                  "cache": {"redis": {"managed": {"enabled": True}}}},
                 labels={"team": "search"})
    for (kind, name), obj in objs.items():
        meta = obj["metadata"]
        assert meta["namespace"] == "ns1", kind
        assert meta["ownerReferences"] == [{
            "apiVersion": "reranker.dev/v1alpha1", "kind": "RerankerDeployment", "name": "rr",
            "uid": UID, "controller": True, "blockOwnerDeletion": True}], kind
        assert meta["labels"]["app.kubernetes.io/name"] == "reranker"
        assert meta["labels"]["app.kubernetes.io/instance"] == "rr"
        assert meta["labels"]["app.kubernetes.io/managed-by"] == "reranker-operator"
        assert meta["labels"]["team"] == "search"  # the owner's labels propagate


def test_settings_are_named_by_the_server_contract() -> None:
    spec = {**BASE, "parallelism": {"maxParallel": 4, "maxQueue": 256, "queueTimeoutSeconds": 2.5,
                                    "batchSize": 32,
                                    "microBatching": {"enabled": True, "windowMs": 5}},
            "cache": {"ttlSeconds": 600, "redis": {"urlSecretRef": {"name": "redis"}}},
            "model": {"id": "m", "revision": "abc", "kind": "cross-encoder", "maxLength": 256},
            "logLevel": "debug"}
    data = build(spec)[("ConfigMap", "rr-config")]["data"]
    assert set(data) <= manifests.settings_env_names()
    assert set(data) - {"HF_HOME"} <= set(contract.ENV_VARS)
    assert data == {
        "RERANKER_MODEL": "m", "RERANKER_MODEL_REVISION": "abc",
        "RERANKER_MODEL_KIND": "cross-encoder", "RERANKER_MAX_LENGTH": "256",
        "RERANKER_DEVICE": "cpu", "RERANKER_QUANTIZATION": "auto", "RERANKER_RUNTIME": "auto",
        "RERANKER_MODEL_CACHE_DIR": "/cache/reranker",
        "RERANKER_PRECISION_RECORD_DIR": "/etc/reranker/precision",
        "RERANKER_MAX_PARALLEL": "4", "RERANKER_MAX_QUEUE": "256",
        "RERANKER_QUEUE_TIMEOUT": "2.5", "RERANKER_BATCH_SIZE": "32",
        "MICRO_BATCH_ENABLED": "true", "MICRO_BATCH_WINDOW_MS": "5",
        "ENABLE_PREDICTION_CACHE": "true", "CACHE_TTL_SECONDS": "600", "REDIS_ENABLED": "true",
        "RERANKER_DRAIN_SECONDS": "30", "HOST": "0.0.0.0", "PORT": str(contract.DEFAULT_PORT),
        "LOG_LEVEL": "debug", "HF_HOME": manifests.HF_HOME,
    }
    assert "REDIS_URL" not in data  # secrets never go through the ConfigMap


def test_llm_reranker_settings() -> None:
    """model.kind llm and promptTemplate reach the server as RERANKER_MODEL_KIND / RERANKER_PROMPT_TEMPLATE."""
    spec = {**BASE, "model": {"id": "Qwen/Qwen3-Reranker-0.6B", "kind": "llm", "promptTemplate": "qwen3-reranker"}}
    data = build(spec)[("ConfigMap", "rr-config")]["data"]
    assert data["RERANKER_MODEL_KIND"] == "llm" and data["RERANKER_PROMPT_TEMPLATE"] == "qwen3-reranker"
    assert "RERANKER_PROMPT_TEMPLATE" in contract.ENV_VARS
    assert "RERANKER_PROMPT_TEMPLATE" not in build(BASE)[("ConfigMap", "rr-config")]["data"]


def test_unset_tunables_are_left_to_the_server() -> None:
    data = build(BASE)[("ConfigMap", "rr-config")]["data"]
    for name in ("RERANKER_MAX_PARALLEL", "RERANKER_MAX_QUEUE", "RERANKER_BATCH_SIZE",
                 "RERANKER_QUEUE_TIMEOUT", "MICRO_BATCH_ENABLED", "CACHE_TTL_SECONDS",
                 "LOG_LEVEL", "RERANKER_MODEL_REVISION"):
        assert name not in data
    assert data["REDIS_ENABLED"] == "false"


def test_pod_template_lists_each_setting_from_the_configmap() -> None:
    objs = build({**BASE, "device": "cpu", "quantization": "int8",
                  "parallelism": {"maxParallel": 3}})
    data = objs[("ConfigMap", "rr-config")]["data"]
    env = env_of(objs)
    for key in data:
        assert env[key] == {"name": key, "valueFrom": {"configMapKeyRef": {
            "name": "rr-config", "key": key}}}
    assert data["RERANKER_DEVICE"] == "cpu"
    assert data["RERANKER_QUANTIZATION"] == "int8"
    assert data["RERANKER_MAX_PARALLEL"] == "3"


def test_secrets_are_env_value_from() -> None:
    env = env_of(build({**BASE, "apiKeySecretRef": {"name": "keys"},
                        "cache": {"redis": {"urlSecretRef": {"name": "redis", "key": "u"}}}}))
    assert env["RERANKER_API_KEYS_FILE"]["value"].startswith(manifests.API_KEYS_MOUNT)
    assert env["REDIS_URL"]["valueFrom"] == {"secretKeyRef": {"name": "redis", "key": "u"}}


def test_managed_redis() -> None:
    objs = build({**BASE, "cache": {"redis": {"managed": {"enabled": True}}}})
    env = env_of(objs)
    # The password comes from the generated Secret; the kubelet expands $(VAR) in the URL.
    assert env[manifests.REDIS_PASSWORD_ENV] == {
        "name": manifests.REDIS_PASSWORD_ENV, "valueFrom": {"secretKeyRef": {
            "name": "rr-redis-auth", "key": "password"}}}
    assert env["REDIS_URL"] == {"name": "REDIS_URL",
                                "value": f"redis://:$({manifests.REDIS_PASSWORD_ENV})@rr-redis:6379/0"}
    names = [e["name"] for e in container(objs)["env"]]
    assert names.index(manifests.REDIS_PASSWORD_ENV) < names.index("REDIS_URL")
    assert objs[("ConfigMap", "rr-config")]["data"]["REDIS_ENABLED"] == "true"
    redis = objs[("Deployment", "rr-redis")]
    c = redis["spec"]["template"]["spec"]["containers"][0]
    assert c["image"] == "redis:test"
    assert "allkeys-lru" in c["args"] and c["securityContext"]["readOnlyRootFilesystem"]
    # Its pods must not be selected by the server's Service, PDB or status.selector.
    server_selector = objs[("Service", "rr")]["spec"]["selector"]
    redis_labels = redis["spec"]["template"]["metadata"]["labels"]
    assert not server_selector.items() <= redis_labels.items()
    assert objs[("Service", "rr-redis")]["spec"]["selector"].items() <= redis_labels.items()


def test_extra_env_overrides_by_name_and_appends() -> None:
    env = container(build({**BASE, "env": [{"name": "RERANKER_DEVICE", "value": "cpu"},
                                           {"name": "EXTRA", "value": "1"}]}))["env"]
    names = [e["name"] for e in env]
    assert names.count("RERANKER_DEVICE") == 1
    assert {"name": "RERANKER_DEVICE", "value": "cpu"} in env
    assert names[-1] == "EXTRA"


def test_config_hash_rolls_pods_on_settings_change_only() -> None:
    def hash_of(spec: dict) -> str:
        annotations = build(spec)[("Deployment", "rr")]["spec"]["template"]["metadata"][
            "annotations"]
        return str(annotations["reranker.dev/config-hash"])

    base = hash_of(BASE)
    assert hash_of(BASE) == base  # deterministic
    assert hash_of({**BASE, "parallelism": {"maxParallel": 8}}) != base
    assert hash_of({**BASE, "quantization": "int8"}) != base
    assert hash_of({**BASE, "apiKeySecretRef": {"name": "k"}}) != base
    assert hash_of({**BASE, "replicas": 7}) == base  # scaling is not a rollout


def test_deployment_shape() -> None:
    objs = build({**BASE, "replicas": 3, "drainSeconds": 45})
    dep = objs[("Deployment", "rr")]
    assert dep["spec"]["replicas"] == 3
    selector = dep["spec"]["selector"]["matchLabels"]
    pod = dep["spec"]["template"]
    assert selector.items() <= pod["metadata"]["labels"].items()
    assert manifests.selector_string("rr") == ",".join(
        f"{k}={v}" for k, v in sorted(selector.items()))
    assert dep["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    c = pod["spec"]["containers"][0]
    assert c["image"] == "example.com/reranker:1"
    assert c["ports"] == [{"name": "http", "containerPort": contract.DEFAULT_PORT,
                           "protocol": "TCP"}]
    assert c["livenessProbe"]["httpGet"] == {"path": contract.ROUTE_HEALTH, "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": contract.ROUTE_READY, "port": "http"}
    assert c["lifecycle"]["preStop"] == {"sleep": {"seconds": manifests.PRESTOP_SLEEP_SECONDS}}
    grace = pod["spec"]["terminationGracePeriodSeconds"]
    assert grace > manifests.PRESTOP_SLEEP_SECONDS + 45
    assert objs[("ConfigMap", "rr-config")]["data"]["RERANKER_DRAIN_SECONDS"] == "45"


@pytest.mark.parametrize("rollout,expected", [
    # A GPU pool at capacity has no room for a surge pod: replace one pod at a time instead.
    ({"maxSurge": 0, "maxUnavailable": 1}, {"maxSurge": 0, "maxUnavailable": 1}),
    ({"maxSurge": "25%", "maxUnavailable": "25%"}, {"maxSurge": "25%", "maxUnavailable": "25%"}),
    ({"maxSurge": 2}, {"maxSurge": 2, "maxUnavailable": 0}),
])
def test_rollout_strategy_is_configurable(rollout: dict, expected: dict) -> None:
    dep = build({**BASE, "rollout": rollout})[("Deployment", "rr")]
    assert dep["spec"]["strategy"] == {"type": "RollingUpdate", "rollingUpdate": expected}


def test_pods_are_unprivileged_with_writable_tmp_and_model_cache() -> None:
    pod = build(BASE)[("Deployment", "rr")]["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts["/tmp"]]["emptyDir"] == {}
    assert manifests.HF_HOME.startswith(next(p for p, n in mounts.items()
                                             if n == "model-cache"))
    assert pod["automountServiceAccountToken"] is False


def test_cuda_gets_a_gpu_and_its_toleration() -> None:
    pod = build({**BASE, "device": "cuda", "quantization": "bf16", "gpus": 2,
                 "nodeSelector": {"pool": "gpu"},
                 "resources": {"limits": {"memory": "16Gi"}}})[("Deployment", "rr")][
        "spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["resources"]["limits"] == {"memory": "16Gi", "nvidia.com/gpu": 2}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
        "tolerations"]
    assert pod["nodeSelector"] == {"pool": "gpu"}


def test_cpu_gets_no_gpu() -> None:
    pod = build(BASE)[("Deployment", "rr")]["spec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in str(pod)
    assert "tolerations" not in pod and "nodeSelector" not in pod


def test_placement_is_passed_through() -> None:
    affinity = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": [
            {"key": "zone", "operator": "In", "values": ["a"]}]}]}}}
    pod = build({**BASE, "affinity": affinity,
                 "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "rr",
                                  "effect": "NoSchedule"}],
                 "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "zone",
                                                "whenUnsatisfiable": "ScheduleAnyway"}]})[
        ("Deployment", "rr")]["spec"]["template"]["spec"]
    assert pod["affinity"] == affinity
    assert pod["tolerations"][0]["key"] == "dedicated"
    spread = pod["topologySpreadConstraints"][0]
    assert spread["labelSelector"] == {"matchLabels": manifests.selector_labels("rr")}


def test_model_from_pvc() -> None:
    objs = build({"model": {"pvc": {"claimName": "models", "path": "ms-marco/"}}})
    pod = objs[("Deployment", "rr")]["spec"]["template"]["spec"]
    assert {"name": "model", "persistentVolumeClaim": {"claimName": "models",
                                                       "readOnly": True}} in pod["volumes"]
    assert {"name": "model", "mountPath": "/models", "readOnly": True} in pod["containers"][0][
        "volumeMounts"]
    data = objs[("ConfigMap", "rr-config")]["data"]
    assert data["RERANKER_LOCAL_MODEL_PATH"] == "/models/ms-marco"
    assert "RERANKER_MODEL" not in data


def test_local_path_alone_is_the_folder_the_server_loads(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The pod's settings, read by the server's own settings class, resolve to that folder."""
    from reranker.backends import model_files
    from reranker.settings import Settings

    folder = tmp_path / "ms-marco"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(
        {"architectures": ["BertForSequenceClassification"], "max_position_embeddings": 512}))
    objs = build({"model": {"localPath": str(folder)}})
    data = objs[("ConfigMap", "rr-config")]["data"]
    assert "RERANKER_MODEL" not in data
    assert {e["name"] for e in container(objs)["env"]} >= set(data)
    for key, value in data.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    files = model_files.resolve(settings.model, revision=settings.model_revision,
                                local_fallback=settings.local_model_path,
                                kind=settings.model_kind, max_length=settings.max_length)
    assert files.path == folder.resolve() and files.kind == "cross-encoder"
    assert files.name == str(folder)


def test_service() -> None:
    svc = build({**BASE, "service": {"type": "LoadBalancer", "port": 80}})[("Service", "rr")]
    assert svc["spec"]["type"] == "LoadBalancer"
    assert svc["spec"]["ports"] == [{"name": "http", "port": 80, "targetPort": "http",
                                     "protocol": "TCP"}]
    assert svc["spec"]["selector"] == manifests.selector_labels("rr")


@pytest.mark.parametrize("metric,expected", [
    ("queueDepth", {"type": "Pods", "pods": {
        "metric": {"name": contract.METRIC_QUEUE_DEPTH},
        "target": {"type": "AverageValue", "averageValue": "32"}}}),
    ("inflight", {"type": "Pods", "pods": {
        "metric": {"name": contract.METRIC_INFLIGHT},
        "target": {"type": "AverageValue", "averageValue": "8"}}}),
    ("cpu", {"type": "Resource", "resource": {
        "name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}}}),
])
def test_hpa_targets_the_reranker_deployment(metric: str, expected: dict) -> None:
    behavior = {"scaleDown": {"stabilizationWindowSeconds": 300}}
    hpa = build({**BASE, "resources": {"requests": {"cpu": "1"}},
                 "autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 9,
                                 "metric": metric, "behavior": behavior}})[
        ("HorizontalPodAutoscaler", "rr")]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "reranker.dev/v1alpha1",
                                             "kind": "RerankerDeployment", "name": "rr"}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 9)
    assert hpa["spec"]["metrics"] == [expected]
    assert hpa["spec"]["behavior"] == behavior


def test_pdb() -> None:
    pdb = build(BASE)[("PodDisruptionBudget", "rr")]
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"] == {"selector": {"matchLabels": manifests.selector_labels("rr")},
                           "maxUnavailable": 1}
    pdb = build({**BASE, "podDisruptionBudget": {"minAvailable": "50%"}})[
        ("PodDisruptionBudget", "rr")]
    assert pdb["spec"]["minAvailable"] == "50%" and "maxUnavailable" not in pdb["spec"]


def test_service_monitor() -> None:
    sm = build({**BASE, "monitoring": {"serviceMonitor": {
        "enabled": True, "interval": "15s", "labels": {"release": "prom"}}}})[
        ("ServiceMonitor", "rr")]
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["metadata"]["labels"]["release"] == "prom"
    assert sm["spec"]["endpoints"] == [{"port": "http", "path": contract.ROUTE_METRICS,
                                        "interval": "15s"}]
    assert sm["spec"]["selector"]["matchLabels"].items() <= build(BASE)[("Service", "rr")][
        "metadata"]["labels"].items()


def test_builders_are_pure() -> None:
    spec = {**BASE, "autoscaling": {"enabled": True}, "env": [{"name": "A", "value": "1"}]}
    before = repr(spec)
    assert build(spec) == build(spec)
    assert repr(spec) == before  # the input is not mutated


def test_api_keys_are_a_mounted_file_so_that_a_rotation_reaches_running_pods() -> None:
    """Env vars from a Secret are fixed when the container starts; a Secret volume is updated
    by the kubelet, and the server reads the keys file again when it changes."""
    objs = build({**BASE, "apiKeySecretRef": {"name": "keys"}})
    env = env_of(objs)
    assert "RERANKER_API_KEYS" not in env
    assert env["RERANKER_API_KEYS_FILE"] == {
        "name": "RERANKER_API_KEYS_FILE", "value": f"{manifests.API_KEYS_MOUNT}/api-keys"}
    pod = objs[("Deployment", "rr")]["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if v["name"] == "api-keys")
    assert volume["secret"] == {"secretName": "keys", "items": [{"key": "api-keys",
                                                                  "path": "api-keys"}]}
    mount = next(m for m in container(objs)["volumeMounts"] if m["name"] == "api-keys")
    assert mount == {"name": "api-keys", "mountPath": manifests.API_KEYS_MOUNT, "readOnly": True}
    # No subPath: a subPath mount is never updated by the kubelet.
    assert "subPath" not in mount


def test_managed_redis_needs_a_password_and_admits_only_the_fleets_pods() -> None:
    objs = build({**BASE, "cache": {"redis": {"managed": {"enabled": True}}}})
    redis = objs[("Deployment", "rr-redis")]["spec"]["template"]["spec"]
    (c,) = redis["containers"]
    assert c["args"][c["args"].index("--requirepass") + 1] == f"$({manifests.REDIS_PASSWORD_ENV})"
    assert {e["name"]: e for e in c["env"]}[manifests.REDIS_PASSWORD_ENV]["valueFrom"] == {
        "secretKeyRef": {"name": "rr-redis-auth", "key": "password"}}
    policy = objs[("NetworkPolicy", "rr-redis")]
    assert policy["apiVersion"] == "networking.k8s.io/v1"
    assert policy["metadata"]["ownerReferences"][0]["uid"] == UID
    assert policy["spec"] == {
        "podSelector": {"matchLabels": manifests.selector_labels("rr", "redis")},
        "policyTypes": ["Ingress"],
        "ingress": [{"from": [{"podSelector": {"matchLabels": manifests.selector_labels("rr")}}],
                     "ports": [{"protocol": "TCP", "port": manifests.REDIS_PORT}]}]}
    # The Secret is built apart (its password is generated once, by the reconciler).
    assert ("Secret", "rr-redis-auth") not in objs
    secret = manifests.redis_password_secret(owner(BASE), "s3cret")
    assert secret["metadata"]["name"] == "rr-redis-auth"
    assert secret["metadata"]["ownerReferences"][0]["uid"] == UID
    assert secret["type"] == "Opaque" and secret["stringData"] == {"password": "s3cret"}


def test_no_managed_redis_without_the_cache() -> None:
    objs = build({**BASE, "cache": {"enabled": False, "redis": {"managed": {"enabled": True}}}})
    assert not {k for k in objs if k[1].startswith("rr-redis")}
    assert "REDIS_URL" not in env_of(objs)
    assert objs[("ConfigMap", "rr-config")]["data"]["REDIS_ENABLED"] == "false"
    objs = build({**BASE, "cache": {"enabled": False, "redis": {"urlSecretRef": {"name": "r"}}}})
    assert "REDIS_URL" not in env_of(objs)
    assert objs[("ConfigMap", "rr-config")]["data"]["REDIS_ENABLED"] == "false"

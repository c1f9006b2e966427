"""Pure builders: every child object of a RerankerDeployment, from its spec.

No API calls and no clock here: the same owner and `Defaults` give the same manifests, so the
reconciler can compare them with the live objects and write only what differs, and the unit
tests can check each field without a cluster. Children are adopted (`kopf.adopt`): owner
reference for garbage collection, namespace, and the owner's labels.

Settings reach the server as environment variables named by the server's contract
(`reranker.contract.ENV_VARS`): the ConfigMap holds them, and the pod template lists each one
(`valueFrom.configMapKeyRef`) so `kubectl describe` shows what a pod runs with. A hash of the
settings on the pod template makes a settings change roll the pods. Secrets never go through
the ConfigMap: REDIS_URL is a `secretKeyRef`, the API keys a mounted Secret file
(RERANKER_API_KEYS_FILE) that the server reads again when the Secret is rotated.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from collections.abc import Mapping
from typing import Any

import kopf

from reranker import contract
from reranker_operator import external, fleet_precision, model_delivery, served_names
from reranker_operator.spec import RerankerSpec

Manifest = dict[str, Any]

OPERATOR_NAME = "reranker-operator"
APP_NAME = "reranker"
API_VERSION = f"{contract.API_GROUP}/{contract.API_VERSION}"

LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_PART_OF = "app.kubernetes.io/part-of"
LABEL_VERSION = "app.kubernetes.io/version"

ANNOTATION_CONFIG_HASH = f"{contract.API_GROUP}/config-hash"

#: EndpointSlices of a Service carry its name; the managed-by label says which controller owns
#: a slice. The built-in EndpointSlice controller manages only slices labelled with its own
#: value (endpointslice-controller.k8s.io) and leaves this one alone (docs/macs.md).
LABEL_SERVICE_NAME = "kubernetes.io/service-name"
LABEL_SLICE_MANAGED_BY = "endpointslice.kubernetes.io/managed-by"
SLICE_MANAGER = f"{OPERATOR_NAME}.{contract.API_GROUP}"
EXTERNAL_COMPONENT = "external-endpoints"

CONTAINER_NAME = "reranker"
PORT_NAME = "http"
PRESTOP_SLEEP_SECONDS = 5
#: Added to preStop + drain so the kubelet's SIGKILL never cuts a drain short.
GRACE_MARGIN_SECONDS = 15
CACHE_MOUNT = "/cache"
HF_HOME = f"{CACHE_MOUNT}/huggingface"
MODEL_CACHE_DIR = f"{CACHE_MOUNT}/reranker"
MODELS_MOUNT = "/models"
API_KEYS_MOUNT = "/etc/reranker/api-keys"
API_KEYS_FILE = "api-keys"
REDIS_PORT = 6379
#: Holds the managed Redis' password in its pods and the server pods; the kubelet expands
#: $(REDIS_PASSWORD) in the Redis args and in REDIS_URL (it is not a server setting).
REDIS_PASSWORD_ENV = "REDIS_PASSWORD"
REDIS_PASSWORD_KEY = "password"
GPU_RESOURCE = "nvidia.com/gpu"
UNPRIVILEGED_UID = 10001
REDIS_UID = 999  # the `redis` user of reranker-fleet/redis (deploy/redis) and the official images

#: Settings the operator renders, each a name from the server's env contract. HF_HOME is
#: Hugging Face's own variable (where models are cached), not the server's.
SECRET_ENV = ("REDIS_URL", "RERANKER_API_KEYS_FILE")
_FOREIGN_ENV = ("HF_HOME", REDIS_PASSWORD_ENV, *(
    k for k in model_delivery.server_cache_settings() if k not in contract.ENV_VARS))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Defaults:
    """Operator-wide values a spec may leave unset (from the operator's settings), and what the
    operator found out about the cluster (`image_volumes`: the reconciler's `with_cluster`)."""

    #: The slim (OpenVINO) server image, for specs it can serve (model_delivery.server_image).
    server_image: str
    redis_image: str
    #: The torch server image: the other specs, and the model-cache Job. None: server_image.
    server_torch_image: str | None = None
    #: Pods mount spec.model.image as an image volume (else an init container copies it).
    image_volumes: bool = False

    @property
    def torch_image(self) -> str:
        return self.server_torch_image or self.server_image


# --- names and labels -------------------------------------------------------------------------

def config_map_name(name: str) -> str:
    return f"{name}-config"


def redis_name(name: str) -> str:
    return f"{name}-redis"


def redis_secret_name(name: str) -> str:
    return f"{name}-redis-auth"


def selector_labels(name: str, component: str = "server") -> dict[str, str]:
    """The immutable labels that select one component's pods."""
    return {LABEL_NAME: APP_NAME, LABEL_INSTANCE: name, LABEL_COMPONENT: component}


def labels(name: str, component: str = "server") -> dict[str, str]:
    return {**selector_labels(name, component), LABEL_MANAGED_BY: OPERATOR_NAME,
            LABEL_PART_OF: "reranker-fleet"}


def selector_string(name: str) -> str:
    """The server pods' selector as a string, as the scale subresource wants it."""
    return ",".join(f"{k}={v}" for k, v in sorted(selector_labels(name).items()))


def service_url(name: str, namespace: str, port: int) -> str:
    return f"http://{name}.{namespace}.svc:{port}"


# --- settings ---------------------------------------------------------------------------------

def _fmt(value: Any) -> str:
    """Env values are strings: booleans as true/false, 2.0 as 2."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def server_settings(spec: RerankerSpec) -> dict[str, str]:
    """The ConfigMap data: every server setting the spec decides, by env var name.

    Unset tunables are left out so the server's own defaults apply.
    """
    m, p, c = spec.model, spec.parallelism, spec.cache
    local_path = m.local_path
    if m.pvc_claim:
        local_path = f"{MODELS_MOUNT}/{m.pvc_path.strip('/')}" if m.pvc_path else MODELS_MOUNT
    if m.image is not None:  # an image volume or the init container's copy, at /models
        local_path = MODELS_MOUNT
    candidates: dict[str, Any] = {
        "RERANKER_MODEL": m.id,
        "RERANKER_MODEL_REVISION": m.revision,
        "RERANKER_MODEL_KIND": m.kind,
        "RERANKER_PROMPT_TEMPLATE": m.prompt_template,
        "RERANKER_LOCAL_MODEL_PATH": local_path,
        "RERANKER_MAX_LENGTH": m.max_length,
        "RERANKER_DEVICE": spec.device,
        "RERANKER_QUANTIZATION": spec.quantization,
        "RERANKER_RUNTIME": spec.runtime,
        # converted models (OpenVINO IR) next to the downloaded ones: a container restart does not convert again
        "RERANKER_MODEL_CACHE_DIR": MODEL_CACHE_DIR,
        # the fleet's precision records (the NAME-precision ConfigMap, mounted read-only)
        fleet_precision.ENV_RECORD_DIR: fleet_precision.MOUNT_PATH,
        "RERANKER_MAX_PARALLEL": p.max_parallel,
        "RERANKER_MAX_QUEUE": p.max_queue,
        "RERANKER_QUEUE_TIMEOUT": p.queue_timeout_seconds,
        "RERANKER_BATCH_SIZE": p.batch_size,
        "MICRO_BATCH_ENABLED": p.micro_batching_enabled,
        "MICRO_BATCH_WINDOW_MS": p.micro_batching_window_ms,
        "ENABLE_PREDICTION_CACHE": c.enabled,
        "CACHE_TTL_SECONDS": c.ttl_seconds,
        "REDIS_ENABLED": c.redis_enabled,
        "RERANKER_DRAIN_SECONDS": spec.drain_seconds,
        "HOST": "0.0.0.0",
        "PORT": contract.DEFAULT_PORT,
        "LOG_LEVEL": spec.log_level,
        "HF_HOME": HF_HOME,
    }
    if m.cache is not None:  # the fleet's filled cache volume, offline (model_delivery)
        candidates.update(model_delivery.server_cache_settings())
    # Aliases: the loaded model's name and them, and no other (docs/operator.md, "Served names").
    loaded = served_names.loaded_name(model=m.id, local_path=local_path)
    candidates[served_names.ENV] = served_names.env_value(m.served_names, loaded=loaded)
    return {k: _fmt(v) for k, v in candidates.items() if v is not None}


def _secret_env(name: str, spec: RerankerSpec) -> list[Manifest]:
    env: list[Manifest] = []
    if spec.cache.redis_enabled and spec.cache.redis_url_secret is not None:
        ref = spec.cache.redis_url_secret
        env.append({"name": "REDIS_URL",
                    "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}})
    elif spec.cache.runs_managed_redis:
        env += [_redis_password_env(name),
                {"name": "REDIS_URL", "value": f"redis://:$({REDIS_PASSWORD_ENV})@"
                                               f"{redis_name(name)}:{REDIS_PORT}/0"}]
    if spec.api_key_secret is not None:
        # A file, not an env var: the kubelet updates a Secret volume when the Secret changes
        # and the server reads the file again, so a key rotation needs no restart.
        env.append({"name": "RERANKER_API_KEYS_FILE", "value": f"{API_KEYS_MOUNT}/{API_KEYS_FILE}"})
    return env


def container_env(name: str, spec: RerankerSpec) -> list[Manifest]:
    """Settings (from the ConfigMap), secrets, then the user's extra env, which wins by name."""
    cm = config_map_name(name)
    env: list[Manifest] = [
        {"name": key, "valueFrom": {"configMapKeyRef": {"name": cm, "key": key}}}
        for key in server_settings(spec)
    ]
    env += _secret_env(name, spec)
    extra = {str(var["name"]): copy.deepcopy(dict(var)) for var in spec.env}
    env = [extra.pop(var["name"], var) for var in env]
    return env + list(extra.values())


def config_hash(name: str, spec: RerankerSpec) -> str:
    """Changes whenever what the server process would see changes (settings, secret refs,
    extra env), so that the pods roll. A Secret's content is not included: the API keys are a
    mounted file that the server reads again when the kubelet updates it; a rotated Redis URL
    needs `kubectl rollout restart`."""
    payload = {"settings": server_settings(spec), "env": container_env(name, spec)}
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# --- children ---------------------------------------------------------------------------------

def _child_meta(owner_name: str, child_name: str, component: str = "server") -> Manifest:
    return {"name": child_name, "labels": labels(owner_name, component)}


def config_map(name: str, spec: RerankerSpec) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _child_meta(name, config_map_name(name)),
        "data": server_settings(spec),
    }


def _resources(spec: RerankerSpec) -> Manifest:
    resources: Manifest = {k: dict(v) for k, v in (spec.resources or {}).items() if v}
    if spec.device == "cuda":
        gpus = spec.gpus or 1
        resources.setdefault("limits", {}).setdefault(GPU_RESOURCE, gpus)
        # Extended resources must have requests == limits when both are given.
        if GPU_RESOURCE in resources.get("requests", {}):
            resources["requests"][GPU_RESOURCE] = resources["limits"][GPU_RESOURCE]
    return resources


def _tolerations(spec: RerankerSpec) -> list[Manifest]:
    tolerations = [dict(t) for t in spec.tolerations]
    if spec.device == "cuda" and not any(t.get("key") == GPU_RESOURCE for t in tolerations):
        # GPU node pools are commonly tainted nvidia.com/gpu:NoSchedule.
        tolerations.append({"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"})
    return tolerations


def _spread(name: str, spec: RerankerSpec) -> list[Manifest]:
    out = []
    for constraint in spec.topology_spread_constraints:
        c = copy.deepcopy(dict(constraint))
        c.setdefault("labelSelector", {"matchLabels": selector_labels(name)})
        out.append(c)
    return out


def _probe(path: str, *, period: int, failures: int, timeout: int = 5) -> Manifest:
    return {"httpGet": {"path": path, "port": PORT_NAME}, "periodSeconds": period,
            "timeoutSeconds": timeout, "failureThreshold": failures}


def _restricted_pod_security() -> Manifest:
    return {"runAsNonRoot": True, "runAsUser": UNPRIVILEGED_UID, "runAsGroup": UNPRIVILEGED_UID,
            "fsGroup": UNPRIVILEGED_UID, "seccompProfile": {"type": "RuntimeDefault"}}


def _restricted_container_security() -> Manifest:
    return {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
            "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]}}


def server_container(name: str, spec: RerankerSpec, defaults: Defaults) -> Manifest:
    mounts: list[Manifest] = [{"name": "tmp", "mountPath": "/tmp"},
                              {"name": "model-cache", "mountPath": CACHE_MOUNT}]
    model_mount = model_delivery.model_mount(spec, image_volumes=defaults.image_volumes)
    if model_mount is not None:
        mounts.append(model_mount)
    if spec.model.cache is not None:
        mounts.append(model_delivery.cache_mount(read_only=True))
    if spec.api_key_secret is not None:  # no subPath: the kubelet never updates those
        mounts.append({"name": "api-keys", "mountPath": API_KEYS_MOUNT, "readOnly": True})
    container: Manifest = {
        "name": CONTAINER_NAME,
        "image": model_delivery.server_image(spec, slim=defaults.server_image,
                                             torch=defaults.torch_image),
        "ports": [{"name": PORT_NAME, "containerPort": contract.DEFAULT_PORT, "protocol": "TCP"}],
        "env": container_env(name, spec),
        # The startup probe holds off liveness until the process answers /health (imports can
        # take seconds; a slim server waiting for its model's conversion answers it, so waiting
        # is never mistaken for a hang), checked every second for up to 10 minutes.
        "startupProbe": _probe(contract.ROUTE_HEALTH, period=1, failures=600),
        "livenessProbe": _probe(contract.ROUTE_HEALTH, period=10, failures=3),
        # Every second: a pod is Ready within ~1 s of its model being ready (a pod that serves
        # in seconds must not wait out a 5 s period); one local GET per second is nothing.
        # Three misses (3 s) take it out of the Service; a drain says 503 at once and preStop
        # keeps it serving meanwhile.
        "readinessProbe": _probe(contract.ROUTE_READY, period=1, failures=3, timeout=2),
        # Keep serving while endpoints are removed, then SIGTERM starts the server's drain.
        "lifecycle": {"preStop": {"sleep": {"seconds": PRESTOP_SLEEP_SECONDS}}},
        "resources": _resources(spec),
        "securityContext": _restricted_container_security(),
        "volumeMounts": mounts,
        # The server writes why it stopped to the termination log (a model that cannot load);
        # any other crash reports the log's tail. The operator's Degraded condition shows it.
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    # The fleet's precision records: a later pod reads auto's pick instead of timing it.
    container["volumeMounts"].append(fleet_precision.volume_mount())
    if spec.image_pull_policy:
        container["imagePullPolicy"] = spec.image_pull_policy
    return container


def pod_template(name: str, spec: RerankerSpec, defaults: Defaults) -> Manifest:
    cache_volume: Manifest = {"name": "model-cache", "emptyDir": {}}
    if spec.model_cache_size_limit is not None:
        cache_volume["emptyDir"] = {"sizeLimit": spec.model_cache_size_limit}
    volumes: list[Manifest] = [{"name": "tmp", "emptyDir": {}}, cache_volume]
    volumes += _model_volumes(spec)
    image_volumes, init_containers = model_delivery.model_image_pieces(
        spec, image_volumes=defaults.image_volumes,
        container_security=_restricted_container_security())
    volumes += image_volumes
    if spec.model.cache is not None:
        volumes.append(model_delivery.cache_volume(name, spec.model.cache, read_only=True))
    if spec.api_key_secret is not None:
        volumes.append({"name": "api-keys", "secret": {
            "secretName": spec.api_key_secret.name,
            "items": [{"key": spec.api_key_secret.key, "path": API_KEYS_FILE}]}})
    volumes.append(fleet_precision.volume(config_map_name=fleet_precision.config_map_name(name)))
    pod_spec: Manifest = {
        **({"initContainers": init_containers} if init_containers else {}),
        "containers": [server_container(name, spec, defaults)],
        "volumes": volumes,
        "terminationGracePeriodSeconds":
            PRESTOP_SLEEP_SECONDS + spec.drain_seconds + GRACE_MARGIN_SECONDS,
        "securityContext": _restricted_pod_security(),
        # The server never talks to the Kubernetes API.
        "automountServiceAccountToken": False,
    }
    optional: dict[str, Any] = {
        "nodeSelector": dict(spec.node_selector) if spec.node_selector else None,
        "tolerations": _tolerations(spec) or None,
        "affinity": copy.deepcopy(dict(spec.affinity)) if spec.affinity else None,
        "topologySpreadConstraints": _spread(name, spec) or None,
        "priorityClassName": spec.priority_class_name,
        "serviceAccountName": spec.service_account_name,
        "imagePullSecrets": [{"name": s} for s in spec.image_pull_secrets] or None,
    }
    pod_spec.update({k: v for k, v in optional.items() if v is not None})
    return {
        "metadata": {
            "labels": {**(spec.pod_labels or {}), **labels(name)},
            "annotations": {**(spec.pod_annotations or {}),
                            ANNOTATION_CONFIG_HASH: config_hash(name, spec)},
        },
        "spec": pod_spec,
    }


def _model_volumes(spec: RerankerSpec) -> list[Manifest]:
    if not spec.model.pvc_claim:
        return []
    return [{"name": model_delivery.MODEL_VOLUME, "persistentVolumeClaim": {
        "claimName": spec.model.pvc_claim, "readOnly": True}}]


def deployment(name: str, spec: RerankerSpec, defaults: Defaults, *,
               model_cache: model_delivery.CacheState | None = None) -> Manifest:
    # No pods until the fleet's cache volume is filled (the slim pods could only wait).
    replicas = 0 if model_cache is not None and not model_cache.ready else spec.replicas
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _child_meta(name, name),
        "spec": {
            # Copied from the RerankerDeployment (the one writer: HPA or `kubectl scale`).
            "replicas": replicas,
            "selector": {"matchLabels": selector_labels(name)},
            # By default a new pod must be ready (model loaded) before an old one goes;
            # spec.rollout lets a pool at capacity replace pods in place instead.
            "strategy": {"type": "RollingUpdate",
                         "rollingUpdate": {"maxSurge": spec.rollout.max_surge,
                                           "maxUnavailable": spec.rollout.max_unavailable}},
            "revisionHistoryLimit": 3,
            "template": pod_template(name, spec, defaults),
        },
    }


def model_cache_pvc(name: str, spec: RerankerSpec) -> Manifest | None:
    """The PVC `NAME-model-cache` for `model.cache.size` (None with an existing claimName)."""
    cache = spec.model.cache
    if cache is None or cache.size is None:
        return None
    return model_delivery.cache_pvc(
        _child_meta(name, model_delivery.cache_pvc_name(name), model_delivery.CACHE_COMPONENT),
        cache)


def model_cache_job(name: str, spec: RerankerSpec, defaults: Defaults) -> Manifest | None:
    """The Job that fills the fleet's cache volume once (`reranker convert` in the torch image:
    download, conversion to OpenVINO IR, precision measured and recorded there), on the same
    kind of node as the pods (the precision is measured on that CPU). Its result is the JSON
    `convert` writes to the termination log."""
    cache = spec.model.cache
    if cache is None:
        return None
    mounts: list[Manifest] = [{"name": "tmp", "mountPath": "/tmp"},
                              model_delivery.cache_mount(read_only=False)]
    model_mount = model_delivery.model_mount(spec, image_volumes=defaults.image_volumes)
    if model_mount is not None:
        mounts.append(model_mount)
    volumes: list[Manifest] = [{"name": "tmp", "emptyDir": {}},
                               model_delivery.cache_volume(name, cache, read_only=False)]
    volumes += _model_volumes(spec)
    image_volumes, init_containers = model_delivery.model_image_pieces(
        spec, image_volumes=defaults.image_volumes,
        container_security=_restricted_container_security())
    volumes += image_volumes
    env = model_delivery.job_settings(server_settings(spec))
    extra = {str(var["name"]): copy.deepcopy(dict(var)) for var in spec.env}
    env = [extra.pop(var["name"], var) for var in env] + list(extra.values())
    container: Manifest = {
        "name": model_delivery.JOB_CONTAINER,
        "image": defaults.torch_image,
        "command": ["reranker", "convert", "--termination-log", "/dev/termination-log"],
        "env": env,
        # The fleet's own requests and limits: the conversion loads the model as a pod does
        # (no GPU: the conversion and the OpenVINO precision run on the CPU).
        "resources": {k: {r: q for r, q in dict(v).items() if r != GPU_RESOURCE}
                      for k, v in (spec.resources or {}).items() if v},
        "securityContext": _restricted_container_security(),
        "volumeMounts": mounts,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if spec.image_pull_policy:
        container["imagePullPolicy"] = spec.image_pull_policy
    pod_spec: Manifest = {
        **({"initContainers": init_containers} if init_containers else {}),
        "containers": [container],
        "volumes": volumes,
        "restartPolicy": "Never",
        "securityContext": _restricted_pod_security(),
        "automountServiceAccountToken": False,
    }
    optional: dict[str, Any] = {
        "nodeSelector": dict(spec.node_selector) if spec.node_selector else None,
        "tolerations": [dict(t) for t in spec.tolerations] or None,
        "affinity": copy.deepcopy(dict(spec.affinity)) if spec.affinity else None,
        "serviceAccountName": spec.service_account_name,
        "imagePullSecrets": [{"name": s} for s in spec.image_pull_secrets] or None,
    }
    pod_spec.update({k: v for k, v in optional.items() if v is not None})
    template = {"metadata": {"labels": labels(name, model_delivery.CACHE_COMPONENT)},
                "spec": pod_spec}
    return model_delivery.cache_job(_child_meta(name, "", model_delivery.CACHE_COMPONENT),
                                    template)


def service(name: str, spec: RerankerSpec) -> Manifest:
    meta = _child_meta(name, name)
    if spec.service.annotations:
        meta["annotations"] = dict(spec.service.annotations)
    # A selector Service: the EndpointSlice controller lists the pods; external endpoints join
    # through the operator's own EndpointSlices (external_endpoint_slices), labelled
    # kubernetes.io/service-name=NAME and managed-by the operator (docs/macs.md).
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta,
        "spec": {
            "type": spec.service.type,
            "selector": selector_labels(name),
            "ports": [{"name": PORT_NAME, "port": spec.service.port, "targetPort": PORT_NAME,
                       "protocol": "TCP"}],
        },
    }


def _hpa_metric(spec: RerankerSpec) -> Manifest:
    a = spec.autoscaling
    if a.metric == "cpu":
        return {"type": "Resource", "resource": {
            "name": "cpu", "target": {"type": "Utilization",
                                      "averageUtilization": a.effective_target}}}
    metric = contract.METRIC_QUEUE_DEPTH if a.metric == "queueDepth" else contract.METRIC_INFLIGHT
    return {"type": "Pods", "pods": {
        "metric": {"name": metric},
        "target": {"type": "AverageValue", "averageValue": str(a.effective_target)}}}


def horizontal_pod_autoscaler(name: str, spec: RerankerSpec) -> Manifest:
    a = spec.autoscaling
    hpa_spec: Manifest = {
        # The HPA scales the RerankerDeployment (its scale subresource), not the Deployment:
        # the operator then copies spec.replicas down, so replicas have exactly one writer.
        "scaleTargetRef": {"apiVersion": API_VERSION, "kind": contract.KIND_DEPLOYMENT,
                           "name": name},
        "minReplicas": a.min_replicas,
        "maxReplicas": a.max_replicas,
        "metrics": [_hpa_metric(spec)],
    }
    if a.behavior:
        hpa_spec["behavior"] = copy.deepcopy(dict(a.behavior))
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": _child_meta(name, name),
        "spec": hpa_spec,
    }


def pod_disruption_budget(name: str, spec: RerankerSpec) -> Manifest:
    budget: Manifest
    if spec.pdb.min_available is not None:
        budget = {"minAvailable": spec.pdb.min_available}
    else:
        budget = {"maxUnavailable": spec.pdb.max_unavailable
                  if spec.pdb.max_unavailable is not None else 1}
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _child_meta(name, name),
        "spec": {"selector": {"matchLabels": selector_labels(name)}, **budget},
    }


def service_monitor(name: str, spec: RerankerSpec) -> Manifest:
    meta = _child_meta(name, name)
    meta["labels"] = {**(spec.service_monitor.labels or {}), **meta["labels"]}
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": meta,
        "spec": {
            "selector": {"matchLabels": selector_labels(name)},
            "endpoints": [{"port": PORT_NAME, "path": contract.ROUTE_METRICS,
                           "interval": spec.service_monitor.interval}],
        },
    }


def _redis_password_env(name: str) -> Manifest:
    return {"name": REDIS_PASSWORD_ENV, "valueFrom": {"secretKeyRef": {
        "name": redis_secret_name(name), "key": REDIS_PASSWORD_KEY}}}


def redis_password_secret(owner: Mapping[str, Any], password: str) -> Manifest:
    """The managed Redis' password, adopted by the RerankerDeployment. Built apart from
    `children`: the password is generated once by the reconciler and the Secret is created,
    never applied again (the operator cannot read Secrets, so it never compares one)."""
    name = owner["metadata"]["name"]
    secret: Manifest = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _child_meta(name, redis_secret_name(name), "redis"),
        "type": "Opaque",
        "stringData": {REDIS_PASSWORD_KEY: password},
    }
    kopf.adopt(secret, owner=_owner_view(owner))
    return secret


def redis_deployment(name: str, spec: RerankerSpec, defaults: Defaults) -> Manifest:
    r = spec.cache.managed_redis
    rname = redis_name(name)
    container: Manifest = {
        "name": "redis",
        "image": r.image or defaults.redis_image,
        # A cache, not a database: no persistence, bounded memory, least-recently-used eviction.
        # No client without the password (the kubelet expands $(REDIS_PASSWORD)).
        "args": ["--save", "", "--appendonly", "no", "--maxmemory", r.max_memory,
                 "--maxmemory-policy", "allkeys-lru", "--requirepass", f"$({REDIS_PASSWORD_ENV})"],
        "env": [_redis_password_env(name)],
        "ports": [{"name": "redis", "containerPort": REDIS_PORT, "protocol": "TCP"}],
        "readinessProbe": {"tcpSocket": {"port": "redis"}, "periodSeconds": 5},
        "livenessProbe": {"tcpSocket": {"port": "redis"}, "periodSeconds": 10},
        "resources": {k: dict(v) for k, v in (r.resources or {}).items() if v},
        "securityContext": _restricted_container_security(),
        "volumeMounts": [{"name": "data", "mountPath": "/data"}],
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _child_meta(name, rname, "redis"),
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": selector_labels(name, "redis")},
            "revisionHistoryLimit": 3,
            "template": {
                "metadata": {"labels": labels(name, "redis")},
                "spec": {
                    "containers": [container],
                    "volumes": [{"name": "data", "emptyDir": {}}],
                    "securityContext": {
                        "runAsNonRoot": True, "runAsUser": REDIS_UID, "runAsGroup": REDIS_UID,
                        "fsGroup": REDIS_UID, "seccompProfile": {"type": "RuntimeDefault"}},
                    "automountServiceAccountToken": False,
                },
            },
        },
    }


def redis_service(name: str) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _child_meta(name, redis_name(name), "redis"),
        "spec": {
            "type": "ClusterIP",
            "selector": selector_labels(name, "redis"),
            "ports": [{"name": "redis", "port": REDIS_PORT, "targetPort": "redis",
                       "protocol": "TCP"}],
        },
    }


def redis_network_policy(name: str) -> Manifest:
    """Only the fleet's server pods may connect to its Redis (where the network plugin
    enforces NetworkPolicies); the password guards it everywhere."""
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _child_meta(name, redis_name(name), "redis"),
        "spec": {
            "podSelector": {"matchLabels": selector_labels(name, "redis")},
            "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"podSelector": {"matchLabels": selector_labels(name)}}],
                         "ports": [{"protocol": "TCP", "port": REDIS_PORT}]}],
        },
    }


def endpoint_slice_name(name: str, address_type: str, port: int) -> str:
    return f"{name}-external-{address_type.lower()}-{port}"


def external_endpoint_slices(name: str, summary: external.Summary) -> list[Manifest]:
    """The EndpointSlices that add the external endpoints to the Service `name`.

    One slice per address family and port (a slice has one addressType and one port list).
    Every endpoint with a valid address is listed, ready or not, with the conditions its
    probes earned (ready = serving; never terminating: a Mac that shuts down deregisters).
    The port is named like the Service's, so that the Service's targetPort reaches it.
    """
    groups: dict[tuple[str, int], dict[str, Manifest]] = {}
    for ep in summary.endpoints:
        if not ep.listable:
            continue
        family = external.address_type(ep.address)
        listed = groups.setdefault((family, ep.port), {}).get(ep.address)
        if listed is not None:  # the same host twice (renamed): ready if either is
            listed["conditions"]["ready"] = listed["conditions"]["serving"] = (
                listed["conditions"]["ready"] or ep.ready)
            continue
        entry: Manifest = {"addresses": [ep.address],
                           "conditions": {"ready": ep.ready, "serving": ep.ready,
                                          "terminating": False}}
        if ep.source == external.SOURCE_REGISTERED:
            entry["targetRef"] = {"apiVersion": API_VERSION, "kind": contract.KIND_ENDPOINT,
                                  "name": ep.name}
        groups[(family, ep.port)][ep.address] = entry
    slices = []
    for (family, port), entries in sorted(groups.items()):
        meta = _child_meta(name, endpoint_slice_name(name, family, port), EXTERNAL_COMPONENT)
        meta["labels"].update({LABEL_SERVICE_NAME: name, LABEL_SLICE_MANAGED_BY: SLICE_MANAGER})
        slices.append({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": meta,
            "addressType": family,
            "ports": [{"name": PORT_NAME, "port": port, "protocol": "TCP"}],
            "endpoints": [entries[address] for address in sorted(entries)],
        })
    return slices


def children(owner: Mapping[str, Any], spec: RerankerSpec, defaults: Defaults,
             summary: external.Summary | None = None, *,
             model_cache: model_delivery.CacheState | None = None) -> list[Manifest]:
    """Every child the spec asks for, adopted by `owner` (the RerankerDeployment body).

    The ServiceMonitor is included when asked for; the reconciler drops it when the
    monitoring.coreos.com CRD is not installed (and says so in the status). The external
    endpoints' EndpointSlices come from `summary` (what the probes found); the Deployment has
    no pods while `model_cache` (the fill Job's state, with spec.model.cache) is not ready.
    """
    name = owner["metadata"]["name"]
    objs = [config_map(name, spec), deployment(name, spec, defaults, model_cache=model_cache),
            service(name, spec)]
    objs += [obj for obj in (model_cache_pvc(name, spec), model_cache_job(name, spec, defaults))
             if obj is not None]
    if spec.autoscaling.enabled:
        objs.append(horizontal_pod_autoscaler(name, spec))
    if spec.pdb.enabled:
        objs.append(pod_disruption_budget(name, spec))
    if spec.service_monitor.enabled:
        objs.append(service_monitor(name, spec))
    if spec.cache.runs_managed_redis:
        objs += [redis_deployment(name, spec, defaults), redis_service(name),
                 redis_network_policy(name)]
    if summary is not None:
        objs += external_endpoint_slices(name, summary)
    kopf.adopt(objs, owner=_owner_view(owner))
    return objs


def precision_config_map(owner: Mapping[str, Any], records: Mapping[str, str], *,
                         stamped: Mapping[str, str] | None = None) -> Manifest:
    """The `NAME-precision` ConfigMap of the fleet's precision records (`fleet_precision`),
    adopted by `owner`. Built apart from `children`: its data is what the pods reported (and
    what the live ConfigMap already holds), not the spec; the pods mount it whatever it holds,
    so a change never rolls them."""
    name = owner["metadata"]["name"]
    cm = fleet_precision.config_map(name, records, labels(name), stamped=stamped)
    kopf.adopt(cm, owner=_owner_view(owner))
    return cm


def _owner_view(owner: Mapping[str, Any]) -> kopf.Body:
    """Only what adoption needs, so that fields like status never leak into children."""
    meta = owner["metadata"]
    return kopf.Body({
        "apiVersion": owner.get("apiVersion", API_VERSION),
        "kind": owner.get("kind", contract.KIND_DEPLOYMENT),
        "metadata": {"name": meta["name"], "namespace": meta.get("namespace"),
                     "uid": meta.get("uid"), "labels": dict(meta.get("labels") or {})},
    })


def settings_env_names() -> frozenset[str]:
    """Names this module may render; all from the server's contract (checked by a test)."""
    return frozenset(contract.ENV_VARS) | frozenset(_FOREIGN_ENV)

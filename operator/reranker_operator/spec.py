"""The typed view of a RerankerDeployment's spec.

The API server applies the CRD's defaults and validation (schema + CEL) before the operator
sees an object, but the builders must not depend on that: unit tests pass partial specs, and
an older API server may skip CEL. So `parse` applies the same defaults as the CRD (a unit test
compares the two) and re-checks the cross-field rules, raising `InvalidSpec` with the same
messages. Everything downstream works on these frozen dataclasses, never on raw dicts.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from kubernetes.utils import parse_quantity

from reranker_operator import served_names as served

#: Devices a pod can run the model on (mps/mlx are Macs: external endpoints, not pods).
POD_DEVICES = ("cpu", "cuda")
QUANTIZATIONS = ("auto", "none", "int8", "int8-dynamic", "bf16", "fp16")
RUNTIMES = ("auto", "torch", "openvino")
MODEL_KINDS = ("auto", "cross-encoder", "bi-encoder", "llm")
AUTOSCALING_METRICS = ("queueDepth", "inflight", "cpu")

#: Target per pod when autoscaling.target is unset (the CRD cannot default by metric).
DEFAULT_TARGETS: Mapping[str, int] = {"queueDepth": 32, "inflight": 8, "cpu": 70}

DEFAULT_REPLICAS = 1
DEFAULT_DRAIN_SECONDS = 30
DEFAULT_SERVICE_PORT = 8000


def quantity(value: Any) -> Decimal:
    """A Kubernetes quantity ("500m", "2Gi", 3) as a number; ValueError if it is not one."""
    return Decimal(parse_quantity(value))  # type: ignore[no-untyped-call]


class InvalidSpec(ValueError):
    """The spec cannot be realised; the message says which field and why."""


@dataclasses.dataclass(frozen=True)
class SecretKeyRef:
    name: str
    key: str


@dataclasses.dataclass(frozen=True)
class ModelImage:
    """spec.model.image: an OCI image holding the model files (model_delivery.py)."""

    reference: str
    path: str = "/models"
    pull_policy: str | None = None


@dataclasses.dataclass(frozen=True)
class ModelCacheVolume:
    """spec.model.cache: the fleet's model-cache volume, an existing PVC (`claim_name`) or
    one the operator creates (`size`), filled once by a Job (model_delivery.py)."""

    claim_name: str | None = None
    size: str | int | None = None
    storage_class_name: str | None = None
    access_modes: tuple[str, ...] = ("ReadWriteOnce",)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    id: str | None = None
    revision: str | None = None
    kind: str = "auto"
    max_length: int | None = None
    local_path: str | None = None
    pvc_claim: str | None = None
    pvc_path: str | None = None
    image: ModelImage | None = None
    cache: ModelCacheVolume | None = None
    prompt_template: str | None = None
    served_names: tuple[str, ...] = ()  # aliases, beside the model's own id


@dataclasses.dataclass(frozen=True)
class Parallelism:
    max_parallel: int | None = None
    max_queue: int | None = None
    queue_timeout_seconds: float | None = None
    batch_size: int | None = None
    micro_batching_enabled: bool | None = None
    micro_batching_window_ms: float | None = None


@dataclasses.dataclass(frozen=True)
class Autoscaling:
    enabled: bool = False
    min_replicas: int = 1
    max_replicas: int = 5
    metric: str = "queueDepth"
    target: int | None = None
    behavior: Mapping[str, Any] | None = None

    @property
    def effective_target(self) -> int:
        return self.target if self.target is not None else DEFAULT_TARGETS[self.metric]


@dataclasses.dataclass(frozen=True)
class ScaleToZero:
    """spec.scaleToZero: the operator takes an idle fleet to 0 replicas (`scale_to_zero`)."""

    idle_seconds: int = 300  # KEDA's default cooldownPeriod


#: Bounds of spec.scaleToZero.idleSeconds (the CRD's; a test compares the two).
MIN_IDLE_SECONDS, MAX_IDLE_SECONDS = 30, 86400


@dataclasses.dataclass(frozen=True)
class ManagedRedis:
    enabled: bool = False
    image: str | None = None
    max_memory: str = "256mb"
    resources: Mapping[str, Any] | None = None


@dataclasses.dataclass(frozen=True)
class Cache:
    enabled: bool = True
    ttl_seconds: int | None = None
    redis_url_secret: SecretKeyRef | None = None
    managed_redis: ManagedRedis = ManagedRedis()

    @property
    def redis_enabled(self) -> bool:
        """The fleet shares scores through Redis (never without the cache itself)."""
        return self.enabled and (self.redis_url_secret is not None or self.managed_redis.enabled)

    @property
    def runs_managed_redis(self) -> bool:
        """The operator runs a Redis for the fleet: asked for, and the cache is on."""
        return self.enabled and self.managed_redis.enabled


@dataclasses.dataclass(frozen=True)
class ServiceSpec:
    type: str = "ClusterIP"
    port: int = DEFAULT_SERVICE_PORT
    annotations: Mapping[str, str] | None = None


@dataclasses.dataclass(frozen=True)
class ServiceMonitorSpec:
    enabled: bool = False
    interval: str = "30s"
    labels: Mapping[str, str] | None = None


@dataclasses.dataclass(frozen=True)
class PDBSpec:
    enabled: bool = True
    min_available: int | str | None = None
    max_unavailable: int | str | None = None


@dataclasses.dataclass(frozen=True)
class Rollout:
    """The Deployment's RollingUpdate: a new pod is ready before an old one goes, by default."""

    max_surge: int | str = 1
    max_unavailable: int | str = 0


@dataclasses.dataclass(frozen=True)
class StaticEndpoint:
    """A host listed in spec.externalEndpoints.static (no heartbeat: it stays until removed)."""

    name: str
    address: str
    port: int = DEFAULT_SERVICE_PORT


@dataclasses.dataclass(frozen=True)
class RerankerSpec:
    model: ModelSpec
    replicas: int = DEFAULT_REPLICAS
    image: str | None = None
    image_pull_policy: str | None = None
    image_pull_secrets: tuple[str, ...] = ()
    device: str = "cpu"
    quantization: str = "auto"
    runtime: str = "auto"
    gpus: int | None = None
    parallelism: Parallelism = Parallelism()
    drain_seconds: int = DEFAULT_DRAIN_SECONDS
    log_level: str | None = None
    autoscaling: Autoscaling = Autoscaling()
    scale_to_zero: ScaleToZero | None = None
    resources: Mapping[str, Any] | None = None
    model_cache_size_limit: str | int | None = None
    node_selector: Mapping[str, str] | None = None
    tolerations: tuple[Mapping[str, Any], ...] = ()
    affinity: Mapping[str, Any] | None = None
    topology_spread_constraints: tuple[Mapping[str, Any], ...] = ()
    priority_class_name: str | None = None
    service_account_name: str | None = None
    pod_annotations: Mapping[str, str] | None = None
    pod_labels: Mapping[str, str] | None = None
    cache: Cache = Cache()
    service: ServiceSpec = ServiceSpec()
    service_monitor: ServiceMonitorSpec = ServiceMonitorSpec()
    pdb: PDBSpec = PDBSpec()
    rollout: Rollout = Rollout()
    api_key_secret: SecretKeyRef | None = None
    env: tuple[Mapping[str, Any], ...] = ()
    static_endpoints: tuple[StaticEndpoint, ...] = ()
    allowed_cidrs: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()


def _obj(raw: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = raw.get(key)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidSpec(f"{key} must be an object")
    return value


def _secret_ref(raw: Mapping[str, Any] | None, default_key: str) -> SecretKeyRef | None:
    if not raw:
        return None
    return SecretKeyRef(name=str(raw["name"]), key=str(raw.get("key") or default_key))


def _check_quantities(where: str, resources: Mapping[str, Any] | None) -> None:
    for section in ("limits", "requests"):
        for name, value in ((resources or {}).get(section) or {}).items():
            try:
                quantity(value)
            except (ValueError, ArithmeticError):
                raise InvalidSpec(f"{where}.{section}.{name}: {value!r} is not a quantity") from None


def _check_resources(resources: Mapping[str, Any] | None) -> None:
    _check_quantities("resources", resources)
    limits = (resources or {}).get("limits") or {}
    requests = (resources or {}).get("requests") or {}
    for name in set(limits) & set(requests):
        if quantity(requests[name]) > quantity(limits[name]):
            raise InvalidSpec(f"resources.requests.{name} must be less than or equal to "
                              f"resources.limits.{name}")


def _names(raw: Any) -> tuple[str, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, (list, tuple)):
        raise InvalidSpec("model.servedNames must be a list of names")
    return tuple(raw)


def static_endpoints(raw: Mapping[str, Any]) -> tuple[StaticEndpoint, ...]:
    """spec.externalEndpoints.static alone (the prober reads it even from a spec that does not
    parse otherwise). Addresses are checked per endpoint, not here: one bad address must not
    stop the fleet's reconciliation."""
    entries = _obj(raw, "externalEndpoints").get("static") or ()
    if not isinstance(entries, (list, tuple)):
        raise InvalidSpec("externalEndpoints.static must be a list")
    out: list[StaticEndpoint] = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, Mapping) or not entry.get("name") or not entry.get("address"):
            raise InvalidSpec(f"externalEndpoints.static[{i}] needs a name and an address")
        out.append(StaticEndpoint(name=str(entry["name"]), address=str(entry["address"]),
                                  port=int(entry.get("port") or DEFAULT_SERVICE_PORT)))
    names = [e.name for e in out]
    if len(set(names)) != len(names):
        raise InvalidSpec("externalEndpoints.static names must be unique")
    return tuple(out)


def allowed_cidrs(raw: Mapping[str, Any]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """spec.externalEndpoints.allowedCIDRs: where registered endpoints may be (empty: nowhere)."""
    entries = _obj(raw, "externalEndpoints").get("allowedCIDRs") or ()
    if not isinstance(entries, (list, tuple)):
        raise InvalidSpec("externalEndpoints.allowedCIDRs must be a list")
    out = []
    for i, entry in enumerate(entries):
        try:
            out.append(ipaddress.ip_network(str(entry).strip()))
        except ValueError:
            raise InvalidSpec(f"externalEndpoints.allowedCIDRs[{i}]: {entry!r} is not a network "
                              "in CIDR notation (no host bits set), e.g. 192.168.1.0/24") from None
    return tuple(out)


def _model_image(raw: Any) -> ModelImage | None:
    if raw is None:
        return None
    if not isinstance(raw, Mapping) or not raw.get("reference"):
        raise InvalidSpec("model.image needs a reference")
    return ModelImage(reference=str(raw["reference"]), path=str(raw.get("path") or "/models"),
                      pull_policy=raw.get("pullPolicy"))


def _model_cache(raw: Any) -> ModelCacheVolume | None:
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise InvalidSpec("model.cache must be an object")
    return ModelCacheVolume(claim_name=raw.get("claimName"), size=raw.get("size"),
                            storage_class_name=raw.get("storageClassName"),
                            access_modes=tuple(raw.get("accessModes") or ("ReadWriteOnce",)))


def parse(raw: Mapping[str, Any]) -> RerankerSpec:
    """The spec as typed values with the CRD's defaults; `InvalidSpec` if it cannot run."""
    m = _obj(raw, "model")
    model = ModelSpec(
        id=m.get("id"),
        revision=m.get("revision"),
        kind=m.get("kind") or "auto",
        max_length=m.get("maxLength"),
        local_path=m.get("localPath"),
        pvc_claim=_obj(m, "pvc").get("claimName"),
        pvc_path=_obj(m, "pvc").get("path"),
        prompt_template=m.get("promptTemplate"),
        image=_model_image(m.get("image")),
        cache=_model_cache(m.get("cache")),
        served_names=_names(m.get("servedNames")),
    )
    p = _obj(raw, "parallelism")
    mb = _obj(p, "microBatching")
    parallelism = Parallelism(
        max_parallel=p.get("maxParallel"),
        max_queue=p.get("maxQueue"),
        queue_timeout_seconds=p.get("queueTimeoutSeconds"),
        batch_size=p.get("batchSize"),
        micro_batching_enabled=mb.get("enabled"),
        micro_batching_window_ms=mb.get("windowMs"),
    )
    a = _obj(raw, "autoscaling")
    autoscaling = Autoscaling(
        enabled=bool(a.get("enabled", False)),
        min_replicas=int(a.get("minReplicas", 1)),
        max_replicas=int(a.get("maxReplicas", 5)),
        metric=a.get("metric") or "queueDepth",
        target=a.get("target"),
        behavior=a.get("behavior") or None,
    )
    z = raw.get("scaleToZero")
    scale_to_zero = None if z is None else ScaleToZero(
        idle_seconds=int(_obj(raw, "scaleToZero").get("idleSeconds", ScaleToZero.idle_seconds)))
    c = _obj(raw, "cache")
    r = _obj(c, "redis")
    mr = _obj(r, "managed")
    cache = Cache(
        enabled=bool(c.get("enabled", True)),
        ttl_seconds=c.get("ttlSeconds"),
        redis_url_secret=_secret_ref(r.get("urlSecretRef"), "url"),
        managed_redis=ManagedRedis(
            enabled=bool(mr.get("enabled", False)),
            image=mr.get("image"),
            max_memory=mr.get("maxMemory") or "256mb",
            resources=mr.get("resources") or None,
        ),
    )
    s = _obj(raw, "service")
    sm = _obj(_obj(raw, "monitoring"), "serviceMonitor")
    pdb = _obj(raw, "podDisruptionBudget")
    spec = RerankerSpec(
        model=model,
        replicas=int(raw.get("replicas", DEFAULT_REPLICAS)),
        image=raw.get("image"),
        image_pull_policy=raw.get("imagePullPolicy"),
        image_pull_secrets=tuple(str(s["name"]) for s in raw.get("imagePullSecrets") or ()),
        device=raw.get("device") or "cpu",
        quantization=raw.get("quantization") or "auto",
        runtime=raw.get("runtime") or "auto",
        gpus=raw.get("gpus"),
        parallelism=parallelism,
        drain_seconds=int(raw.get("drainSeconds", DEFAULT_DRAIN_SECONDS)),
        log_level=raw.get("logLevel"),
        autoscaling=autoscaling,
        scale_to_zero=scale_to_zero,
        resources=raw.get("resources") or None,
        model_cache_size_limit=_obj(raw, "modelCache").get("sizeLimit"),
        node_selector=raw.get("nodeSelector") or None,
        tolerations=tuple(raw.get("tolerations") or ()),
        affinity=raw.get("affinity") or None,
        topology_spread_constraints=tuple(raw.get("topologySpreadConstraints") or ()),
        priority_class_name=raw.get("priorityClassName"),
        service_account_name=raw.get("serviceAccountName"),
        pod_annotations=raw.get("podAnnotations") or None,
        pod_labels=raw.get("podLabels") or None,
        cache=cache,
        service=ServiceSpec(
            type=s.get("type") or "ClusterIP",
            port=int(s.get("port", DEFAULT_SERVICE_PORT)),
            annotations=s.get("annotations") or None,
        ),
        service_monitor=ServiceMonitorSpec(
            enabled=bool(sm.get("enabled", False)),
            interval=sm.get("interval") or "30s",
            labels=sm.get("labels") or None,
        ),
        pdb=PDBSpec(
            enabled=bool(pdb.get("enabled", True)),
            min_available=pdb.get("minAvailable"),
            max_unavailable=pdb.get("maxUnavailable"),
        ),
        rollout=Rollout(
            max_surge=_obj(raw, "rollout").get("maxSurge", 1),
            max_unavailable=_obj(raw, "rollout").get("maxUnavailable", 0),
        ),
        api_key_secret=_secret_ref(raw.get("apiKeySecretRef"), "api-keys"),
        env=tuple(raw.get("env") or ()),
        static_endpoints=static_endpoints(raw),
        allowed_cidrs=allowed_cidrs(raw),
    )
    validate(spec)
    return spec


def validate(spec: RerankerSpec) -> None:
    """The CRD's CEL rules and enums again, plus checks CEL cannot express."""
    if spec.device not in POD_DEVICES:
        raise InvalidSpec(f"device {spec.device!r} is not a pod device (use one of "
                          f"{', '.join(POD_DEVICES)}; Macs join as external endpoints)")
    if spec.quantization not in QUANTIZATIONS:
        raise InvalidSpec(f"quantization {spec.quantization!r} is not one of "
                          f"{', '.join(QUANTIZATIONS)}")
    if spec.device == "cpu" and spec.quantization == "fp16":
        raise InvalidSpec("quantization fp16 needs device cuda: the server rejects fp16 on cpu "
                          "(use bf16 or int8)")
    if spec.device == "cuda" and spec.quantization in ("int8", "int8-dynamic"):
        raise InvalidSpec("quantization int8 and int8-dynamic (OpenVINO) run on cpu only: the server "
                          "rejects them on cuda (use bf16 or fp16)")
    if spec.runtime not in RUNTIMES:
        raise InvalidSpec(f"runtime {spec.runtime!r} is not one of {', '.join(RUNTIMES)}")
    if spec.device == "cuda" and spec.runtime == "openvino":
        raise InvalidSpec("runtime openvino runs on cpu only: use runtime torch (or auto) with device cuda")
    if spec.runtime == "torch" and spec.quantization in ("int8", "int8-dynamic"):
        raise InvalidSpec("quantization int8 and int8-dynamic run on the openvino runtime: use runtime openvino (or auto)")
    if spec.gpus is not None and spec.device != "cuda":
        raise InvalidSpec("gpus applies only to device cuda")
    if spec.model.kind not in MODEL_KINDS:
        raise InvalidSpec(f"model.kind {spec.model.kind!r} is not one of {', '.join(MODEL_KINDS)}")
    if not (spec.model.id or spec.model.local_path or spec.model.pvc_claim or spec.model.image):
        raise InvalidSpec("model needs id, localPath or pvc, or an image")
    if spec.model.local_path and spec.model.pvc_claim:
        raise InvalidSpec("set model.localPath or model.pvc, not both")
    if spec.model.image is not None and (spec.model.local_path or spec.model.pvc_claim):
        raise InvalidSpec("set one of model.image, model.localPath and model.pvc")
    if spec.model.image is not None and not spec.model.image.path.startswith("/"):
        raise InvalidSpec("model.image.path must be an absolute path inside the image")
    cache = spec.model.cache
    if cache is not None and (cache.claim_name is None) == (cache.size is None):
        raise InvalidSpec("model.cache needs claimName (an existing PVC) or size (the operator "
                          "creates one), not both")
    if cache is not None and cache.size is not None:
        try:
            quantity(cache.size)
        except (ValueError, ArithmeticError):
            raise InvalidSpec(f"model.cache.size: {cache.size!r} is not a quantity") from None
    if spec.model.prompt_template is not None and spec.model.kind not in ("auto", "llm"):
        raise InvalidSpec("model.promptTemplate applies only to LLM rerankers (kind llm or auto)")
    if (why := served.check_aliases(spec.model.served_names)) is not None:
        raise InvalidSpec(why)
    if spec.replicas < 0:
        raise InvalidSpec("replicas must be at least 0")
    z = spec.scale_to_zero
    if z is not None and not MIN_IDLE_SECONDS <= z.idle_seconds <= MAX_IDLE_SECONDS:
        raise InvalidSpec(f"scaleToZero.idleSeconds must be between {MIN_IDLE_SECONDS} and "
                          f"{MAX_IDLE_SECONDS}")
    a = spec.autoscaling
    if a.metric not in AUTOSCALING_METRICS:
        raise InvalidSpec(f"autoscaling.metric {a.metric!r} is not one of "
                          f"{', '.join(AUTOSCALING_METRICS)}")
    if a.enabled and a.min_replicas > a.max_replicas:
        raise InvalidSpec("autoscaling.minReplicas must be less than or equal to "
                          "autoscaling.maxReplicas")
    if a.enabled and a.metric == "cpu" and "cpu" not in ((spec.resources or {}).get("requests")
                                                         or {}):
        raise InvalidSpec("autoscaling on cpu needs resources.requests.cpu")
    if spec.cache.redis_url_secret is not None and spec.cache.managed_redis.enabled:
        raise InvalidSpec("set cache.redis.urlSecretRef or cache.redis.managed.enabled, not both")
    if spec.rollout.max_surge == 0 and spec.rollout.max_unavailable == 0:
        raise InvalidSpec("rollout.maxSurge and rollout.maxUnavailable may not both be 0 (the "
                          "rollout could never start)")
    if spec.pdb.min_available is not None and spec.pdb.max_unavailable is not None:
        raise InvalidSpec("set podDisruptionBudget.minAvailable or maxUnavailable, not both")
    _check_resources(spec.resources)
    _check_quantities("cache.redis.managed.resources", spec.cache.managed_redis.resources)
    for i, var in enumerate(spec.env):
        if not isinstance(var, Mapping) or not var.get("name"):
            raise InvalidSpec(f"env[{i}] needs a name")

"""Operator configuration: the operator's own settings and how Kopf is tuned.

`OperatorConfig` holds what a deployment of the operator decides (default images, API
workers, how external endpoints are probed), read from the environment so the Helm chart sets
them as env vars. `configure_kopf`
applies the choices that keep the operator quiet and safe: state in annotations under the
`reranker.dev` prefix (the status schema is structural, so Kopf may not keep its state there),
explicit Events only, server-side label selectors for the children's watch streams, no
dynamic scanning (so the RBAC needs no CRD or Namespace watch), and mandatory peering for HA.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping

import kopf

from reranker import contract
from reranker_operator import external, manifests, model_delivery
from reranker_operator.external import ProbeConfig

#: The images `make images` builds (README: building and pushing images). A cluster that
#: pulls from a registry sets RERANKER_OPERATOR_SERVER_IMAGE / _REDIS_IMAGE (the chart's
#: serverImage / redisImage) to the names they were pushed under.
DEFAULT_SERVER_IMAGE = "reranker-fleet/server:dev"
#: The server image with PyTorch (what the slim image cannot serve, and the model-cache Job).
DEFAULT_SERVER_TORCH_IMAGE = "reranker-fleet/server:dev-torch"
DEFAULT_REDIS_IMAGE = "reranker-fleet/redis:dev"

#: The kinds whose watch streams are filtered server-side to the operator's children.
CHILD_RESOURCES = (
    ("", "v1", "configmaps"),
    ("", "v1", "services"),
    ("apps", "v1", "deployments"),
    ("autoscaling", "v2", "horizontalpodautoscalers"),
    ("policy", "v1", "poddisruptionbudgets"),
    ("networking.k8s.io", "v1", "networkpolicies"),
    ("", "v1", "persistentvolumeclaims"),
    ("batch", "v1", "jobs"),
    ("monitoring.coreos.com", "v1", "servicemonitors"),
)
MANAGED_SELECTOR = f"{manifests.LABEL_MANAGED_BY}={manifests.OPERATOR_NAME}"
#: EndpointSlices: only the operator's own (the built-in controller's slices copy the
#: Service's labels, app.kubernetes.io/managed-by included).
ENDPOINT_SLICES = ("discovery.k8s.io", "v1", "endpointslices")
SLICE_SELECTOR = f"{manifests.LABEL_SLICE_MANAGED_BY}={manifests.SLICE_MANAGER}"


def _positive_int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name) or ""
    if not raw:
        return default
    if not raw.isdigit() or int(raw) < 1:
        raise SystemExit(f"{name}={raw!r} must be a positive integer")
    return int(raw)


def _positive_float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name) or ""
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise SystemExit(f"{name}={raw!r} must be a positive number of seconds")
    return value


def _choice(env: Mapping[str, str], name: str, choices: tuple[str, ...]) -> str:
    raw = (env.get(name) or choices[0]).strip().lower()
    if raw not in choices:
        raise SystemExit(f"{name}={raw!r} must be one of {', '.join(choices)}")
    return raw


def _networks(env: Mapping[str, str], name: str) -> tuple[external.Network, ...]:
    raw = env.get(name) or ""
    try:
        return external.networks(raw.split(","))
    except ValueError as e:
        raise SystemExit(f"{name}={raw!r}: {e} (comma-separated CIDRs)") from None


@dataclasses.dataclass(frozen=True)
class OperatorConfig:
    #: Server image for RerankerDeployments without spec.image.
    server_image: str = DEFAULT_SERVER_IMAGE
    #: Image of the operator-managed Redis.
    redis_image: str = DEFAULT_REDIS_IMAGE
    #: Server image with PyTorch: specs the slim image cannot serve, and the model-cache Job.
    server_torch_image: str = DEFAULT_SERVER_TORCH_IMAGE
    #: spec.model.image as an image volume: auto (when the API server keeps them and every
    #: node's runtime mounts them), true, or false (always the init container's copy).
    image_volumes: str = "auto"
    #: Threads making the (blocking) API writes: passes for different resources in parallel.
    api_workers: int = 16
    #: How external endpoints (Macs) are probed: GET /ready every `period` seconds, each
    #: within `timeout`; not ready after `failure_threshold` failures in a row, ready after
    #: `success_threshold` successes.
    probe: ProbeConfig = ProbeConfig()
    #: More of the cluster's pod and Service ranges, added to those the operator learns from
    #: the Nodes and ServiceCIDRs (`cluster_ranges`): no external endpoint is ever listed there,
    #: and where the learning falls short (a node without spec.podCIDRs, no ServiceCIDR API)
    #: these make the ranges known, so that registrations are no longer refused.
    cluster_cidrs: tuple[external.Network, ...] = ()

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> OperatorConfig:
        env = os.environ if env is None else env
        return cls(
            server_image=env.get("RERANKER_OPERATOR_SERVER_IMAGE") or DEFAULT_SERVER_IMAGE,
            redis_image=env.get("RERANKER_OPERATOR_REDIS_IMAGE") or DEFAULT_REDIS_IMAGE,
            server_torch_image=(env.get("RERANKER_OPERATOR_SERVER_TORCH_IMAGE")
                                or DEFAULT_SERVER_TORCH_IMAGE),
            image_volumes=_choice(env, "RERANKER_OPERATOR_IMAGE_VOLUMES",
                                  model_delivery.IMAGE_VOLUME_MODES),
            api_workers=_positive_int(env, "RERANKER_OPERATOR_API_WORKERS", 16),
            probe=ProbeConfig(
                period=_positive_float(env, "RERANKER_OPERATOR_PROBE_PERIOD_SECONDS", 5.0),
                timeout=_positive_float(env, "RERANKER_OPERATOR_PROBE_TIMEOUT_SECONDS", 2.0),
                failure_threshold=_positive_int(env, "RERANKER_OPERATOR_PROBE_FAILURE_THRESHOLD",
                                                3),
                success_threshold=_positive_int(env, "RERANKER_OPERATOR_PROBE_SUCCESS_THRESHOLD",
                                                1),
            ),
            cluster_cidrs=_networks(env, "RERANKER_OPERATOR_CLUSTER_CIDRS"),
        )

    def defaults(self) -> manifests.Defaults:
        return manifests.Defaults(server_image=self.server_image, redis_image=self.redis_image,
                                  server_torch_image=self.server_torch_image)


def configure_kopf(settings: kopf.OperatorSettings) -> None:
    """Kopf settings, applied in the startup handler (after the CLI flags)."""
    # Events: only the ones the operator posts on purpose (created, transitions, failures);
    # no Event for every handler run, which would be a write per reconciliation.
    settings.posting.level = logging.INFO
    settings.posting.loggers = False
    settings.posting.reporting_component = manifests.OPERATOR_NAME

    # Handler progress and the last handled spec live in annotations, not in status.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(
        prefix=contract.API_GROUP, v1=False)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=contract.API_GROUP, key="last-handled-configuration", v1=False)
    # No deletion handlers, so no finalizer is ever added: deletion is plain garbage
    # collection through owner references. The name is set for clarity should one appear.
    settings.persistence.finalizer = f"{contract.API_GROUP}/finalizer"

    # Watch streams: reconnect well before proxies cut idle connections.
    settings.watching.server_timeout = 270
    settings.watching.client_timeout = 300
    settings.watching.connect_timeout = 10
    for resource in CHILD_RESOURCES:
        settings.watching.label_selectors[resource] = MANAGED_SELECTOR
    settings.watching.label_selectors[ENDPOINT_SLICES] = SLICE_SELECTOR
    settings.networking.request_timeout = 60
    settings.networking.connect_timeout = 10

    # Serve the namespaces given on the command line (or all); resources known at startup.
    settings.scanning.disabled = True

    # HA: with peering, only the highest-priority replica acts; the others stand by. If the
    # peering CRDs are missing, fail instead of running several active replicas.
    settings.peering.mandatory = not settings.peering.standalone

"""The Kubernetes API calls the operator makes, and nothing else.

Reads come from Kopf's watch streams (indices), so the calls here are writes (server-side
apply of a child, create-if-absent of a generated Secret, delete of a child, a merge patch of a RerankerDeployment's or
RerankerEndpoint's status subresource, each logged), one discovery request at startup, and a
GET of a child the indices do not hold before it is first created: whether that name is taken
by an object the operator does not control (reconcile.py never takes one over).
Bodies are plain dicts in and out: the builders produce dicts and the comparison reads dicts,
so the typed models of the kubernetes client would only add conversions. The client's
`ApiClient` still does the authentication (kubeconfig, in-cluster token, exec plugins).

Blocking (urllib3): call these from a worker thread, never from the event loop.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Mapping
from typing import Any

import kubernetes
from kubernetes.client.exceptions import ApiException

from reranker import contract

logger = logging.getLogger(__name__)

FIELD_MANAGER = "reranker-operator"
APPLY_CONTENT_TYPE = "application/apply-patch+yaml"
MERGE_PATCH = "application/merge-patch+json"

#: (apiVersion, kind) -> (path prefix, plural) of every kind the operator writes.
RESOURCES: Mapping[tuple[str, str], tuple[str, str]] = {
    ("v1", "ConfigMap"): ("/api/v1", "configmaps"),
    ("v1", "Service"): ("/api/v1", "services"),
    ("v1", "Secret"): ("/api/v1", "secrets"),  # created only (the managed Redis' password)
    ("networking.k8s.io/v1", "NetworkPolicy"): ("/apis/networking.k8s.io/v1", "networkpolicies"),
    ("apps/v1", "Deployment"): ("/apis/apps/v1", "deployments"),
    ("v1", "PersistentVolumeClaim"): ("/api/v1", "persistentvolumeclaims"),  # model.cache.size
    ("batch/v1", "Job"): ("/apis/batch/v1", "jobs"),  # the model-cache fill
    ("autoscaling/v2", "HorizontalPodAutoscaler"): ("/apis/autoscaling/v2",
                                                    "horizontalpodautoscalers"),
    ("policy/v1", "PodDisruptionBudget"): ("/apis/policy/v1", "poddisruptionbudgets"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"): ("/apis/monitoring.coreos.com/v1",
                                                     "servicemonitors"),
    ("discovery.k8s.io/v1", "EndpointSlice"): ("/apis/discovery.k8s.io/v1", "endpointslices"),
    (f"{contract.API_GROUP}/{contract.API_VERSION}", contract.KIND_DEPLOYMENT): (
        f"/apis/{contract.API_GROUP}/{contract.API_VERSION}", contract.PLURAL_DEPLOYMENT),
    (f"{contract.API_GROUP}/{contract.API_VERSION}", contract.KIND_ENDPOINT): (
        f"/apis/{contract.API_GROUP}/{contract.API_VERSION}", contract.PLURAL_ENDPOINT),
}


def load_config(*, connections: int = 16) -> kubernetes.client.ApiClient:
    """In a pod: its ServiceAccount; elsewhere: $KUBECONFIG or ~/.kube/config."""
    configuration = kubernetes.client.Configuration()
    configuration.connection_pool_maxsize = connections  # one per API worker thread
    try:
        kubernetes.config.load_incluster_config(  # type: ignore[no-untyped-call]
            client_configuration=configuration)
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config(  # type: ignore[no-untyped-call]
            client_configuration=configuration)
    return kubernetes.client.ApiClient(configuration)


def _path(api_version: str, kind: str, namespace: str, name: str | None = None,
          subresource: str | None = None) -> str:
    try:
        prefix, plural = RESOURCES[(api_version, kind)]
    except KeyError:
        raise ValueError(f"the operator does not manage {kind} ({api_version})") from None
    path = f"{prefix}/namespaces/{namespace}/{plural}"
    if name is not None:
        path += f"/{name}"
    if subresource is not None:
        path += f"/{subresource}"
    return path


class Kube:
    """A thin, dict-based client over `kubernetes.client.ApiClient`."""

    def __init__(self, api: kubernetes.client.ApiClient, *, timeout: float = 30.0) -> None:
        self.api = api
        self.timeout = timeout
        self._writes = 0
        self._lock = threading.Lock()

    @property
    def writes(self) -> int:
        """Write requests sent (apply, delete, status patch): an idle operator sends none."""
        return self._writes

    def _request(self, method: str, path: str, *, query: list[tuple[str, str]] | None = None,
                 body: Any = None, content_type: str | None = None) -> Any:
        headers = {"Accept": "application/json"}
        if content_type:
            headers["Content-Type"] = content_type
        if method != "GET":
            with self._lock:
                self._writes += 1
            logger.info("API write: %s %s", "apply" if content_type == APPLY_CONTENT_TYPE
                        else method, path)
        method, url, headers, body, _ = self.api.param_serialize(
            method=method, resource_path=path, query_params=query or [],
            header_params=headers, body=body, auth_settings=["BearerToken"])
        response = self.api.call_api(method, url, header_params=headers, body=body,
                                     _request_timeout=self.timeout)
        data = response.read()  # type: ignore[no-untyped-call]
        if not 200 <= response.status < 300:
            raise ApiException(http_resp=response)
        return json.loads(data) if data else None

    def apply(self, obj: Mapping[str, Any], *, force: bool = True) -> dict[str, Any]:
        """Server-side apply (creates or updates). With `force`, takes back fields someone
        else changed: only for objects the caller has checked it controls. Without, a field
        another manager set differently is a 409 conflict (the first apply of a new child,
        so that an object created meanwhile by someone else is not overwritten)."""
        meta = obj["metadata"]
        path = _path(obj["apiVersion"], obj["kind"], meta["namespace"], meta["name"])
        query = [("fieldManager", FIELD_MANAGER)]
        if force:
            query.append(("force", "true"))
        result: dict[str, Any] = self._request(
            "PATCH", path, body=dict(obj), content_type=APPLY_CONTENT_TYPE, query=query)
        return result

    def create(self, obj: Mapping[str, Any]) -> bool:
        """Create unless it exists: True if created, False if the name was taken (409). Never
        replaces an existing object (for Secrets the operator generates and cannot read)."""
        meta = obj["metadata"]
        try:
            self._request("POST", _path(obj["apiVersion"], obj["kind"], meta["namespace"]),
                          body=dict(obj), query=[("fieldManager", FIELD_MANAGER)])
        except ApiException as e:
            if e.status == 409:
                return False
            raise
        return True

    def get(self, api_version: str, kind: str, namespace: str, name: str
            ) -> dict[str, Any] | None:
        try:
            result: dict[str, Any] = self._request("GET", _path(api_version, kind, namespace, name))
            return result
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def delete(self, api_version: str, kind: str, namespace: str, name: str) -> None:
        try:
            self._request("DELETE", _path(api_version, kind, namespace, name),
                          body={"propagationPolicy": "Background"})
        except ApiException as e:
            if e.status != 404:
                raise

    def patch_status(self, namespace: str, name: str, patch: Mapping[str, Any], *,
                     kind: str = contract.KIND_DEPLOYMENT) -> None:
        """Merge patch of the status of a RerankerDeployment (or `kind` RerankerEndpoint)."""
        api_version = f"{contract.API_GROUP}/{contract.API_VERSION}"
        path = _path(api_version, kind, namespace, name, "status")
        self._request("PATCH", path, body={"status": dict(patch)}, content_type=MERGE_PATCH)

    def keeps_image_volumes(self, namespace: str) -> bool:
        """Whether the API server keeps `volumes[].image` (Kubernetes 1.33+ with the ImageVolume
        gate): a server-side dry run of a Deployment with one, in `namespace` (creates nothing).
        An API server without the gate accepts it but silently drops the volume and its mounts
        (pkg/api/pod dropImageVolumes), so the answer is whether the returned object still has
        it. A refusal is a no too: the init container's copy works everywhere."""
        from reranker_operator import model_delivery  # noqa: PLC0415  (kube.py stays a leaf)
        try:
            version = self._request("GET", "/version") or {}
            if not model_delivery.api_server_may_serve(str(version.get("gitVersion", ""))):
                return False
            probe = {"apiVersion": "apps/v1", "kind": "Deployment",
                     "metadata": {"generateName": "reranker-image-volume-probe-"},
                     "spec": {"selector": {"matchLabels": {"probe": "image-volume"}},
                              "template": {"metadata": {"labels": {"probe": "image-volume"}},
                                           "spec": {"containers": [{
                                               "name": "probe", "image": "probe:0",
                                               "volumeMounts": [{"name": "m",
                                                                 "mountPath": "/m"}]}],
                                               "volumes": [{"name": "m", "image": {
                                                   "reference": "probe:0"}}]}}}}
            made = self._request("POST", _path("apps/v1", "Deployment", namespace), body=probe,
                                 query=[("dryRun", "All"), ("fieldManager", FIELD_MANAGER)])
        except ApiException as e:
            logger.info("image volumes: not kept by the API server (%s): spec.model.image is "
                        "copied by an init container", error_message(e))
            return False
        volumes = ((((made or {}).get("spec") or {}).get("template") or {}).get("spec")
                   or {}).get("volumes") or ()
        if not any(isinstance(v, Mapping) and v.get("image") for v in volumes):
            logger.info("image volumes: not kept by the API server (its ImageVolume feature "
                        "gate is off): spec.model.image is copied by an init container")
            return False
        logger.info("image volumes: kept by the API server")
        return True

    def patch_scale(self, namespace: str, name: str, replicas: int, *,
                    resource_version: str | None = None) -> None:
        """A RerankerDeployment's spec.replicas through its scale subresource (where the HPA
        and `kubectl scale` write it); with `resource_version`, only if the object has not
        changed since (else 409)."""
        api_version = f"{contract.API_GROUP}/{contract.API_VERSION}"
        path = _path(api_version, contract.KIND_DEPLOYMENT, namespace, name, "scale")
        body: dict[str, Any] = {"spec": {"replicas": replicas}}
        if resource_version is not None:
            body["metadata"] = {"resourceVersion": resource_version}
        self._request("PATCH", path, body=body, content_type=MERGE_PATCH)

    def serves(self, group_version: str, plural: str) -> bool:
        """Whether the API server serves a resource (discovery: no RBAC needed)."""
        try:
            doc = self._request("GET", f"/apis/{group_version}")
        except ApiException as e:
            if e.status == 404:
                return False
            raise
        return any(r.get("name") == plural for r in (doc or {}).get("resources", ()))


def error_message(error: ApiException) -> str:
    """The API server's own message (a Status object), else the HTTP reason."""
    try:
        body = json.loads(error.body or "")
        return str(body.get("message") or error.reason)
    except (ValueError, AttributeError):
        return f"{error.status} {error.reason}"

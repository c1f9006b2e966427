"""How a fleet's model reaches its pods: an OCI image of model files, or a cache volume that a
one-off Job fills, and which server image (slim or torch) can serve what arrives.

Issue 23 made a new pod's start a matter of seconds; downloading and converting the model in
every pod would undo that. Two deliveries, taken from KServe and NVIDIA's NIM operator:

- `spec.model.image` (KServe's "modelcars", the Kubernetes image-volume KEP 4639): the model
  files ship as an OCI image, pulled and cached by the node like any image. Where the cluster
  mounts images as volumes (`volumes[].image`: API server 1.33+ with the ImageVolume gate, and
  a runtime that implements it: containerd 2.1+ or CRI-O 1.31+), the pod mounts it read-only;
  elsewhere an init container running the model image copies the files (`cp -a`) into an
  emptyDir, as KServe's storage initializer does. Either way the server reads /models.
- `spec.model.cache` (KServe's LocalModelCache, NIM's NIMCache): a PVC that a Job fills once
  with the torch image's `reranker convert` (download from the hub, convert to OpenVINO IR,
  measure the precision, write the record), then every pod mounts read-only, offline
  (HF_HUB_OFFLINE=1) with the converted IR as a seed directory: no pod downloads or converts.
  Until the Job has succeeded the Deployment runs no pods; the `ModelCached` condition says
  why. The Job's name carries a hash of its pod template, so a new model (id, revision,
  settings that change the conversion) runs a new Job.

Pure, like `manifests` (which calls it): the cluster facts (node runtimes, whether the API
server keeps image volumes) are gathered by the reconciler and passed in.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from reranker_operator.spec import ModelCacheVolume, RerankerSpec

Manifest = dict[str, Any]

#: The model the slim image embeds (its IR baked in at build time): the only model a slim
#: server can serve without a converted copy from elsewhere (the server's own default).
EMBEDDED_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"

MODEL_VOLUME = "model"
#: Where the model files are in the server container (RERANKER_LOCAL_MODEL_PATH), for
#: model.pvc and model.image alike.
MODELS_MOUNT = "/models"
COPY_CONTAINER = "model-files"

CACHE_VOLUME = "model-cache-pvc"
#: Where the fleet's model-cache PVC is mounted, in the Job (read-write) and the pods
#: (read-only).
CACHE_PVC_MOUNT = "/model-cache"
CACHE_HF_HOME = f"{CACHE_PVC_MOUNT}/huggingface"
CACHE_IR_DIR = f"{CACHE_PVC_MOUNT}/reranker"
CACHE_COMPONENT = "model-cache"
JOB_CONTAINER = "convert"
#: The Job is retried this often (a pod that fails) before it counts as failed.
JOB_BACKOFF_LIMIT = 2
#: A fill that takes longer than this has hung (a download that never ends).
JOB_DEADLINE_SECONDS = 3600
#: Kubernetes' limit for a Job's name (it becomes a label value of its pods).
_JOB_NAME_MAX = 63

#: Settings that change what the conversion produces: the Job gets these (and the user's
#: extra env), no tunables, so a new batch size does not run a new Job.
CONVERT_SETTINGS = ("RERANKER_MODEL", "RERANKER_MODEL_REVISION", "RERANKER_MODEL_KIND",
                    "RERANKER_PROMPT_TEMPLATE", "RERANKER_LOCAL_MODEL_PATH", "RERANKER_MAX_LENGTH",
                    "RERANKER_DEVICE", "RERANKER_QUANTIZATION", "RERANKER_RUNTIME", "LOG_LEVEL")

IMAGE_VOLUME_MODES = ("auto", "true", "false")
#: Minimum versions of the container runtimes that mount image volumes (KEP 4639).
_RUNTIME_MINIMUM = {"containerd": (2, 1), "cri-o": (1, 31)}
#: The API server keeps `volumes[].image` from this version on, with the ImageVolume gate.
API_SERVER_MINIMUM = (1, 33)

FILLING, SUCCEEDED, FAILED = "Filling", "Succeeded", "Failed"


# --- which image serves -------------------------------------------------------------------

def slim_can_serve(spec: RerankerSpec) -> bool:
    """Whether the slim (OpenVINO, no torch) image serves this spec: on CPU through OpenVINO,
    a cross-/bi-encoder, whose converted IR is already somewhere the slim server looks (the
    embedded model's, baked into the image; or the fleet's cache volume, filled by the Job)."""
    m = spec.model
    if spec.device != "cpu" or spec.runtime == "torch" or m.kind == "llm":
        return False
    if m.cache is not None:
        return True
    return m.id == EMBEDDED_MODEL_ID and not (m.local_path or m.pvc_claim or m.image)


def server_image(spec: RerankerSpec, *, slim: str, torch: str) -> str:
    """spec.image always wins; else slim where it can serve, the torch image otherwise."""
    if spec.image:
        return spec.image
    return slim if slim_can_serve(spec) else torch


# --- spec.model.image -----------------------------------------------------------------------

def runtime_supports_image_volumes(version: str) -> bool:
    """A Node's status.nodeInfo.containerRuntimeVersion ("containerd://2.1.4",
    "cri-o://1.31.0"): whether that runtime mounts image volumes."""
    name, _, rest = version.partition("://")
    minimum = _RUNTIME_MINIMUM.get(name.lower())
    numbers = re.match(r"v?(\d+)\.(\d+)", rest)
    return minimum is not None and numbers is not None and (
        (int(numbers[1]), int(numbers[2])) >= minimum)


def api_server_may_serve(git_version: str) -> bool:
    """The API server's /version gitVersion ("v1.34.4"): new enough to keep image volumes,
    given the gate (which only a dry run shows: `kube.Kube.keeps_image_volumes`)."""
    numbers = re.match(r"v?(\d+)\.(\d+)", git_version)
    return numbers is not None and (int(numbers[1]), int(numbers[2])) >= API_SERVER_MINIMUM


def image_volumes_decision(mode: str, *, runtimes: Iterable[str], api_server: bool | None
                           ) -> bool | None:
    """Whether pods mount spec.model.image as an image volume. `mode` is the operator's
    RERANKER_OPERATOR_IMAGE_VOLUMES; with `auto`, every node's runtime must support them (a pod
    may land on any node) and the API server keep them (`api_server`; None: not asked yet,
    and then the answer is None: ask it)."""
    if mode == "true":
        return True
    if mode == "false":
        return False
    if not all(runtime_supports_image_volumes(v) for v in runtimes):
        return False
    return api_server


def model_image_pieces(spec: RerankerSpec, *, image_volumes: bool, container_security: Manifest
                       ) -> tuple[list[Manifest], list[Manifest]]:
    """(volumes, init containers) that put spec.model.image's files at MODELS_MOUNT (mounted
    by `model_mount`)."""
    image = spec.model.image
    if image is None:
        return [], []
    if image_volumes:
        source: Manifest = {"reference": image.reference}
        if image.pull_policy:
            source["pullPolicy"] = image.pull_policy
        return [{"name": MODEL_VOLUME, "image": source}], []
    copier: Manifest = {
        "name": COPY_CONTAINER,
        "image": image.reference,
        # No shell needed in the model image, only cp: the directory's content, attributes kept.
        "command": ["cp", "-a", f"{image.path.rstrip('/')}/.", f"{MODELS_MOUNT}/"],
        "securityContext": container_security,
        "volumeMounts": [{"name": MODEL_VOLUME, "mountPath": MODELS_MOUNT}],
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if image.pull_policy:
        copier["imagePullPolicy"] = image.pull_policy
    return [{"name": MODEL_VOLUME, "emptyDir": {}}], [copier]


def model_mount(spec: RerankerSpec, *, image_volumes: bool) -> Manifest | None:
    """The server's read-only mount of the model files (model.pvc or model.image), or None."""
    if spec.model.pvc_claim:
        return {"name": MODEL_VOLUME, "mountPath": MODELS_MOUNT, "readOnly": True}
    image = spec.model.image
    if image is None:
        return None
    mount: Manifest = {"name": MODEL_VOLUME, "mountPath": MODELS_MOUNT, "readOnly": True}
    if image_volumes and image.path.strip("/"):
        mount["subPath"] = image.path.strip("/")  # image volumes take subPath since 1.33
    return mount


# --- spec.model.cache -----------------------------------------------------------------------

def cache_pvc_name(name: str) -> str:
    return f"{name}-model-cache"


def cache_claim(name: str, cache: ModelCacheVolume) -> str:
    return cache.claim_name or cache_pvc_name(name)


def cache_pvc(meta: Manifest, cache: ModelCacheVolume) -> Manifest:
    """The PVC the operator creates for `model.cache.size` (`meta`: its adopted metadata)."""
    spec: Manifest = {"accessModes": list(cache.access_modes),
                      "resources": {"requests": {"storage": cache.size}}}
    if cache.storage_class_name:
        spec["storageClassName"] = cache.storage_class_name
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": meta, "spec": spec}


def cache_volume(name: str, cache: ModelCacheVolume, *, read_only: bool) -> Manifest:
    return {"name": CACHE_VOLUME, "persistentVolumeClaim": {
        "claimName": cache_claim(name, cache), "readOnly": read_only}}


def cache_mount(*, read_only: bool) -> Manifest:
    return {"name": CACHE_VOLUME, "mountPath": CACHE_PVC_MOUNT, "readOnly": read_only}


def server_cache_settings() -> dict[str, str]:
    """What the server pods of a cached fleet are told: the volume's hub cache, offline, and its
    converted IR as a read-only seed directory (their own emptyDir stays
    RERANKER_MODEL_CACHE_DIR, for OpenVINO's compiled blobs)."""
    return {"HF_HOME": CACHE_HF_HOME, "HF_HUB_OFFLINE": "1",
            "RERANKER_MODEL_SEED_DIRS": CACHE_IR_DIR}


def job_settings(settings: Mapping[str, str]) -> list[Manifest]:
    """The Job's env: the conversion's settings from the fleet's (`manifests.server_settings`),
    writing into the volume."""
    env = {k: settings[k] for k in CONVERT_SETTINGS if k in settings}
    env.update({"HF_HOME": CACHE_HF_HOME, "RERANKER_MODEL_CACHE_DIR": CACHE_IR_DIR})
    return [{"name": k, "value": v} for k, v in env.items()]


def job_name(name: str, template: Mapping[str, Any]) -> str:
    """`NAME-model-cache-HASH`: the hash of the Job's pod template (which is immutable: another
    model or conversion setting is another Job), the prefix cut to fit 63 characters."""
    blob = json.dumps(template, sort_keys=True, separators=(",", ":"), default=str).encode()
    digest = hashlib.sha256(blob).hexdigest()[:8]
    prefix = cache_pvc_name(name)[:_JOB_NAME_MAX - len(digest) - 1].rstrip("-")
    return f"{prefix}-{digest}"


def cache_job(meta: Manifest, template: Manifest) -> Manifest:
    """The fill Job (`meta` without a name: `job_name` names it from `template`)."""
    meta = {**meta, "name": job_name(meta["labels"]["app.kubernetes.io/instance"], template)}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": meta,
        "spec": {
            "backoffLimit": JOB_BACKOFF_LIMIT,
            "activeDeadlineSeconds": JOB_DEADLINE_SECONDS,
            "template": template,
        },
    }


@dataclasses.dataclass(frozen=True)
class CacheState:
    """Where the fill of a fleet's cache volume stands."""

    job: str
    state: str  # FILLING, SUCCEEDED or FAILED
    message: str
    result: Mapping[str, Any] | None = None  # what `reranker convert` reported

    @property
    def ready(self) -> bool:
        return self.state == SUCCEEDED

    def as_status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"job": self.job, "state": self.state, "message": self.message}
        if self.result is not None:
            out["result"] = dict(self.result)
        return out


def _condition(job: Mapping[str, Any], type_: str) -> Mapping[str, Any] | None:
    for cond in (job.get("status") or {}).get("conditions") or ():
        if isinstance(cond, Mapping) and cond.get("type") == type_ and cond.get("status") == "True":
            return cond
    return None


def convert_result(message: str) -> dict[str, Any] | None:
    """The JSON object `reranker convert` wrote to the termination log (its last JSON line)."""
    for line in reversed(message.strip().splitlines()):
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return None


def _clip(text: str, limit: int = 1000) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else f"{text[:600]} ... {text[-350:]}"


def job_state(job_name_: str, job: Mapping[str, Any] | None,
              pods: Sequence[Mapping[str, Any]], previous: Mapping[str, Any] | None = None
              ) -> CacheState:
    """The fill's state from the live Job (None: not created yet), its pods' termination
    messages (`pods`: `terminated_pod` of each, newest last) and the last reported
    status.modelCache (`previous`: keeps the result once the pod is gone)."""
    mine = [p for p in pods if p.get("job") == job_name_]
    if job is None:
        return CacheState(job_name_, FILLING, f"creating Job {job_name_}")
    if _condition(job, "Complete") is not None:
        ok = [p for p in mine if p.get("exitCode") == 0]
        result = convert_result(str(ok[-1].get("message") or "")) if ok else None
        if result is None and previous and previous.get("job") == job_name_:
            result = previous.get("result")
        return CacheState(job_name_, SUCCEEDED,
                          f"Job {job_name_} filled the model cache", result)
    failed = _condition(job, "Failed")
    if failed is not None:
        why = next((str(p.get("message")) for p in reversed(mine)
                    if p.get("exitCode") and p.get("message")), "")
        message = f"Job {job_name_} failed: {failed.get('reason')}: {failed.get('message') or ''}"
        if why:
            message += f"; its pod said: {why}"
        return CacheState(job_name_, FAILED, _clip(message))
    st = job.get("status") or {}
    attempts = int(st.get("failed") or 0)
    message = (f"Job {job_name_} is filling the model cache (download, conversion, precision); "
               f"{int(st.get('active') or 0)} pod(s) running")
    if attempts:
        message += f", {attempts} failed before"
    return CacheState(job_name_, FILLING, message)


def terminated_pod(body: Mapping[str, Any]) -> dict[str, Any] | None:
    """A fill pod's job, exit code and termination message, once its container has ended."""
    labels = (body.get("metadata") or {}).get("labels") or {}
    for cs in (body.get("status") or {}).get("containerStatuses") or ():
        terminated = (cs.get("state") or {}).get("terminated")
        if cs.get("name") == JOB_CONTAINER and terminated:
            return {"job": labels.get("job-name"), "pod": (body.get("metadata") or {}).get("name"),
                    "exitCode": int(terminated.get("exitCode") or 0),
                    "message": str(terminated.get("message") or "")}
    return None

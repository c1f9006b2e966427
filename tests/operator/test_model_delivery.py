"""How the model reaches the pods (model_delivery.py, the builders and one reconciliation
pass): spec.model.image (image volume or init-container copy), spec.model.cache (PVC, fill
Job, Deployment held at 0 until the Job succeeds, ModelCached), the slim-or-torch image choice
and the probes that make a pod Ready within a second of its server.

The pass runs against test_reconcile's in-memory `FakeKube` (the real API server's side is
tests/kube/test_model_delivery_cluster.py).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from test_reconcile import Events, FakeKube, owner

from reranker import contract
from reranker_operator import manifests, model_delivery, status
from reranker_operator.reconcile import Reconciler
from reranker_operator.settings import OperatorConfig
from reranker_operator.spec import InvalidSpec, parse

DEFAULTS = manifests.Defaults(server_image="slim:1", redis_image="redis:1",
                              server_torch_image="torch:1")
EMBEDDED = model_delivery.EMBEDDED_MODEL_ID
CACHED = {"model": {"id": "org/model", "cache": {"size": "5Gi"}}}


def build(spec: dict[str, Any], defaults: manifests.Defaults = DEFAULTS,
          model_cache: model_delivery.CacheState | None = None
          ) -> dict[tuple[str, str], dict[str, Any]]:
    o = owner(spec)
    objs = manifests.children(o, parse(spec), defaults, model_cache=model_cache)
    return {(obj["kind"], obj["metadata"]["name"]): obj for obj in objs}


def pod(objs: dict) -> dict[str, Any]:
    return objs[("Deployment", "rr")]["spec"]["template"]["spec"]


def job_of(objs: dict) -> dict[str, Any]:
    jobs = [o for (kind, _), o in objs.items() if kind == "Job"]
    assert len(jobs) == 1
    return jobs[0]


def settings_of(objs: dict) -> dict[str, str]:
    return objs[("ConfigMap", "rr-config")]["data"]


# --- the image choice ------------------------------------------------------------------------

@pytest.mark.parametrize("spec,image", [
    ({"model": {"id": EMBEDDED}}, "slim:1"),                       # its IR is in the image
    (CACHED, "slim:1"),                                            # the Job converts it
    ({"model": {"id": "org/model"}}, "torch:1"),                   # nobody converts it
    ({"model": {"id": EMBEDDED, "localPath": "/m"}}, "torch:1"),   # a folder: no IR
    ({"model": {"image": {"reference": "models/x:1"}}}, "torch:1"),
    ({"model": {"id": EMBEDDED}, "runtime": "torch"}, "torch:1"),
    ({"model": {"id": EMBEDDED}, "device": "cuda"}, "torch:1"),
    ({"model": {"id": "org/qwen", "kind": "llm", "cache": {"size": "5Gi"}}}, "torch:1"),
    ({"model": {"id": "org/model"}, "image": "mine:2"}, "mine:2"),   # spec.image wins
    ({**CACHED, "image": "mine:2"}, "mine:2"),
])
def test_slim_where_it_can_serve_else_torch_and_spec_image_wins(spec: dict, image: str) -> None:
    assert pod(build(spec))["containers"][0]["image"] == image


def test_without_a_torch_image_the_server_image_serves_everything() -> None:
    defaults = manifests.Defaults(server_image="only:1", redis_image="r")
    assert pod(build({"model": {"id": "org/model"}}, defaults))["containers"][0]["image"] == "only:1"


def test_operator_settings_carry_the_torch_image_and_the_image_volume_mode() -> None:
    config = OperatorConfig.from_env({"RERANKER_OPERATOR_SERVER_TORCH_IMAGE": "reg/s:1-torch",
                                      "RERANKER_OPERATOR_IMAGE_VOLUMES": "false"})
    assert config.defaults().torch_image == "reg/s:1-torch"
    assert config.image_volumes == "false"
    assert OperatorConfig.from_env({}).image_volumes == "auto"
    assert OperatorConfig.from_env({}).server_torch_image == "reranker-fleet/server:dev-torch"
    with pytest.raises(SystemExit, match="RERANKER_OPERATOR_IMAGE_VOLUMES"):
        OperatorConfig.from_env({"RERANKER_OPERATOR_IMAGE_VOLUMES": "maybe"})


# --- fast readiness --------------------------------------------------------------------------

def test_ready_within_a_second_and_liveness_unchanged() -> None:
    c = pod(build({"model": {"id": EMBEDDED}}))["containers"][0]
    assert c["readinessProbe"]["httpGet"]["path"] == contract.ROUTE_READY
    assert c["readinessProbe"]["periodSeconds"] == 1
    assert c["readinessProbe"]["timeoutSeconds"] <= 2
    # The startup probe (on /health: a server waiting for its conversion is alive) every
    # second, still 10 minutes in all; liveness as before.
    assert c["startupProbe"]["httpGet"]["path"] == contract.ROUTE_HEALTH
    assert c["startupProbe"]["periodSeconds"] == 1
    assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] == 600
    assert (c["livenessProbe"]["periodSeconds"], c["livenessProbe"]["failureThreshold"]) == (10, 3)


# --- spec.model.image ------------------------------------------------------------------------

IMAGE_SPEC = {"model": {"image": {"reference": "models/minilm:1", "path": "/data/model",
                                  "pullPolicy": "IfNotPresent"}}}


def test_model_image_copied_by_an_init_container_where_image_volumes_are_not_kept() -> None:
    objs = build(IMAGE_SPEC)
    spec = pod(objs)
    (copier,) = spec["initContainers"]
    assert copier["image"] == "models/minilm:1"
    assert copier["imagePullPolicy"] == "IfNotPresent"
    assert copier["command"] == ["cp", "-a", "/data/model/.", "/models/"]
    assert copier["volumeMounts"] == [{"name": "model", "mountPath": "/models"}]
    assert copier["securityContext"]["readOnlyRootFilesystem"] is True
    assert {"name": "model", "emptyDir": {}} in spec["volumes"]
    mounts = spec["containers"][0]["volumeMounts"]
    assert {"name": "model", "mountPath": "/models", "readOnly": True} in mounts
    assert settings_of(objs)["RERANKER_LOCAL_MODEL_PATH"] == "/models"


def test_model_image_mounted_as_an_image_volume_where_kept() -> None:
    objs = build(IMAGE_SPEC, manifests.Defaults(server_image="slim:1", redis_image="r",
                                                image_volumes=True))
    spec = pod(objs)
    assert "initContainers" not in spec
    assert {"name": "model", "image": {"reference": "models/minilm:1",
                                       "pullPolicy": "IfNotPresent"}} in spec["volumes"]
    mounts = spec["containers"][0]["volumeMounts"]
    assert {"name": "model", "mountPath": "/models", "readOnly": True,
            "subPath": "data/model"} in mounts
    assert settings_of(objs)["RERANKER_LOCAL_MODEL_PATH"] == "/models"


@pytest.mark.parametrize("version,ok", [
    ("containerd://1.6.20", False), ("containerd://2.0.5", False), ("containerd://2.1.0", True),
    ("containerd://2.2.1-rc.1", True), ("cri-o://1.30.4", False), ("cri-o://1.31.0", True),
    ("docker://27.1.0", False), ("", False), ("containerd://dev", False),
])
def test_which_runtimes_mount_image_volumes(version: str, ok: bool) -> None:
    assert model_delivery.runtime_supports_image_volumes(version) is ok


def test_image_volume_decision() -> None:
    decide = model_delivery.image_volumes_decision
    new, old = "containerd://2.1.4", "containerd://1.6.20"
    assert decide("true", runtimes=[old], api_server=False) is True
    assert decide("false", runtimes=[new], api_server=True) is False
    assert decide("auto", runtimes=[new, old], api_server=True) is False  # any node may run it
    assert decide("auto", runtimes=[new], api_server=None) is None         # ask the API server
    assert decide("auto", runtimes=[new], api_server=True) is True
    assert decide("auto", runtimes=[new], api_server=False) is False
    assert model_delivery.api_server_may_serve("v1.33.0")
    assert not model_delivery.api_server_may_serve("v1.32.9")


@pytest.mark.parametrize("model,message", [
    ({"image": {"reference": "m:1"}, "localPath": "/x"}, "set one of model.image"),
    ({"image": {"reference": "m:1"}, "pvc": {"claimName": "c"}}, "set one of model.image"),
    ({"image": {"reference": "m:1", "path": "rel"}}, "absolute"),
    ({"image": {}}, "model.image needs a reference"),
    ({"id": "m", "cache": {}}, "model.cache needs claimName"),
    ({"id": "m", "cache": {"claimName": "c", "size": "1Gi"}}, "model.cache needs claimName"),
    ({"id": "m", "cache": {"size": "lots"}}, "not a quantity"),
])
def test_invalid_model_delivery(model: dict, message: str) -> None:
    with pytest.raises(InvalidSpec, match=message):
        parse({"model": model})


# --- spec.model.cache: the children ----------------------------------------------------------

def test_cache_size_creates_the_pvc_and_the_fill_job() -> None:
    objs = build({"model": {"id": "org/model", "revision": "abc",
                            "cache": {"size": "5Gi", "storageClassName": "fast",
                                      "accessModes": ["ReadWriteMany"]}},
                  "quantization": "auto", "parallelism": {"maxParallel": 3},
                  "nodeSelector": {"pool": "cpu"},
                  "env": [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {
                      "name": "hf", "key": "token"}}}]})
    pvc = objs[("PersistentVolumeClaim", "rr-model-cache")]
    assert pvc["spec"] == {"accessModes": ["ReadWriteMany"], "storageClassName": "fast",
                           "resources": {"requests": {"storage": "5Gi"}}}
    job = job_of(objs)
    for obj in (pvc, job):
        assert obj["metadata"]["ownerReferences"][0]["kind"] == "RerankerDeployment"
        assert obj["metadata"]["labels"]["app.kubernetes.io/component"] == "model-cache"
    assert job["metadata"]["name"].startswith("rr-model-cache-")
    tpl = job["spec"]["template"]
    assert tpl["spec"]["restartPolicy"] == "Never"
    assert tpl["spec"]["nodeSelector"] == {"pool": "cpu"}  # measured on the pods' kind of CPU
    (c,) = tpl["spec"]["containers"]
    assert c["image"] == "torch:1"
    assert c["command"] == ["reranker", "convert", "--termination-log", "/dev/termination-log"]
    env = {e["name"]: e for e in c["env"]}
    assert env["RERANKER_MODEL"]["value"] == "org/model"
    assert env["RERANKER_MODEL_REVISION"]["value"] == "abc"
    assert env["RERANKER_QUANTIZATION"]["value"] == "auto"
    assert env["HF_HOME"]["value"] == "/model-cache/huggingface"
    assert env["RERANKER_MODEL_CACHE_DIR"]["value"] == "/model-cache/reranker"
    assert "HF_HUB_OFFLINE" not in env and "RERANKER_MAX_PARALLEL" not in env
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "hf"
    assert {"name": "model-cache-pvc", "mountPath": "/model-cache",
            "readOnly": False} in c["volumeMounts"]
    assert {"name": "model-cache-pvc", "persistentVolumeClaim": {
        "claimName": "rr-model-cache", "readOnly": False}} in tpl["spec"]["volumes"]


def test_server_pods_mount_the_cache_read_only_offline_with_its_ir_as_seed() -> None:
    objs = build(CACHED, model_cache=model_delivery.CacheState("j", "Succeeded", "done"))
    spec = pod(objs)
    assert {"name": "model-cache-pvc", "persistentVolumeClaim": {
        "claimName": "rr-model-cache", "readOnly": True}} in spec["volumes"]
    assert {"name": "model-cache-pvc", "mountPath": "/model-cache",
            "readOnly": True} in spec["containers"][0]["volumeMounts"]
    data = settings_of(objs)
    assert data["HF_HOME"] == "/model-cache/huggingface"
    assert data["HF_HUB_OFFLINE"] == "1"
    assert data["RERANKER_MODEL_SEED_DIRS"] == "/model-cache/reranker"
    # The pod's own emptyDir keeps OpenVINO's compiled blobs.
    assert data["RERANKER_MODEL_CACHE_DIR"] == manifests.MODEL_CACHE_DIR
    env = {e["name"] for e in spec["containers"][0]["env"]}
    assert {"HF_HUB_OFFLINE", "RERANKER_MODEL_SEED_DIRS"} <= env
    assert {"HF_HUB_OFFLINE", "RERANKER_MODEL_SEED_DIRS"} <= manifests.settings_env_names()


def test_existing_claim_gets_no_pvc_but_the_same_job() -> None:
    objs = build({"model": {"id": "org/model", "cache": {"claimName": "shared"}}})
    assert not [k for k in objs if k[0] == "PersistentVolumeClaim"]
    vols = job_of(objs)["spec"]["template"]["spec"]["volumes"]
    assert {"name": "model-cache-pvc", "persistentVolumeClaim": {
        "claimName": "shared", "readOnly": False}} in vols


@pytest.mark.parametrize("state,replicas", [
    (None, 0), (model_delivery.CacheState("j", "Filling", "..."), 0),
    (model_delivery.CacheState("j", "Failed", "..."), 0),
    (model_delivery.CacheState("j", "Succeeded", "..."), 3),
])
def test_no_pods_until_the_cache_is_filled(state: Any, replicas: int) -> None:
    objs = build({**CACHED, "replicas": 3},
                 model_cache=state or model_delivery.job_state("j", None, ()))
    assert objs[("Deployment", "rr")]["spec"]["replicas"] == replicas


def test_job_name_follows_the_model_not_the_tunables() -> None:
    def name(spec: dict) -> str:
        return str(job_of(build(spec))["metadata"]["name"])
    base = name(CACHED)
    assert name({**CACHED, "parallelism": {"maxParallel": 8}, "replicas": 4}) == base
    assert name({"model": {**CACHED["model"], "revision": "v2"}}) != base
    assert name({"model": {**CACHED["model"], "id": "org/other"}}) != base
    assert name({**CACHED, "quantization": "int8"}) != base
    long = "a" * 57
    objs = manifests.children(owner(CACHED) | {"metadata": {**owner(CACHED)["metadata"],
                                                            "name": long}},
                              parse(CACHED), DEFAULTS)
    (job,) = [o for o in objs if o["kind"] == "Job"]
    assert len(job["metadata"]["name"]) <= 63


# --- spec.model.cache: the Job's state -------------------------------------------------------

RESULT = {"model": "org/model", "fingerprint": "f1", "precision": {"key": "k", "plan": "int8",
                                                                  "spearman": 0.9995},
          "seconds": {"total": 41.0}}


def job(conditions: list[dict] | None = None, **st: Any) -> dict[str, Any]:
    return {"status": {**st, "conditions": conditions or []}}


def test_job_state_from_the_job_and_its_pods() -> None:
    state = model_delivery.job_state
    assert state("j", None, ()).state == "Filling"
    filling = state("j", job(active=1, failed=1), ())
    assert (filling.state, filling.ready) == ("Filling", False)
    assert "1 failed before" in filling.message

    pods = [{"job": "old", "exitCode": 0, "message": "{}"},
            {"job": "j", "exitCode": 0, "message": "converting...\n" + json.dumps(RESULT)}]
    done = state("j", job([{"type": "Complete", "status": "True"}], succeeded=1), pods)
    assert (done.state, done.ready, done.result) == ("Succeeded", True, RESULT)
    # The pod went away: the result stays, from the last status.
    kept = state("j", job([{"type": "Complete", "status": "True"}]), (),
                 previous=done.as_status())
    assert kept.result == RESULT
    assert state("j2", job([{"type": "Complete", "status": "True"}]), (),
                 previous=done.as_status()).result is None

    failed = state("j", job([{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                              "message": "Job has reached the specified backoff limit"}]),
                   [{"job": "j", "exitCode": 1, "message": "cannot reach huggingface.co"}])
    assert failed.state == "Failed"
    assert "BackoffLimitExceeded" in failed.message
    assert "cannot reach huggingface.co" in failed.message


def test_terminated_pod_reads_the_convert_container() -> None:
    body: dict[str, Any] = {"metadata": {"name": "p", "labels": {"job-name": "j"}},
            "status": {"containerStatuses": [{"name": "convert", "state": {"terminated": {
                "exitCode": 0, "message": json.dumps(RESULT)}}}]}}
    assert model_delivery.terminated_pod(body) == {"job": "j", "pod": "p", "exitCode": 0,
                                                    "message": json.dumps(RESULT)}
    body["status"]["containerStatuses"][0]["state"] = {"running": {}}
    assert model_delivery.terminated_pod(body) is None


def test_status_reports_model_cached_and_why_not_ready() -> None:
    o = owner(CACHED)
    filling = model_delivery.CacheState("j", "Filling", "Job j is filling the model cache")
    st = status.build(o, deployment={"metadata": {"generation": 1}, "status": {
        "observedGeneration": 1}}, problems=[], config_hash="h", service_port=8000,
        now="t", model_cache=filling)
    conds = {c["type"]: c for c in st["conditions"]}
    assert (conds["ModelCached"]["status"], conds["ModelCached"]["reason"]) == ("False", "Filling")
    assert (conds["Ready"]["status"], conds["Ready"]["reason"]) == ("False", "ModelCacheFilling")
    assert conds["Degraded"]["status"] == "False"
    assert st["modelCache"] == {"job": "j", "state": "Filling",
                                "message": "Job j is filling the model cache"}
    plain = status.build(owner({"model": {"id": "m"}}), deployment=None, problems=[],
                         config_hash="h", service_port=8000, now="t")
    assert "ModelCached" not in {c["type"] for c in plain["conditions"]}
    assert "modelCache" not in plain


# --- one pass --------------------------------------------------------------------------------

def reconciler(kube: FakeKube, *, pods: list[dict] | None = None) -> Reconciler:
    return Reconciler(kube, DEFAULTS, clock=lambda: "2024-01-01T00:00:00Z",  # type: ignore[arg-type]
                      events=Events(), cache_pods=lambda _key: pods or ())


def conditions(st: dict) -> dict[str, dict]:
    return {c["type"]: c for c in st["conditions"]}


async def test_a_pass_holds_the_deployment_until_the_job_succeeds_then_scales_up() -> None:
    kube = FakeKube()
    spec: dict[str, Any] = {**CACHED, "replicas": 2}
    r = reconciler(kube)
    outcome = await r.reconcile(owner(spec), {})
    jobs = [k for k in kube.objects if k[0] == "Job"]
    assert len(jobs) == 1 and ("PersistentVolumeClaim", "rr-model-cache") in kube.objects
    assert kube.objects[("Deployment", "rr")]["spec"]["replicas"] == 0
    assert conditions(kube.status)["ModelCached"]["reason"] == "Filling"
    assert conditions(kube.status)["Ready"]["reason"] == "ModelCacheFilling"
    assert outcome.retry is None

    # The Job succeeds (what the Job controller writes), its pod said what it measured.
    kube.objects[jobs[0]]["status"] = {"succeeded": 1, "conditions": [
        {"type": "Complete", "status": "True"}]}
    pods = [{"job": jobs[0][1], "exitCode": 0, "message": json.dumps(RESULT)}]
    r.cache_pods = lambda _key: pods
    await r.reconcile(owner(spec, status=kube.status), kube.live())
    assert kube.objects[("Deployment", "rr")]["spec"]["replicas"] == 2
    assert conditions(kube.status)["ModelCached"]["status"] == "True"
    assert kube.status["modelCache"]["result"] == RESULT

    # A new revision: a new Job; the serving pods (and their settings) stay until it is done,
    # the old Job goes.
    spec2 = {**spec, "model": {**spec["model"], "revision": "v2"}}
    settings_before = kube.objects[("ConfigMap", "rr-config")]["data"]
    await r.reconcile(owner(spec2, status=kube.status, generation=2), kube.live())
    new_jobs = [k for k in kube.objects if k[0] == "Job"]
    assert len(new_jobs) == 1 and new_jobs != jobs
    assert kube.objects[("Deployment", "rr")]["spec"]["replicas"] == 2
    assert kube.objects[("ConfigMap", "rr-config")]["data"] == settings_before
    assert conditions(kube.status)["ModelCached"]["status"] == "False"


async def test_a_failed_fill_is_degraded_with_the_pods_words() -> None:
    kube = FakeKube()
    r = reconciler(kube)
    await r.reconcile(owner(CACHED), {})
    (key,) = [k for k in kube.objects if k[0] == "Job"]
    kube.objects[key]["status"] = {"failed": 3, "conditions": [
        {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
         "message": "Job has reached the specified backoff limit"}]}
    r.cache_pods = lambda _key: [{"job": key[1], "exitCode": 2,
                                  "message": "model org/model: 401 Unauthorized"}]
    outcome = await r.reconcile(owner(CACHED, status=kube.status), kube.live())
    c = conditions(kube.status)
    assert (c["ModelCached"]["status"], c["ModelCached"]["reason"]) == ("False", "Failed")
    assert c["Degraded"]["status"] == "True" and c["Degraded"]["reason"] == "ModelCacheFailed"
    assert "401 Unauthorized" in c["Ready"]["message"]
    assert kube.objects[("Deployment", "rr")]["spec"]["replicas"] == 0
    assert outcome.retry is None  # a failed Job is not retried by the operator


async def test_image_volumes_asked_of_the_api_server_once_and_only_for_model_images() -> None:
    class Asked(FakeKube):
        asked: list[str] = []

        def keeps_image_volumes(self, namespace: str) -> bool:
            self.asked.append(namespace)
            return True

    kube = Asked()
    r = Reconciler(kube, DEFAULTS, clock=lambda: "t", events=Events(),  # type: ignore[arg-type]
                   node_runtimes=lambda: ["containerd://2.1.1"])
    await r.reconcile(owner({"model": {"id": "m"}}), {})
    assert kube.asked == []
    spec = {"model": {"image": {"reference": "models/m:1"}}}
    await r.reconcile(owner(spec), kube.live())
    await r.reconcile(owner(spec, status=kube.status), kube.live())
    assert kube.asked == ["ns"]
    volumes = kube.objects[("Deployment", "rr")]["spec"]["template"]["spec"]["volumes"]
    assert {"name": "model", "image": {"reference": "models/m:1"}} in volumes
    # An old runtime joins: the copy, without asking again.
    r.node_runtimes = lambda: ["containerd://2.1.1", "containerd://1.6.20"]
    await r.reconcile(owner(spec, status=kube.status), kube.live())
    spec_ = kube.objects[("Deployment", "rr")]["spec"]["template"]["spec"]
    assert spec_["initContainers"][0]["command"][0] == "cp" and kube.asked == ["ns"]

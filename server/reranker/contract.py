"""Names shared by the server and the operator: the contract between them.

The operator renders these environment variables onto pods, the dashboards and HPA rules
query these metric names, and the CRDs live in this API group. Both `reranker` (the server)
and `reranker_operator` read this module, so it must stay free of third-party imports and
of anything else from the server package. Change a name here only on purpose, everywhere at
once (docs/architecture.md lists the contracts).
"""

from __future__ import annotations

#: Environment variables read by the server's settings class (one per setting).
ENV_VARS: tuple[str, ...] = (
    "RERANKER_MODEL",
    "RERANKER_MODEL_REVISION",
    "RERANKER_MODEL_KIND",
    "RERANKER_PROMPT_TEMPLATE",
    "RERANKER_PREFIX_SHARING",
    "RERANKER_LOCAL_MODEL_PATH",
    "RERANKER_MAX_LENGTH",
    "RERANKER_QUANTIZATION",
    "RERANKER_RUNTIME",
    "RERANKER_MODEL_CACHE_DIR",
    "RERANKER_MODEL_SEED_DIRS",
    "RERANKER_PRECISION_RECORD_DIR",
    "RERANKER_USE_MLX",
    "RERANKER_DEVICE",
    "RERANKER_MAX_PARALLEL",
    "RERANKER_MAX_QUEUE",
    "RERANKER_QUEUE_TIMEOUT",
    "RERANKER_BATCH_SIZE",
    "RERANKER_MAX_BATCH_TOKENS",
    "RERANKER_WORKER_TIMEOUT",
    "RERANKER_MAX_RETRIES",
    "RERANKER_MAX_DOCUMENTS",
    "RERANKER_MAX_BODY_BYTES",
    "RERANKER_MAX_QUERY_CHARS",
    "RERANKER_MAX_CONCURRENT_REQUESTS",
    "RERANKER_SERVED_MODEL_NAMES",
    "RERANKER_API_KEYS",
    "RERANKER_API_KEYS_FILE",
    "RERANKER_PROTECT_METRICS",
    "RERANKER_PROTECT_DOCS",
    "RERANKER_DRAIN_SECONDS",
    "RERANKER_CACHE_SIZE",
    "RERANKER_REDIS_PREFIX",
    "RERANKER_REDIS_TIMEOUT",
    "RERANKER_REDIS_LEASE_SECONDS",
    "RERANKER_REGISTER_DEPLOYMENT",
    "RERANKER_REGISTER_NAMESPACE",
    "RERANKER_REGISTER_KUBECONFIG",
    "RERANKER_REGISTER_NAME",
    "RERANKER_REGISTER_ADDRESS",
    "RERANKER_REGISTER_PORT",
    "RERANKER_REGISTER_LEASE_SECONDS",
    "RERANKER_REGISTER_LEAVE_SECONDS",
    "RERANKER_REGISTER_MACHINE_ID",
    "ENABLE_PREDICTION_CACHE",
    "CACHE_TTL_SECONDS",
    "CLEAR_CACHE_INTERVAL",
    "ENABLE_TORCH_COMPILE",
    "ENABLE_MIXED_PRECISION",
    "WARMUP_ON_START",
    "REDIS_ENABLED",
    "REDIS_URL",
    "MICRO_BATCH_ENABLED",
    "MICRO_BATCH_WINDOW_MS",
    "HOST",
    "PORT",
    "RERANKER_TLS_CERTFILE",
    "RERANKER_TLS_KEYFILE",
    "LOG_LEVEL",
)

#: Values the server accepts for RERANKER_DEVICE, RERANKER_QUANTIZATION and RERANKER_RUNTIME.
DEVICES: tuple[str, ...] = ("auto", "cuda", "mps", "cpu", "mlx")
QUANTIZATIONS: tuple[str, ...] = ("auto", "none", "int8", "int8-dynamic", "bf16", "fp16")
RUNTIMES: tuple[str, ...] = ("auto", "torch", "openvino", "mlx")
#: Values the server accepts for LOG_LEVEL (any case).
LOG_LEVELS: tuple[str, ...] = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

#: HTTP routes every server exposes.
ROUTE_HEALTH = "/health"
ROUTE_READY = "/ready"
ROUTE_METRICS = "/metrics"
DEFAULT_PORT = 8000

#: Prometheus metric names used by dashboards, alerts and autoscaling rules.
METRIC_REQUESTS = "reranker_requests_total"
METRIC_REQUEST_DURATION = "reranker_request_duration_seconds"
METRIC_QUEUE_WAIT = "reranker_queue_wait_seconds"
METRIC_INFERENCE_DURATION = "reranker_inference_duration_seconds"
METRIC_QUEUE_DEPTH = "reranker_queue_depth"
METRIC_INFLIGHT = "reranker_inflight_requests"
METRIC_BATCH_SIZE = "reranker_batch_size"
METRIC_BATCH_TOKENS = "reranker_batch_tokens"
METRIC_PAIRS_SCORED = "reranker_pairs_scored_total"
METRIC_TOKENS = "reranker_tokens_total"
METRIC_CACHE_HITS = "reranker_cache_hits_total"
METRIC_CACHE_MISSES = "reranker_cache_misses_total"
METRIC_REJECTED = "reranker_rejected_total"
METRIC_MODEL_INFO = "reranker_model_info"

#: Kubernetes API group, version and kinds.
API_GROUP = "reranker.dev"
API_VERSION = "v1alpha1"
KIND_DEPLOYMENT = "RerankerDeployment"
KIND_ENDPOINT = "RerankerEndpoint"
PLURAL_DEPLOYMENT = "rerankerdeployments"
PLURAL_ENDPOINT = "rerankerendpoints"

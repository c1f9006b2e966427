"""Prometheus metrics (the names of the contract) and the JSON summary of the original service.

Each app gets its own CollectorRegistry, so tests that build several apps in one process do
not collide. Percentiles for the JSON summary come from a bounded window of recent samples;
Prometheus gets histograms.
"""

from __future__ import annotations

import time
from collections import deque

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from . import contract as c

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_PAIR_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_TOKEN_BUCKETS = (64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536)


class Window:
    """The last N samples of one timing, for p50/p95/p99 without unbounded memory."""

    def __init__(self, size: int = 4096) -> None:
        self.samples: deque[float] = deque(maxlen=size)

    def add(self, value: float) -> None:
        self.samples.append(value)

    def summary_ms(self) -> dict[str, float]:
        if not self.samples:
            return {"p50": 0.0, "p95": 0.0, "p99": 0.0, "count": 0}
        values = np.fromiter(self.samples, dtype=float) * 1000.0
        p50, p95, p99 = np.percentile(values, [50, 95, 99])
        return {"p50": round(float(p50), 3), "p95": round(float(p95), 3), "p99": round(float(p99), 3),
                "count": len(self.samples)}


class Metrics:
    """All server metrics, registered on one registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(c.METRIC_REQUESTS, "Requests by route and status", ["route", "status"], registry=r)
        self.request_duration = Histogram(c.METRIC_REQUEST_DURATION, "Request latency", ["route"], buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram(c.METRIC_QUEUE_WAIT, "Time a pair waited for its batch", buckets=_LATENCY_BUCKETS, registry=r)
        self.inference_duration = Histogram(c.METRIC_INFERENCE_DURATION, "Forward pass duration", buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge(c.METRIC_QUEUE_DEPTH, "Pairs waiting for the model", registry=r)
        self.inflight = Gauge(c.METRIC_INFLIGHT, "Rerank requests being served", registry=r)
        self.batch_size = Histogram(c.METRIC_BATCH_SIZE, "Pairs per forward pass", buckets=_PAIR_BUCKETS, registry=r)
        self.batch_tokens = Histogram(c.METRIC_BATCH_TOKENS, "Padded tokens per forward pass", buckets=_TOKEN_BUCKETS, registry=r)
        self.pairs_scored = Counter(c.METRIC_PAIRS_SCORED, "Pairs that went through the model", registry=r)
        self.tokens = Counter(c.METRIC_TOKENS, "Tokens that went through the model (unpadded)", registry=r)
        self.cache_hits = Counter(c.METRIC_CACHE_HITS, "Score cache hits", ["tier"], registry=r)
        self.cache_misses = Counter(c.METRIC_CACHE_MISSES, "Score cache misses (pairs that needed the model or another server)", registry=r)
        self.dedup = Counter("reranker_deduplicated_pairs_total", "Pairs answered by a computation already in flight", ["scope"], registry=r)
        self.rejected = Counter(c.METRIC_REJECTED, "Requests refused", ["reason"], registry=r)
        self.model_info = Gauge(c.METRIC_MODEL_INFO, "The model being served", ["model", "backend", "device", "dtype"], registry=r)
        self.redis_errors = Counter("reranker_redis_errors_total", "Redis calls that failed or timed out", ["op"], registry=r)
        self.redis_latency = Histogram("reranker_redis_duration_seconds", "Redis round trips", ["op"], buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25), registry=r)
        self.batch_cut = Histogram("reranker_batch_cut_seconds", "The batching task's own time to cut one batch "
                                   "from the queue", buckets=(1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1),
                                   registry=r)
        self.leases_renewed = Counter("reranker_redis_leases_renewed_total", "Fleet leases on pairs still queued or "
                                      "running here, renewed so no other server computes them too", registry=r)
        for tier in ("local", "redis"):
            self.cache_hits.labels(tier=tier)
        self.wait_window = Window()
        self.process_window = Window()
        self.started_at = time.time()
        self.total_requests = 0
        self.failed_requests = 0

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        """Current value of one sample (tests and /health read metrics through this)."""
        got = self.registry.get_sample_value(name, labels or {})
        return float(got or 0.0)

    def summary(self) -> dict[str, object]:
        """The original service's JSON metrics, plus wait/process percentiles."""
        hits_local = self.value(c.METRIC_CACHE_HITS, {"tier": "local"})
        hits_redis = self.value(c.METRIC_CACHE_HITS, {"tier": "redis"})
        misses = self.value(c.METRIC_CACHE_MISSES)
        looked_up = hits_local + hits_redis + misses
        return {
            "uptime_seconds": round(time.time() - self.started_at, 1),
            "total_requests": self.total_requests,
            "failed_requests": self.failed_requests,
            "pairs_scored": int(self.value(c.METRIC_PAIRS_SCORED)),
            "tokens_scored": int(self.value(c.METRIC_TOKENS)),
            "cache": {"hits_local": int(hits_local), "hits_redis": int(hits_redis), "misses": int(misses),
                      "hit_rate": round((hits_local + hits_redis) / looked_up, 4) if looked_up else 0.0},
            "queue_wait_ms": self.wait_window.summary_ms(),
            "process_time_ms": self.process_window.summary_ms(),
        }

"""The gateway's Prometheus metrics, on its own registry (the dashboard's gateway row reads these).

Labels: `model` is the fleet's model id (its first served name; "" when no fleet matched), so an
alias does not split a fleet's series and an unknown name cannot grow the label set; `dialect` is
the dialect the request was read as (native, tei, vllm, cohere-v1, cohere-v2, nim, score; "" when
the body could not be read).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REQUESTS = "reranker_gateway_requests_total"
REQUEST_DURATION = "reranker_gateway_request_duration_seconds"
HOLD = "reranker_gateway_hold_seconds"
HELD = "reranker_gateway_held_requests"
RETRIES = "reranker_gateway_retries_total"
FANOUT_WIDTH = "reranker_gateway_fanout_width"
AFFINITY = "reranker_gateway_affinity_total"
UPSTREAM = "reranker_gateway_upstream_requests_total"
WAKES = "reranker_gateway_wakes_total"

_LATENCY = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_HOLD = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter(REQUESTS, "Requests by model, dialect and status", ["model", "dialect", "status"], registry=r)
        self.duration = Histogram(REQUEST_DURATION, "Request latency through the gateway (hold included)",
                                  ["model", "dialect"], buckets=_LATENCY, registry=r)
        self.hold = Histogram(HOLD, "Time requests waited for a fleet with no ready endpoint", ["model"],
                              buckets=_HOLD, registry=r)
        self.held = Gauge(HELD, "Requests waiting for a fleet with no ready endpoint", registry=r)
        self.retries = Counter(RETRIES, "Requests sent again to another endpoint, by why "
                               "(refused: 429/503; connect: connection error or reset)", ["model", "reason"], registry=r)
        self.fanout_width = Histogram(FANOUT_WIDTH, "Endpoints a request was split across (1: not split)", ["model"],
                                      buckets=(1, 2, 3, 4, 6, 8, 12, 16), registry=r)
        self.affinity = Counter(AFFINITY, "Affinity picks: hit (the query's home endpoint) or spill (home over "
                                "the load bound: the next on the ring)", ["model", "result"], registry=r)
        self.upstream = Counter(UPSTREAM, "Requests sent to endpoints, by endpoint and status (or error)",
                                ["model", "endpoint", "status"], registry=r)
        self.wakes = Counter(WAKES, "Wake requests for fleets with no ready endpoint", ["model"], registry=r)

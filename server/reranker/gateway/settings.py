"""The gateway's settings: one pydantic-settings class, every option an env var RERANKER_GATEWAY_*.

The limits the gateway checks itself (body size, documents per request) default to the server's,
so a body the gateway refuses is one every server behind it would refuse too.
"""

from __future__ import annotations

from typing import Literal

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class GatewaySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RERANKER_GATEWAY_", extra="ignore", populate_by_name=True)

    host: str = Field("0.0.0.0", validation_alias=AliasChoices("RERANKER_GATEWAY_HOST", "HOST"),
                      description="Address to listen on.")
    port: int = Field(8000, ge=1, le=65535, validation_alias=AliasChoices("RERANKER_GATEWAY_PORT", "PORT"),
                      description="Port to listen on ($PORT works too).")
    log_level: str = Field("INFO", validation_alias=AliasChoices("RERANKER_GATEWAY_LOG_LEVEL", "LOG_LEVEL"))

    # --- where fleets come from ---------------------------------------------------------------
    discovery: Literal["kubernetes", "static"] = Field(
        "static", description="kubernetes: watch RerankerDeployments and their EndpointSlices; static: "
        "RERANKER_GATEWAY_STATIC_FLEETS.")
    namespaces: str = Field("", description="kubernetes: comma-separated namespaces to watch; empty: all (cluster-wide RBAC).")
    static_fleets: str = Field(
        "[]", description="static: the fleets as JSON, or the path of a JSON file (re-read when it changes): "
        '[{"name", "namespace"?, "served_names": [...], "endpoints": ["http://host:port" | {"url", "name"}], '
        '"replicas"?, "can_wake"?}].')
    static_reload_seconds: float = Field(1.0, gt=0, description="static: how often a fleets file is checked for changes.")

    # --- routing -------------------------------------------------------------------------------
    default_model: str = Field("", description="The fleet (by a name it serves) for requests that name no model; "
                               "empty: the only fleet if there is one, else 404.")
    affinity: bool = Field(True, description="Send the same query to the same endpoint (bounded-load consistent "
                           "hashing) so the servers' score caches hit.")
    affinity_balance: float = Field(0.25, ge=0, description="epsilon: an endpoint keeps its queries while its "
                                    "load is at most (1 + epsilon) x the fleet's mean load.")
    fanout_threshold: int = Field(256, ge=1, description="Requests with more documents than this are split "
                                  "across the fleet's ready endpoints and merged.")
    fanout_max_width: int = Field(4, ge=1, description="Most endpoints one request is split across.")
    load_report_seconds: float = Field(2.0, gt=0, description="How long a server's reported queue depth "
                                       "(endpoint-load-metrics header) counts in its load.")

    # --- time and limits ------------------------------------------------------------------------
    request_timeout_seconds: float = Field(150.0, gt=0, description="The one deadline of a forwarded request, "
                                           "retries included (the server's own: queue + worker timeout).")
    connect_timeout_seconds: float = Field(2.0, gt=0, description="Connecting to an endpoint; past it the "
                                           "request is retried on another.")
    hold_timeout_seconds: float = Field(120.0, ge=0, description="How long a request waits for a fleet with "
                                        "no ready endpoint (scaled to zero, waking); past it 503 + Retry-After.")
    max_held_requests: int = Field(1000, ge=0, description="Most requests held at once; more: 429.")
    max_retries: int = Field(2, ge=0, le=5, description="Further endpoints tried after a connection error "
                             "(a 429/503 answer is retried once).")
    endpoint_max_connections: int = Field(64, ge=1, description="Connection pool bound per endpoint.")
    max_body_bytes: int = Field(2 * 1024 * 1024, ge=1024, description="Largest request body (more: 413), as "
                                "the server's RERANKER_MAX_BODY_BYTES.")
    max_documents: int = Field(1000, ge=1, description="Most documents in one request (more: 422), as the "
                               "server's RERANKER_MAX_DOCUMENTS (fan-out does not raise it).")

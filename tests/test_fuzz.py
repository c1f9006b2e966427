"""Property-based fuzzing of every route, generated from the server's own OpenAPI schema.

Schemathesis (Hypothesis underneath) reads /openapi.json from a real `reranker serve` process
and sends bodies that follow the schema and bodies that break it, then checks every answer: no
5xx, a status code the schema declares, and a body that matches the declared response schema.
The run is bounded (examples per route below); the figures of the run (requests sent, answers by
status) are printed at the end of the module (`pytest -s tests/test_fuzz.py`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from servers import ServerProcess

#: Examples per route and generation mode; every example is one request (more on shrinking a failure).
EXAMPLES = 60
SENT = {"requests": 0, "routes": 0}

# Every check but one runs: "a schema-valid request is accepted" cannot hold for rules JSON Schema
# cannot state (rank_fields must name fields of the document objects; limits that are settings,
# RERANKER_MAX_DOCUMENTS and RERANKER_MAX_QUERY_CHARS; truncate=false with a text too long in
# tokens). Those answers are 4xx naming the field, which the other checks still hold to the schema.
positive_data_acceptance = schemathesis.checks.positive_data_acceptance


@pytest.fixture(scope="module")
def api_schema(module_server_factory: Callable[..., ServerProcess]) -> Iterator[object]:
    # Small limits so that generated requests reach them; the embedded MiniLM scores for real.
    server = module_server_factory({"RERANKER_MAX_DOCUMENTS": "16", "RERANKER_MAX_QUERY_CHARS": "512",
                                    "RERANKER_MAX_BODY_BYTES": "65536", "MICRO_BATCH_WINDOW_MS": "0"}, wait=False)
    server.wait_ready(timeout=300)
    yield schemathesis.openapi.from_url(server.url + "/openapi.json")
    text = httpx.get(server.url + "/metrics", timeout=10).text
    counts: dict[str, float] = {}
    for route, status, value in re.findall(r'reranker_requests_total\{route="([^"]+)",status="(\d+)"\} ([0-9.e+]+)', text):
        counts[status] = counts.get(status, 0) + float(value)
    print(f"\nfuzz run: {SENT['requests']} requests to {SENT['routes']} routes; the rerank routes answered "
          f"{int(sum(counts.values()))}, by status {dict(sorted(counts.items()))}")
    assert not [s for s in counts if s.startswith("5") and s != "503"], counts
    assert counts.get("503", 0) == 0, counts  # not loading, not draining, nothing timed out


@pytest.mark.parametrize("mode", list(schemathesis.GenerationMode), ids=lambda m: m.value)
def test_every_route_answers_within_its_schema(api_schema: schemathesis.BaseSchema, mode: schemathesis.GenerationMode) -> None:
    """Positive: bodies that follow the schema. Negative: bodies that break it (each must be a 4xx)."""
    # The pytest plugin's own parametrization does not run under this pytest (9.x); Hypothesis is driven directly.
    operations = [result.ok() for result in api_schema.get_all_operations()]
    SENT["routes"] = len(operations)
    assert {op.path for op in operations} >= {"/rerank", "/v1/rerank", "/v2/rerank", "/health", "/ready", "/metrics"}
    for operation in operations:
        if mode is schemathesis.GenerationMode.NEGATIVE and operation.method.upper() == "GET":
            continue  # nothing to break: the probes take no input

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case: schemathesis.Case) -> None:
            SENT["requests"] += 1
            case.call_and_validate(excluded_checks=[positive_data_acceptance])

        check()

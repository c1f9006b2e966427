"""The server reports its load on every rerank answer (Envoy ORCA's `endpoint-load-metrics`, TEXT
form), which the gateway's picking reads; probes and errors of other routes do not carry it."""

from __future__ import annotations

from servers import running_app


async def test_rerank_answers_carry_the_queue_depth() -> None:
    async with running_app() as client:
        for path, body in [("/rerank", {"query": "q", "documents": ["a", "b"]}),
                           ("/v1/rerank", {"query": "q", "documents": ["a"]}),
                           ("/v2/rerank", {"query": "q", "documents": ["a"]}),
                           ("/v1/ranking", {"query": {"text": "q"}, "passages": [{"text": "a"}]}),
                           ("/score", {"text_1": "q", "text_2": ["a"]})]:
            resp = await client.post(path, json=body)
            assert resp.status_code == 200, resp.text
            value = resp.headers["endpoint-load-metrics"]
            assert value.startswith("TEXT "), value
            metrics = dict(part.split("=") for part in value.removeprefix("TEXT ").split(", "))
            assert int(metrics["named_metrics.queue_pairs"]) >= 0
            assert int(metrics["named_metrics.inflight_requests"]) >= 0
        assert "endpoint-load-metrics" not in (await client.get("/health")).headers

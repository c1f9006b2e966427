"""The throughput engine under concurrency: batching across requests, admission, cache, de-duplication.

In-process (the app through its lifespan); the forwards run for real on the tiny BERT or the
embedded MiniLM. Assertions go through the metrics the server exports.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import httpx

from servers import running_app

WORDS = "apple river data model kernel queue cache python paris token server batch query night fast".split()


def make_docs(rng: random.Random, n: int) -> list[str]:
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 60))) for _ in range(n)]


def metric(client: httpx.AsyncClient, name: str, labels: dict[str, str] | None = None) -> float:
    return client.app.state.runtime.metrics.value(name, labels)  # type: ignore[attr-defined]


async def test_concurrent_requests_get_their_solo_scores(tiny_bert: Path) -> None:
    rng = random.Random(7)
    pool = make_docs(rng, 120)  # requests overlap: they draw from one pool
    requests = [{"query": rng.choice(WORDS) + " " + rng.choice(WORDS), "documents": rng.sample(pool, rng.randint(1, 30))}
                for _ in range(50)]
    async with running_app(model=str(tiny_bert), enable_prediction_cache=False, batch_size=16,
                           micro_batch_window_ms=5) as client:
        solo = []
        for body in requests:
            solo.append((await client.post("/rerank", json=body)).json()["results"])
        batches_before = metric(client, "reranker_batch_size_count")
        together = await asyncio.gather(*(client.post("/rerank", json=body) for body in requests))
        batches = metric(client, "reranker_batch_size_count") - batches_before
        per_request_batches = sum(-(-len(b["documents"]) // 16) for b in requests)
        for alone, resp in zip(solo, together):
            assert resp.status_code == 200
            got = resp.json()["results"]
            assert [r["index"] for r in got] == [r["index"] for r in alone] or \
                max(abs(a["score"] - b["score"]) for a, b in zip(alone, got)) < 1e-6
            by_index = {r["index"]: r["score"] for r in got}
            for r in alone:
                assert abs(by_index[r["index"]] - r["score"]) < 1e-5
        # pairs from different requests shared forwards: fewer batches than batching each request alone
        assert batches < 0.8 * per_request_batches


async def test_queue_full_is_429_with_retry_after(minilm: Path) -> None:
    rng = random.Random(1)
    async with running_app(max_queue=8, batch_size=4, enable_prediction_cache=False, queue_timeout=60) as client:
        bodies = [{"query": "q", "documents": make_docs(rng, 4)} for _ in range(30)]
        responses = await asyncio.wait_for(asyncio.gather(*(client.post("/rerank", json=b) for b in bodies)), 120)
        statuses = [r.status_code for r in responses]
        assert set(statuses) <= {200, 429}
        assert statuses.count(429) > 0 and statuses.count(200) > 0
        refused = next(r for r in responses if r.status_code == 429)
        assert int(refused.headers["retry-after"]) >= 1
        assert refused.json()["error"] == "queue_full" and "RERANKER_MAX_QUEUE" in refused.json()["message"]
        assert metric(client, "reranker_rejected_total", {"reason": "queue_full"}) == statuses.count(429)
        # admitted requests were complete and correct
        ok = next(r for r in responses if r.status_code == 200)
        assert len(ok.json()["results"]) == 4


async def test_queue_timeout_is_503_and_drops_pairs(minilm: Path) -> None:
    rng = random.Random(2)
    # No warm-up: no throughput estimate yet, so admission cannot foresee the wait and admits all.
    async with running_app(batch_size=2, enable_prediction_cache=False, queue_timeout=0.2, micro_batch_window_ms=0,
                           warmup_on_start=False) as client:
        big = {"query": "q", "documents": make_docs(rng, 200)}
        responses = await asyncio.wait_for(asyncio.gather(*(client.post("/rerank", json=big | {"query": f"q{i}"})
                                                           for i in range(3))), 120)
        statuses = sorted(r.status_code for r in responses)
        assert 503 in statuses and set(statuses) <= {200, 503}
        timed_out = next(r for r in responses if r.status_code == 503)
        assert timed_out.json()["error"] == "queue_timeout" and "retry-after" in timed_out.headers
        await client.app.state.runtime.batcher.idle()  # type: ignore[attr-defined]
        scored = metric(client, "reranker_pairs_scored_total")
        assert scored < 3 * 200  # the timed-out requests' pending pairs were never computed


async def test_work_that_cannot_finish_in_time_is_refused_up_front(minilm: Path) -> None:
    rng = random.Random(3)
    async with running_app(batch_size=4, enable_prediction_cache=False, queue_timeout=1.0, micro_batch_window_ms=0) as client:
        bodies = [{"query": f"q{i}", "documents": make_docs(rng, 60)} for i in range(4)]
        responses = await asyncio.wait_for(asyncio.gather(*(client.post("/rerank", json=b) for b in bodies)), 120)
        statuses = [r.status_code for r in responses]
        assert 200 in statuses  # an empty queue always admits
        refused = [r for r in responses if r.status_code == 429]
        assert refused, statuses
        assert "RERANKER_QUEUE_TIMEOUT" in refused[0].json()["message"] and "retry-after" in refused[0].headers


async def test_cache_hits_do_not_reach_the_model(minilm: Path) -> None:
    body = {"query": "cache me", "documents": ["one doc", "two doc", "three doc"]}
    async with running_app() as client:
        first = (await client.post("/rerank", json=body)).json()
        scored = metric(client, "reranker_pairs_scored_total")
        assert scored == 3
        second = (await client.post("/rerank", json=body)).json()
        assert metric(client, "reranker_pairs_scored_total") == scored
        assert metric(client, "reranker_cache_hits_total", {"tier": "local"}) == 3
        assert [r["score"] for r in first["results"]] == [r["score"] for r in second["results"]]
        # same documents through another dialect: still cached (same pairs)
        await client.post("/v2/rerank", json=body)
        assert metric(client, "reranker_pairs_scored_total") == scored


async def test_identical_pairs_in_flight_are_computed_once(minilm: Path) -> None:
    docs = [f"document number {i} about rivers" for i in range(40)]
    async with running_app(batch_size=8, micro_batch_window_ms=0) as client:
        responses = await asyncio.gather(*(client.post("/rerank", json={"query": "rivers", "documents": docs})
                                           for _ in range(5)))
        assert all(r.status_code == 200 for r in responses)
        assert metric(client, "reranker_pairs_scored_total") == 40
        deduped = metric(client, "reranker_deduplicated_pairs_total", {"scope": "local"})
        hits = metric(client, "reranker_cache_hits_total", {"tier": "local"})
        assert deduped + hits == 4 * 40
        assert deduped > 0
        first = responses[0].json()["results"]
        assert all(r.json()["results"] == first for r in responses)


async def test_duplicate_documents_in_one_request(minilm: Path) -> None:
    async with running_app(enable_prediction_cache=False) as client:
        body = (await client.post("/rerank", json={"query": "q", "documents": ["same", "same", "other"]})).json()
        scores = {r["index"]: r["score"] for r in body["results"]}
        assert scores[0] == scores[1]
        assert metric(client, "reranker_pairs_scored_total") == 2


async def test_each_pair_is_tokenized_once(tiny_bert: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The lengths the batcher groups by and the forward's input ids come from one tokenizer call."""
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

    tokenized: list[int] = []  # texts (or pairs) per tokenizer call, from every thread
    real_call = PreTrainedTokenizerBase.__call__

    def counting(self, text=None, text_pair=None, *args, **kwargs):  # type: ignore[no-untyped-def]
        tokenized.append(len(text) if isinstance(text, list) else 1)
        return real_call(self, text, text_pair, *args, **kwargs)

    # The fast path calls the tokenizer's Rust engine directly: count those calls too.
    from reranker.backends.tokenization import HFTokenization

    real_engine = HFTokenization._encode_batch

    def counting_engine(self, inputs):  # type: ignore[no-untyped-def]
        tokenized.append(len(inputs))
        return real_engine(self, inputs)

    rng = random.Random(5)
    async with running_app(model=str(tiny_bert), batch_size=8, micro_batch_window_ms=5) as client:
        monkeypatch.setattr(PreTrainedTokenizerBase, "__call__", counting)
        monkeypatch.setattr(HFTokenization, "_encode_batch", counting_engine)
        bodies = [{"query": f"query {i}", "documents": make_docs(rng, 12)} for i in range(6)]
        responses = await asyncio.gather(*(client.post("/rerank", json=b) for b in bodies))
        assert all(r.status_code == 200 for r in responses)
        scored = metric(client, "reranker_pairs_scored_total")
        assert scored == 6 * 12
        assert sum(tokenized) == scored  # one tokenization per pair, none in the forward
        await client.post("/rerank", json=bodies[0])  # all cached: no tokenizer work at all
        assert sum(tokenized) == scored

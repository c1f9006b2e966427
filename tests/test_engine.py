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
        # An empty queue always admits. The admitted request may still run past the 1 s queue
        # timeout on a slow machine (503 + Retry-After, not a refusal at the door).
        admitted = [r for r in responses if r.status_code != 429]
        assert admitted and all(r.status_code in (200, 503) for r in admitted), statuses
        assert all("retry-after" in r.headers for r in admitted if r.status_code == 503)
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
    # a long queue timeout: admission must not refuse any of it on a slow, shared machine
    async with running_app(model=str(tiny_bert), batch_size=8, micro_batch_window_ms=5, queue_timeout=600) as client:
        monkeypatch.setattr(PreTrainedTokenizerBase, "__call__", counting)
        monkeypatch.setattr(HFTokenization, "_encode_batch", counting_engine)
        bodies = [{"query": f"query {i}", "documents": make_docs(rng, 12)} for i in range(6)]
        responses = await asyncio.gather(*(client.post("/rerank", json=b) for b in bodies))
        assert [r.status_code for r in responses] == [200] * 6, [r.text for r in responses]
        scored = metric(client, "reranker_pairs_scored_total")
        assert scored == 6 * 12
        assert sum(tokenized) == scored  # one tokenization per pair, none in the forward
        await client.post("/rerank", json=bodies[0])  # all cached: no tokenizer work at all
        assert sum(tokenized) == scored


# --- lifecycle of jobs and admission (hardening) ---------------------------------------------

class ForwardGate:
    """Holds the real backend's forwards until released: the queue fills up deterministically.

    The model still runs (the gate only delays each forward), so nothing here is mocked.
    """

    def __init__(self, runtime: object) -> None:
        import threading

        self.open = threading.Event()
        backend = runtime.backend  # type: ignore[attr-defined]
        original = backend.score_encoded

        def gated(encoded):  # type: ignore[no-untyped-def]
            self.open.wait(60)
            return original(encoded)

        backend.score_encoded = gated

    def release(self) -> None:
        self.open.set()


async def wait_until(predicate, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


async def test_idle_server_holds_no_jobs_after_timeouts_and_disconnects(minilm: Path) -> None:
    """Issue 15.1: dropped jobs (queue timeout, client gone) leave Ranker.inflight."""
    rng = random.Random(4)
    async with running_app(batch_size=2, enable_prediction_cache=False, queue_timeout=0.3, micro_batch_window_ms=0,
                           warmup_on_start=False) as client:
        runtime = client.app.state.runtime  # type: ignore[attr-defined]
        gate = ForwardGate(runtime)
        timed_out = await client.post("/rerank", json={"query": "timeout", "documents": make_docs(rng, 30)})
        assert timed_out.status_code == 503
        # a client that goes away: its request task is cancelled (what an ASGI server does on disconnect)
        gone = asyncio.get_running_loop().create_task(
            client.post("/rerank", json={"query": "gone", "documents": make_docs(rng, 30)}))
        await wait_until(lambda: runtime.admission.inflight == 1)
        await asyncio.sleep(0.2)  # its jobs are queued behind the held forward
        gone.cancel()
        gate.release()
        await runtime.batcher.idle()
        await asyncio.sleep(0.05)
        assert len(runtime.ranker.inflight) == 0, f"{len(runtime.ranker.inflight)} jobs held by an idle server"
        assert (await client.get("/health")).json()["controller"]["jobs_held"] == 0


async def test_cancelled_pairs_leave_the_queue_depth_at_once(minilm: Path) -> None:
    """Issue 15.3: pairs of a timed-out request stop counting (429s, reranker_queue_depth) right away."""
    rng = random.Random(5)
    async with running_app(batch_size=2, enable_prediction_cache=False, queue_timeout=0.3, micro_batch_window_ms=0,
                           warmup_on_start=False) as client:
        runtime = client.app.state.runtime  # type: ignore[attr-defined]
        gate = ForwardGate(runtime)  # the first batch is stuck in its forward: the batcher cannot prune
        r = await client.post("/rerank", json={"query": "q", "documents": make_docs(rng, 20)})
        assert r.status_code == 503
        try:
            assert runtime.admission.waiting == 0
            assert metric(client, "reranker_queue_depth") == 0
        finally:
            gate.release()
            await runtime.batcher.idle()


async def test_refused_requests_cost_no_tokenizer_time(minilm: Path) -> None:
    """Issue 15.4: admission comes before tokenization; a full queue refuses before any tokenizer call."""
    rng = random.Random(6)
    async with running_app(batch_size=2, max_queue=8, enable_prediction_cache=False, micro_batch_window_ms=0,
                           warmup_on_start=False) as client:
        runtime = client.app.state.runtime  # type: ignore[attr-defined]
        gate = ForwardGate(runtime)
        first = asyncio.get_running_loop().create_task(
            client.post("/rerank", json={"query": "first", "documents": make_docs(rng, 10)}))
        await wait_until(lambda: runtime.admission.waiting >= 8)
        calls = []
        backend = runtime.backend
        for name in ("encode", "pair_lengths", "token_offsets", "token_counts"):
            original = getattr(backend, name)
            setattr(backend, name, lambda *a, _o=original, _n=name, **k: (calls.append(_n), _o(*a, **k))[1])
        refused = await client.post("/v1/rerank", json={"query": "late", "documents": make_docs(rng, 5)})
        chunked = await client.post("/v1/rerank", json={"query": "late", "documents": make_docs(rng, 5),
                                                         "max_chunks_per_doc": 3})
        gate.release()
        assert (await first).status_code == 200
        assert refused.status_code == 429 and chunked.status_code == 429
        assert calls == []


async def test_concurrent_requests_are_capped_with_429(minilm: Path) -> None:
    """Issue 15.4: at most RERANKER_MAX_CONCURRENT_REQUESTS requests at once; the rest get 429 + Retry-After."""
    rng = random.Random(7)
    async with running_app(max_concurrent_requests=2, enable_prediction_cache=False, warmup_on_start=False) as client:
        runtime = client.app.state.runtime  # type: ignore[attr-defined]
        gate = ForwardGate(runtime)
        held = [asyncio.get_running_loop().create_task(client.post("/rerank", json={"query": f"q{i}", "documents": make_docs(rng, 2)}))
                for i in range(2)]
        await wait_until(lambda: runtime.admission.inflight == 2)
        third = await client.post("/rerank", json={"query": "third", "documents": make_docs(rng, 2)})
        gate.release()
        assert [(await t).status_code for t in held] == [200, 200]
        assert third.status_code == 429 and "retry-after" in third.headers
        assert "RERANKER_MAX_CONCURRENT_REQUESTS" in third.json()["message"]
        assert metric(client, "reranker_rejected_total", {"reason": "concurrency"}) == 1


async def test_query_is_bounded_and_hashed_once(minilm: Path) -> None:
    """Issue 15.4: an overlong query is refused (413 naming it) before any work; keys hash the query once."""
    from reranker.cache import pair_key

    async with running_app(max_query_chars=100) as client:
        r = await client.post("/rerank", json={"query": "q" * 101, "documents": ["a", "b"]})
        assert r.status_code == 413 and r.json()["message"].startswith("query")
        assert "RERANKER_MAX_QUERY_CHARS" in r.json()["message"]
        assert metric(client, "reranker_cache_misses_total") == 0  # not even looked up
        assert (await client.post("/rerank", json={"query": "q" * 100, "documents": ["a"]})).status_code == 200
        cache = client.app.state.runtime.cache  # type: ignore[attr-defined]
        docs = ["one", "two", "\udc80 lone"]
        assert cache.keys("the query", docs) == [pair_key(cache.fingerprint, ("the query", d)) for d in docs]

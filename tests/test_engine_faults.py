"""No request hangs, and a server that cannot serve says so: broken backends, stuck forwards,
a dead batching task, another server that never delivers.

In-process (the app through its lifespan) with the real embedded MiniLM. The backends here are
deliberately broken versions of the real one (its forward wrapped to drop a score, return
garbage, block, or report no lengths): a broken component under test, not a mock of a working
one. Every request is bounded by `asyncio.wait_for`, so a regression to a hang fails the test
instead of stalling the suite.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from redis_fixture import RedisServer
from servers import running_app

DOCS = ["the seine flows through paris", "rivers of europe", "a cake recipe", "kernel queues"]


def wrap_forward(runtime: Any, broken: Any) -> None:
    """Replace the real backend's forward with `broken(original, encoded)`."""
    backend = runtime.backend
    original = backend.score_encoded
    backend.score_encoded = lambda encoded: broken(original, encoded)


async def post(client: httpx.AsyncClient, body: dict[str, Any], *, within: float = 30) -> httpx.Response:
    return await asyncio.wait_for(client.post("/rerank", json=body), within)


async def test_a_backend_that_returns_one_score_too_few_is_a_424_not_a_hang(minilm: Path) -> None:
    async with running_app(enable_prediction_cache=False, micro_batch_window_ms=0) as client:
        runtime = client.app.state.runtime  # type: ignore[attr-defined]
        wrap_forward(runtime, lambda original, encoded: original(encoded)[:-1])
        r = await post(client, {"query": "rivers", "documents": DOCS})
        assert r.status_code == 424 and r.json()["error"] == "backend_error", r.text
        assert "3 scores for a batch of 4 pairs" in r.json()["message"]
        assert runtime.ranker.inflight == {}  # every job settled
        assert (await client.get("/ready")).status_code == 200  # a broken batch is not a broken engine


async def test_a_backend_that_returns_garbage_while_scoring_is_a_424_not_a_hang(minilm: Path) -> None:
    """A score that is not a number raised while the results were being handed out: the jobs
    after it were never settled and their request waited forever."""
    async with running_app(enable_prediction_cache=False, micro_batch_window_ms=0) as client:
        runtime = client.app.state.runtime  # type: ignore[attr-defined]
        wrap_forward(runtime, lambda original, encoded: [*original(encoded)[:-1], None])
        r = await post(client, {"query": "rivers", "documents": DOCS})
        assert r.status_code == 424 and "not numbers" in r.json()["message"], r.text
        assert runtime.ranker.inflight == {}


async def test_a_failing_completion_hook_answers_and_keeps_the_engine(minilm: Path) -> None:
    async with running_app(enable_prediction_cache=False, micro_batch_window_ms=0) as client:
        runtime = client.app.state.runtime  # type: ignore[attr-defined]

        def hook(_jobs: list[Any]) -> None:
            raise RuntimeError("the hook broke")

        runtime.batcher.on_done = hook
        first = await post(client, {"query": "rivers", "documents": DOCS})
        second = await post(client, {"query": "cakes", "documents": DOCS})
        assert (first.status_code, second.status_code) == (200, 200)
        assert runtime.batcher.fault() is None


async def test_waiting_on_another_server_counts_against_the_request_deadline(redis_server: RedisServer) -> None:
    """Another server holds the pair's lease and never delivers: the request answers 503 with
    Retry-After at its deadline (queue + worker timeout). Before, the wait ran out, the pair was
    claimed again, found taken again, and waited for again: the request never answered."""
    async with running_app(redis_enabled=True, redis_url=redis_server.url, queue_timeout=0.6,
                           worker_timeout=0.6) as client:
        runtime = client.app.state.runtime  # type: ignore[attr-defined]
        doc = "a pair another server claimed and never scores"
        redis_server.client().set(runtime.remote._lease_key(runtime.cache.key(("q", doc))), b"a-stuck-server",
                                  px=60_000)
        started = time.monotonic()
        r = await post(client, {"query": "q", "documents": [doc]}, within=20)
        took = time.monotonic() - started
        assert r.status_code == 503 and r.json()["error"] == "request_timeout", r.text
        assert int(r.headers["retry-after"]) >= 1
        assert 1.1 < took < 5, took
        assert client.app.state.runtime.metrics.value(  # type: ignore[attr-defined]
            "reranker_rejected_total", {"reason": "request_timeout"}) == 1
        await asyncio.sleep(0.3)
        assert runtime.ranker.inflight == {} and not runtime.ranker._background  # nobody waits for it any more


class Gate:
    """Holds the real forward until opened."""

    def __init__(self, runtime: Any) -> None:
        self.open = threading.Event()
        self.entered = threading.Event()

        def held(original: Any, encoded: Any) -> Any:
            self.entered.set()
            self.open.wait(60)
            return original(encoded)

        wrap_forward(runtime, held)


async def test_every_forward_slot_stuck_past_the_worker_timeout_is_not_ready(minilm: Path) -> None:
    async with running_app(enable_prediction_cache=False, micro_batch_window_ms=0, worker_timeout=0.3,
                           max_parallel=1) as client:
        runtime = client.app.state.runtime  # type: ignore[attr-defined]
        gate = Gate(runtime)
        try:
            r = await post(client, {"query": "stuck", "documents": DOCS})
            assert r.status_code == 503 and r.json()["error"] == "worker_timeout", r.text
            ready = await client.get("/ready")
            assert ready.status_code == 503 and ready.json()["reason"] == "wedged", ready.text
            assert "RERANKER_WORKER_TIMEOUT" in ready.json()["message"]
            health = await client.get("/health")
            assert health.status_code == 503 and health.json()["status"] == "wedged"
            assert "stuck" in health.json()["error"]
        finally:
            gate.open.set()
        # the forward came back: the slot is free and the server serves again
        deadline = time.monotonic() + 10
        while (await client.get("/ready")).status_code != 200:
            assert time.monotonic() < deadline, "never ready again after the forward returned"
            await asyncio.sleep(0.05)
        assert (await client.get("/health")).status_code == 200


async def test_a_slow_forward_within_the_timeout_stays_ready(minilm: Path) -> None:
    async with running_app(enable_prediction_cache=False, micro_batch_window_ms=0, worker_timeout=30,
                           max_parallel=1) as client:
        runtime = client.app.state.runtime  # type: ignore[attr-defined]
        gate = Gate(runtime)
        task = asyncio.get_running_loop().create_task(post(client, {"query": "slow", "documents": DOCS}))
        assert await asyncio.to_thread(gate.entered.wait, 10)
        assert (await client.get("/ready")).status_code == 200
        gate.open.set()
        assert (await task).status_code == 200


@dataclass
class NoLength:
    """What a broken tokenizer hands back: token ids, but no length the batcher can budget by."""

    ids: list[int]
    type_ids: list[int] | None = None
    query: list[int] | None = None
    tokens: Any = None


async def test_a_dead_batching_task_fails_its_requests_and_is_not_ready(minilm: Path) -> None:
    async with running_app(enable_prediction_cache=False) as client:
        runtime = client.app.state.runtime  # type: ignore[attr-defined]
        real_encode = runtime.backend.encode

        def broken_encode(pairs: Sequence[Any]) -> list[Any]:
            return [NoLength(e.ids, e.type_ids, e.query) for e in real_encode(pairs)]

        runtime.backend.encode = broken_encode
        r = await post(client, {"query": "q", "documents": DOCS})
        assert r.status_code == 503 and r.json()["error"] == "engine_failed", r.text
        assert "batching task died" in r.json()["message"]
        runtime.backend.encode = real_encode
        later = await post(client, {"query": "later", "documents": DOCS})  # answered at once, not at a timeout
        assert later.status_code == 503 and later.json()["error"] == "engine_failed"
        ready = await client.get("/ready")
        assert ready.status_code == 503 and "batching task died: TypeError" in ready.json()["message"]
        health = await client.get("/health")
        assert health.status_code == 503 and "batching task died" in health.json()["error"]

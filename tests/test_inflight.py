"""How the server feeds a GPU, checked on CPU with a stand-in forward.

CI has no GPU, so the forward here is a stand-in that blocks like a GPU batch does (its thread
waits without the GIL); everything around it is real: the app through its lifespan, the ranker,
the batcher, the tiny BERT's tokenizer. What is checked is the host side of the CUDA path:

- batches in flight: with RERANKER_MAX_PARALLEL left to the backend, a CUDA-like backend gets two
  forwards running at once (each worker thread has its own stream on a real GPU);
- the next request is tokenized while a forward runs (tokenization never waits for the model);
- the batching defaults come from the backend when the settings leave them open, and explicit
  settings win.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest

from reranker.app import create_app
from reranker.backends import Backend, Encoded, EngineSizing, Pair, load_backend
from reranker.settings import Settings

GPU_LIKE = EngineSizing(batch_size=4, max_batch_tokens=100_000, max_parallel=2, padded=False)


class StandInForward(Backend):
    """A real backend's tokenizer and info; the forward is `forward(batch)`, set by each test."""

    def __init__(self, real: Backend, sizing: EngineSizing = GPU_LIKE) -> None:
        self.real = real
        self.info = real.info
        self._sizing = sizing
        self.lock = threading.Lock()
        self.running = 0
        self.most_running = 0
        self.forward_started = threading.Event()
        self.encoded_during_forward = threading.Event()

    def encode(self, pairs: Sequence[Pair]) -> list[Encoded]:
        if self.running:
            self.encoded_during_forward.set()
        return self.real.encode(pairs)

    def score_encoded(self, batch: Sequence[Encoded]) -> list[float]:
        with self.lock:
            self.running += 1
            self.most_running = max(self.most_running, self.running)
        self.forward_started.set()
        try:
            self.forward(batch)
            return [float(e.tokens) for e in batch]
        finally:
            with self.lock:
                self.running -= 1

    def forward(self, batch: Sequence[Encoded]) -> None:
        raise NotImplementedError

    def token_counts(self, texts: Sequence[str]) -> list[int]:
        return self.real.token_counts(texts)

    def token_offsets(self, text: str) -> list[tuple[int, int]]:
        return self.real.token_offsets(text)

    @property
    def special_tokens_per_pair(self) -> int:
        return self.real.special_tokens_per_pair

    def sizing(self) -> EngineSizing:
        return self._sizing


@pytest.fixture(scope="module")
def tiny(tiny_bert: Path) -> Backend:
    return load_backend(Settings(model=str(tiny_bert), device="cpu"))


def serve(backend: Backend, **settings: Any) -> Any:
    return create_app(Settings(warmup_on_start=False, enable_prediction_cache=False, micro_batch_window_ms=0,
                               **settings), backend=backend)


def body(i: int, n: int) -> dict[str, Any]:
    return {"query": f"query {i}", "documents": [f"document {i} {j} about rivers and data" for j in range(n)]}


async def test_two_batches_are_in_flight_at_once(tiny: Backend) -> None:
    class Slow(StandInForward):
        def forward(self, batch: Sequence[Encoded]) -> None:
            # Hold every forward until a second one runs beside it (or give up): with one
            # batch at a time this would wait out the timeout and the requests would fail.
            deadline = threading.Event()
            for _ in range(200):
                if self.most_running >= 2:
                    return
                deadline.wait(0.01)
            raise TimeoutError("no second batch came while this one ran")

    backend = Slow(tiny)
    app = serve(backend)
    async with app.router.lifespan_context(app):
        while not app.state.runtime.loaded.is_set():
            await asyncio.sleep(0.01)
        runtime = app.state.runtime
        assert runtime.batcher.max_parallel == 2 and runtime.admission.max_parallel == 2  # from the backend
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=30) as c:
            responses = await asyncio.gather(*(c.post("/rerank", json=body(i, 8)) for i in range(4)))
    assert [r.status_code for r in responses] == [200] * 4
    assert backend.most_running == 2


async def test_the_next_request_is_tokenized_while_a_forward_runs(tiny: Backend) -> None:
    class WaitsForTokenizer(StandInForward):
        def forward(self, batch: Sequence[Encoded]) -> None:
            if not self.encoded_during_forward.wait(10):
                raise TimeoutError("nothing was tokenized while the forward ran")

    backend = WaitsForTokenizer(tiny, EngineSizing(batch_size=64, max_batch_tokens=100_000, max_parallel=1, padded=False))
    app = serve(backend)
    async with app.router.lifespan_context(app):
        while not app.state.runtime.loaded.is_set():
            await asyncio.sleep(0.01)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=30) as c:
            first = asyncio.create_task(c.post("/rerank", json=body(0, 8)))
            assert await asyncio.to_thread(backend.forward_started.wait, 10)  # batch 1 is on the "GPU"
            second = await c.post("/rerank", json=body(1, 8))  # tokenized now, scored after batch 1
            assert (await first).status_code == 200
    assert second.status_code == 200
    assert backend.encoded_during_forward.is_set()


async def test_batching_defaults_come_from_the_backend_unless_set(tiny: Backend) -> None:
    class Instant(StandInForward):
        def forward(self, batch: Sequence[Encoded]) -> None:
            return None

    sizing = EngineSizing(batch_size=7, max_batch_tokens=777, max_parallel=3, padded=False)
    for settings, want in (({}, (7, 777, 3, False)),
                           ({"batch_size": 5, "max_batch_tokens": 555, "max_parallel": 1}, (5, 555, 1, False))):
        app = serve(Instant(tiny, sizing), **settings)
        async with app.router.lifespan_context(app):
            while not app.state.runtime.loaded.is_set():
                await asyncio.sleep(0.01)
            batcher = app.state.runtime.batcher
            assert (batcher.batch_size, batcher.max_batch_tokens, batcher.max_parallel, batcher.padded) == want
            assert app.state.runtime.admission.max_parallel == want[2]
    assert tiny.sizing() == EngineSizing()  # CPU: the settings' historical defaults (32 pairs, 16384 tokens, 1)

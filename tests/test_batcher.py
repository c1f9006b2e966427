"""The batch-cutting policy, as a pure function: budgets, length grouping, no starvation."""

from __future__ import annotations

import asyncio
import threading
import time

from reranker.batcher import Job, cut_batch


def jobs(lengths: list[int]) -> list[Job]:
    loop = asyncio.new_event_loop()
    try:
        return [Job(pair=("q", str(i)), key=str(i), tokens=n, future=loop.create_future()) for i, n in enumerate(lengths)]
    finally:
        loop.close()


def test_fifo_cut_respects_size_and_padded_token_budget() -> None:
    queue = jobs([10, 400, 10, 10, 10])
    batch = cut_batch(queue, batch_size=3, max_tokens=10_000, by_length=False)
    assert [j.key for j in batch] == ["0", "1", "2"]
    batch = cut_batch(queue, batch_size=10, max_tokens=800, by_length=False)
    assert [j.key for j in batch] == ["0", "1"]  # a third pair would pad to 3 x 400 = 1200 tokens


def test_length_cut_groups_similar_lengths_around_the_oldest() -> None:
    queue = jobs([100, 400, 12, 390, 95, 10, 105, 380])
    batch = cut_batch(queue, batch_size=3, max_tokens=100_000, by_length=True)
    assert queue[0] in batch  # the oldest job always goes
    assert sorted(j.tokens for j in batch) == [95, 100, 105]


def test_length_cut_never_exceeds_budget_and_takes_at_least_one() -> None:
    queue = jobs([500, 10, 10, 10])
    batch = cut_batch(queue, batch_size=8, max_tokens=600, by_length=True)
    assert [j.key for j in batch] == ["0"]  # 500 + anything pads past 600
    assert cut_batch(jobs([5000]), batch_size=8, max_tokens=600, by_length=True)[0].tokens == 5000
    long_queue = jobs([50] * 40)
    batch = cut_batch(long_queue, batch_size=32, max_tokens=1000, by_length=True)
    assert len(batch) == 20 and max(j.tokens for j in batch) * len(batch) <= 1000


def test_every_job_is_eventually_cut() -> None:
    queue = jobs([10, 300, 20, 310, 15, 305, 12] * 5)
    seen = 0
    while queue:
        batch = cut_batch(queue, batch_size=4, max_tokens=2000, by_length=True)
        assert queue[0] in batch
        queue = [j for j in queue if j not in batch]
        seen += len(batch)
    assert seen == 35


def test_padding_free_cut_counts_real_tokens_first_come() -> None:
    queue = jobs([100, 400, 12, 390, 95])
    batch = cut_batch(queue, batch_size=10, max_tokens=505, by_length=True, padded=False)
    assert [j.key for j in batch] == ["0", "1"]  # arrival order; 100 + 400 real tokens, a third would pass 505
    batch = cut_batch(queue, batch_size=10, max_tokens=950, by_length=True, padded=False)
    assert [j.key for j in batch] == ["0", "1", "2", "3"]  # 902 real tokens; padded, 4 x 400 would not fit in 950
    assert [j.key for j in cut_batch(jobs([5000, 1]), batch_size=8, max_tokens=600, padded=False, by_length=True)] == ["0"]


def test_oldest_request_completes_first_and_batches_stay_grouped() -> None:
    """Six 20-pair requests of ~150-190 tokens: each batch finishes the oldest request still waiting
    (a request is done when its last pair is), and fills up with the nearest lengths of the others."""
    import random

    loop = asyncio.new_event_loop()
    rng = random.Random(3)
    queue: list[Job] = []
    origins = [object() for _ in range(6)]
    try:
        for r, origin in enumerate(origins):
            for i in range(20):
                queue.append(Job(pair=("q", f"{r}-{i}"), key=f"{r}-{i}", tokens=rng.randint(150, 190),
                                 future=loop.create_future(), origin=origin))  # type: ignore[arg-type]
    finally:
        loop.close()
    done_at: dict[int, int] = {}
    cut = 0
    while queue:
        batch = cut_batch(queue, batch_size=32, max_tokens=100_000, by_length=True)
        assert len(batch) == min(32, len(queue))
        queue = [j for j in queue if j not in batch]
        cut += 1
        for r, origin in enumerate(origins):
            if r not in done_at and not any(j.origin is origin for j in queue):
                done_at[r] = cut
    assert list(done_at) == list(range(6))  # completed in arrival order
    assert done_at[0] == 1  # the oldest request in the first batch
    assert max(done_at.values()) == 4  # 120 pairs in 4 full batches, as first-come would take


def test_a_request_bigger_than_a_batch_is_cut_by_length_first() -> None:
    loop = asyncio.new_event_loop()
    origin, other = object(), object()
    try:
        own = [Job(pair=("q", str(i)), key=str(i), tokens=n, future=loop.create_future(), origin=origin)  # type: ignore[arg-type]
               for i, n in enumerate([100, 400, 110, 390, 105, 395])]
        later = [Job(pair=("p", str(i)), key=f"p{i}", tokens=100, future=loop.create_future(), origin=other)  # type: ignore[arg-type]
                 for i in range(4)]
    finally:
        loop.close()
    batch = cut_batch(own + later, batch_size=3, max_tokens=100_000, by_length=True)
    assert sorted(j.tokens for j in batch) == [100, 105, 110]  # its own short pairs, not the later request's


class Recorder:
    """Stands in for a backend's forward (the batcher is what is tested): records each batch's
    size and how many forwards ran at once; each forward takes 50 ms."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.running = 0
        self.most_at_once = 0
        self.lock = threading.Lock()

    def score_encoded(self, batch: list[object]) -> list[float]:
        with self.lock:
            self.sizes.append(len(batch))
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        time.sleep(0.05)
        with self.lock:
            self.running -= 1
        return [0.5] * len(batch)


async def run_batcher(pairs: int, *, spread: bool, max_parallel: int = 2) -> Recorder:
    from reranker.backends import Encoded
    from reranker.batcher import Batcher
    from reranker.metrics import Metrics

    backend = Recorder()
    batcher = Batcher(backend, Metrics(), batch_size=32, max_batch_tokens=16384, window_ms=0,  # type: ignore[arg-type]
                      max_parallel=max_parallel, worker_timeout=10, spread=spread)
    batcher.start()
    loop = asyncio.get_running_loop()
    queue = [Job(pair=("q", str(i)), key=str(i), tokens=100, future=loop.create_future(), encoded=Encoded(ids=[1] * 100))
             for i in range(pairs)]
    batcher.submit(queue)
    scores = await asyncio.wait_for(asyncio.gather(*(j.future for j in queue)), 10)
    await batcher.stop()
    assert scores == [0.5] * pairs
    return backend


async def test_spread_splits_a_lone_request_across_idle_workers() -> None:
    """Forwards on disjoint compute (OpenVINO's streams): 20 waiting pairs become two forwards of
    10 that run at once, not one of 20 while the other worker idles."""
    spread = await run_batcher(20, spread=True)
    assert sorted(spread.sizes) == [10, 10] and spread.most_at_once == 2
    together = await run_batcher(20, spread=False)
    assert together.sizes == [20]
    tiny = await run_batcher(5, spread=True)  # fewer than 2 x SPREAD_MIN: one forward
    assert tiny.sizes == [5]


async def test_spread_under_load_keeps_batches_full() -> None:
    backend = await run_batcher(160, spread=True)
    assert backend.sizes[:4] == [32, 32, 32, 32] and sum(backend.sizes) == 160
    assert backend.most_at_once == 2

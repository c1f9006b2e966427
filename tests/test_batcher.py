"""The batch-cutting policy, as pure functions: budgets, length grouping in rounds, no starvation;
then the batcher with a stand-in forward."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from reranker.batcher import Job, cut_batch, cut_round


def jobs(lengths: list[int]) -> list[Job]:
    loop = asyncio.new_event_loop()
    try:
        return [Job(pair=("q", str(i)), key=str(i), tokens=n, future=loop.create_future()) for i, n in enumerate(lengths)]
    finally:
        loop.close()


def test_fifo_cut_respects_size_and_padded_token_budget() -> None:
    queue = jobs([10, 400, 10, 10, 10])
    batch = cut_batch(queue, batch_size=3, max_tokens=10_000)
    assert [j.key for j in batch] == ["0", "1", "2"]
    batch = cut_batch(queue, batch_size=10, max_tokens=800)
    assert [j.key for j in batch] == ["0", "1"]  # a third pair would pad to 3 x 400 = 1200 tokens


def test_padding_free_cut_counts_real_tokens_first_come() -> None:
    queue = jobs([100, 400, 12, 390, 95])
    batch = cut_batch(queue, batch_size=10, max_tokens=505, padded=False)
    assert [j.key for j in batch] == ["0", "1"]  # arrival order; 100 + 400 real tokens, a third would pass 505
    batch = cut_batch(queue, batch_size=10, max_tokens=950, padded=False)
    assert [j.key for j in batch] == ["0", "1", "2", "3"]  # 902 real tokens; padded, 4 x 400 would not fit in 950
    assert [j.key for j in cut_batch(jobs([5000, 1]), batch_size=8, max_tokens=600, padded=False)] == ["0"]


def test_a_round_groups_lengths_and_hands_out_the_oldest_pair_first() -> None:
    queue = jobs([100, 400, 12, 390, 95, 10, 105, 380])
    first, second = cut_round(queue, batch_size=4, max_tokens=100_000, workers=2)
    assert sorted(j.tokens for j in first) == [10, 12, 95, 100]  # the oldest job's batch goes first
    assert sorted(j.tokens for j in second) == [105, 380, 390, 400]


def test_a_round_never_exceeds_the_budget_and_takes_every_job() -> None:
    assert [[j.tokens for j in b] for b in cut_round(jobs([500, 10, 10, 10]), batch_size=8, max_tokens=600)] == \
        [[500], [10, 10, 10]]  # 500 with anything pads past 600; the oldest first
    assert cut_round(jobs([5000]), batch_size=8, max_tokens=600)[0][0].tokens == 5000
    batches = cut_round(jobs([50] * 40), batch_size=32, max_tokens=1000)
    assert [len(b) for b in batches] == [20, 12]  # the round holds one batch's worth of requests: 32
    queue, seen = jobs([10, 300, 20, 310, 15, 305, 12] * 5), 0
    while queue:
        round_ = cut_round(queue, batch_size=4, max_tokens=2000, workers=2)
        assert queue[0] in round_[0]  # every round serves the oldest job first: nothing starves
        done = {id(j) for b in round_ for j in b}
        queue = [j for j in queue if id(j) not in done]
        seen += len(done)
    assert seen == 35


def requests(sizes: list[int], seed: int) -> tuple[list[Job], list[object]]:
    """Requests of `sizes` pairs each of ~150-190 tokens, in arrival order."""
    import random

    loop = asyncio.new_event_loop()
    rng = random.Random(seed)
    queue: list[Job] = []
    origins = [object() for _ in sizes]
    try:
        for r, (origin, size) in enumerate(zip(origins, sizes)):
            queue += [Job(pair=("q", f"{r}-{i}"), key=f"{r}-{i}", tokens=rng.randint(150, 190),
                          future=loop.create_future(), origin=origin) for i in range(size)]  # type: ignore[arg-type]
    finally:
        loop.close()
    return queue, origins


@pytest.mark.parametrize("spread", [False, True])
def test_requests_complete_in_arrival_order_with_less_padding_than_first_come(spread: bool) -> None:
    """Six 20-pair requests, two workers: each request completes no later than a younger one,
    padding fewer tokens than first-come. On one device the rounds are topped up to full batches
    (as many as first-come cuts); spread, each round is a multiple of the workers' batches."""
    queue, origins = requests([20] * 6, seed=3)
    fifo_queue, fifo_padded = list(queue), 0
    while fifo_queue:
        batch = cut_batch(fifo_queue, batch_size=32, max_tokens=100_000)
        fifo_padded += max(j.tokens for j in batch) * len(batch)
        fifo_queue = fifo_queue[len(batch):]
    done_at: dict[int, int] = {}
    sizes: list[list[int]] = []
    padded = 0
    while queue:
        sizes.append([])
        for batch in cut_round(queue, batch_size=32, max_tokens=100_000, workers=2, spread=spread):
            sizes[-1].append(len(batch))
            padded += max(j.tokens for j in batch) * len(batch)
            queue = [j for j in queue if j not in batch]
            done_at.update({r: sum(map(len, sizes)) for r, origin in enumerate(origins)
                            if r not in done_at and not any(j.origin is origin for j in queue)})
    assert list(done_at) == list(range(6)) and sorted(done_at.values()) == list(done_at.values())
    assert padded < fifo_padded
    # one device: 4 requests and 16 pairs of the 5th, then the rest; spread: 4 requests in 4 x 20, 2 in 2 x 20
    assert sizes == ([[20, 20, 20, 20], [20, 20]] if spread else [[32, 32, 32], [24]])


def test_a_request_bigger_than_a_round_is_cut_alone_by_length() -> None:
    loop = asyncio.new_event_loop()
    origin, other = object(), object()
    try:
        own = [Job(pair=("q", str(i)), key=str(i), tokens=n, future=loop.create_future(), origin=origin)  # type: ignore[arg-type]
               for i, n in enumerate([100, 400, 110, 390, 105, 395])]
        later = [Job(pair=("p", str(i)), key=f"p{i}", tokens=100, future=loop.create_future(), origin=other)  # type: ignore[arg-type]
                 for i in range(4)]
    finally:
        loop.close()
    round_ = cut_round(own + later, batch_size=3, max_tokens=100_000)
    assert [sorted(j.tokens for j in b) for b in round_] == [[100, 105, 110], [390, 395, 400]]  # not the later request's


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

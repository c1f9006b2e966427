"""The batch-cutting policy, as pure functions: budgets, length grouping in rounds, no starvation;
then the batcher with a stand-in forward."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from dataclasses import dataclass

import pytest
from reranker.batcher import SPREAD_MIN, Job, cut_batch, cut_round


def jobs(lengths: list[int]) -> list[Job]:
    loop = asyncio.new_event_loop()
    try:
        return [Job(pair=("q", str(i)), key=str(i), tokens=n, future=loop.create_future()) for i, n in enumerate(lengths)]
    finally:
        loop.close()


# --- the policy's properties over random queues ----------------------------------------------
# Many queues (requests of 1-50 pairs of 5-400 tokens) under many budgets, drained round by round
# as the batcher does; what must hold for each, rather than the batch sizes of one example.

SEEDS = range(400)


@dataclass
class Drain:
    queue: list[Job]
    origins: list[object]
    batch_size: int
    max_tokens: int
    workers: int
    spread: bool
    rounds: list[list[list[Job]]]


def random_drain(seed: int) -> Drain:
    rng = random.Random(seed)
    loop = asyncio.new_event_loop()
    queue: list[Job] = []
    origins = [object() for _ in range(rng.randint(1, 12))]
    try:
        for r, origin in enumerate(origins):
            queue += [Job(pair=("q", f"{r}-{i}"), key=f"{r}-{i}", tokens=rng.randint(5, 400),
                          future=loop.create_future(), origin=origin)  # type: ignore[arg-type]
                      for i in range(rng.randint(1, 50))]
    finally:
        loop.close()
    drain = Drain(queue, origins, batch_size=rng.choice([1, 4, 8, 16, 32]),
                  max_tokens=rng.choice([512, 2048, 16384, 1_000_000]), workers=rng.choice([1, 2, 4]),
                  spread=rng.random() < 0.3, rounds=[])
    rest = list(queue)
    while rest:
        round_ = cut_round(rest, batch_size=drain.batch_size, max_tokens=drain.max_tokens, workers=drain.workers,
                           spread=drain.spread)
        drain.rounds.append(round_)
        done = {id(j) for b in round_ for j in b}
        rest = [j for j in rest if id(j) not in done]
    return drain


def first_come(queue: list[Job], *, batch_size: int, max_tokens: int) -> list[list[Job]]:
    batches, rest = [], list(queue)
    while rest:
        batches.append(cut_batch(rest, batch_size=batch_size, max_tokens=max_tokens))
        rest = rest[len(batches[-1]):]
    return batches


def test_rounds_respect_the_budgets_and_take_every_job_once() -> None:
    for seed in SEEDS:
        d = random_drain(seed)
        batches = [b for round_ in d.rounds for b in round_]
        assert sorted(id(j) for b in batches for j in b) == sorted(id(j) for j in d.queue), seed
        for b in batches:
            assert 1 <= len(b) <= d.batch_size, seed
            assert len(b) == 1 or max(j.tokens for j in b) * len(b) <= d.max_tokens, seed  # a lone long pair still goes


def test_rounds_keep_arrival_order() -> None:
    """Each round serves the oldest waiting pair first (nothing starves), and requests complete in
    arrival order: an older request never finishes in a later round than a younger one."""
    for seed in SEEDS:
        d = random_drain(seed)
        rest = list(d.queue)
        done_in: dict[int, int] = {}
        for n, round_ in enumerate(d.rounds):
            assert rest[0] in round_[0], seed
            taken = {id(j) for b in round_ for j in b}
            rest = [j for j in rest if id(j) not in taken]
            for r, origin in enumerate(d.origins):
                if r not in done_in and not any(j.origin is origin for j in rest):
                    done_in[r] = n
        assert [done_in[r] for r in range(len(d.origins))] == sorted(done_in.values()), seed


def test_rounds_fill_batches_at_least_as_full_as_first_come() -> None:
    """Where the token budget does not bind (it holds a full batch of the longest pair), draining
    by rounds takes no more forwards than first-come and pads no more; spread, each round feeds
    every worker once there are SPREAD_MIN pairs per worker, at the cost of at most one forward
    per worker and round. (Where the budget binds, rounds may pad a little more: fuller
    batches.)"""
    checked = 0
    for seed in SEEDS:
        d = random_drain(seed)
        if d.max_tokens < d.batch_size * max(j.tokens for j in d.queue):
            continue
        checked += 1
        if not d.spread:
            fifo = first_come(d.queue, batch_size=d.batch_size, max_tokens=d.max_tokens)
            assert sum(len(r) for r in d.rounds) <= len(fifo), seed
            assert sum(max(j.tokens for j in b) * len(b) for r in d.rounds for b in r) <= \
                sum(max(j.tokens for j in b) * len(b) for b in fifo), seed
            continue
        fifo = first_come(d.queue, batch_size=d.batch_size, max_tokens=d.max_tokens)
        for round_ in d.rounds:  # every worker gets work while there is enough of it
            if sum(map(len, round_)) // SPREAD_MIN >= d.workers:
                assert len(round_) >= d.workers, seed
        # a round (whole requests, not topped up) splits across its workers: at most one forward
        # more per worker and round than first-come
        assert sum(len(r) for r in d.rounds) <= len(fifo) + d.workers * len(d.rounds), seed
    assert checked >= len(SEEDS) // 4, checked  # the property ran on enough queues


def cost(batch: list[Job], *, padded: bool) -> int:
    return max(j.tokens for j in batch) * len(batch) if padded else sum(j.tokens for j in batch)


@pytest.mark.parametrize("padded", [True, False])
def test_first_come_takes_the_longest_prefix_that_fits(padded: bool) -> None:
    """First-come (the padding-free path, and the baseline): the batch is the oldest pairs in
    arrival order, within the pair budget and the token budget (padded: longest x pairs; padding
    free: real tokens), and as long as that allows: one more pair would break a budget. A lone
    pair over the token budget still goes, alone."""
    for seed in SEEDS:
        d = random_drain(seed)
        batch = cut_batch(d.queue, batch_size=d.batch_size, max_tokens=d.max_tokens, padded=padded)
        assert batch == d.queue[:len(batch)], seed
        assert 1 <= len(batch) <= d.batch_size, seed
        assert len(batch) == 1 or cost(batch, padded=padded) <= d.max_tokens, seed
        if len(batch) < len(d.queue):
            longer = d.queue[:len(batch) + 1]
            assert len(longer) > d.batch_size or cost(longer, padded=padded) > d.max_tokens, seed


def test_a_round_groups_its_pairs_by_length() -> None:
    """Inside a round, batches hold neighbouring lengths: sorted by their shortest pair, no batch
    holds a pair longer than the next batch's shortest (what saves the padding)."""
    for seed in SEEDS:
        for round_ in random_drain(seed).rounds:
            spans = sorted((min(j.tokens for j in b), max(j.tokens for j in b)) for b in round_)
            assert all(high <= low for (_, high), (low, _) in zip(spans, spans[1:])), seed


def test_a_round_never_exceeds_the_budget_and_takes_every_job() -> None:
    assert [[j.tokens for j in b] for b in cut_round(jobs([500, 10, 10, 10]), batch_size=8, max_tokens=600)] == \
        [[500], [10, 10, 10]]  # 500 with anything pads past 600; the oldest first
    assert cut_round(jobs([5000]), batch_size=8, max_tokens=600)[0][0].tokens == 5000


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
    """Forwards on disjoint compute (OpenVINO's streams): a lone request's waiting pairs become one
    forward per worker, of equal size, running at once, not one forward while the other idles."""
    spread = await run_batcher(20, spread=True)
    assert len(spread.sizes) == 2 and max(spread.sizes) - min(spread.sizes) <= 1 and spread.most_at_once == 2
    together = await run_batcher(20, spread=False)
    assert together.sizes == [20]  # one device: a batch's worth is one forward
    tiny = await run_batcher(SPREAD_MIN * 2 - 1, spread=True)  # too few to split: one forward
    assert len(tiny.sizes) == 1


async def test_spread_under_load_keeps_batches_full() -> None:
    """Under load every forward but the last round's is a full batch, and both workers run."""
    backend = await run_batcher(160, spread=True)
    assert sum(backend.sizes) == 160 and backend.most_at_once == 2
    assert all(size == 32 for size in backend.sizes[:-2]), backend.sizes

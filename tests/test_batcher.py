"""The batch-cutting policy, as a pure function: budgets, length grouping, no starvation."""

from __future__ import annotations

import asyncio

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

"""The batching task's own work per batch at a full queue, against a forward of the model.

    .venv/bin/python bench/batcher_queue.py [--queue 4096] [--runtime torch|openvino|auto]

The batcher keeps the queue at RERANKER_MAX_QUEUE (4096 pairs by default) by adding a new request
for every batch cut, and times what its batching task does for each batch (`_next_batch`: the
round's cut, then taking the batch's jobs out of the queue, exactly the steps of `Batcher._loop`)
against one forward of the embedded MiniLM at the batch size, measured in the same process. It
prints the cut time per batch at a few queue lengths (flat when the work follows the batch, not
the queue) and the ratio cut / forward at the full queue, which must stay under 5%.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "server"))
from reranker.backends import load_backend  # noqa: E402
from reranker.batcher import Batcher, Job  # noqa: E402
from reranker.metrics import Metrics  # noqa: E402
from reranker.settings import Settings  # noqa: E402

WORDS = "apple river data model kernel queue cache python paris token server batch query night fast".split()


class Origin:
    """Stands for a request (the Ticket the ranker gives each)."""


def request(rng: random.Random, loop: asyncio.AbstractEventLoop, pairs: int) -> list[Job]:
    origin = Origin()
    return [Job(pair=("q", f"d{i}"), key=f"{id(origin)}-{i}", tokens=rng.randint(20, 200), future=loop.create_future(),
                origin=origin)  # type: ignore[arg-type]
            for i in range(pairs)]


def cut_times(batcher: Batcher, *, queue: int, batches: int, seed: int) -> list[float]:
    """Seconds of the batching task's own work for each of `batches` batches, the queue held at `queue` pairs."""
    rng = random.Random(seed)
    loop = asyncio.get_running_loop()
    while batcher.pending_pairs < queue:
        batcher.submit(request(rng, loop, min(rng.randint(1, 40), queue - batcher.pending_pairs)))
    times = []
    for _ in range(batches):
        started = time.perf_counter()
        batch = batcher._next_batch()
        for job in batch:  # what Batcher._loop does with a cut batch
            batcher._queue.remove(job)
            job.on_drop = None
        times.append(time.perf_counter() - started)
        top_up = queue - batcher.pending_pairs
        while top_up > 0:  # new requests arrive as fast as batches leave: the queue stays full
            jobs = request(rng, loop, min(top_up, rng.randint(1, 40)))
            batcher.submit(jobs)
            top_up -= len(jobs)
    return times


def forward_seconds(backend, batch_size: int, *, runs: int) -> float:  # type: ignore[no-untyped-def]
    rng = random.Random(1)
    pairs = [("what flows through paris", " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 120))))
             for _ in range(batch_size)]
    encoded = backend.encode(pairs)
    backend.score_encoded(encoded)  # warm
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        backend.score_encoded(encoded)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queue", type=int, default=4096)
    parser.add_argument("--batches", type=int, default=400)
    parser.add_argument("--runtime", default=os.environ.get("RERANKER_RUNTIME", "torch"))
    args = parser.parse_args()
    backend = load_backend(Settings(runtime=args.runtime, warmup_on_start=False))
    sizing = backend.sizing()
    info = backend.info
    batcher = Batcher(backend, Metrics(), batch_size=sizing.batch_size, max_batch_tokens=sizing.max_batch_tokens,
                      window_ms=0, max_parallel=sizing.max_parallel, worker_timeout=60, padded=sizing.padded,
                      spread=sizing.spread)
    print(f"model {info.model} ({info.backend} on {info.device}, {info.dtype}); batch {sizing.batch_size} pairs, "
          f"{sizing.max_parallel} forward(s) at once, spread={sizing.spread}")
    per_queue = {}
    for queue in sorted({32, 512, args.queue}):
        times = cut_times(batcher, queue=queue, batches=args.batches, seed=queue)
        per_queue[queue] = statistics.median(times), max(times)
        print(f"queue {queue:5d} pairs: batching task {per_queue[queue][0] * 1e6:8.1f} us per batch (median), "
              f"{per_queue[queue][1] * 1e6:8.1f} us max")
        batcher._round, batcher._queue = [], type(batcher._queue)()  # empty for the next length
    forward = forward_seconds(backend, sizing.batch_size, runs=10)
    median, worst = per_queue[args.queue]
    print(f"forward of {sizing.batch_size} pairs: {forward * 1e3:.1f} ms (median of 10)")
    print(f"ratio cut/forward at {args.queue} queued: {median / forward:.2e} (median), {worst / forward:.2e} (max; "
          f"the max is the machine's preemption as much as the cut); queue {args.queue} vs 32: "
          f"{median / per_queue[32][0]:.2f}x")


if __name__ == "__main__":
    asyncio.run(main())

"""The micro-batcher: pairs from concurrent requests, cut into token-budget batches.

Every (query, document) pair that misses the cache becomes a `Job` in one queue. A batching
task cuts batches and hands each to a worker thread (the event loop never runs a forward):

- a batch holds at most RERANKER_BATCH_SIZE pairs and RERANKER_MAX_BATCH_TOKENS padded
  tokens (longest pair x pairs, what the forward pass really pays for);
- a request is done when its last pair is, so batches are cut in rounds (`cut_round`): the
  oldest whole requests, a batch's worth per worker, sorted by length and cut into equal
  batches. Requests complete in arrival order, as under first-come batching, and none waits for
  a younger one, while padding is saved inside the round (docs/benchmarks.md: same pairs/s as
  grouping over the whole queue, p99 at 16 clients 0.76x);
- a padding-free backend (the packed CUDA path) pays for real tokens only: there the budget
  counts real tokens and batches are first-come first-served (requests complete in arrival order);
- a batch that is not full waits at most MICRO_BATCH_WINDOW_MS (counted from its oldest
  pair's arrival) for more work, and never when it is already full;
- at most RERANKER_MAX_PARALLEL forwards run at once (on CUDA each worker thread has its own
  stream, so the next batch is packed and uploaded while the current one runs; OpenVINO on a CPU
  runs one stream per worker on its own cores); RERANKER_WORKER_TIMEOUT bounds one;
- a backend whose forwards run on disjoint compute (`spread`: OpenVINO's streams) gets rounds
  of a multiple of its workers' batches (at least SPREAD_MIN pairs each) instead of one batch on
  one worker while the others idle: a lone request is as fast as on one stream of every core,
  and under load each worker takes full batches.

A job may belong to several requests (`Ticket`s) when they asked for the same pair at once;
it is dropped before it is computed only when every one of them has gone away.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from .backends import Backend, Encoded, Pair
from .errors import BackendFailure, ClientGone, WorkerTimeout
from .metrics import Metrics

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Job:
    """One pair to score, shared by every request waiting for it."""

    pair: Pair
    key: str
    tokens: int
    future: asyncio.Future[float]
    encoded: Encoded | None = None  # the pair's token ids, from the one tokenizer call that measured `tokens`
    origin: "Ticket | None" = None  # the request that queued it: its pairs are batched first together
    owners: set["Ticket"] = field(default_factory=set)
    enqueued_at: float = field(default_factory=time.monotonic)
    started: bool = False
    cancelled: bool = False
    on_drop: Callable[["Job"], None] | None = None  # the queue holding it stops counting it

    def start(self) -> None:
        """The pair's computation began (here or on another server): no owner waits for it to start."""
        self.started = True
        for owner in list(self.owners):
            owner.mark_started(self)

    def drop(self) -> None:
        if self.cancelled:
            return
        self.cancelled = True
        if self.on_drop is not None:
            self.on_drop(self)
        if not self.future.done():
            self.future.set_exception(ClientGone())
            self.future.exception()  # mark retrieved: nobody may be left to await it


class Ticket:
    """One request's stake in the queue: which of its jobs have not started yet."""

    def __init__(self) -> None:
        self.unstarted: set[Job] = set()
        self.all_started = asyncio.Event()
        self.all_started.set()
        self.cancelled = False
        self.reason: Exception | None = None

    def track(self, job: Job) -> None:
        job.owners.add(self)
        if not job.started:
            self.unstarted.add(job)
            self.all_started.clear()

    def mark_started(self, job: Job) -> None:
        self.unstarted.discard(job)
        if not self.unstarted:
            self.all_started.set()

    def cancel(self, reason: Exception | None = None) -> int:
        """The request is gone (client disconnected, queue timeout, shutdown): drop what only it
        wanted. `reason`, if given, is what the request answers (else nothing: the client is gone)."""
        self.cancelled = True
        self.reason = reason
        dropped = 0
        for job in list(self.unstarted):
            job.owners.discard(self)
            if not job.owners:
                job.drop()
                dropped += 1
        self.unstarted.clear()
        self.all_started.set()  # wake the request: it sees `cancelled` and stops waiting
        return dropped


SPREAD_MIN = 4


def cut_batch(jobs: Sequence[Job], *, batch_size: int, max_tokens: int, padded: bool = True) -> list[Job]:
    """First-come first-served: the oldest jobs that fit the pair and token budgets.

    padded=True counts padded tokens (longest pair x pairs, what a padded forward pays for);
    padded=False (a padding-free backend, the packed CUDA path) counts real tokens. The padded
    form is the baseline the length grouping (`cut_round`) is measured against.
    """
    batch: list[Job] = []
    total = longest = 0
    for job in jobs:
        cost = total + job.tokens if not padded else max(longest, job.tokens) * (len(batch) + 1)
        if batch and (len(batch) >= batch_size or cost > max_tokens):
            break
        batch.append(job)
        total += job.tokens
        longest = max(longest, job.tokens)
    return batch


def cut_round(jobs: Sequence[Job], *, batch_size: int, max_tokens: int, workers: int = 1,
              spread: bool = False) -> list[list[Job]]:
    """The next round of batches, grouped by length inside the oldest requests (oldest first in `jobs`).

    The round's pool is the oldest whole requests (a request is done when its last pair is),
    added until it holds a batch for each worker (`workers` forwards run at once and finish
    together); the pool is sorted by length and cut into batches within the pair and
    padded-token budgets, handed out oldest pair first. Requests complete in arrival order, as
    under first-come batching, and a request is never held back by younger ones; padding is
    saved inside the round. How the pool is cut:
    - `spread` (forwards on disjoint compute: OpenVINO's streams, where a forward's pairs/s
      hardly depends on its batch size): into equal batches, as many as a multiple of the
      workers, so none idles at the end of a round and a lone request is split across all of
      them (at least SPREAD_MIN pairs each);
    - otherwise (one device, where fuller batches run faster): into full batches, the pool
      topped up with the next waiting pairs in arrival order.
    """
    if not jobs:
        return []
    position = {id(job): i for i, job in enumerate(jobs)}
    by_origin: dict[object, list[Job]] = {}
    for job in jobs:
        by_origin.setdefault(job.origin if job.origin is not None else job, []).append(job)
    pool: list[Job] = []
    for own in by_origin.values():  # requests in arrival order of their oldest waiting pair
        if len(pool) >= batch_size * workers:
            break
        pool.extend(own)
    parts = -(-len(pool) // batch_size)
    if spread:
        if len(pool) // SPREAD_MIN >= workers > 1:
            parts = -(-parts // workers) * workers
    else:
        chosen = {id(job) for job in pool}
        pool += [job for job in jobs if id(job) not in chosen][: parts * batch_size - len(pool)]
    pool.sort(key=lambda j: j.tokens)
    size = -(-len(pool) // parts)
    batches: list[list[Job]] = []
    for job in pool:  # ascending lengths: a job pads the batch it joins to its own length
        batch = batches[-1] if batches else None
        if batch is None or len(batch) >= size or job.tokens * (len(batch) + 1) > max_tokens:
            batches.append([job])
        else:
            batch.append(job)
    return sorted(batches, key=lambda b: min(position[id(j)] for j in b))


class Batcher:
    """Owns the queue of jobs and the worker threads that score them."""

    def __init__(self, backend: Backend, metrics: Metrics, *, batch_size: int, max_batch_tokens: int,
                 window_ms: float, max_parallel: int, worker_timeout: float, max_retries: int = 0,
                 by_length: bool = True, padded: bool = True, spread: bool = False,
                 on_done: Callable[[list[Job]], None] | None = None) -> None:
        self.backend = backend
        self.metrics = metrics
        self.batch_size = batch_size
        self.max_batch_tokens = max_batch_tokens
        self.window_s = window_ms / 1000.0
        self.max_parallel = max_parallel
        self.worker_timeout = worker_timeout
        self.max_retries = max_retries
        self.by_length = by_length
        self.padded = padded
        self.spread = spread
        self.on_done = on_done
        self.pending: list[Job] = []
        self._round: list[list[Job]] = []  # batches cut and not handed out yet; their jobs are still pending
        self._dropped = 0  # cancelled jobs still in `pending` until the loop prunes them
        self.active = 0
        self.throughput = 0.0  # pairs/s, moving average: used for Retry-After
        self._slots = asyncio.Semaphore(max_parallel)
        self._busy = 0  # slots taken by batches handed out (a forward may not have started yet)
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=max_parallel, thread_name_prefix="forward")
        self._task: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()

    # --- queue ---------------------------------------------------------------------------
    @property
    def pending_pairs(self) -> int:
        """Pairs waiting for the model; a dropped pair stops counting at once (admission, HPA signal)."""
        return len(self.pending) - self._dropped

    def submit(self, jobs: Sequence[Job]) -> None:
        live = [job for job in jobs if not job.cancelled]
        for job in live:
            job.on_drop = self._dropped_while_pending
        self.pending.extend(live)
        self.metrics.queue_depth.set(self.pending_pairs)
        self._wake.set()

    def _dropped_while_pending(self, _job: Job) -> None:
        self._dropped += 1
        self.metrics.queue_depth.set(self.pending_pairs)

    def _prune(self) -> None:
        if self._dropped:
            self.pending = [j for j in self.pending if not j.cancelled]
            self._dropped = 0
            self.metrics.queue_depth.set(len(self.pending))

    def _full(self) -> bool:
        if len(self.pending) >= self.batch_size:
            return True
        if not self.padded:
            return sum(j.tokens for j in self.pending) >= self.max_batch_tokens
        longest = max((j.tokens for j in self.pending), default=0)
        return longest * (len(self.pending) + 1) > self.max_batch_tokens

    # --- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="batcher")

    async def stop(self, *, timeout: float = 5.0) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self._running:
            await asyncio.wait(self._running, timeout=timeout)
        pending, self.pending, self._dropped, self._round = self.pending, [], 0, []
        for job in pending:
            job.on_drop = None
            job.drop()
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def idle(self) -> None:
        """Wait until nothing is queued or running (used by graceful shutdown and tests)."""
        while self.pending_pairs or self.active:
            await asyncio.sleep(0.01)

    # --- the batching task ---------------------------------------------------------------
    async def _loop(self) -> None:
        while True:
            await self._wake.wait()
            self._prune()
            if not self.pending:
                self._wake.clear()
                continue
            if self.window_s > 0:
                await self._wait_window()
            await self._slots.acquire()
            self._prune()
            batch = self._next_batch()
            if not batch:
                self._slots.release()
                continue
            self._busy += 1
            chosen = set(batch)
            self.pending = [j for j in self.pending if j not in chosen]
            for job in batch:
                job.on_drop = None
            self.metrics.queue_depth.set(len(self.pending))
            if not self.pending:
                self._wake.clear()
            task = asyncio.get_running_loop().create_task(self._run(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    def _next_batch(self) -> list[Job]:
        """The next batch of the current round (a new round once it is handed out); first-come
        where lengths are not grouped (the benchmark's baseline, the padding-free backend)."""
        if not (self.by_length and self.padded):
            return cut_batch(self.pending, batch_size=self._share(), max_tokens=self.max_batch_tokens, padded=self.padded)
        while self._round:
            batch = [job for job in self._round.pop(0) if not job.cancelled]
            if batch:
                return batch
        self._round = cut_round(self.pending, batch_size=self.batch_size, max_tokens=self.max_batch_tokens,
                                workers=self.max_parallel, spread=self.spread)
        return self._round.pop(0) if self._round else []

    def _share(self) -> int:
        """Pairs the next batch may take: the batch size, or, where forwards run on disjoint
        compute, the waiting pairs split evenly across the idle workers (this one included)."""
        workers = min(self.max_parallel - self._busy, len(self.pending) // SPREAD_MIN)
        if not self.spread or workers <= 1:
            return self.batch_size
        return min(self.batch_size, -(-len(self.pending) // workers))

    async def _wait_window(self) -> None:
        deadline = self.pending[0].enqueued_at + self.window_s
        while not self._full():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), remaining)
            except TimeoutError:
                return
            finally:
                self._wake.set()
            self._prune()
            if not self.pending:
                return

    async def _run(self, batch: list[Job]) -> None:
        now = time.monotonic()
        for job in batch:
            job.start()
            wait = now - job.enqueued_at
            self.metrics.queue_wait.observe(wait)
            self.metrics.wait_window.add(wait)
        self.active += 1
        release_now = True
        loop = asyncio.get_running_loop()
        try:
            for attempt in range(self.max_retries + 1):
                future = loop.run_in_executor(self._executor, self._forward, batch)
                try:
                    scores = await asyncio.wait_for(asyncio.shield(future), self.worker_timeout)
                    break
                except TimeoutError:
                    # A thread cannot be killed: its slot stays taken until the forward returns.
                    release_now = False
                    future.add_done_callback(lambda _f: self._release())
                    log.error("forward of %d pairs exceeded RERANKER_WORKER_TIMEOUT=%ss", len(batch), self.worker_timeout)
                    self._fail(batch, WorkerTimeout(f"the model did not answer within {self.worker_timeout:g}s",
                                                    retry_after=max(1.0, self.worker_timeout / 4)))
                    return
                except Exception as exc:  # the backend may raise anything torch/mlx raise
                    if attempt < self.max_retries:
                        log.warning("forward failed (%s), retrying", exc)
                        continue
                    log.exception("forward of %d pairs failed", len(batch))
                    self._fail(batch, BackendFailure(f"the model failed to score the batch: {exc.__class__.__name__}: {exc}"))
                    return
        finally:
            in_flight = self.active  # forwards running as this one ended, itself included
            self.active -= 1
            if release_now:
                self._release()
        elapsed = time.monotonic() - now
        longest = max(j.tokens for j in batch)
        self.metrics.inference_duration.observe(elapsed)
        self.metrics.process_window.add(elapsed)
        self.metrics.batch_size.observe(len(batch))
        self.metrics.batch_tokens.observe(longest * len(batch) if self.padded else sum(j.tokens for j in batch))
        self.metrics.pairs_scored.inc(len(batch))
        self.metrics.tokens.inc(sum(j.tokens for j in batch))
        # concurrent forwards share the device (or, spread, each has its own cores): the
        # backend's rate is about this forward's times the forwards in flight
        rate = len(batch) / max(elapsed, 1e-6) * max(1, in_flight)
        self.throughput = rate if self.throughput == 0 else 0.8 * self.throughput + 0.2 * rate
        for job, score in zip(batch, scores):
            if not job.future.done():
                job.future.set_result(float(score))
        if self.on_done is not None:
            self.on_done(batch)

    def seed_throughput(self, one_forward: float) -> None:
        """The first estimate, from one forward's pairs/s measured alone: where forwards run on
        disjoint compute (`spread`), max_parallel of them run at that rate side by side."""
        self.throughput = one_forward * (self.max_parallel if self.spread else 1)

    def _release(self) -> None:
        self._busy -= 1
        self._slots.release()

    def _forward(self, batch: list[Job]) -> list[float]:
        """Score a batch from its token ids (jobs built without them are tokenized here)."""
        encoded = [job.encoded for job in batch if job.encoded is not None]
        if len(encoded) < len(batch):
            encoded = self.backend.encode([job.pair for job in batch])
        return self.backend.score_encoded(encoded)

    def _fail(self, batch: list[Job], error: Exception) -> None:
        for job in batch:
            if not job.future.done():
                job.future.set_exception(error)
                job.future.exception()
        if self.on_done is not None:
            self.on_done(batch)

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

The queue is kept by request (`_Queue`: insertion-ordered, each request's waiting jobs in
order), so cutting a batch, taking its jobs out and dropping a gone client's job cost the
batching task work in proportion to the batch, not to the queue (RERANKER_MAX_QUEUE is 4096
pairs; bench/batcher_queue.py measures the task's own time per batch against a forward).

Every job a forward took is settled when the forward ends, whatever happens (scores, an
exception, a timeout, a score count that does not match the batch, a failing completion hook):
a request never waits for a future nobody will set. A batcher that cannot serve says why
(`fault`): every forward slot stuck past RERANKER_WORKER_TIMEOUT, or the batching task dead;
/health and /ready turn 503 with that reason, so the orchestrator restarts the process.

A job may belong to several requests (`Ticket`s) when they asked for the same pair at once;
it is dropped before it is computed only when every one of them has gone away.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from .backends import Backend, Encoded, Pair
from .errors import APIError, BackendFailure, ClientGone, EngineFailure, WorkerTimeout
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
    """One request's stake in the queue: which of its jobs have not started yet, and its deadline."""

    def __init__(self, *, deadline: float = math.inf) -> None:
        self.unstarted: set[Job] = set()
        self.all_started = asyncio.Event()
        self.all_started.set()
        self.cancelled = False
        self.reason: Exception | None = None
        self.deadline = deadline  # the event loop's clock: past it the request is answered 503

    def track(self, job: Job) -> None:
        job.owners.add(self)
        if not job.started and not job.future.done():
            self.unstarted.add(job)
            self.all_started.clear()
            # A job settled before it started (a failed tokenizer, a dead batching task) is not
            # waited for: the request goes on to read its error.
            job.future.add_done_callback(lambda _f: self.mark_started(job))

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

    @property
    def live(self) -> bool:
        """Still waiting for an answer (not cancelled, not past its deadline)."""
        return not self.cancelled and asyncio.get_running_loop().time() < self.deadline


SPREAD_MIN = 4


def cut_batch(jobs: Iterable[Job], *, batch_size: int, max_tokens: int, padded: bool = True) -> list[Job]:
    """First-come first-served: the oldest jobs that fit the pair and token budgets.

    padded=True counts padded tokens (longest pair x pairs, what a padded forward pays for);
    padded=False (a padding-free backend, the packed CUDA path) counts real tokens. The padded
    form is the baseline the length grouping (`cut_round`) is measured against. Reads `jobs`
    only as far as the batch goes.
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


def by_request(jobs: Iterable[Job]) -> list[list[Job]]:
    """Jobs grouped by the request that queued them, requests in order of their oldest job."""
    groups: dict[object, list[Job]] = {}
    for job in jobs:
        groups.setdefault(job.origin if job.origin is not None else job, []).append(job)
    return list(groups.values())


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
    return cut_round_of(by_request(jobs), batch_size=batch_size, max_tokens=max_tokens, workers=workers,
                        spread=spread)


def cut_round_of(requests: Iterable[Iterable[Job]], *, batch_size: int, max_tokens: int, workers: int = 1,
                 spread: bool = False) -> list[list[Job]]:
    """`cut_round` over the waiting jobs already grouped by request (oldest request first, each
    request's jobs oldest first). Reads only the requests the round takes: its cost follows the
    round, not the queue behind it."""
    groups = iter(requests)
    pool: list[Job] = []
    for own in groups:
        pool.extend(own)
        if len(pool) >= batch_size * workers:
            break
    if not pool:
        return []
    parts = -(-len(pool) // batch_size)
    if spread:
        if len(pool) // SPREAD_MIN >= workers > 1:
            parts = -(-parts // workers) * workers
    else:
        pool.extend(itertools.islice(itertools.chain.from_iterable(groups), parts * batch_size - len(pool)))
    position = {id(job): i for i, job in enumerate(pool)}
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


class _Queue:
    """The waiting jobs by request: insertion-ordered requests, each an ordered set of its jobs.

    Adding, taking out and dropping a job are O(1); reading the oldest jobs costs what is read.
    A request's place is its oldest waiting job's: it keeps its place while it has jobs here.
    """

    def __init__(self) -> None:
        self.requests: dict[object, dict[Job, None]] = {}
        self.size = 0

    @staticmethod
    def _request(job: Job) -> object:
        return job.origin if job.origin is not None else job

    def add(self, job: Job) -> None:
        own = self.requests.setdefault(self._request(job), {})
        if job not in own:
            own[job] = None
            self.size += 1

    def remove(self, job: Job) -> None:
        request = self._request(job)
        own = self.requests.get(request)
        if own is not None and own.pop(job, False) is None:
            self.size -= 1
            if not own:
                del self.requests[request]

    def in_order(self) -> Iterator[Job]:
        """Jobs request by request, oldest request first (lazily: stop reading when done)."""
        return itertools.chain.from_iterable(self.requests.values())

    def oldest(self) -> Job:
        return next(self.in_order())

    def take_all(self) -> list[Job]:
        jobs = list(self.in_order())
        self.requests.clear()
        self.size = 0
        return jobs


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
        self._queue = _Queue()
        self._round: list[list[Job]] = []  # batches cut and not handed out yet (last first); their jobs are still queued
        self.active = 0
        self.throughput = 0.0  # pairs/s, moving average: used for Retry-After
        self.failure: str | None = None  # why the batching task died, once it has
        self._slots = asyncio.Semaphore(max_parallel)
        self._busy = 0  # slots taken by batches handed out (a forward may not have started yet)
        self._forwards: dict[asyncio.Future[list[float]], float] = {}  # forwards running in threads: their start
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=max_parallel, thread_name_prefix="forward")
        self._task: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()

    # --- queue ---------------------------------------------------------------------------
    @property
    def pending_pairs(self) -> int:
        """Pairs waiting for the model; a dropped pair stops counting at once (admission, HPA signal)."""
        return self._queue.size

    def submit(self, jobs: Sequence[Job]) -> None:
        live = [job for job in jobs if not job.cancelled]
        if self.failure is not None:  # nothing would ever score them: answer now, not at the deadline
            self._fail(live, self._engine_failure())
            return
        for job in live:
            job.on_drop = self._dropped_while_queued
            self._queue.add(job)
        self.metrics.queue_depth.set(self._queue.size)
        self._wake.set()

    def _dropped_while_queued(self, job: Job) -> None:
        self._queue.remove(job)
        self.metrics.queue_depth.set(self._queue.size)

    def _full(self) -> bool:
        if self._queue.size >= self.batch_size:
            return True
        waiting = list(self._queue.in_order())  # fewer than a batch
        if not self.padded:
            return sum(j.tokens for j in waiting) >= self.max_batch_tokens
        longest = max((j.tokens for j in waiting), default=0)
        return longest * (len(waiting) + 1) > self.max_batch_tokens

    # --- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="batcher")
        self._task.add_done_callback(self._loop_ended)

    async def stop(self, *, timeout: float = 5.0) -> None:
        if self._task is not None and not self._task.done():  # a dead one was reported by _loop_ended
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._running:
            await asyncio.wait(self._running, timeout=timeout)
        self._round = []
        for job in self._queue.take_all():
            job.on_drop = None
            job.drop()
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def idle(self) -> None:
        """Wait until nothing is queued or running (used by graceful shutdown and tests)."""
        while self._queue.size or self.active:
            await asyncio.sleep(0.01)

    def fault(self) -> str | None:
        """Why this batcher cannot serve, or None: the batching task died, or every forward slot
        is held by a forward running past RERANKER_WORKER_TIMEOUT (a thread cannot be killed)."""
        if self.failure is not None:
            return self.failure
        now = time.monotonic()
        stuck = sum(1 for started in self._forwards.values() if now - started > self.worker_timeout)
        if stuck >= self.max_parallel:
            return (f"every forward slot ({stuck} of {self.max_parallel}) is stuck in a forward running past "
                    f"RERANKER_WORKER_TIMEOUT={self.worker_timeout:g}s")
        return None

    def _loop_ended(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            return
        self.failure = f"the batching task died: {exc.__class__.__name__}: {exc}"
        log.error("%s; nothing queued will be scored", self.failure, exc_info=exc)
        self._round = []
        jobs = self._queue.take_all()
        for job in jobs:
            job.on_drop = None
        self.metrics.queue_depth.set(0)
        self._fail(jobs, self._engine_failure())

    def _engine_failure(self) -> EngineFailure:
        return EngineFailure(f"{self.failure}; this server cannot score until it restarts", retry_after=5)

    # --- the batching task ---------------------------------------------------------------
    async def _loop(self) -> None:
        while True:
            await self._wake.wait()
            if not self._queue.size:
                self._wake.clear()
                continue
            if self.window_s > 0:
                await self._wait_window()
            await self._slots.acquire()
            cutting = time.perf_counter()
            batch = self._next_batch()
            if not batch:
                self._slots.release()
                continue
            self._busy += 1
            for job in batch:
                self._queue.remove(job)
                job.on_drop = None
            self.metrics.queue_depth.set(self._queue.size)
            if not self._queue.size:
                self._wake.clear()
            task = asyncio.get_running_loop().create_task(self._run(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)
            self.metrics.batch_cut.observe(time.perf_counter() - cutting)

    def _next_batch(self) -> list[Job]:
        """The next batch of the current round (a new round once it is handed out); first-come
        where lengths are not grouped (the benchmark's baseline, the padding-free backend)."""
        if not (self.by_length and self.padded):
            return cut_batch(self._queue.in_order(), batch_size=self._share(), max_tokens=self.max_batch_tokens,
                             padded=self.padded)
        while self._round:
            batch = [job for job in self._round.pop() if not job.cancelled]
            if batch:
                return batch
        self._round = cut_round_of(self._queue.requests.values(), batch_size=self.batch_size,
                                   max_tokens=self.max_batch_tokens, workers=self.max_parallel, spread=self.spread)
        self._round.reverse()  # handed out from the end: oldest pair's batch first
        return self._round.pop() if self._round else []

    def _share(self) -> int:
        """Pairs the next batch may take: the batch size, or, where forwards run on disjoint
        compute, the waiting pairs split evenly across the idle workers (this one included)."""
        waiting = self._queue.size
        workers = min(self.max_parallel - self._busy, waiting // SPREAD_MIN)
        if not self.spread or workers <= 1:
            return self.batch_size
        return min(self.batch_size, -(-waiting // workers))

    async def _wait_window(self) -> None:
        deadline = self._queue.oldest().enqueued_at + self.window_s
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
            if not self._queue.size:
                return

    async def _run(self, batch: list[Job]) -> None:
        """One forward, with its retries; whatever happens, every job of the batch is settled."""
        now = time.monotonic()
        for job in batch:
            job.start()
            wait = now - job.enqueued_at
            self.metrics.queue_wait.observe(wait)
            self.metrics.wait_window.add(wait)
        self.active += 1
        in_flight = self.active
        release_now = True
        scores: list[float] | None = None
        error: APIError | None = None
        loop = asyncio.get_running_loop()
        try:
            for attempt in range(self.max_retries + 1):
                future = loop.run_in_executor(self._executor, self._forward, batch)
                self._forwards[future] = time.monotonic()
                future.add_done_callback(self._forward_returned)
                try:
                    raw = await asyncio.wait_for(asyncio.shield(future), self.worker_timeout)
                except TimeoutError:
                    # A thread cannot be killed: its slot stays taken until the forward returns.
                    release_now = False
                    future.add_done_callback(lambda _f: self._release())
                    log.error("forward of %d pairs exceeded RERANKER_WORKER_TIMEOUT=%ss", len(batch), self.worker_timeout)
                    error = WorkerTimeout(f"the model did not answer within {self.worker_timeout:g}s",
                                          retry_after=max(1.0, self.worker_timeout / 4))
                    break
                except Exception as exc:  # the backend may raise anything torch/mlx raise
                    if attempt < self.max_retries:
                        log.warning("forward failed (%s), retrying", exc)
                        continue
                    log.exception("forward of %d pairs failed", len(batch))
                    error = BackendFailure(f"the model failed to score the batch: {exc.__class__.__name__}: {exc}")
                    break
                scores = self._checked(raw, len(batch))
                break
        except BackendFailure as exc:
            error = exc
        finally:
            in_flight = self.active  # forwards running as this one ended, itself included
            self.active -= 1
            if release_now:
                self._release()
            self._settle(batch, scores, error)
        if scores is not None:
            self._observe(batch, time.monotonic() - now, in_flight)

    def _checked(self, raw: Sequence[float], pairs: int) -> list[float]:
        """One float per pair, or BackendFailure (424) for the batch: a score count that does not
        match leaves no pair's score known for sure."""
        try:
            scores = [float(score) for score in raw]
        except (TypeError, ValueError) as exc:
            log.error("the model returned scores that are not numbers: %s", exc)
            raise BackendFailure(f"the model returned scores that are not numbers ({exc})") from None
        if len(scores) != pairs:
            log.error("the model returned %d scores for a batch of %d pairs", len(scores), pairs)
            raise BackendFailure(f"the model returned {len(scores)} scores for a batch of {pairs} pairs; "
                                 "the backend is broken")
        return scores

    def _settle(self, batch: list[Job], scores: list[float] | None, error: APIError | None) -> None:
        """Every job gets its score or an error; then the completion hook sees the batch."""
        # no scores and no error: cancelled mid-forward, the server is stopping
        failure = error or EngineFailure("the server stopped while the model was scoring this request", retry_after=1)
        for i, job in enumerate(batch):
            if job.future.done():
                continue
            if scores is not None:
                job.future.set_result(scores[i])
            else:
                job.future.set_exception(failure)
                job.future.exception()  # the requests may be gone: nobody else retrieves it
        if self.on_done is not None:
            try:
                self.on_done(batch)
            except Exception:  # the hook (cache fill) failing must not take the batching task down; the jobs are settled
                log.exception("the completion hook failed for a batch of %d pairs", len(batch))

    def _observe(self, batch: list[Job], elapsed: float, in_flight: int) -> None:
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

    def seed_throughput(self, one_forward: float) -> None:
        """The first estimate, from one forward's pairs/s measured alone: where forwards run on
        disjoint compute (`spread`), max_parallel of them run at that rate side by side."""
        self.throughput = one_forward * (self.max_parallel if self.spread else 1)

    def _release(self) -> None:
        self._busy -= 1
        self._slots.release()

    def _forward_returned(self, future: asyncio.Future[list[float]]) -> None:
        self._forwards.pop(future, None)

    def _forward(self, batch: list[Job]) -> list[float]:
        """Score a batch from its token ids (jobs built without them are tokenized here)."""
        encoded = [job.encoded for job in batch if job.encoded is not None]
        if len(encoded) < len(batch):
            encoded = self.backend.encode([job.pair for job in batch])
        return self.backend.score_encoded(encoded)

    @staticmethod
    def _fail(jobs: Iterable[Job], error: Exception) -> None:
        for job in jobs:
            if not job.future.done():
                job.future.set_exception(error)
                job.future.exception()

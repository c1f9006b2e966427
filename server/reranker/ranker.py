"""One request's path from texts to scores: split, cache, de-duplicate, admit, batch.

The routes speak the dialects; this module does the work they share:
documents -> pairs (chunks) -> cache look-up -> join identical pairs already in flight ->
admission -> batcher -> scores (max over a document's chunks). Scores of new pairs are
written to the cache by the batcher's completion hook, so a score is cached even when the
request that asked for it has gone; a request answers only once the fleet fill of the pairs it
waited for has landed (cache.py), so every server finds the scores of every answer given.

One deadline per request (RERANKER_QUEUE_TIMEOUT + RERANKER_WORKER_TIMEOUT from when the ranker
gets it): queue, forward, another server's work (the fleet lease, leases.py) and the cache fill
all count against it, and past it the request is answered 503 with Retry-After, never left
waiting. Within it, a request still queued after RERANKER_QUEUE_TIMEOUT gets 503 as before.

Every job leaves `inflight` when its future settles (scored, failed, dropped by a timeout, a
gone client or shutdown), so an idle server holds no jobs. A Redis lease this server took is
given back when its job fails or is dropped (a scored job's lease goes with the cache fill),
and only by its owner (redis_tier.py).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Coroutine, Sequence
from typing import Any
from dataclasses import dataclass

from .admission import Admission
from .backends import Backend, Pair
from .batcher import Batcher, Job, Ticket
from .cache import ScoreCache
from .chunking import Split, split_documents
from .errors import BackendFailure, ClientGone, QueueFull, QueueTimeout, RequestTimeout
from .leases import Leases
from .metrics import Metrics

log = logging.getLogger(__name__)


@dataclass
class Ranked:
    raw: list[float]  # one raw score per document (max over its chunks)
    tokens: int  # tokens of the pairs this request sent to the model (cache hits are free)


class Ranker:
    #: Hash pair keys in a worker thread past this many characters (a long query times many documents).
    HASH_OFF_LOOP_CHARS = 256 * 1024

    def __init__(self, *, backend: Backend, batcher: Batcher, cache: ScoreCache, admission: Admission,
                 metrics: Metrics, queue_timeout: float, worker_timeout: float, leases: Leases | None = None) -> None:
        self.backend = backend
        self.batcher = batcher
        self.cache = cache
        self.admission = admission
        self.metrics = metrics
        self.queue_timeout = queue_timeout
        self.worker_timeout = worker_timeout
        #: One deadline per request: its queue wait and its work.
        self.request_timeout = queue_timeout + worker_timeout
        self.leases = leases if cache.enabled else None
        self.inflight: dict[str, Job] = {}
        batcher.on_done = self._completed
        self._background: set[asyncio.Task[Any]] = set()  # waits on other servers
        self.tickets: set[Ticket] = set()

    def abort_waiting(self, error: Exception) -> int:
        """Answer every request whose pairs have not all started with `error` (shutdown deadline)."""
        aborted = 0
        for ticket in list(self.tickets):
            if ticket.unstarted:
                ticket.cancel(error)
                aborted += 1
        return aborted

    # --- jobs' lifecycle ---------------------------------------------------------------------
    def _spawn(self, work: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _register(self, job: Job) -> None:
        self.inflight[job.key] = job
        job.future.add_done_callback(lambda _f: self._settled(job))

    @staticmethod
    def _score_of(job: Job) -> float | None:
        """The job's score if it has a usable one (scored, finite), else None."""
        future = job.future
        if not future.done() or future.cancelled() or future.exception() is not None:
            return None
        score = future.result()
        return score if math.isfinite(score) else None

    def _settled(self, job: Job) -> None:
        """Whatever ended the job (score, failure, drop), it leaves `inflight`; a failed one's lease goes back."""
        if self.inflight.get(job.key) is job:
            del self.inflight[job.key]
        if self.leases is not None:
            self.leases.settled(job, scored=self._score_of(job) is not None)

    def _completed(self, jobs: list[Job]) -> None:
        done: dict[str, float] = {}
        for job in jobs:
            score = self._score_of(job)
            if score is not None:
                done[job.key] = score
        self.cache.store(done)  # requests answer once it has landed (cache.landed)

    async def _prepare(self, jobs: list[Job]) -> None:
        """Tokenize new jobs, once (off the event loop): the ids carry their length for batching and go
        to the forward as they are. Then queue them."""
        try:
            encoded = await asyncio.to_thread(self.backend.encode, [job.pair for job in jobs])
        except Exception as exc:  # the tokenizer may raise anything; the jobs' requests get one typed error
            log.exception("tokenizing %d pairs failed", len(jobs))
            failure = BackendFailure(f"the tokenizer failed: {exc.__class__.__name__}: {exc}")
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(failure)
                    job.future.exception()
            return
        for job, ids in zip(jobs, encoded):
            job.encoded, job.tokens = ids, ids.tokens
        await self._dispatch(jobs)

    async def _dispatch(self, jobs: list[Job]) -> None:
        """Queue new jobs here, except pairs another server of the fleet is computing right now."""
        if self.leases is None:
            self.batcher.submit(jobs)
            return
        ours, theirs = await self.leases.claim(jobs)
        self.batcher.submit(ours)
        if theirs:
            for job in theirs:
                job.start()  # started elsewhere: the local queue timeout does not apply
            self._spawn(self._await_fleet(theirs))

    @staticmethod
    def _wanted_until(jobs: list[Job]) -> float:
        """The latest deadline among the live requests that want any of `jobs` (-inf: none)."""
        return max((t.deadline for job in jobs for t in job.owners if t.live), default=-math.inf)

    async def _await_fleet(self, jobs: list[Job]) -> None:
        """Another server computes `jobs`: wait for its scores as long as a request wants them,
        then compute what is still missing here."""
        assert self.leases is not None
        loop = asyncio.get_running_loop()
        found = await self.leases.wait(jobs, timeout=max(0.0, self._wanted_until(jobs) - loop.time()))
        missing = []
        for job in jobs:
            if job.key in found:
                self.cache.local[job.key] = found[job.key]
                if not job.future.done():
                    job.future.set_result(found[job.key])
            elif not job.future.done():
                if any(t.live for t in job.owners):
                    missing.append(job)
                else:  # every request that wanted it has timed out or gone
                    job.future.set_exception(self._timed_out())
                    job.future.exception()
        if not missing:
            return
        # The other server died or failed: compute here, admitted like any other work.
        try:
            self.admission.admit(len(missing))
        except QueueFull as exc:
            for job in missing:
                job.future.set_exception(exc)
                job.future.exception()  # the requests may be gone: nobody else retrieves it
            return
        await self._dispatch(missing)

    # --- one request ---------------------------------------------------------------------------
    async def rank(self, query: str, documents: Sequence[str], *, split: Split, ticket: Ticket,
                   instruction: str | None = None) -> Ranked:
        ticket.deadline = asyncio.get_running_loop().time() + self.request_timeout
        self.tickets.add(ticket)
        try:
            async with asyncio.timeout_at(ticket.deadline):
                return await self._rank(query, documents, split=split, ticket=ticket, instruction=instruction)
        except TimeoutError:
            ticket.cancel()
            self.metrics.rejected.labels(reason="request_timeout").inc()
            raise self._timed_out() from None
        except BaseException:
            ticket.cancel()  # whatever ended the request (error, timeout, gone client): drop what only it wanted
            raise
        finally:
            self.tickets.discard(ticket)

    def _timed_out(self) -> RequestTimeout:
        return RequestTimeout(f"no answer within {self.request_timeout:g}s "
                              "(RERANKER_QUEUE_TIMEOUT + RERANKER_WORKER_TIMEOUT)",
                              retry_after=self.admission.retry_after())

    async def _keys(self, query: str, texts: list[str], instruction: str | None) -> list[str]:
        if len(query) * len(texts) + sum(map(len, texts)) > self.HASH_OFF_LOOP_CHARS:
            return await asyncio.to_thread(self.cache.keys, query, texts, instruction)
        return self.cache.keys(query, texts, instruction)

    async def _rank(self, query: str, documents: Sequence[str], *, split: Split, ticket: Ticket,
                    instruction: str | None) -> Ranked:
        self.admission.check_serving()
        # The backend says what the pairs carry: None for models without instructions.
        instruction = self.backend.instruction(instruction)
        with self.admission.reserve() as places:
            if split.trivial:
                chunks = [[doc] for doc in documents]  # no tokenizer needed: skip the thread hop
            else:
                places.resize(len(documents))  # at least one pair per document, admitted before the tokenizer runs
                chunks = await asyncio.to_thread(split_documents, self.backend, query, documents, split, instruction)
            texts = [text for doc_chunks in chunks for text in doc_chunks]
            keys = await self._keys(query, texts, instruction)
            scores = await self.cache.get_many(keys)

            text_of = dict(zip(keys, texts))
            missing = [k for k in text_of if k not in scores]
            # No await from here until every job is registered and tracked by the ticket: concurrent
            # requests see (and join) each other's jobs before any is tokenized, and nothing can start
            # or drop a job the ticket does not know.
            waiting: dict[str, Job] = {}
            new_keys: list[str] = []
            for key in missing:
                job = self.inflight.get(key)
                if job is not None and not job.cancelled:
                    waiting[key] = job
                    self.metrics.dedup.labels(scope="local").inc()
                else:
                    new_keys.append(key)
            places.resize(len(new_keys))  # admitted before its pairs are tokenized; joined pairs cost no place
            loop = asyncio.get_running_loop()
            jobs = [Job(pair=Pair(query, text_of[k], instruction), key=k, tokens=0, origin=ticket,
                        future=loop.create_future()) for k in new_keys]
            for job in jobs:
                self._register(job)
                waiting[job.key] = job
            for job in waiting.values():
                ticket.track(job)
            if jobs:
                # Shielded: requests that joined these jobs depend on them being queued even if this
                # request is cancelled meanwhile (its dropped jobs are skipped, their leases given back).
                await asyncio.shield(self._prepare(jobs))

        if waiting:
            try:
                await asyncio.wait_for(ticket.all_started.wait(), self.queue_timeout)
            except TimeoutError:
                ticket.cancel()
                self.metrics.rejected.labels(reason="queue_timeout").inc()
                raise QueueTimeout(
                    f"waited more than RERANKER_QUEUE_TIMEOUT={self.queue_timeout:g}s for the model",
                    retry_after=self.admission.retry_after()) from None
            if ticket.cancelled:
                raise ticket.reason or ClientGone()
            results = await asyncio.gather(*(job.future for job in waiting.values()))
            broken = sum(1 for r in results if not math.isfinite(r))
            if broken:
                raise BackendFailure(f"the model returned a non-finite score (NaN or infinity) for {broken} "
                                     f"of {len(results)} pairs; the model or its weights are broken")
            scores.update(zip(waiting.keys(), results))
            await self.cache.landed(waiting)  # the fleet can read every score of this answer

        raw: list[float] = []
        cursor = 0
        for doc_chunks in chunks:
            raw.append(max(scores[k] for k in keys[cursor: cursor + len(doc_chunks)]))
            cursor += len(doc_chunks)
        return Ranked(raw=raw, tokens=sum(job.tokens for job in jobs))  # tokens this request sent to the model

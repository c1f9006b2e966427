"""One request's path from texts to scores: split, cache, de-duplicate, admit, batch.

The routes speak the dialects; this module does the work they share:
documents -> pairs (chunks) -> cache look-up -> join identical pairs already in flight ->
admission -> batcher -> scores (max over a document's chunks). Scores of new pairs are
written to the cache by the batcher's completion hook, so a score is cached even when the
request that asked for it has gone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from .admission import Admission
from .backends import Backend, Pair
from .batcher import Batcher, Job, Ticket
from .cache import RemoteTier, ScoreCache
from .chunking import Split, split_documents
from .errors import ClientGone, QueueTimeout
from .metrics import Metrics


@dataclass
class Ranked:
    raw: list[float]  # one raw score per document (max over its chunks)
    tokens: int  # tokens of the pairs this request sent to the model (cache hits are free)


class Ranker:
    def __init__(self, *, backend: Backend, batcher: Batcher, cache: ScoreCache, admission: Admission,
                 metrics: Metrics, queue_timeout: float, worker_timeout: float) -> None:
        self.backend = backend
        self.batcher = batcher
        self.cache = cache
        self.admission = admission
        self.metrics = metrics
        self.queue_timeout = queue_timeout
        self.worker_timeout = worker_timeout
        self.inflight: dict[str, Job] = {}
        batcher.on_done = self._completed
        self._background: set[asyncio.Task[None]] = set()  # cache fills and waits on other servers
        self.tickets: set[Ticket] = set()

    def abort_waiting(self, error: Exception) -> int:
        """Answer every request whose pairs have not all started with `error` (shutdown deadline)."""
        aborted = 0
        for ticket in list(self.tickets):
            if ticket.unstarted:
                ticket.cancel(error)
                aborted += 1
        return aborted

    def _completed(self, jobs: list[Job]) -> None:
        done: dict[str, float] = {}
        for job in jobs:
            if self.inflight.get(job.key) is job:
                del self.inflight[job.key]
            if job.future.done() and not job.future.cancelled() and job.future.exception() is None:
                done[job.key] = job.future.result()
        if done:
            task = asyncio.get_running_loop().create_task(self.cache.put_many(done))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _dispatch(self, jobs: list[Job]) -> None:
        """Queue new jobs here, except pairs another server of the fleet is computing right now."""
        remote = self.cache.remote if self.cache.enabled else None
        if remote is None:
            self.batcher.submit(jobs)
            return
        ours, theirs = await remote.claim([job.key for job in jobs])
        by_key = {job.key: job for job in jobs}
        self.batcher.submit([by_key[k] for k in ours])
        if theirs:
            waiting = [by_key[k] for k in theirs]
            for job in waiting:
                job.started = True  # started elsewhere: the local queue timeout does not apply
            task = asyncio.get_running_loop().create_task(self._await_fleet(remote, waiting))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _await_fleet(self, remote: "RemoteTier", jobs: list[Job]) -> None:
        found = await remote.wait_for([job.key for job in jobs], timeout=self.queue_timeout + self.worker_timeout)
        self.metrics.dedup.labels(scope="fleet").inc(len(found))
        missing = []
        for job in jobs:
            if job.key in found:
                self.cache.local[job.key] = found[job.key]
                if self.inflight.get(job.key) is job:
                    del self.inflight[job.key]
                if not job.future.done():
                    job.future.set_result(found[job.key])
            else:
                missing.append(job)
        if missing:  # the other server died or failed: compute here
            self.batcher.submit(missing)

    async def rank(self, query: str, documents: Sequence[str], *, split: Split, ticket: Ticket,
                   instruction: str | None = None) -> Ranked:
        self.tickets.add(ticket)
        try:
            return await self._rank(query, documents, split=split, ticket=ticket, instruction=instruction)
        finally:
            self.tickets.discard(ticket)

    async def _rank(self, query: str, documents: Sequence[str], *, split: Split, ticket: Ticket,
                    instruction: str | None) -> Ranked:
        self.admission.check_serving()
        # The backend says what the pairs carry: None for models without instructions.
        instruction = self.backend.instruction(instruction)
        if split.trivial:
            chunks = [[doc] for doc in documents]  # no tokenizer needed: skip the thread hop
        else:
            chunks = await asyncio.to_thread(split_documents, self.backend, query, documents, split, instruction)
        pairs: list[Pair] = [Pair(query, text, instruction) for doc_chunks in chunks for text in doc_chunks]
        keys = [self.cache.key(pair) for pair in pairs]
        scores = await self.cache.get_many(keys)

        pair_of = dict(zip(keys, pairs))
        missing = [k for k in pair_of if k not in scores]
        # Only pairs the model may see are tokenized, once: the ids carry their length for batching
        # and go to the forward as they are. Cache hits cost no tokenizer time.
        encoded = await asyncio.to_thread(self.backend.encode, [pair_of[k] for k in missing]) if missing else []
        encoded_of = dict(zip(missing, encoded))
        # No await from here until the jobs are registered: concurrent requests see each other's jobs.
        waiting: dict[str, Job] = {}
        new_keys: list[str] = []
        for key in missing:
            job = self.inflight.get(key)
            if job is not None and not job.cancelled:
                waiting[key] = job
                self.metrics.dedup.labels(scope="local").inc()
            else:
                new_keys.append(key)
        if new_keys:
            self.admission.admit(len(new_keys))
            loop = asyncio.get_running_loop()
            jobs = [Job(pair=pair_of[k], key=k, tokens=encoded_of[k].tokens, encoded=encoded_of[k],
                        future=loop.create_future()) for k in new_keys]
            for job in jobs:
                self.inflight[job.key] = job
                waiting[job.key] = job
            await self._dispatch(jobs)
        for job in waiting.values():
            ticket.track(job)

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
            scores.update(zip(waiting.keys(), results))

        raw: list[float] = []
        cursor = 0
        for doc_chunks in chunks:
            raw.append(max(scores[k] for k in keys[cursor: cursor + len(doc_chunks)]))
            cursor += len(doc_chunks)
        return Ranked(raw=raw, tokens=sum(e.tokens for e in encoded))  # tokens this request sent to the model

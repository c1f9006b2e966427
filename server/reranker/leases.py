"""The fleet's lease protocol: which server computes a pair (claim, wait, give back, renew).

Before queueing new pairs a server claims them in the fleet tier (Redis, redis_tier.py): the
pairs it gets are its own to compute, the others are being computed by another server and are
waited for instead. This module keeps the server's side of that protocol:

- `claim` splits new jobs into ours (queued here, their leases held) and theirs;
- a held lease goes back with its score (the cache fill deletes it) or, when its job failed or
  was dropped, at once (`settled`; the releases of one event-loop turn go in one call);
- `renew_forever` extends every lease still held, every third of the lease, in one call: a
  pair that waits in a long queue here keeps its lease, so a second server does not compute it
  too (it would, once the lease lapsed). A server that dies stops renewing, and its leases
  lapse within one lease time, as before.

Waiting for another server's pair is bounded by the deadlines of the requests that want it
(ranker.py); what is still missing then is computed here, admitted like new work.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

from .batcher import Job
from .cache import RemoteTier
from .metrics import Metrics

log = logging.getLogger(__name__)


class Leases:
    def __init__(self, remote: RemoteTier, *, lease_seconds: float, metrics: Metrics) -> None:
        self.remote = remote
        self.lease_seconds = lease_seconds
        self.metrics = metrics
        self.held: dict[str, Job] = {}  # jobs whose lease this server holds, until they settle
        self._unlease: list[str] = []  # leases to give back, sent together
        self._background: set[asyncio.Task[Any]] = set()

    def _spawn(self, work: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def claim(self, jobs: list[Job]) -> tuple[list[Job], list[Job]]:
        """(ours to compute, being computed by another server). Ours are held until they settle;
        one dropped while the claim was in flight is given back at once."""
        ours, theirs = await self.remote.claim([job.key for job in jobs])
        by_key = {job.key: job for job in jobs}
        mine: list[Job] = []
        for key in ours:
            job = by_key[key]
            if job.future.done():
                self._give_back(key)
            else:
                self.held[key] = job
                mine.append(job)
        return mine, [by_key[k] for k in theirs if not by_key[k].future.done()]

    def settled(self, job: Job, *, scored: bool) -> None:
        """The job ended: a scored job's lease goes with its cache fill, any other's back now."""
        if self.held.get(job.key) is job:
            del self.held[job.key]
            if not scored:
                self._give_back(job.key)

    def _give_back(self, key: str) -> None:
        if not self._unlease:
            asyncio.get_running_loop().call_soon(self._flush)
        self._unlease.append(key)

    def _flush(self) -> None:
        keys, self._unlease = self._unlease, []
        if keys:
            self._spawn(self.remote.release(keys))

    async def renew(self) -> int:
        """Extend every lease still held (one round trip); how many were ours still."""
        keys = list(self.held)
        if not keys:
            return 0
        renewed = await self.remote.renew(keys)
        self.metrics.leases_renewed.inc(renewed)
        return renewed

    async def renew_forever(self) -> None:
        """The renewal task: every third of a lease, so a held lease never lapses while the
        server lives (a renewal may fail once, within the remote tier's timeout)."""
        while True:
            await asyncio.sleep(self.lease_seconds / 3)
            await self.renew()

    async def wait(self, jobs: list[Job], *, timeout: float) -> dict[str, float]:
        """Scores of pairs other servers compute, as they land; returns at `timeout` or when every
        pair has a score or lost its lease."""
        found = await self.remote.wait_for([job.key for job in jobs], timeout=timeout)
        self.metrics.dedup.labels(scope="fleet").inc(len(found))
        return found

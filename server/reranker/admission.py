"""Admission control: who gets into the queue, and what the others are told.

The queue is bounded in pairs (RERANKER_MAX_QUEUE), because pairs are what costs model
time: one request of 1,000 documents weighs as much as 1,000 requests of one.

- 429 Too Many Requests + Retry-After: the request's pairs do not fit in the queue right now,
  or the queue already holds more work than the model can finish within
  RERANKER_QUEUE_TIMEOUT at its measured throughput (back off and retry, or go to another
  replica). A request bigger than the whole queue is
  admitted when the queue is empty, so big requests are slow rather than impossible.
- 429 too: more than RERANKER_MAX_CONCURRENT_REQUESTS requests at once (counted from the
  first byte of the body, so slow uploads are bounded too).
- 503 Service Unavailable + Retry-After: the server cannot serve at all right now: the model
  is still loading, the server is draining for shutdown, or the request waited longer than
  RERANKER_QUEUE_TIMEOUT for the model (its pending pairs are then dropped).

Admission comes before the work it guards: a request reserves its pairs' places
(`Reservation`) before any tokenizer runs for it, and holds them until its jobs are in the
batcher's queue, so concurrent requests that are still tokenizing cannot all squeeze in.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

from .batcher import Batcher
from .errors import NotReady, QueueFull
from .metrics import Metrics


class Admission:
    #: Share of the queue timeout the queued work may take at the measured rate.
    DRAIN_MARGIN = 0.6

    def __init__(self, *, metrics: Metrics, max_queue: int, max_parallel: int, queue_timeout: float,
                 max_concurrent: int = 512) -> None:
        self.queue_timeout = queue_timeout
        self.batcher: Batcher | None = None  # set once the model is loaded
        self.metrics = metrics
        self.max_queue = max_queue
        self.max_parallel = max_parallel
        self.ready = False
        self.draining = False
        self.inflight = 0
        self.max_concurrent = max_concurrent
        self.reserved = 0  # pairs admitted whose jobs are not in the batcher's queue yet

    def retry_after(self, extra_pairs: int = 0) -> int:
        """Seconds until the queue has likely drained enough: queued pairs / recent throughput."""
        rate = (self.batcher.throughput if self.batcher else 0.0) or 50.0
        return int(min(60, max(1, math.ceil((self.waiting + extra_pairs) / rate))))

    @property
    def waiting(self) -> int:
        return (self.batcher.pending_pairs if self.batcher else 0) + self.reserved

    @property
    def active(self) -> int:
        return self.batcher.active if self.batcher else 0

    def check_serving(self) -> None:
        # Draining refuses nothing: a request that still arrives (a kept-alive connection in the
        # moment before it is closed, a kube-proxy not yet updated) is served, with
        # `Connection: close` (app.py), rather than failed with a 503 while the model is loaded.
        if not self.ready:
            self.metrics.rejected.labels(reason="not_ready").inc()
            raise NotReady("the model is still loading", retry_after=5)

    def admit(self, pairs: int, *, held: int = 0) -> None:
        """Raise QueueFull unless `pairs` more fit in the queue, and would be served in time.

        Two bounds: the queue's size, and the time the queue needs to drain at the measured
        throughput. A request that would wait past RERANKER_QUEUE_TIMEOUT anyway is refused now
        (429, cheap) rather than timed out later (503, after its place in the queue was spent).
        """
        waiting = self.waiting
        others = waiting - held  # `held`: places this request already has (the queue may be otherwise empty)
        if others and waiting + pairs > self.max_queue:
            self.metrics.rejected.labels(reason="queue_full").inc()
            raise QueueFull(
                f"the queue holds {waiting} pairs and this request needs {pairs} more "
                f"(RERANKER_MAX_QUEUE={self.max_queue})", retry_after=self.retry_after(pairs))
        rate = self.batcher.throughput if self.batcher else 0.0
        # the last of its pairs starts after the queue ahead drains, and finishes one batch later
        finish = (waiting + pairs + (self.batcher.batch_size if self.batcher else 0)) / rate if rate > 0 else 0.0
        if others and finish > self.queue_timeout * self.DRAIN_MARGIN:
            self.metrics.rejected.labels(reason="queue_full").inc()
            raise QueueFull(
                f"the queue holds {waiting} pairs, about {waiting / rate:.1f}s of work at {rate:.0f} pairs/s; "
                f"this request would wait past RERANKER_QUEUE_TIMEOUT={self.queue_timeout:g}s",
                retry_after=self.retry_after(pairs))

    def reserve(self) -> "Reservation":
        """Places in the queue for one request, admitted before its pairs are tokenized."""
        return Reservation(self)

    @contextlib.contextmanager
    def request(self) -> Iterator[None]:
        """Count a rerank request as in flight (the draining logic waits for zero); 429 past the cap."""
        if self.inflight >= self.max_concurrent:
            self.metrics.rejected.labels(reason="concurrency").inc()
            raise QueueFull(f"{self.inflight} requests are being served, the most at once "
                            f"(RERANKER_MAX_CONCURRENT_REQUESTS={self.max_concurrent})", retry_after=1)
        self.inflight += 1
        self.metrics.inflight.set(self.inflight)
        try:
            yield
        finally:
            self.inflight -= 1
            self.metrics.inflight.set(self.inflight)

    def controller(self) -> dict[str, int]:
        """The original service's controller stats, shown in /health."""
        return {
            "waiting": self.waiting,
            "active": self.active,
            "available_slots": max(0, self.max_parallel - self.active),
            "max_parallel": self.max_parallel,
            "max_queue": self.max_queue,
            "inflight_requests": self.inflight,
        }


class Reservation:
    """A request's admitted places in the queue, held until its jobs are queued (a context manager).

    `resize(n)` admits growth (raising QueueFull like `Admission.admit`) and gives back what
    shrinks; leaving the `with` block gives everything back: by then the request's jobs count in
    the batcher's queue, or the request failed.
    """

    def __init__(self, admission: Admission) -> None:
        self.admission = admission
        self.pairs = 0

    def resize(self, pairs: int) -> None:
        grow = pairs - self.pairs
        if grow > 0:
            self.admission.admit(grow, held=self.pairs)
        self.admission.reserved += grow
        self.pairs = pairs

    def __enter__(self) -> "Reservation":
        return self

    def __exit__(self, *_exc: object) -> None:
        self.admission.reserved -= self.pairs
        self.pairs = 0

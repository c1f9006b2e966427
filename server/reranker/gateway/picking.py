"""Load-aware endpoint picking: least outstanding pairs, by the power of two choices.

An endpoint's load is the (query, document) pairs this gateway has in flight to it, plus the queue
depth the server last reported (its `endpoint-load-metrics` answer header, Envoy ORCA's TEXT form)
while that report is fresh: the report covers what other gateway replicas and direct clients sent,
which this replica cannot see. Pairs, not requests, because pairs are what costs model time.

From Envoy's least-request balancer: with equal weights, pick two endpoints at random and take the
less loaded (P2C): nearly the balance of "least loaded of all" without every request herding onto
the same momentarily idle endpoint, which a full scan does when many gateways act on stale loads.
Endpoints that refused a connection are skipped for a short while (Envoy's outlier detection, in
its simplest form) unless nothing else is left.
"""

from __future__ import annotations

import random
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from .directory import Endpoint

#: Seconds an endpoint that refused a connection is passed over.
EJECT_SECONDS = 2.0


@dataclass
class EndpointLoad:
    outstanding: int = 0  # pairs in flight from this gateway
    reported: int = 0  # the server's queue depth in pairs, as last reported
    reported_at: float = 0.0
    ejected_until: float = 0.0


def parse_load_header(value: str) -> int | None:
    """queue_pairs from `TEXT named_metrics.queue_pairs=12, named_metrics.inflight_requests=3`."""
    body = value.removeprefix("TEXT").strip()
    for part in body.split(","):
        name, _, number = part.strip().partition("=")
        if name == "named_metrics.queue_pairs":
            try:
                return max(0, int(float(number)))
            except ValueError:
                return None
    return None


class Loads:
    """What this gateway knows of each endpoint's load, by URL."""

    def __init__(self, *, report_seconds: float = 2.0, rng: random.Random | None = None) -> None:
        self._state: dict[str, EndpointLoad] = {}
        self.report_seconds = report_seconds
        self.rng = rng or random.Random()

    def state(self, endpoint: Endpoint) -> EndpointLoad:
        state = self._state.get(endpoint.url)
        if state is None:
            state = self._state[endpoint.url] = EndpointLoad()
        return state

    def load(self, endpoint: Endpoint, *, now: float | None = None) -> int:
        state = self.state(endpoint)
        now = time.monotonic() if now is None else now
        reported = state.reported if now - state.reported_at <= self.report_seconds else 0
        return state.outstanding + reported

    def start(self, endpoint: Endpoint, pairs: int) -> None:
        self.state(endpoint).outstanding += pairs

    def finish(self, endpoint: Endpoint, pairs: int, *, header: str | None) -> None:
        state = self.state(endpoint)
        state.outstanding -= pairs
        if header:
            reported = parse_load_header(header)
            if reported is not None:
                state.reported, state.reported_at = reported, time.monotonic()

    def eject(self, endpoint: Endpoint) -> None:
        self.state(endpoint).ejected_until = time.monotonic() + EJECT_SECONDS

    def usable(self, endpoints: Sequence[Endpoint], exclude: Collection[str] = ()) -> list[Endpoint]:
        """Endpoints not yet tried; the ejected ones only when no other is left."""
        now = time.monotonic()
        left = [e for e in endpoints if e.url not in exclude]
        healthy = [e for e in left if self.state(e).ejected_until <= now]
        return healthy or left

    def pick(self, endpoints: Sequence[Endpoint], exclude: Collection[str] = ()) -> Endpoint | None:
        """Power of two choices on least outstanding pairs; None if every endpoint was tried."""
        left = self.usable(endpoints, exclude)
        if len(left) <= 1:
            return left[0] if left else None
        a, b = self.rng.sample(left, 2)
        la, lb = self.load(a), self.load(b)
        if la == lb:
            return a  # sample order is random already
        return a if la < lb else b

    def least_loaded(self, endpoints: Sequence[Endpoint], count: int) -> list[Endpoint]:
        """The `count` least loaded endpoints (a fan-out's parts), ties in random order."""
        left = self.usable(endpoints)
        shuffled = self.rng.sample(left, len(left))
        return sorted(shuffled, key=self.load)[:count]

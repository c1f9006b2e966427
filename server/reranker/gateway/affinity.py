"""Cache affinity: the same query goes to the same endpoint, while that endpoint is not overloaded.

Each server caches scores by (query, document); a query that comes back (a user paging, an agent
retrying, the same popular question) hits that cache only on the endpoint that scored it first.
Consistent hashing with bounded loads (Mirrokni, Thorup and Zadimoghaddam, 2018; HAProxy's
`hash-balance-factor`): the query hashes to a point on a ring of endpoints (many virtual points
each, so endpoints own even shares and a change of endpoints moves only the share of the one that
came or went); the endpoint found there takes the request if its load with the request stays
within (1 + epsilon) times the mean, else the walk goes on clockwise to the next endpoint under
the bound (when none is, picking falls back to least load). A hot query spills to the same second
endpoint every time, which warms a second cache rather than all of them.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from collections.abc import Callable, Sequence

from .directory import Endpoint

#: Points per endpoint on the ring: enough that shares differ by a few percent.
VIRTUAL_POINTS = 160


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big")


class Ring:
    """The hash ring of one set of endpoints (rebuilt when the set changes)."""

    def __init__(self, endpoints: Sequence[Endpoint]) -> None:
        points = sorted((_hash(f"{e.url}#{i}"), k) for k, e in enumerate(endpoints) for i in range(VIRTUAL_POINTS))
        self.endpoints = tuple(endpoints)
        self._hashes = [h for h, _ in points]
        self._owners = [k for _, k in points]

    def walk(self, key: str) -> list[Endpoint]:
        """The endpoints in the order the key's walk meets them (each once)."""
        if not self.endpoints:
            return []
        start = bisect.bisect(self._hashes, _hash(key)) % len(self._hashes)
        seen: list[int] = []
        for i in range(len(self._owners)):
            owner = self._owners[(start + i) % len(self._owners)]
            if owner not in seen:
                seen.append(owner)
                if len(seen) == len(self.endpoints):
                    break
        return [self.endpoints[k] for k in seen]


class Affinity:
    """Rings by endpoint set, and the bounded-load walk."""

    def __init__(self, *, balance: float) -> None:
        self.balance = balance
        self._rings: dict[tuple[Endpoint, ...], Ring] = {}

    def ring(self, endpoints: Sequence[Endpoint]) -> Ring:
        key = tuple(sorted(endpoints, key=lambda e: e.url))
        ring = self._rings.get(key)
        if ring is None:
            if len(self._rings) > 64:  # endpoint sets come and go with scaling: keep the recent ones
                self._rings.clear()
            ring = self._rings[key] = Ring(key)
        return ring

    def pick(self, key: str, endpoints: Sequence[Endpoint], load: Callable[[Endpoint], int],
             usable: Sequence[Endpoint], *, weight: int = 1) -> tuple[Endpoint, bool] | None:
        """(endpoint, whether it is the key's home) or None if no usable endpoint is under the bound.

        The bound is the paper's: with the request counted, an endpoint may hold up to
        ceil((1 + epsilon) x the mean load), the mean and the rounding in units of this request's
        pairs (`weight`), so a few requests in flight do not push every query off its home (as a
        bound on the raw mean does: one request more than its neighbours already exceeds it).
        """
        order = self.ring(endpoints).walk(key)
        if not order:
            return None
        weight = max(1, weight)
        loads = {e.url: load(e) for e in order}
        total = sum(loads.values()) + weight
        capacity = math.ceil((1 + self.balance) * total / (len(order) * weight)) * weight
        allowed = {e.url for e in usable}
        for position, endpoint in enumerate(order):
            if endpoint.url in allowed and loads[endpoint.url] + weight <= capacity:
                return endpoint, position == 0
        return None

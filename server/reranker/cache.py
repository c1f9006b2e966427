"""The score cache: a local TTL/LRU tier, and an optional fleet-wide tier behind it.

Keys are a digest of the model fingerprint and the exact (query, document) pair, so a
cached score is always from the same model, revision, dtype, max length and kind. Values are
raw scores (activation is applied per request). The local tier is cachetools' TTLCache
(LRU eviction within a TTL), used only from the event loop, so it needs no lock.

A server reads its own writes across the fleet: a score is in the local tier as soon as it is
computed, and its fleet fill (`store`) is tracked until it lands; whoever answers with that
score (the request that computed it, or one that finds it locally meanwhile) waits for the
fill first (`landed`), so once a server has answered, every other server finds those scores.
The fill is bounded by the remote tier's own timeout, so a Redis that is down stalls nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Iterable
from typing import Protocol

from cachetools import TTLCache

from .backends import Pair
from .metrics import Metrics

log = logging.getLogger(__name__)


class RemoteTier(Protocol):
    """A cache shared by the fleet (Redis). Must never raise: failures read as misses.

    `claim` and `wait_for` de-duplicate work across servers: pairs another server is computing
    are waited for rather than computed; `renew` keeps the claims on pairs still queued or
    running here; `release` gives back claims whose work failed or was dropped, and `put_many`
    those whose scores it stores (see redis_tier.py and leases.py).
    """

    async def get_many(self, keys: list[str]) -> dict[str, float]: ...

    async def put_many(self, items: dict[str, float]) -> None: ...

    async def claim(self, keys: list[str]) -> tuple[list[str], list[str]]: ...

    async def wait_for(self, keys: list[str], *, timeout: float) -> dict[str, float]: ...

    async def release(self, keys: list[str]) -> None: ...

    async def renew(self, keys: list[str]) -> int: ...

    async def close(self) -> None: ...


def _feed(digest: "hashlib.blake2b", text: str) -> None:
    encoded = text.encode("utf-8", "surrogatepass")
    digest.update(len(encoded).to_bytes(8, "little"))
    digest.update(encoded)


def query_keys(fingerprint: str, query: str, documents: Iterable[str], instruction: str | None = None) -> list[str]:
    """The keys of (query, document[, instruction]) pairs. The query is hashed once and the hash
    state copied per document, so a long query costs its length once, not once per document."""
    prefix = hashlib.blake2b(digest_size=16)
    prefix.update(fingerprint.encode())
    _feed(prefix, query)
    keys = []
    for doc in documents:
        digest = prefix.copy()
        _feed(digest, doc)
        if instruction is not None:
            _feed(digest, instruction)
        keys.append(digest.hexdigest())
    return keys


def pair_key(fingerprint: str, pair: Pair) -> str:
    """Digest of the fingerprint, query, document and (LLM rerankers) the instruction."""
    return query_keys(fingerprint, pair[0], [pair[1]], pair[2] if len(pair) > 2 else None)[0]


class ScoreCache:
    """Local tier first, then the remote tier; remote hits are copied into the local tier."""

    def __init__(self, *, fingerprint: str, size: int, ttl: float, metrics: Metrics,
                 enabled: bool = True, remote: RemoteTier | None = None) -> None:
        self.fingerprint = fingerprint
        self.enabled = enabled
        self.local: TTLCache[str, float] = TTLCache(maxsize=size, ttl=ttl)
        self.remote = remote
        self.metrics = metrics
        self._landing: dict[str, asyncio.Task[None]] = {}  # fleet fills in flight, by key

    def key(self, pair: Pair) -> str:
        return pair_key(self.fingerprint, pair)

    def keys(self, query: str, documents: Iterable[str], instruction: str | None = None) -> list[str]:
        return query_keys(self.fingerprint, query, documents, instruction)

    async def get_many(self, keys: Iterable[str]) -> dict[str, float]:
        if not self.enabled:
            return {}
        found: dict[str, float] = {}
        missing: list[str] = []
        for key in dict.fromkeys(keys):
            value = self.local.get(key)
            if value is None:
                missing.append(key)
            else:
                found[key] = value
        self.metrics.cache_hits.labels(tier="local").inc(len(found))
        if found:
            await self.landed(found)  # answered from here only once the fleet can read it too
        if missing and self.remote is not None:
            remote = await self.remote.get_many(missing)
            for key, value in remote.items():
                self.local[key] = value
            found.update(remote)
            self.metrics.cache_hits.labels(tier="redis").inc(len(remote))
            missing = [k for k in missing if k not in remote]
        self.metrics.cache_misses.inc(len(missing))
        return found

    def store(self, items: dict[str, float]) -> None:
        """Scores just computed: in the local tier now; into the fleet tier in the background,
        tracked until they land (`landed`)."""
        if not self.enabled or not items:
            return
        for key, value in items.items():
            self.local[key] = value
        if self.remote is None:
            return
        task = asyncio.get_running_loop().create_task(self.remote.put_many(items))
        keys = list(items)
        for key in keys:
            self._landing[key] = task
        task.add_done_callback(lambda done: self._landed(done, keys))

    def _landed(self, task: "asyncio.Task[None]", keys: list[str]) -> None:
        for key in keys:
            if self._landing.get(key) is task:
                del self._landing[key]
        if not task.cancelled() and task.exception() is not None:  # put_many must not raise: a bug, said once
            log.error("the fleet cache fill failed", exc_info=task.exception())

    async def landed(self, keys: Iterable[str]) -> None:
        """Return once the fleet fills of `keys` in flight have ended (stored, or failed within
        the remote tier's timeout)."""
        if not self._landing:
            return
        fills = {self._landing[k] for k in keys if k in self._landing}
        if fills:
            await asyncio.wait(fills)  # not cancelled with the waiter: another request may wait for it

    def clear(self) -> None:
        self.local.clear()

    def __len__(self) -> int:
        return len(self.local)

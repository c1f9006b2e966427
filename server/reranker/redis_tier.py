"""The fleet-wide score cache in Redis, and de-duplication of work across servers.

A second cache tier behind the local one: a score computed by any server (pod or Mac) is
found by every other server serving the same model fingerprint.

- Keys: `{prefix}:{fingerprint}:s:{pair digest}`, so different models, revisions, dtypes,
  max lengths or kinds never share scores. Values: the raw score as 8 bytes (IEEE double,
  exactly what the model produced). TTL: CACHE_TTL_SECONDS.
- One round trip per request for look-ups (MGET) and one for fills (a pipeline of SETs).
- De-duplication: before computing pairs, a server takes a lease per pair
  (`...:l:{digest}`, SET NX PX). A server that finds a lease taken waits for the score
  instead of computing it, polling both keys in one round trip; if the lease expires (its
  holder died or failed) without a score, it computes the pair itself. A lease is deleted only
  by the server that holds it (a compare-and-delete script): when its score is stored, or at
  once when its computation failed or was dropped, so the others stop waiting. A lease on a
  pair still queued or running is renewed (a compare-and-extend script, every held lease in one
  call, leases.py) so that a long queue does not let it lapse and a second server compute it too.
- Faults never fail requests: every call is bounded by a short timeout; an error counts in
  `reranker_redis_errors_total{op}`, is logged at most once per interval, and opens a circuit
  for a backoff (0.25 s doubling up to 5 s) during which Redis is skipped entirely; then the next call
  tries again and redis-py reconnects. A garbage value reads as a miss.

Consistency promised: a cached score is always one the same model fingerprint produced for
exactly that (query, document) pair, at most CACHE_TTL_SECONDS old. Nothing more: two servers
may both compute a pair when Redis is down or a lease expires.
"""

from __future__ import annotations

import asyncio
import logging
import os
import struct
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.exceptions import AuthenticationError, RedisError

from .metrics import Metrics

log = logging.getLogger(__name__)
T = TypeVar("T")
_DOUBLE = struct.Struct("<d")

#: Delete each lease in KEYS that ARGV[1] (this server) holds; leave other servers' leases alone.
_RELEASE = """
local released = 0
for _, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then
    redis.call('DEL', key)
    released = released + 1
  end
end
return released
"""


#: Extend each lease in KEYS that ARGV[1] (this server) holds to ARGV[2] ms; leave others' alone.
_RENEW = """
local renewed = 0
for _, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then
    redis.call('PEXPIRE', key, ARGV[2])
    renewed = renewed + 1
  end
end
return renewed
"""


def redact(url: str) -> str:
    """The URL without its password, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.hostname or ""
    if parts.username:
        netloc = f"{parts.username}:***@{netloc}"
    else:
        netloc = f":***@{netloc}"
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


class RedisTier:
    """Implements the cache's RemoteTier protocol, plus leases for cross-server de-duplication."""

    def __init__(self, url: str, *, prefix: str, fingerprint: str, ttl: float, metrics: Metrics,
                 timeout: float = 0.25, lease_seconds: float = 10.0, poll_interval: float = 0.01) -> None:
        self.url = url
        self.ns = f"{prefix}:{fingerprint}"
        self.ttl_ms = max(1, int(ttl * 1000))
        self.timeout = timeout
        self.lease_ms = max(1, int(lease_seconds * 1000))
        self.poll_interval = poll_interval
        self.metrics = metrics
        self.owner = f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:8]}".encode()
        self.client = aioredis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout,
                                              health_check_interval=30)
        self._release = self.client.register_script(_RELEASE)
        self._renew = self.client.register_script(_RENEW)
        self._down_until = 0.0
        self._backoff = 0.25
        self._last_log = 0.0

    def _score_key(self, key: str) -> str:
        return f"{self.ns}:s:{key}"

    def _lease_key(self, key: str) -> str:
        return f"{self.ns}:l:{key}"

    # --- fault handling ------------------------------------------------------------------
    async def _call(self, op: str, make: Callable[[], Awaitable[T]], default: T) -> T:
        if time.monotonic() < self._down_until:
            return default
        started = time.perf_counter()
        try:
            result = await asyncio.wait_for(make(), self.timeout)
        except (RedisError, OSError, TimeoutError, ValueError) as exc:
            self.metrics.redis_errors.labels(op=op).inc()
            self._down_until = time.monotonic() + self._backoff
            self._backoff = min(self._backoff * 2, 5.0)
            now = time.monotonic()
            if now - self._last_log > 10:
                self._last_log = now
                log.warning("redis %s failed (%s: %s); serving from the model, retrying in %.1fs",
                            op, exc.__class__.__name__, exc, self._backoff)
            return default
        self._backoff = 0.25
        self.metrics.redis_latency.labels(op=op).observe(time.perf_counter() - started)
        return result

    async def check(self) -> bool:
        """Startup probe: a clear warning for a wrong password or an absent server; never raises."""
        try:
            await asyncio.wait_for(self.client.ping(), max(self.timeout, 1.0))
        except AuthenticationError as exc:
            log.warning("redis at %s refused our credentials (%s): the fleet cache is off until they work; "
                        "serving from the model", redact(self.url), exc)
            self.metrics.redis_errors.labels(op="auth").inc()
            return False
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning("redis at %s is not reachable (%s: %s); serving from the model and retrying",
                        redact(self.url), exc.__class__.__name__, exc)
            self.metrics.redis_errors.labels(op="connect").inc()
            return False
        log.info("fleet cache: redis at %s", redact(self.url))
        return True

    # --- cache tier ------------------------------------------------------------------------
    def _decode(self, value: Any) -> float | None:
        if value is None:
            return None
        if isinstance(value, bytes) and len(value) == _DOUBLE.size:
            score = _DOUBLE.unpack(value)[0]
            if score == score and abs(score) != float("inf"):  # NaN or inf is garbage
                return float(score)
        self.metrics.redis_errors.labels(op="decode").inc()
        return None

    async def get_many(self, keys: list[str]) -> dict[str, float]:
        if not keys:
            return {}
        values = await self._call("get", lambda: self.client.mget([self._score_key(k) for k in keys]), None)
        if values is None:
            return {}
        found: dict[str, float] = {}
        for key, value in zip(keys, values):
            score = self._decode(value)
            if score is not None:
                found[key] = score
        return found

    async def put_many(self, items: dict[str, float]) -> None:
        if not items:
            return

        async def fill() -> Any:
            pipe = self.client.pipeline(transaction=False)
            for key, score in items.items():
                pipe.set(self._score_key(key), _DOUBLE.pack(score), px=self.ttl_ms)
            await self._release(keys=[self._lease_key(k) for k in items], args=[self.owner], client=pipe)
            return await pipe.execute()

        await self._call("set", fill, None)

    # --- leases ----------------------------------------------------------------------------
    async def claim(self, keys: list[str]) -> tuple[list[str], list[str]]:
        """Split `keys` into (ours to compute, being computed by another server)."""
        if not keys:
            return [], []

        async def take() -> Any:
            pipe = self.client.pipeline(transaction=False)
            for key in keys:
                pipe.set(self._lease_key(key), self.owner, nx=True, px=self.lease_ms)
            return await pipe.execute()

        taken = await self._call("lease", take, None)
        if taken is None:
            return list(keys), []  # Redis unavailable: compute everything here
        ours = [k for k, ok in zip(keys, taken) if ok]
        theirs = [k for k, ok in zip(keys, taken) if not ok]
        return ours, theirs

    async def release(self, keys: list[str]) -> None:
        """Give back leases this server holds on pairs it will not score (failed or dropped)."""
        if keys:
            await self._call("release", lambda: self._release(keys=[self._lease_key(k) for k in keys],
                                                                 args=[self.owner]), None)

    async def renew(self, keys: list[str]) -> int:
        """Extend the leases this server still holds on `keys` by a full lease, in one round trip;
        how many it still held."""
        if not keys:
            return 0
        renewed = await self._call("renew", lambda: self._renew(keys=[self._lease_key(k) for k in keys],
                                                                 args=[self.owner, self.lease_ms]), 0)
        return int(renewed)

    async def wait_for(self, keys: list[str], *, timeout: float) -> dict[str, float]:
        """Scores of pairs other servers hold leases on, as they arrive. Returns when every key
        has a score or lost its lease, or at the timeout; the caller computes what is missing."""
        found: dict[str, float] = {}
        remaining = list(keys)
        deadline = time.monotonic() + timeout
        interval = self.poll_interval
        while remaining and time.monotonic() < deadline:
            await asyncio.sleep(interval)
            interval = min(interval * 1.5, 0.1)

            async def poll() -> Any:
                pipe = self.client.pipeline(transaction=False)
                pipe.mget([self._score_key(k) for k in remaining])
                pipe.mget([self._lease_key(k) for k in remaining])
                return await pipe.execute()

            got = await self._call("wait", poll, None)
            if got is None:
                break  # Redis went away: compute the rest here
            scores, leases = got
            still: list[str] = []
            for key, value, lease in zip(remaining, scores, leases):
                score = self._decode(value)
                if score is not None:
                    found[key] = score
                elif lease is not None:
                    still.append(key)
            remaining = still
        return found

    async def close(self) -> None:
        try:
            await self.client.aclose()
        except (RedisError, OSError):
            pass

"""The fleet-wide cache against a real redis-server, with real server processes sharing it.

What counts is what the servers export: pairs that went through the model
(`reranker_pairs_scored_total`), hits by tier, pairs answered by another server's work.
"""

from __future__ import annotations

import asyncio
import re
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from servers import ServerProcess, free_port, running_app
from redis_fixture import RedisServer

QUERY = "which river flows through paris"
DOCS = [f"document {i}: the seine flows through paris and {i} other towns" for i in range(24)]


def metric(server: ServerProcess, name: str, labels: str = "") -> float:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    pattern = re.escape(name + (("{" + labels + "}") if labels else "")) + r" ([0-9.e+-]+)"
    match = re.search(pattern, text)
    return float(match.group(1)) if match else 0.0


def scored(server: ServerProcess) -> float:
    return metric(server, "reranker_pairs_scored_total")


def env_for(redis: RedisServer, **extra: str) -> dict[str, str]:
    return {"REDIS_ENABLED": "true", "REDIS_URL": redis.url, "RERANKER_REDIS_LEASE_SECONDS": "10", **extra}


def test_second_server_answers_from_the_first_ones_scores(redis_server: RedisServer,
                                                          uvicorn_server: Callable[..., ServerProcess]) -> None:
    a, b = uvicorn_server(env_for(redis_server)), uvicorn_server(env_for(redis_server))
    first = httpx.post(a.url + "/rerank", json={"query": QUERY, "documents": DOCS}, timeout=60).json()
    assert scored(a) == len(DOCS)
    # no pause: a server answers only once its scores are in Redis
    second = httpx.post(b.url + "/rerank", json={"query": QUERY, "documents": DOCS}, timeout=60).json()
    assert scored(b) == 0  # zero new forwards on the second server
    assert metric(b, "reranker_cache_hits_total", 'tier="redis"') == len(DOCS)
    assert first["results"] == second["results"]  # bit-identical scores
    keys = redis_server.client().keys("reranker:*:s:*")
    assert len(keys) == len(DOCS)
    assert all(len(redis_server.client().get(k) or b"") == 8 for k in keys)  # compact values


def test_concurrent_identical_requests_to_two_servers_compute_each_pair_once(
        redis_server: RedisServer, uvicorn_server: Callable[..., ServerProcess]) -> None:
    env = env_for(redis_server, RERANKER_BATCH_SIZE="4", MICRO_BATCH_WINDOW_MS="0")
    a, b = uvicorn_server(env), uvicorn_server(env)
    docs = [f"{d} and more words about rivers " * 6 for d in DOCS]
    results: list[httpx.Response] = []

    def call(server: ServerProcess) -> None:
        results.append(httpx.post(server.url + "/rerank", json={"query": QUERY, "documents": docs}, timeout=60))

    threads = [threading.Thread(target=call, args=(s,)) for s in (a, b, a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [r.status_code for r in results] == [200] * 4
    assert scored(a) + scored(b) == len(docs)
    fleet = metric(a, "reranker_deduplicated_pairs_total", 'scope="fleet"') + \
        metric(b, "reranker_deduplicated_pairs_total", 'scope="fleet"')
    assert fleet > 0
    assert all(r.json()["results"] == results[0].json()["results"] for r in results)


def test_redis_killed_mid_load_fails_nothing_and_sharing_resumes(
        redis_server: RedisServer, uvicorn_server: Callable[..., ServerProcess]) -> None:
    redis = redis_server  # the fixture stops the restarted server too, also when this fails
    env = env_for(redis, RERANKER_REDIS_TIMEOUT="0.2")
    a, b = uvicorn_server(env), uvicorn_server(env)
    statuses: list[int] = []
    stop = threading.Event()

    def load(server: ServerProcess, tag: str) -> None:
        i = 0
        deadline = time.monotonic() + 30
        while not stop.is_set() and time.monotonic() < deadline:  # bounded in time and count
            body = {"query": f"{tag} {i}", "documents": DOCS[:6]}  # unique: every request reaches redis
            statuses.append(httpx.post(server.url + "/rerank", json=body, timeout=30).status_code)
            i += 1
            if i > 400:
                break

    threads = [threading.Thread(target=load, args=(s, t)) for s, t in ((a, "x"), (b, "y"))]
    for t in threads:
        t.start()
    time.sleep(1.0)
    redis.kill()
    time.sleep(2.0)
    stop.set()
    for t in threads:
        t.join(60)
    assert statuses and set(statuses) == {200}, set(statuses)
    assert metric(a, "reranker_redis_errors_total", 'op="get"') + metric(a, "reranker_redis_errors_total", 'op="set"') + \
        metric(a, "reranker_redis_errors_total", 'op="lease"') > 0
    # restarted on the same port: sharing resumes without restarting the servers
    redis.start()
    fresh = {"query": "after the restart", "documents": DOCS[:5]}
    deadline = time.monotonic() + 40
    attempt = 0
    while time.monotonic() < deadline:
        attempt += 1
        assert httpx.post(a.url + "/rerank", json=fresh | {"query": f"restart {attempt}"}, timeout=30).status_code == 200
        if redis.client().dbsize() > 0:
            break
        time.sleep(0.5)
    assert redis.client().dbsize() > 0
    # b may still be inside its own backoff (up to 5 s after its last failure, which can be later
    # than a's) and score by itself until then: each try is a query a has just cached.
    deadline = time.monotonic() + 40
    attempt = 0
    while True:
        attempt += 1
        shared = fresh | {"query": f"shared {attempt}"}
        assert httpx.post(a.url + "/rerank", json=shared, timeout=30).status_code == 200
        time.sleep(0.3)
        before = scored(b)
        assert httpx.post(b.url + "/rerank", json=shared, timeout=30).status_code == 200
        if scored(b) == before:
            break
        assert time.monotonic() < deadline, "b never read a's scores from Redis after the restart"
        time.sleep(0.5)
    redis.stop()


def app_metric(client: httpx.AsyncClient, name: str, labels: dict[str, str] | None = None) -> float:
    return client.app.state.runtime.metrics.value(name, labels)  # type: ignore[attr-defined]


async def test_ttl_expiry(redis_server: RedisServer) -> None:
    body = {"query": QUERY, "documents": DOCS[:3]}
    async with running_app(redis_enabled=True, redis_url=redis_server.url, cache_ttl_seconds=1) as a:
        await a.post("/rerank", json=body)
        await asyncio.sleep(0.2)
        client = redis_server.client()
        keys = client.keys("reranker:*:s:*")
        assert len(keys) == 3 and 0 < client.pttl(keys[0]) <= 1000
        await asyncio.sleep(1.3)
        assert client.keys("reranker:*:s:*") == []
    async with running_app(redis_enabled=True, redis_url=redis_server.url, cache_ttl_seconds=1) as b:
        await b.post("/rerank", json=body)
        assert app_metric(b, "reranker_pairs_scored_total") == 3  # expired: computed again


async def test_different_fingerprints_never_share(redis_server: RedisServer, tiny_bert: Path) -> None:
    body = {"query": QUERY, "documents": DOCS[:4]}
    fingerprints = set()
    for settings in ({}, {"quantization": "bf16"}, {"model": str(tiny_bert)}, {"max_length": 128}):
        async with running_app(redis_enabled=True, redis_url=redis_server.url, **settings) as server:
            assert (await server.post("/rerank", json=body)).status_code == 200
            await asyncio.sleep(0.2)
            assert app_metric(server, "reranker_pairs_scored_total") == 4
            assert app_metric(server, "reranker_cache_hits_total", {"tier": "redis"}) == 0
            fingerprints.add((await server.get("/health")).json()["model"]["fingerprint"].encode())
    prefixes = {k.split(b":")[1] for k in redis_server.client().keys("reranker:*:s:*")}
    assert len(prefixes) == 4 and prefixes == fingerprints


async def test_garbage_values_read_as_misses(redis_server: RedisServer) -> None:
    body = {"query": QUERY, "documents": DOCS[:3]}
    async with running_app(redis_enabled=True, redis_url=redis_server.url) as a:
        good = (await a.post("/rerank", json=body)).json()
        await asyncio.sleep(0.2)
    client = redis_server.client()
    for i, key in enumerate(client.keys("reranker:*:s:*")):
        client.set(key, [b"not a float", struct.pack("<d", float("nan")), b"\x00" * 3][i])
    async with running_app(redis_enabled=True, redis_url=redis_server.url) as b:
        again = (await b.post("/rerank", json=body)).json()
        assert app_metric(b, "reranker_pairs_scored_total") == 3
        assert [r["index"] for r in again["results"]] == [r["index"] for r in good["results"]]
        assert app_metric(b, "reranker_redis_errors_total", {"op": "decode"}) == 3


async def test_slow_redis_is_bounded(redis_server: RedisServer) -> None:
    """A Redis that stalls (DEBUG SLEEP) costs at most the call timeout, and fails nothing."""
    body = {"query": QUERY, "documents": DOCS[:3]}
    async with running_app(redis_enabled=True, redis_url=redis_server.url, redis_timeout=0.1) as a:
        stall = asyncio.get_running_loop().run_in_executor(None, lambda: redis_server.client().execute_command("DEBUG", "SLEEP", "1.5"))
        await asyncio.sleep(0.1)
        started = time.perf_counter()
        r = await a.post("/rerank", json=body)
        assert r.status_code == 200
        assert time.perf_counter() - started < 1.2
        assert app_metric(a, "reranker_redis_errors_total", {"op": "get"}) >= 1
        await stall


async def test_password_protected_redis(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    redis = RedisServer(free_port(), tmp_path, password="s3cret-pass").start()
    try:
        body = {"query": QUERY, "documents": DOCS[:2]}
        async with running_app(redis_enabled=True, redis_url=redis.url) as good:
            assert (await good.post("/rerank", json=body)).status_code == 200
            await asyncio.sleep(0.2)
            assert len(redis.client().keys("reranker:*")) == 2
        wrong = f"redis://:wrong-pass@127.0.0.1:{redis.port}/0"
        with caplog.at_level("WARNING"):
            async with running_app(redis_enabled=True, redis_url=wrong) as bad:
                r = await bad.post("/rerank", json=body)
                assert r.status_code == 200  # still serves, from the model
        assert "refused our credentials" in caplog.text
        assert "wrong-pass" not in caplog.text and "s3cret-pass" not in caplog.text
    finally:
        redis.stop()


@pytest.mark.parametrize("url", ["redis://:pw@host:6379/0", "rediss://user:pw@host/1", "redis://host:1"])
def test_redact_hides_passwords(url: str) -> None:
    from reranker.redis_tier import redact

    assert "pw" not in redact(url).replace("pw@", "") or ":***@" in redact(url)
    assert ":pw@" not in redact(url)


# --- leases: joined requests, failures, owners, fall-backs (hardening) ------------------------

class HeldForwards:
    """Holds the real backend's forwards until released (or makes them raise): deterministic queues."""

    def __init__(self, runtime: object, *, fail: bool = False) -> None:
        self.open = threading.Event()
        backend = runtime.backend  # type: ignore[attr-defined]
        original = backend.score_encoded

        def held(encoded):  # type: ignore[no-untyped-def]
            self.open.wait(60)
            if fail:
                raise RuntimeError("the model broke")
            return original(encoded)

        backend.score_encoded = held

    def release(self) -> None:
        self.open.set()


def lease_and_score_keys(runtime: object, query: str, doc: str) -> tuple[str, str]:
    remote = runtime.remote  # type: ignore[attr-defined]
    key = runtime.cache.key((query, doc))  # type: ignore[attr-defined]
    return remote._lease_key(key), remote._score_key(key)


async def test_request_joining_a_job_during_a_slow_claim_is_not_left_waiting(redis_server: RedisServer) -> None:
    """Issue 15.2: a request that joins a job while its owner awaits a (50 ms) claim is told when the
    job turns out to be another server's, instead of waiting out the queue timeout for a local start."""
    async with running_app(redis_enabled=True, redis_url=redis_server.url, queue_timeout=3) as a:
        runtime = a.app.state.runtime  # type: ignore[attr-defined]
        claim = runtime.remote.claim

        async def slow_claim(keys: list[str]) -> tuple[list[str], list[str]]:
            await asyncio.sleep(0.05)
            return await claim(keys)

        runtime.remote.claim = slow_claim
        doc = "the seine flows through paris"
        lease, score = lease_and_score_keys(runtime, QUERY, doc)
        redis = redis_server.client()
        redis.set(lease, b"another-server", px=5000)  # another server of the fleet is computing this pair

        async def other_server_delivers() -> None:
            await asyncio.sleep(0.4)
            redis.set(score, struct.pack("<d", 1.25))
            redis.delete(lease)

        async def joiner() -> httpx.Response:
            await asyncio.sleep(0.02)  # arrives while the first request awaits its claim
            return await a.post("/rerank", json={"query": QUERY, "documents": [doc], "raw_scores": True})

        started = time.monotonic()
        first, second, _ = await asyncio.gather(
            a.post("/rerank", json={"query": QUERY, "documents": [doc], "raw_scores": True}), joiner(),
            other_server_delivers())
        assert (first.status_code, second.status_code) == (200, 200), second.text
        assert second.json()["results"][0]["score"] == 1.25
        assert time.monotonic() - started < 2.5
        assert app_metric(a, "reranker_pairs_scored_total") == 0


async def test_failed_job_gives_its_lease_back(redis_server: RedisServer) -> None:
    """Issue 15.5: a lease is released when its computation fails, not left for the others to wait out."""
    async with running_app(redis_enabled=True, redis_url=redis_server.url, redis_lease_seconds=30) as a:
        runtime = a.app.state.runtime  # type: ignore[attr-defined]
        held = HeldForwards(runtime, fail=True)
        doc = "a pair whose forward fails"
        lease, _ = lease_and_score_keys(runtime, QUERY, doc)
        task = asyncio.get_running_loop().create_task(a.post("/rerank", json={"query": QUERY, "documents": [doc]}))
        deadline = time.monotonic() + 10
        while not redis_server.client().exists(lease):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        held.release()
        failed = await task
        assert failed.status_code == 424, failed.text
        await asyncio.sleep(0.3)
        assert not redis_server.client().exists(lease)


async def test_only_the_owner_deletes_a_lease(redis_server: RedisServer) -> None:
    """Issue 15.5: storing a score deletes the lease only if this server still holds it."""
    async with running_app(redis_enabled=True, redis_url=redis_server.url) as a:
        runtime = a.app.state.runtime  # type: ignore[attr-defined]
        held = HeldForwards(runtime)
        doc = "a pair whose lease changes hands"
        lease, score = lease_and_score_keys(runtime, QUERY, doc)
        task = asyncio.get_running_loop().create_task(a.post("/rerank", json={"query": QUERY, "documents": [doc]}))
        redis = redis_server.client()
        deadline = time.monotonic() + 10
        while not redis.exists(lease):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        redis.set(lease, b"another-server", px=30_000)  # ours expired meanwhile; another server took it
        held.release()
        assert (await task).status_code == 200
        await asyncio.sleep(0.3)
        assert redis.exists(score)
        assert redis.get(lease) == b"another-server"


async def test_fleet_fallbacks_go_through_admission(redis_server: RedisServer) -> None:
    """Issue 15.5: pairs computed here after another server's lease expired are admitted like new work."""
    async with running_app(redis_enabled=True, redis_url=redis_server.url, max_queue=4, batch_size=1,
                           micro_batch_window_ms=0, warmup_on_start=False) as a:
        runtime = a.app.state.runtime  # type: ignore[attr-defined]
        held = HeldForwards(runtime)
        redis = redis_server.client()
        orphans = [f"orphan {i}" for i in range(4)]
        for doc in orphans:  # another server claimed these and died: its leases expire with no score
            redis.set(lease_and_score_keys(runtime, QUERY, doc)[0], b"dead-server", px=600)
        waiting = asyncio.get_running_loop().create_task(
            a.post("/rerank", json={"query": QUERY, "documents": orphans}))
        await asyncio.sleep(0.1)
        busy = asyncio.get_running_loop().create_task(
            a.post("/rerank", json={"query": "other", "documents": [f"fresh {i}" for i in range(5)]}))
        deadline = time.monotonic() + 10
        while runtime.batcher.pending_pairs < 4:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        fallback = await waiting  # the leases expired: its 4 pairs would overflow the queue
        assert runtime.batcher.pending_pairs <= 4
        held.release()
        assert (await busy).status_code == 200
        assert fallback.status_code == 429 and fallback.json()["error"] == "queue_full", fallback.text


# --- reads its own writes; leases outlive the queue -------------------------------------------

async def test_an_answer_goes_out_only_once_its_scores_are_in_redis(redis_server: RedisServer) -> None:
    """The fleet fill is slow (a Redis 300 ms away): the answer waits for it, so any server asked
    next finds every score of the answer. Before, the response went out first and a second pod
    scored the pairs again (tests/e2e/test_fleet.py, 'scored 4.0 pairs the first already had')."""
    async with running_app(redis_enabled=True, redis_url=redis_server.url, redis_timeout=2) as a:
        runtime = a.app.state.runtime  # type: ignore[attr-defined]
        put_many = runtime.remote.put_many

        async def far_fill(items: dict[str, float]) -> None:
            await asyncio.sleep(0.3)
            await put_many(items)

        runtime.remote.put_many = far_fill
        body = {"query": QUERY, "documents": DOCS[:5]}
        assert (await a.post("/rerank", json=body)).status_code == 200
        assert len(redis_server.client().keys("reranker:*:s:*")) == 5  # no sleep: already there
        # a local hit waits for a fill still in flight too
        fresh = {"query": "another query", "documents": DOCS[:3]}
        first = asyncio.get_running_loop().create_task(a.post("/rerank", json=fresh))
        while app_metric(a, "reranker_pairs_scored_total") < 8:
            await asyncio.sleep(0.005)
        runtime.remote.put_many = put_many
        again = await a.post("/rerank", json=fresh)  # scored, fill in flight: answered from the local tier
        assert again.status_code == 200 and app_metric(a, "reranker_cache_hits_total", {"tier": "local"}) >= 3
        assert len(redis_server.client().keys("reranker:*:s:*")) == 8
        assert (await first).status_code == 200


async def test_a_queued_pair_keeps_its_lease_past_the_lease_time(redis_server: RedisServer) -> None:
    """Leases of 0.4 s, a pair queued for 1.5 s behind a held forward: its lease is renewed, so a
    second server finds it taken and waits instead of computing it too. Before, it lapsed."""
    async with running_app(redis_enabled=True, redis_url=redis_server.url, redis_lease_seconds=0.4, batch_size=1,
                           micro_batch_window_ms=0, warmup_on_start=False, queue_timeout=20) as a:
        runtime = a.app.state.runtime  # type: ignore[attr-defined]
        held = HeldForwards(runtime)
        redis = redis_server.client()
        doc = "a pair that waits in a long queue"
        lease, score = lease_and_score_keys(runtime, QUERY, doc)
        busy = asyncio.get_running_loop().create_task(
            a.post("/rerank", json={"query": "busy", "documents": ["the forward that holds the queue"]}))
        while not runtime.batcher.active:
            await asyncio.sleep(0.01)
        queued = asyncio.get_running_loop().create_task(a.post("/rerank", json={"query": QUERY, "documents": [doc]}))
        while not runtime.batcher.pending_pairs:
            await asyncio.sleep(0.01)
        await asyncio.sleep(1.5)  # almost four lease times
        try:
            assert redis.get(lease) == runtime.remote.owner, "the queued pair's lease lapsed"
            assert not redis.set(lease, b"second-server", nx=True, px=10_000)  # a second server must wait
            assert app_metric(a, "reranker_redis_leases_renewed_total") >= 2
        finally:
            held.release()
        assert (await busy).status_code == 200 and (await queued).status_code == 200
        assert redis.exists(score) and not redis.exists(lease)  # scored: stored, lease given back

"""The fleet-wide cache against a real redis-server, with real server processes sharing it.

What counts is what the servers export: pairs that went through the model
(`reranker_pairs_scored_total`), hits by tier, pairs answered by another server's work.
"""

from __future__ import annotations

import re
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from conftest import ServerProcess, free_port
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
    time.sleep(0.2)  # the fill is written after the response
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
        tmp_path: Path, uvicorn_server: Callable[..., ServerProcess]) -> None:
    redis = RedisServer(free_port(), tmp_path).start()
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
    assert httpx.post(a.url + "/rerank", json=fresh, timeout=30).status_code == 200
    time.sleep(0.3)
    before = scored(b)
    assert httpx.post(b.url + "/rerank", json=fresh, timeout=30).status_code == 200
    assert scored(b) == before
    redis.stop()


def test_ttl_expiry(redis_server: RedisServer, uvicorn_server: Callable[..., ServerProcess]) -> None:
    a = uvicorn_server(env_for(redis_server, CACHE_TTL_SECONDS="1"))
    httpx.post(a.url + "/rerank", json={"query": QUERY, "documents": DOCS[:3]}, timeout=60)
    time.sleep(0.2)
    client = redis_server.client()
    keys = client.keys("reranker:*:s:*")
    assert len(keys) == 3 and 0 < client.pttl(keys[0]) <= 1000
    time.sleep(1.3)
    assert client.keys("reranker:*:s:*") == []
    b = uvicorn_server(env_for(redis_server, CACHE_TTL_SECONDS="1"))
    httpx.post(b.url + "/rerank", json={"query": QUERY, "documents": DOCS[:3]}, timeout=60)
    assert scored(b) == 3  # expired: computed again


def test_different_fingerprints_never_share(redis_server: RedisServer, uvicorn_server: Callable[..., ServerProcess],
                                            tiny_bert: Path) -> None:
    fp32 = uvicorn_server(env_for(redis_server))
    bf16 = uvicorn_server(env_for(redis_server, RERANKER_QUANTIZATION="bf16"))
    other = uvicorn_server(env_for(redis_server, RERANKER_MODEL=str(tiny_bert)))
    body = {"query": QUERY, "documents": DOCS[:4]}
    for server in (fp32, bf16, other):
        assert httpx.post(server.url + "/rerank", json=body, timeout=60).status_code == 200
        time.sleep(0.2)
        assert scored(server) == 4
        assert metric(server, "reranker_cache_hits_total", 'tier="redis"') == 0
    prefixes = {k.split(b":")[1] for k in redis_server.client().keys("reranker:*:s:*")}
    assert len(prefixes) == 3
    fingerprints = {httpx.get(s.url + "/health").json()["model"]["fingerprint"].encode() for s in (fp32, bf16, other)}
    assert prefixes == fingerprints


def test_garbage_values_read_as_misses(redis_server: RedisServer, uvicorn_server: Callable[..., ServerProcess]) -> None:
    a = uvicorn_server(env_for(redis_server))
    body = {"query": QUERY, "documents": DOCS[:3]}
    good = httpx.post(a.url + "/rerank", json=body, timeout=60).json()
    time.sleep(0.2)
    client = redis_server.client()
    for i, key in enumerate(client.keys("reranker:*:s:*")):
        client.set(key, [b"not a float", struct.pack("<d", float("nan")), b"\x00" * 3][i])
    b = uvicorn_server(env_for(redis_server))
    again = httpx.post(b.url + "/rerank", json=body, timeout=60).json()
    assert scored(b) == 3
    assert again["results"] == good["results"]
    assert metric(b, "reranker_redis_errors_total", 'op="decode"') == 3


def test_password_protected_redis(tmp_path: Path, uvicorn_server: Callable[..., ServerProcess]) -> None:
    redis = RedisServer(free_port(), tmp_path, password="s3cret-pass").start()
    try:
        good = uvicorn_server(env_for(redis))
        assert httpx.post(good.url + "/rerank", json={"query": QUERY, "documents": DOCS[:2]}, timeout=60).status_code == 200
        time.sleep(0.2)
        assert len(redis.client().keys("reranker:*")) == 2
        wrong = f"redis://:wrong-pass@127.0.0.1:{redis.port}/0"
        bad = uvicorn_server({"REDIS_ENABLED": "true", "REDIS_URL": wrong})
        r = httpx.post(bad.url + "/rerank", json={"query": QUERY, "documents": DOCS[:2]}, timeout=60)
        assert r.status_code == 200  # still serves, from the model
        log = bad.log.read_text()
        assert "refused our credentials" in log
        assert "wrong-pass" not in log and "s3cret-pass" not in good.log.read_text()
    finally:
        redis.stop()


@pytest.mark.parametrize("url", ["redis://:pw@host:6379/0", "rediss://user:pw@host/1", "redis://host:1"])
def test_redact_hides_passwords(url: str) -> None:
    from reranker.redis_tier import redact

    assert "pw" not in redact(url).replace("pw@", "") or ":***@" in redact(url)
    assert ":pw@" not in redact(url)

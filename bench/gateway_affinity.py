"""Cache affinity: the servers' score-cache hit rate on a workload of repeated queries, with the
gateway's bounded-load consistent hashing against picking without it (power of two choices on
load alone, effectively random for equal loads), on the same server processes in the same run.

    .venv/bin/python bench/gateway_affinity.py [--servers 3] [--queries 150] [--repeats 4]

Each query (with its own 8 documents) is sent `repeats` times, in shuffled order, at a few
requests at once. Each phase uses its own queries, so neither starts with a warm cache. The hit
rate is the servers' own (reranker_cache_hits_total{tier="local"} over hits + misses, summed over
the servers). The best possible rate is (repeats - 1) / repeats: every repeat finds its scores.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
import workload as w  # noqa: E402
from gateway_workload import Gateway, counter  # noqa: E402


def cache_counts(servers: list[w.Server]) -> tuple[float, float]:
    hits = sum(counter(s.url, "reranker_cache_hits_total", tier="local") for s in servers)
    misses = sum(counter(s.url, "reranker_cache_misses_total") for s in servers)
    return hits, misses


async def send(url: str, bodies: list[dict], *, clients: int) -> dict[int, int]:  # type: ignore[type-arg]
    statuses: dict[int, int] = {}
    queue = list(bodies)
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        async def worker() -> None:
            while queue:
                r = await client.post("/v1/rerank", json=queue.pop())
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1

        await asyncio.gather(*(worker() for _ in range(clients)))
    return statuses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--servers", type=int, default=3)
    parser.add_argument("--queries", type=int, default=150)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--clients", type=int, default=4)
    args = parser.parse_args()
    servers = [w.Server({}, wait=False) for _ in range(args.servers)]
    for s in servers:
        s.wait_ready()
    urls = [s.url for s in servers]
    rates = {}
    try:
        for mode in ("affinity", "no-affinity"):
            gateway = Gateway(urls, env={"RERANKER_GATEWAY_AFFINITY": "true" if mode == "affinity" else "false"})
            try:
                docs = w.texts(8, tokens=(10, 20), seed=2, tag="doc")
                bodies = [{"model": "bench", "query": f"{mode} question {q}", "documents": docs}
                          for q in range(args.queries) for _ in range(args.repeats)]
                random.Random(3).shuffle(bodies)
                hits0, misses0 = cache_counts(servers)
                statuses = asyncio.run(send(gateway.url, bodies, clients=args.clients))
                hits1, misses1 = cache_counts(servers)
                hits, misses = hits1 - hits0, misses1 - misses0
                rates[mode] = hits / (hits + misses) if hits + misses else 0.0
                home = counter(gateway.url, "reranker_gateway_affinity_total", result="hit")
                spill = counter(gateway.url, "reranker_gateway_affinity_total", result="spill")
                print(f"{mode:12s}: {statuses}  cache hits {hits:.0f} misses {misses:.0f}  hit rate {rates[mode]:.3f}"
                      f"  (affinity picks: home {home:.0f}, spilled {spill:.0f})")
            finally:
                gateway.stop()
        best = (args.repeats - 1) / args.repeats
        print(f"hit rate with affinity {rates['affinity']:.3f} vs without {rates['no-affinity']:.3f}: "
              f"ratio {rates['affinity'] / max(rates['no-affinity'], 1e-9):.2f}x (best possible {best:.3f}; "
              f"{args.servers} servers)")
    finally:
        for s in servers:
            s.stop()


if __name__ == "__main__":
    main()

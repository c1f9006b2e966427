"""What the gateway adds: p50/p99 latency and throughput of small requests at a fixed 200 requests/s,
straight to a server process and through `reranker-gateway` to the same server, in the same run.

    .venv/bin/python bench/gateway_overhead.py [--rate 200] [--seconds 15]

Two workloads, each run direct, through the gateway, direct, through the gateway (alternating, so
drift of a shared machine falls on both): `cached` repeats a few bodies, so the server answers
from its score cache and its own time is small and steady (the gateway's cost stands out);
`scored` sends a new query with one document each time (the model runs: the realistic case). Target: <= 2 ms added
at p99 and no throughput lost. The load generator, the gateway and the server share the machine's
cores, so on a small machine the gateway's CPU is taken from the server. `--pin` puts the server on
half the cores and the gateway and load generator on the rest, as in a cluster where the gateway
has pods of its own; on a 2-core machine that leaves the server one core, which 200 scored
requests/s saturate (the load generator then sees connections reset), so it is for larger machines.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import workload as w  # noqa: E402
from gateway_workload import Gateway  # noqa: E402


def _tree(pid: int) -> list[int]:
    """`pid` and its threads (affinity is per thread on Linux)."""
    return [int(t) for t in os.listdir(f"/proc/{pid}/task")]


async def open_loop(url: str, sent: list[dict], *, rate: float) -> w.LoadResult:  # type: ignore[type-arg]
    """workload.open_loop, counting a connection error as status 0 instead of ending the run."""
    result = w.LoadResult()
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=1000)) as client:
        started = time.perf_counter()

        async def one(body: dict) -> None:  # type: ignore[type-arg]
            t0 = time.perf_counter()
            try:
                status = (await client.post("/v1/rerank", json=body)).status_code
            except httpx.HTTPError:
                status = 0
            result.statuses[status] = result.statuses.get(status, 0) + 1
            if status == 200:
                result.latencies.append(time.perf_counter() - t0)

        tasks = []
        for i, body in enumerate(sent):
            await asyncio.sleep(max(0.0, started + i / rate - time.perf_counter()))
            tasks.append(asyncio.create_task(one(body)))
        await asyncio.gather(*tasks)
        result.seconds = time.perf_counter() - started
    return result


def bodies(n: int, *, cached: bool, tag: str) -> list[dict]:  # type: ignore[type-arg]
    # scored: one document per request, so 200 requests/s stay within what one server on a shared
    # 2-core machine scores (at 3 it saturates, and both paths measure the queue instead)
    docs = w.texts(3 if cached else 1, tokens=(8, 16), seed=1, tag="doc")
    queries = [f"{tag} question {i % 8 if cached else i}" for i in range(n)]
    return [{"model": "bench", "query": q, "documents": docs} for q in queries]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--pin", action="store_true",
                        help="server on the first half of the cores, gateway and load generator on the rest")
    args = parser.parse_args()
    n = int(args.rate * args.seconds)
    server = w.Server({})
    gateway = Gateway([server.url])
    cores = sorted(os.sched_getaffinity(0))
    if args.pin and len(cores) >= 2:
        # As in a cluster, where the gateway runs in its own pods: its CPU is not taken from the server.
        half = len(cores) // 2
        for pid in _tree(server.proc.pid):
            os.sched_setaffinity(pid, cores[:half])
        for pid in [*_tree(gateway.proc.pid), os.getpid()]:
            os.sched_setaffinity(pid, cores[half:])
        print(f"pinned: server on cores {cores[:half]}, gateway and load generator on {cores[half:]}")
    try:
        for kind in ("cached", "scored"):
            results: dict[str, list[w.LoadResult]] = {"direct": [], "gateway": []}
            warm = bodies(16, cached=True, tag=kind)
            asyncio.run(open_loop(server.url, warm, rate=50))
            asyncio.run(open_loop(gateway.url, warm, rate=50))
            for round_ in range(2):
                for path, url in (("direct", server.url), ("gateway", gateway.url)):
                    sent = bodies(n, cached=kind == "cached", tag=f"{kind}-{path}-{round_}")
                    results[path].append(asyncio.run(open_loop(url, sent, rate=args.rate)))
            summary = {}
            for path, runs in results.items():
                latencies = [x for r in runs for x in r.latencies]
                ok = sum(len(r.latencies) for r in runs)
                statuses: dict[int, int] = {}
                for r in runs:
                    for code, count in r.statuses.items():
                        statuses[code] = statuses.get(code, 0) + count
                seconds = sum(r.seconds for r in runs)
                p50, p99 = (float(np.percentile(latencies, q)) * 1000 for q in (50, 99))
                summary[path] = (p50, p99, ok / seconds)
                print(f"{kind:6s} {path:7s}: {ok} ok of {sum(statuses.values())} {statuses} (0: connection error)  p50 {p50:.2f} ms  "
                      f"p99 {p99:.2f} ms  {ok / seconds:.1f} answers/s")
            (d50, d99, dput), (g50, g99, gput) = summary["direct"], summary["gateway"]
            print(f"{kind:6s} added by the gateway: p50 +{g50 - d50:.2f} ms, p99 +{g99 - d99:.2f} ms; "
                  f"throughput ratio gateway/direct = {gput / dput:.3f}  (target: p99 <= +2 ms, ratio >= 0.99)")
    finally:
        gateway.stop()
        server.stop()


if __name__ == "__main__":
    main()

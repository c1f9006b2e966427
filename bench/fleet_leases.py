"""Two loaded servers sharing one Redis: how many pairs the fleet computes twice.

    .venv/bin/python bench/fleet_leases.py [--source DIR] [--lease 1.0] [--clients 6]

Starts a real redis-server and two `reranker serve` processes (A and B) that share it, then sends
the same requests to both at once, each from `--clients` concurrent clients, so both queues are
long and both servers want the same pairs at the same time. A pair is meant to be computed by
one server only: the one holding its Redis lease; the other waits for its score. A lease that
lapses while its pair still waits in a long queue lets the second server compute it too.

Prints the unique pairs sent, the forwards on A and on B (`reranker_pairs_scored_total`), and
the pairs computed twice (A + B - unique), with the ratio to unique. `--source DIR` runs the
servers from another tree's `server/` folder (e.g. `git archive <commit> server | tar -x -C DIR`)
so a change is measured against its baseline with the same bench, on the same machine.
Leases are short (`--lease`, RERANKER_REDIS_LEASE_SECONDS) so that the queue outlasts them on a
small machine, as a 10 s lease is outlasted by a long queue in production.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import workload as w  # noqa: E402


async def both(a: str, b: str, bodies: list[dict], clients: int) -> tuple[w.LoadResult, w.LoadResult]:  # type: ignore[type-arg]
    got = await asyncio.gather(w.load(a, bodies, clients=clients, max_seconds=300),
                               w.load(b, bodies, clients=clients, max_seconds=300))
    return got[0], got[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=w.REPO / "server")
    parser.add_argument("--lease", type=float, default=1.0)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--documents", type=int, default=16)
    args = parser.parse_args()
    port = w.free_port()
    folder = tempfile.mkdtemp(prefix="bench-fleet-redis-")
    redis = subprocess.Popen([shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind",
                              "127.0.0.1", "--save", "", "--dir", folder],
                             stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    model = w.build_cross_encoder()
    env = {"RERANKER_MODEL": str(model), "RERANKER_RUNTIME": "torch", "RERANKER_QUANTIZATION": "none",
           "REDIS_ENABLED": "true", "REDIS_URL": f"redis://127.0.0.1:{port}/0",
           "RERANKER_REDIS_LEASE_SECONDS": str(args.lease), "RERANKER_BATCH_SIZE": "8", "MICRO_BATCH_WINDOW_MS": "0",
           # every request admitted: a 429 would shorten the queue this bench is about
           "RERANKER_QUEUE_TIMEOUT": "300"}
    a, b = w.Server(env, source=args.source, wait=False), w.Server(env, source=args.source, wait=False)
    try:
        a.wait_ready()
        b.wait_ready()
        docs = w.texts(args.requests * args.documents, tokens=(60, 80), seed=5)
        bodies = [{"query": f"query {i}", "documents": docs[i * args.documents:(i + 1) * args.documents]}
                  for i in range(args.requests)]
        unique = args.requests * args.documents
        before_a, before_b = a.scored(), b.scored()  # the warm-up's forwards
        started = time.perf_counter()
        res_a, res_b = asyncio.run(both(a.url, b.url, bodies, args.clients))
        took = time.perf_counter() - started
        scored_a, scored_b = a.scored() - before_a, b.scored() - before_b
        twice = scored_a + scored_b - unique
        print(f"source {args.source}; lease {args.lease:g}s, {args.clients} clients per server, {args.requests} "
              f"requests x {args.documents} documents to each server")
        print(f"statuses A {res_a.statuses} B {res_b.statuses}; {took:.1f}s; p99 A {res_a.pct(99):.0f} ms "
              f"B {res_b.pct(99):.0f} ms")
        print(f"unique pairs {unique}; forwards A {scored_a:.0f}, B {scored_b:.0f}; computed twice {twice:.0f} "
              f"({twice / unique:.3f} of unique)")
    finally:
        a.stop()
        b.stop()
        redis.kill()
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

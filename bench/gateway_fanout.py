"""Fan-out: one request of 1,000 documents answered by 3 server processes through the gateway,
against the same request sent to 1 server process, in the same run (score caches off, so every
repeat is scored again).

    .venv/bin/python bench/gateway_fanout.py [--documents 1000] [--servers 3] [--repeats 5]

Three timings, median of `repeats` each: one server direct; the gateway over that one server (no
split possible: what a 1,000-document body costs the gateway); the gateway over all servers,
splitting above 256 documents. The ratio is direct-to-one / through-the-gateway-to-all.

What the ratio can be depends on cores: fan-out turns idle replicas into parallel work. Where each
pod has its own cores the ideal is ~N x; on a machine with C cores shared by every process, no
split beats C x, and a single server already spreads one request's forward passes over its intra-op
threads, so the gain here is bounded by what one server leaves idle (the machine's core count is
printed with the result).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
import workload as w  # noqa: E402
from gateway_workload import Gateway  # noqa: E402

NO_CACHE = {"ENABLE_PREDICTION_CACHE": "false"}


def timed(url: str, body: dict, repeats: int) -> float:  # type: ignore[type-arg]
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        r = httpx.post(url + "/v1/rerank", json={**body, "query": f"{body['query']} {i}"}, timeout=600)
        times.append(time.perf_counter() - t0)
        assert r.status_code == 200, r.text
        assert len(r.json()["results"]) == body.get("top_n", len(body["documents"]))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--documents", type=int, default=1000)
    parser.add_argument("--servers", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    servers = [w.Server(NO_CACHE, wait=False) for _ in range(args.servers)]
    for s in servers:
        s.wait_ready()
    one = Gateway([servers[0].url])
    fan = Gateway([s.url for s in servers], env={"RERANKER_GATEWAY_FANOUT_THRESHOLD": "256",
                                                 "RERANKER_GATEWAY_FANOUT_MAX_WIDTH": str(args.servers)})
    try:
        body = {"model": "bench", "query": "which document is about ranking?", "top_n": 10,
                "documents": w.texts(args.documents, tokens=(40, 60), seed=4, tag="doc")}
        timed(servers[0].url, body, 1)  # warm every path once
        timed(fan.url, body, 1)
        direct = timed(servers[0].url, body, args.repeats)
        via_one = timed(one.url, body, args.repeats)
        via_all = timed(fan.url, body, args.repeats)
        print(f"{args.documents} documents, median of {args.repeats}, {os.cpu_count()} CPU cores on this machine:")
        print(f"  1 server direct            : {direct * 1000:8.0f} ms")
        print(f"  gateway -> 1 server        : {via_one * 1000:8.0f} ms  (ratio to direct {via_one / direct:.3f})")
        print(f"  gateway -> {args.servers} servers (split): {via_all * 1000:8.0f} ms")
        print(f"fan-out speedup: {direct / via_all:.2f}x over one server ({args.servers} servers, "
              f"{os.cpu_count()} cores shared by all of them)")
    finally:
        one.stop()
        fan.stop()
        for s in servers:
            s.stop()


if __name__ == "__main__":
    main()

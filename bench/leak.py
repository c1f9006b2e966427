"""Memory of an idle server before and after many timed-out and disconnected requests.

A request that times out in the queue, or whose client goes away, drops its pairs; nothing of
it may stay behind. This starts `python -m reranker serve` (embedded MiniLM, cache off so that
every request's pairs become jobs, a 0.1 s queue timeout so that queued requests time out), warms
it up with one round of the same traffic, then measures the server's RSS while idle, sends
--requests more (half read their answer: 200, 429 or 503 after the queue timeout; half close the
connection right after sending), waits for the server to go idle, and measures again. It prints
RSS before and after (MB), their ratio, the jobs the idle server still holds (/health
`controller.jobs_held`, which must be 0), and the statuses seen.

    .venv/bin/python bench/leak.py                  # 10,000 requests, a few minutes on 2 cores
    .venv/bin/python bench/leak.py --requests 2000  # quicker
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

WORDS = "apple river data model kernel queue cache python paris token server batch query night fast".split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def body(rng: random.Random, i: int) -> bytes:
    docs = [f"{i} {k} " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40))) for k in range(rng.randint(4, 16))]
    payload = json.dumps({"query": f"query {i} " + rng.choice(WORDS), "documents": docs}).encode()
    return (b"POST /rerank HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\nConnection: close\r\n"
            + f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)


async def one(port: int, raw: bytes, disconnect: bool, statuses: collections.Counter[str]) -> None:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(raw)
        await writer.drain()
        if disconnect:
            await asyncio.sleep(0.005)  # the server has the request; the client goes away
            statuses["disconnected"] += 1
        else:
            line = await asyncio.wait_for(reader.readline(), 60)
            statuses[line.split(b" ")[1].decode() if line else "no answer"] += 1
        writer.close()
    except (OSError, asyncio.TimeoutError) as exc:
        statuses[exc.__class__.__name__] += 1


async def traffic(port: int, n: int, seed: int, concurrency: int = 64) -> collections.Counter[str]:
    rng = random.Random(seed)
    statuses: collections.Counter[str] = collections.Counter()
    slots = asyncio.Semaphore(concurrency)

    async def bounded(i: int) -> None:
        async with slots:
            await one(port, body(rng, seed * 1_000_000 + i), i % 2 == 1, statuses)

    await asyncio.gather(*(bounded(i) for i in range(n)))
    return statuses


def health(url: str) -> dict:  # type: ignore[type-arg]
    return httpx.get(url + "/health", timeout=10).json()


def wait_idle(url: str, timeout: float = 120) -> dict:  # type: ignore[type-arg]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        controller = health(url)["controller"]
        if not controller["waiting"] and not controller["active"] and not controller["inflight_requests"]:
            time.sleep(1.0)  # background work (cache fills, callbacks) settles
            return health(url)["controller"]
        time.sleep(0.2)
    raise SystemExit("the server did not go idle")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=10_000)
    args = parser.parse_args()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "HOST": "127.0.0.1", "PORT": str(port), "LOG_LEVEL": "WARNING", "ENABLE_PREDICTION_CACHE": "false",
           "RERANKER_QUEUE_TIMEOUT": "0.1", "RERANKER_BATCH_SIZE": "8", "MICRO_BATCH_WINDOW_MS": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "reranker", "serve"], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(url + "/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit("the server did not start")
            time.sleep(0.2)
        warm = asyncio.run(traffic(port, max(500, args.requests // 10), seed=1))
        wait_idle(url)
        before = rss_mb(proc.pid)
        started = time.monotonic()
        statuses = asyncio.run(traffic(port, args.requests, seed=2))
        sent_s = time.monotonic() - started
        controller = wait_idle(url)
        after = rss_mb(proc.pid)
        print(f"warm-up: {sum(warm.values())} requests {dict(warm)}")
        print(f"measured: {args.requests} requests in {sent_s:.0f}s: {dict(statuses)}")
        print(f"idle RSS before {before:.1f} MB, after {after:.1f} MB, ratio {after / before:.3f}")
        held = controller.get("jobs_held", "not reported")
        print(f"jobs held by the idle server: {held}; queued pairs: {controller['waiting']}")
        return 0 if held == 0 else 1
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


if __name__ == "__main__":
    sys.exit(main())

"""The fleet cache: cross-server hits next to local hits and cold requests, same run.

    .venv/bin/python bench/redis_cache.py

Starts a real redis-server and two `reranker serve` processes sharing it. For the same
workload (requests of 20 documents), it measures request latency and pairs/s when:
  cold   - server A computes every pair (nothing cached anywhere)
  redis  - server B answers pairs A computed (fleet tier hit: one MGET round trip)
  local  - server A answers them again (local tier hit)
and prints each as a ratio to cold.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import workload as w  # noqa: E402

import httpx  # noqa: E402


def main() -> int:
    port = w.free_port()
    folder = tempfile.mkdtemp(prefix="bench-redis-")
    redis = subprocess.Popen([shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind", "127.0.0.1",
                              "--save", "", "--dir", folder], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    time.sleep(0.5)
    model = w.build_cross_encoder()
    env = {"RERANKER_MODEL": str(model), "REDIS_ENABLED": "true", "REDIS_URL": f"redis://127.0.0.1:{port}/0"}
    a, b = w.Server(env), w.Server(env)
    try:
        docs = w.texts(16 * 20, tokens=(60, 80), seed=3)
        bodies = [{"query": f"query {i}", "documents": docs[i * 20:(i + 1) * 20]} for i in range(16)]
        cold = asyncio.run(w.load(a.url, bodies, clients=4, max_seconds=120))
        time.sleep(0.5)
        fleet = asyncio.run(w.load(b.url, bodies, clients=4, max_seconds=60))
        local = asyncio.run(w.load(a.url, bodies, clients=4, max_seconds=60))
        scored_b = httpx.get(b.url + "/metrics", headers={"accept": "application/json"}).json()["pairs_scored"]
        for name, res in (("cold (model)", cold), ("redis hit (other server)", fleet), ("local hit", local)):
            print(f"{name:<28} {res.pairs_per_s:10.1f} pairs/s  p50 {res.pct(50):8.2f} ms  p99 {res.pct(99):8.2f} ms  "
                  f"x{res.pairs_per_s / cold.pairs_per_s:8.1f} of cold")
        print(f"server B model forwards during its run: {scored_b} (0 means every pair came from the fleet cache)")
    finally:
        a.stop()
        b.stop()
        redis.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())

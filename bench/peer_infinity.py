"""The peer: Infinity (infinity-emb) against this server, same model folder, dtype, workload, same run.

    python3 -m venv /tmp/infvenv && /tmp/infvenv/bin/pip install 'infinity-emb[server,torch]'
    .venv/bin/python bench/peer_infinity.py --infinity /tmp/infvenv/bin/infinity_emb

Infinity runs in its own virtual environment (its pins differ from ours), serving the saved
MiniLM-sized cross-encoder folder in fp32 on the CPU with batch size 32; this server serves the
same folder with the same batch size. Both get the same 20-document requests from 16 concurrent
clients (on /rerank, which both speak), one server at a time; the ratio is pairs/s ours / theirs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
import run  # noqa: E402
import workload as w  # noqa: E402


def start_infinity(binary: str, model: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = w.free_port()
    log = open(tempfile.mktemp(prefix="bench-infinity-", suffix=".log"), "wb")
    proc = subprocess.Popen([binary, "v2", "--model-id", str(model), "--port", str(port), "--host", "127.0.0.1",
                             "--engine", "torch", "--device", "cpu", "--dtype", "float32", "--batch-size", "32",
                             "--no-bettertransformer"], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "INFINITY_ANONYMOUS_USAGE_STATS": "0", "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"infinity exited; see {log.name}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"infinity not ready; see {log.name}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--infinity", required=True, help="path to the infinity_emb console script of its venv")
    parser.add_argument("--requests", type=int, default=48)
    args = parser.parse_args()
    model = w.build_cross_encoder()
    results = {}
    for name in ("reranker", "infinity", "reranker-again"):
        bodies = run.bodies(args.requests, seed=900 + len(results))
        if name.startswith("reranker"):
            server = w.Server({"RERANKER_MODEL": str(model), "ENABLE_PREDICTION_CACHE": "false",
                               "RERANKER_BATCH_SIZE": "32", "RERANKER_MAX_QUEUE": "100000", "RERANKER_QUEUE_TIMEOUT": "300"})
            url, stop = server.url, server.stop
        else:
            proc, url = start_infinity(args.infinity, model)
            stop = proc.terminate
        try:
            asyncio.run(w.load(url, run.bodies(2, seed=1), clients=2, max_seconds=60))  # warm
            res = asyncio.run(w.load(url, bodies, clients=16, max_seconds=300))
        finally:
            stop()
        results[name] = res
        print(f"{name:<16} {res.pairs_per_s:8.1f} pairs/s  p50 {res.pct(50):8.0f} ms  p99 {res.pct(99):8.0f} ms  "
              f"statuses {res.statuses}", flush=True)
    ours = (results["reranker"].pairs_per_s + results["reranker-again"].pairs_per_s) / 2
    print(f"ratio reranker/infinity = {ours / results['infinity'].pairs_per_s:.2f} (reranker: mean of the runs before and after)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

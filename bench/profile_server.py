"""Where the server's time goes at 16 clients: py-spy samples of a real server under load.

    .venv/bin/python bench/profile_server.py [--seconds 30] [--stacks stacks.txt]

Starts `reranker serve` at its defaults (RERANKER_RUNTIME=auto, RERANKER_QUANTIZATION=auto) on the
MiniLM-sized cross-encoder of workload.py, drives it with 16 concurrent clients sending 20-document
requests, and samples every thread of the server with py-spy (non-blocking, native frames off)
for --seconds. Samples are then put in buckets by the innermost part of the server they are in,
and printed as shares of all samples of busy threads (py-spy leaves idle threads out):

  forward        the model's forward pass (OpenVINO infer request, or torch)
  collate        padding a batch into arrays
  tokenize       the one tokenizer call per pair (tokenization.py encode)
  engine         batcher, ranker, cache, admission (the server's own Python)
  http           uvicorn, starlette/FastAPI, pydantic validation, JSON
  other          anything else (asyncio's loop, logging, ...)
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import run  # noqa: E402
import workload as w  # noqa: E402

#: bucket -> substrings of a frame ("function (path:line)"); the first bucket with a frame in a stack wins.
BUCKETS: list[tuple[str, tuple[str, ...]]] = [
    ("forward", ("backends/openvino.py:", "openvino/", "torch/nn/", "backends/torch.py:")),
    ("collate", ("collate",)),  # before tokenize: collate lives in tokenization.py
    ("tokenize", ("tokenization.py", "tokenizers/", "tokenization_utils")),
    ("engine", ("reranker/batcher.py", "reranker/ranker.py", "reranker/cache.py", "reranker/admission.py",
                "reranker/chunking.py")),
    ("http", ("uvicorn/", "starlette/", "fastapi/", "pydantic", "json", "h11", "httptools", "reranker/routes.py",
              "reranker/app.py", "reranker/schemas.py")),
]


def bucket_of(stack: str) -> str:
    frames = stack.split(";")
    for name, needles in BUCKETS:
        if any(needle in frame for frame in frames for needle in needles):
            return name
    return "other"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=30)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--model", type=Path, help="a saved cross-encoder folder (default: build workload.py's)")
    parser.add_argument("--stacks", type=Path, help="also keep the collapsed stacks here (flamegraph.pl input)")
    args = parser.parse_args()
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    model = args.model or w.build_cross_encoder()
    server = w.Server({"RERANKER_MODEL": str(model), "ENABLE_PREDICTION_CACHE": "false", "RERANKER_BATCH_SIZE": "32",
                       "RERANKER_MAX_QUEUE": "100000", "RERANKER_QUEUE_TIMEOUT": "600"})
    raw = Path(tempfile.mktemp(prefix="profile-", suffix=".txt"))
    try:
        import httpx

        info = httpx.get(server.url + "/health", timeout=10).json()["model"]
        print(f"# server: {info['backend']} {info['dtype']} ({info['precision']}); {args.clients} clients, "
              f"20-document requests, {args.seconds} s of samples")
        asyncio.run(w.load(server.url, run.bodies(2, seed=1), clients=2, max_seconds=60))  # warm
        # Enough requests to outlast the sampling; the load stops when the sampling does.
        bodies = run.bodies(args.clients * 40, seed=321)
        result: dict[str, w.LoadResult] = {}
        loader = threading.Thread(target=lambda: result.setdefault(
            "load", asyncio.run(w.load(server.url, bodies, clients=args.clients, max_seconds=args.seconds + 5))))
        loader.start()
        subprocess.run([spy, "record", "--pid", str(server.proc.pid), "--duration", str(args.seconds), "--rate", "50",
                        "--nonblocking", "--format", "raw", "--output", str(raw)], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        loader.join()
        load = result["load"]
        print(f"# load: {load.pairs_per_s:.1f} pairs/s, p50 {load.pct(50):.0f} ms, p99 {load.pct(99):.0f} ms")
    finally:
        server.stop()
    counts: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack:
            continue
        counts[bucket_of(stack)] += int(n)
        total += int(n)
    print("\n| where | share of busy samples |\n|---|---|")
    for name, _ in BUCKETS + [("other", ())]:
        print(f"| {name} | {100 * counts[name] / max(total, 1):.1f}% |")
    print(f"\n{total} samples")
    if args.stacks:
        args.stacks.write_text(raw.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())

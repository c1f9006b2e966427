"""Shared piece of the gateway benches: `reranker-gateway` in a subprocess over a static fleet of
real server processes (bench/workload.py's Server), and reading counters off /metrics."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
import workload as w  # noqa: E402


class Gateway:
    def __init__(self, urls: list[str], *, env: dict[str, str] | None = None, model: str = "bench") -> None:
        self.port = w.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        fleets = [{"name": model, "served_names": [model],
                   "endpoints": [{"url": u, "name": f"pod-{i}"} for i, u in enumerate(urls)]}]
        self.log = open(tempfile.mktemp(prefix="bench-gateway-", suffix=".log"), "wb")
        full = {**os.environ, "RERANKER_GATEWAY_HOST": "127.0.0.1", "RERANKER_GATEWAY_PORT": str(self.port),
                "RERANKER_GATEWAY_DISCOVERY": "static", "RERANKER_GATEWAY_STATIC_FLEETS": json.dumps(fleets),
                "RERANKER_GATEWAY_LOG_LEVEL": "WARNING", **(env or {})}
        pythonpath = os.pathsep.join(filter(None, [str(w.REPO / "server"), full.get("PYTHONPATH")]))
        self.proc = subprocess.Popen([sys.executable, "-m", "reranker.gateway"], env={**full, "PYTHONPATH": pythonpath},
                                     stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError(f"gateway not ready; see {self.log.name}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def counter(url: str, name: str, **labels: str) -> float:
    """The sum of a Prometheus counter's samples (with these labels) at `url`/metrics."""
    total = 0.0
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        match = re.match(rf"^{name}(\{{[^}}]*\}})? ([0-9.e+-]+)$", line)
        if match and all(f'{k}="{v}"' in (match.group(1) or "") for k, v in labels.items()):
            total += float(match.group(2))
    return total

"""The gateway for tests: `reranker-gateway` in a subprocess over a static fleets file, with the
helpers to write that file from real server processes (tests/servers.py).

A module of its own (as servers.py) so tests under tests/gateway and tests/e2e can import it.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from servers import VENV_BIN, free_port, wait_ready

#: The served names of the gateway tests' two fleets (tests/gateway/conftest.py starts their servers).
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
TINY = "tiny-bert"


def fleet(name: str, served_names: Sequence[str], urls: Sequence[str], **extra: Any) -> dict[str, Any]:
    return {"name": name, "namespace": "default", "served_names": list(served_names),
            "endpoints": [{"url": u, "name": f"{name}-{i}"} for i, u in enumerate(urls)], **extra}


class GatewayProcess:
    """`reranker-gateway` on a free loopback port, its fleets in `folder/fleets.json` (re-read on change)."""

    def __init__(self, folder: Path, fleets: list[dict[str, Any]], env: dict[str, str] | None = None) -> None:
        self.folder = folder
        self.fleets_file = folder / f"fleets-{id(self)}.json"
        self.write(fleets)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = folder / f"gateway-{self.port}.log"
        full_env = {**os.environ, "RERANKER_GATEWAY_HOST": "127.0.0.1", "RERANKER_GATEWAY_PORT": str(self.port),
                    "RERANKER_GATEWAY_DISCOVERY": "static", "RERANKER_GATEWAY_STATIC_FLEETS": str(self.fleets_file),
                    "RERANKER_GATEWAY_STATIC_RELOAD_SECONDS": "0.2", **(env or {})}
        self.proc = subprocess.Popen([str(VENV_BIN / "reranker-gateway")], env=full_env, stdout=self.log.open("wb"),
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.wait_ready()

    def write(self, fleets: list[dict[str, Any]]) -> None:
        tmp = self.fleets_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(fleets))
        os.replace(tmp, self.fleets_file)  # atomic: the gateway never reads half a file

    def wait_ready(self, timeout: float = 30) -> None:
        wait_ready(self.proc, self.url, self.log, timeout=timeout, what="gateway")

    def metric(self, name: str, **labels: str) -> float:
        """The sum of `name`'s samples whose labels include `labels`."""
        from prometheus_client.parser import text_string_to_metric_families

        total = 0.0
        for family in text_string_to_metric_families(httpx.get(self.url + "/metrics", timeout=5).text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    total += sample.value
        return total

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

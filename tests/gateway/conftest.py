"""Real servers for the gateway tests: three MiniLM processes (one fleet) and one tiny-BERT process
(a second fleet, another model), started once for the package; and gateway processes over them.

Score caches are off on these servers: a fanned-out request must count the tokens one server
would, and a cache warmed by an earlier test would make a part count fewer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateways import TINY, GatewayProcess
from servers import ServerFactory, ServerProcess

NO_CACHE = {"ENABLE_PREDICTION_CACHE": "false"}


@pytest.fixture(scope="package")
def server_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerFactory]:
    factory = ServerFactory(tmp_path_factory.mktemp("gateway-servers"))
    yield factory
    factory.close()


@pytest.fixture(scope="package")
def minilm_servers(server_factory: ServerFactory) -> list[ServerProcess]:
    servers = [server_factory(NO_CACHE, wait=False) for _ in range(3)]
    for server in servers:
        server.wait_ready()
    return servers


@pytest.fixture(scope="package")
def tiny_server(server_factory: ServerFactory, tiny_bert: Path) -> ServerProcess:
    return server_factory({**NO_CACHE, "RERANKER_LOCAL_MODEL_PATH": str(tiny_bert), "RERANKER_MODEL": TINY,
                           "RERANKER_SERVED_MODEL_NAMES": f"{TINY},tiny"})


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Callable[..., GatewayProcess]]:
    """Start gateways over fleets (gateways.fleet dicts), stopped at the end of the test."""
    started: list[GatewayProcess] = []

    def start(fleets: list[dict[str, Any]], **env: str) -> GatewayProcess:
        process = GatewayProcess(tmp_path, fleets, {f"RERANKER_GATEWAY_{k.upper()}": v for k, v in env.items()})
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()

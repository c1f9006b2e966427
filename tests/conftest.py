"""Shared fixtures: the models the tests build, servers to call, a real redis-server.

Helpers that test modules import live in `servers.py` (`running_app`, `ServerProcess`,
`free_port`), not here, so a test module can import them by a unique name. The development
cluster's fixtures (`kube_cluster`, `kube_namespace`, `node_cluster`) live in `kubecluster.py`
and are registered here for tests/kube and tests/e2e alike.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# The references the tests compare with are PyTorch fp32 (sentence-transformers), so servers the tests
# start default to that, here and in their subprocesses; the defaults a user gets (RERANKER_RUNTIME=auto,
# RERANKER_QUANTIZATION=auto: OpenVINO bf16 on a CPU with native bf16) are tested by name in
# tests/test_openvino_backend.py.
os.environ.setdefault("RERANKER_RUNTIME", "torch")
os.environ.setdefault("RERANKER_QUANTIZATION", "none")

sys.path.insert(0, str(Path(__file__).parent))
import models  # noqa: E402
from kubecluster import collection_finish, kube_cluster, kube_namespace, node_cluster  # noqa: E402,F401
from servers import ServerFactory, free_port  # noqa: E402
from stand_in_macs import MacNetwork, mac_network_namespace  # noqa: E402


def pytest_collection_finish(session: pytest.Session) -> None:
    collection_finish(session)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return models.build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_xlmr(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return models.build_tiny_xlmr(tmp_path_factory.mktemp("tiny-xlmr"))


@pytest.fixture(scope="session")
def tiny_llms(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Random causal LMs of the LLM-reranker families' architectures, by model_type."""
    root = tmp_path_factory.mktemp("tiny-llms")
    return {t: models.build_tiny_llm(root / t, model_type=t) for t in ("qwen3", "qwen2", "gemma", "gemma2")}


@pytest.fixture(scope="session")
def minilm() -> Path:
    return models.minilm_path()


@pytest.fixture
def uvicorn_server(tmp_path: Path) -> Iterator[ServerFactory]:
    factory = ServerFactory(tmp_path)
    yield factory
    factory.close()


@pytest.fixture(scope="module")
def module_server_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerFactory]:
    """Like uvicorn_server, shared by one test module (servers take seconds to start)."""
    factory = ServerFactory(tmp_path_factory.mktemp("servers"))
    yield factory
    factory.close()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator["object"]:
    """A real redis-server on a free loopback port (stopped at the end)."""
    from redis_fixture import RedisServer

    server = RedisServer(free_port(), tmp_path).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def mac_netns(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MacNetwork]:
    """The stand-in Macs' network namespace (tests/stand_in_macs.py), one per session."""
    with mac_network_namespace(tmp_path_factory.mktemp("mac-netns")) as network:
        yield network


@pytest.fixture
def mac_network(mac_netns: MacNetwork) -> Iterator[MacNetwork]:
    """The Macs' namespace for one test; the relays it started are stopped afterwards."""
    try:
        yield mac_netns
    finally:
        mac_netns.stop_relays()

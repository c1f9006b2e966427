"""The pod-health poller against a real `reranker serve` process on loopback.

The pods are described as the Kopf index holds them (`pod_address` of a Pod body); their IP is
127.0.0.1 and their `http` port the server's: there are no pods here, but the server answering
is the real one (tests/servers.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import httpx
import pytest
from servers import ServerFactory, ServerProcess, free_port

from reranker_operator import manifests, pod_health
from reranker_operator.pod_health import PodAddress, PodHealth, Poller


def pod(name: str, port: int, *, fleet: str = "fleet", ready: bool = True, ip: str = "127.0.0.1",
        uid: str | None = None, deleting: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": "ns", "uid": uid or f"uid-{name}",
                            "labels": manifests.labels(fleet),
                            "annotations": {manifests.ANNOTATION_CONFIG_HASH: "h1"}}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return {"metadata": meta,
            "spec": {"containers": [{"name": manifests.CONTAINER_NAME, "ports": [
                {"name": manifests.PORT_NAME, "containerPort": port}]}]},
            "status": {"podIP": ip, "conditions": [
                {"type": "Ready", "status": "True" if ready else "False"}]}}


def addresses(*pods: Mapping[str, Any]) -> list[PodAddress]:
    out = [pod_health.pod_address(p) for p in pods]
    return [a for a in out if a is not None]


@pytest.fixture(scope="module")
def server(module_server_factory: ServerFactory) -> ServerProcess:
    return module_server_factory()


def port_of(server: ServerProcess) -> int:
    return int(server.url.rsplit(":", 1)[1])


def test_pod_address_reads_the_index_facts() -> None:
    a = pod_health.pod_address(pod("p", 9000))
    assert a == PodAddress(namespace="ns", deployment="fleet", pod="p", uid="uid-p",
                           ip="127.0.0.1", port=9000, ready=True, config_hash="h1")
    assert a.url == "http://127.0.0.1:9000/health"
    v6 = pod_health.pod_address(pod("p", 9000, ip="fd00::5"))
    assert v6 is not None and v6.url == "http://[fd00::5]:9000/health"
    # Not Ready: unready, terminating, or no IP yet.
    assert not pod_health.pod_address(pod("p", 9000, ready=False)).ready  # type: ignore[union-attr]
    assert not pod_health.pod_address(
        pod("p", 9000, deleting=True)).ready  # type: ignore[union-attr]
    body = pod("p", 9000)
    del body["status"]["podIP"]
    assert not pod_health.pod_address(body).ready  # type: ignore[union-attr]
    # No port named http: the server's default port.
    body["spec"]["containers"][0]["ports"] = []
    assert pod_health.pod_address(body).port == 8000  # type: ignore[union-attr]
    # A pod of no fleet is not indexed.
    body["metadata"]["labels"] = {}
    assert pod_health.pod_address(body) is None


async def test_the_newest_answer_per_ready_pod(server: ServerProcess) -> None:
    clock = iter(range(100, 200))
    poller = Poller(timeout=2.0, clock=lambda: float(next(clock)))
    told: list[Mapping[tuple[str, str], tuple[PodHealth, ...]]] = []

    async def subscriber(view: Mapping[tuple[str, str], tuple[PodHealth, ...]]) -> None:
        told.append(view)
    poller.subscribe(subscriber)
    port = port_of(server)
    async with httpx.AsyncClient(timeout=2.0, trust_env=False) as client:
        await poller.tick(client, addresses(pod("a", port), pod("b", port, ready=False),
                                            pod("c", port, fleet="other")))
        (a,) = poller.latest("ns", "fleet")
        assert (a.namespace, a.deployment, a.pod, a.ip, a.at, a.config_hash) == (
            "ns", "fleet", "a", "127.0.0.1", 100.0, "h1")
        # The server's own /health answer (the model it serves, its precision).
        assert a.body["status"] == "healthy" and a.body["model"]["model"]
        assert [h.pod for h in poller.latest("ns", "other")] == ["c"]
        assert set(told[-1]) == {("ns", "fleet"), ("ns", "other")}

        # A second pass replaces the answer with a newer one.
        await poller.tick(client, addresses(pod("a", port), pod("c", port, fleet="other")))
        assert poller.latest("ns", "fleet")[0].at == 102.0

        # A failed poll (nothing listens there any more) keeps the newest answer.
        dead = free_port()
        await poller.tick(client, addresses(pod("a", port), pod("d", dead)))
        assert [(h.pod, h.at) for h in poller.latest("ns", "fleet")] == [("a", 104.0)]
        # The fleet whose last pod went is told once more, with no answer.
        assert poller.latest("ns", "other") == () and told[-1][("ns", "other")] == ()

        # Unready, then deleted: forgotten.
        await poller.tick(client, addresses(pod("a", port, ready=False)))
        assert poller.latest("ns", "fleet") == ()
        assert told[-1] == {("ns", "fleet"): ()}
        await poller.tick(client, [])
        assert told[-1] == {("ns", "fleet"): ()}
        await poller.tick(client, [])
        assert told[-1] == {}


async def test_a_pod_whose_ip_changed_loses_its_old_answer(server: ServerProcess) -> None:
    poller = Poller()
    port = port_of(server)
    async with httpx.AsyncClient(timeout=2.0, trust_env=False) as client:
        await poller.tick(client, addresses(pod("a", port)))
        assert poller.latest("ns", "fleet")
        # Same pod (uid), another address where nothing answers: the old answer was not its.
        await poller.tick(client, addresses(pod("a", free_port(), ip="127.0.0.2")))
        assert poller.latest("ns", "fleet") == ()


async def test_latest_reads_the_installed_poller(server: ServerProcess) -> None:
    poller = Poller()
    assert pod_health.latest("ns", "fleet") == ()  # no poller runs: nothing, not an error
    pod_health.install(poller)
    try:
        async with httpx.AsyncClient(timeout=2.0, trust_env=False) as client:
            await poller.tick(client, addresses(pod("a", port_of(server))))
        assert [h.pod for h in pod_health.latest("ns", "fleet")] == ["a"]
    finally:
        pod_health.install(None)


async def test_a_failing_subscriber_does_not_stop_the_polls(server: ServerProcess) -> None:
    poller = Poller()
    calls: list[int] = []

    async def broken(_view: Any) -> None:
        calls.append(1)
        raise RuntimeError("bug")

    async def fine(_view: Any) -> None:
        calls.append(2)
    poller.subscribe(broken)
    poller.subscribe(fine)
    async with httpx.AsyncClient(timeout=2.0, trust_env=False) as client:
        await poller.tick(client, addresses(pod("a", port_of(server))))
    assert calls == [1, 2] and poller.latest("ns", "fleet")

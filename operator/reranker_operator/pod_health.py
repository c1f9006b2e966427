"""The pod-health poller: one operator-wide task that reads every Ready server pod's GET /health.

A server pod knows things the Kubernetes API does not: which precision `auto` picked and the
record of that measurement (`model.precision_record`), how its start went (`startup`), when it
last answered a request (`activity`). The operator needs them to record one precision per fleet
(`fleet_precision`) and to tell an idle fleet from a busy one. So every `period` seconds this
task sends GET /health to each Ready pod of each RerankerDeployment (the pod's IP and its
container's `http` port, from a Kopf index of the server pods: no API reads), each bounded by
`timeout`, keeps the newest answer per pod, and forgets pods that are gone or no longer Ready.
Other modules read the answers with `latest(namespace, deployment)`; after each pass the
subscribers (`Poller.subscribe`) are told the answers of every fleet, so that a fleet whose
answers changed in a way they care about gets a reconciliation pass.

Why a task started by `@kopf.on.startup` and not a `@kopf.timer`/`@kopf.daemon` on each pod or
RerankerDeployment: Kopf puts a finalizer on every object that has a timer or daemon, and a
finalizer makes deletion wait for the operator (see `prober`, which runs the same way). A
failed poll (timeout, refused, not JSON) keeps the pod's previous answer: `PodHealth.at` says how
old it is.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import httpx

from reranker import contract
from reranker_operator import manifests

logger = logging.getLogger(__name__)

#: The Kopf index of the server pods' addresses (see handlers), keyed by (namespace, fleet).
POD_ADDRESSES_INDEX = "reranker_pod_addresses"
PERIOD_SECONDS = 5.0
TIMEOUT_SECONDS = 2.0
#: Concurrent requests (each bounded by the timeout): a pass over 200 pods takes ~1 timeout.
MAX_CONCURRENT = 64

FleetKey = tuple[str, str]  # (namespace, RerankerDeployment name)


@dataclasses.dataclass(frozen=True)
class PodHealth:
    """The newest /health answer of one Ready server pod."""

    namespace: str
    deployment: str
    pod: str
    ip: str
    body: Mapping[str, Any]
    at: float  # time.time() of the answer
    config_hash: str | None = None  # the pod's reranker.dev/config-hash: the spec it runs


@dataclasses.dataclass(frozen=True)
class PodAddress:
    """What the poller needs of a server pod (the Kopf index keeps only this)."""

    namespace: str
    deployment: str
    pod: str
    uid: str
    ip: str | None
    port: int
    ready: bool
    config_hash: str | None = None

    @property
    def url(self) -> str:
        host = self.ip or ""
        if ":" in host:  # IPv6
            host = f"[{host}]"
        return f"http://{host}:{self.port}{contract.ROUTE_HEALTH}"


def pod_address(pod: Mapping[str, Any]) -> PodAddress | None:
    """A server pod's address and readiness, or None for a pod of no fleet (no instance label).
    Ready means the kubelet's Ready condition and an IP, and not terminating."""
    meta = pod.get("metadata") or {}
    deployment = (meta.get("labels") or {}).get(manifests.LABEL_INSTANCE)
    if not deployment:
        return None
    status = pod.get("status") or {}
    ready = any(isinstance(c, Mapping) and c.get("type") == "Ready" and c.get("status") == "True"
                for c in status.get("conditions") or ())
    ip = status.get("podIP") or None
    if ip is not None:
        try:
            ip = str(ipaddress.ip_address(ip))
        except ValueError:
            ip = None
    return PodAddress(namespace=str(meta.get("namespace")), deployment=str(deployment),
                      pod=str(meta.get("name")), uid=str(meta.get("uid")), ip=ip,
                      port=_http_port(pod),
                      ready=ready and ip is not None and not meta.get("deletionTimestamp"),
                      config_hash=(meta.get("annotations") or {}).get(
                          manifests.ANNOTATION_CONFIG_HASH))


def _http_port(pod: Mapping[str, Any]) -> int:
    """The server container's `http` port (the operator renders contract.DEFAULT_PORT)."""
    for container in (pod.get("spec") or {}).get("containers") or ():
        if container.get("name") != manifests.CONTAINER_NAME:
            continue
        for port in container.get("ports") or ():
            if port.get("name") == manifests.PORT_NAME and port.get("containerPort"):
                return int(port["containerPort"])
    return contract.DEFAULT_PORT


Subscriber = Callable[[Mapping[FleetKey, tuple[PodHealth, ...]]], Awaitable[None]]


class Poller:
    """Holds the newest answer per pod (written by the event loop; `latest` may be read from
    the reconciler's worker threads)."""

    def __init__(self, *, period: float = PERIOD_SECONDS, timeout: float = TIMEOUT_SECONDS,
                 clock: Callable[[], float] = time.time) -> None:
        self.period, self.timeout = period, timeout
        self._clock = clock
        self._answers: dict[tuple[str, str, str], PodHealth] = {}  # (ns, fleet, pod uid)
        self._fleets: set[FleetKey] = set()
        self._subscribers: list[Subscriber] = []
        self._wake = asyncio.Event()

    def latest(self, namespace: str, deployment: str) -> tuple[PodHealth, ...]:
        """The newest answer of each Ready pod of the fleet, by pod name."""
        answers = tuple(self._answers.items())  # one step: the reconciler's threads read too
        return tuple(sorted((h for (ns, fleet, _), h in answers
                             if (ns, fleet) == (namespace, deployment)), key=lambda h: h.pod))

    def subscribe(self, subscriber: Subscriber) -> None:
        """`subscriber(answers by fleet)` after every pass (fleets with no answer included)."""
        self._subscribers.append(subscriber)

    def wake(self) -> None:
        """Poll now (a pod turned Ready): its answer need not wait for the period."""
        self._wake.set()

    async def run(self, index: Callable[[], Any], *,
                  transport: httpx.AsyncBaseTransport | None = None) -> None:
        """Forever: a pass, then sleep for the period or until woken. `index()` gives the Kopf
        index of the pods' addresses (`POD_ADDRESSES_INDEX`); `transport` is for tests."""
        limits = httpx.Limits(max_connections=MAX_CONCURRENT, max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=self.timeout, limits=limits, trust_env=False,
                                     transport=transport) as client:
            while True:
                self._wake.clear()
                await self.tick(client, _addresses(index()))
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout=self.period)
                except asyncio.TimeoutError:
                    pass

    async def tick(self, client: httpx.AsyncClient, pods: list[PodAddress]) -> None:
        """One pass: poll the Ready pods, forget the others, tell the subscribers."""
        ready = [p for p in pods if p.ready]
        answers = await asyncio.gather(*(self._get(client, p) for p in ready))
        wanted = {(p.namespace, p.deployment, p.uid): p for p in ready}
        for key in [k for k, h in self._answers.items()
                    if k not in wanted or h.ip != wanted[k].ip]:
            del self._answers[key]
        for pod, body in zip(ready, answers):
            if body is not None:
                self._answers[(pod.namespace, pod.deployment, pod.uid)] = PodHealth(
                    namespace=pod.namespace, deployment=pod.deployment, pod=pod.pod, ip=str(pod.ip),
                    body=body, at=self._clock(), config_hash=pod.config_hash)
        fleets = {(p.namespace, p.deployment) for p in pods} | self._fleets
        self._fleets = {(p.namespace, p.deployment) for p in pods}
        view = {key: self.latest(*key) for key in sorted(fleets)}
        for subscriber in self._subscribers:
            try:
                await subscriber(view)
            except Exception:  # noqa: BLE001 - one subscriber's bug must not stop the polls
                logger.exception("a pod-health subscriber failed")

    async def _get(self, client: httpx.AsyncClient, pod: PodAddress) -> Mapping[str, Any] | None:
        """The pod's /health body (a JSON object, whatever the status code: a failing server
        answers 503 with its reason), or None when it gave none."""
        try:
            response = await client.get(pod.url)
            body = response.json()
        except (httpx.HTTPError, ValueError) as e:
            logger.debug("GET %s (pod %s/%s): %s", pod.url, pod.namespace, pod.pod,
                         e.__class__.__name__)
            return None
        return body if isinstance(body, Mapping) else None


def _addresses(index: Any) -> list[PodAddress]:
    """Every PodAddress in a Kopf index (a mapping of keys to stores of values)."""
    if index is None:
        return []
    return [value for key in list(index) for value in list(index.get(key, ()))
            if isinstance(value, PodAddress)]


#: The running operator's poller (set by the startup handler), read through `latest`.
_installed: Poller | None = None


def install(poller: Poller | None) -> None:
    global _installed
    _installed = poller


def latest(namespace: str, deployment: str) -> tuple[PodHealth, ...]:
    """The newest /health answer of each Ready pod of a fleet (none before the first pass, or
    where no poller runs)."""
    return _installed.latest(namespace, deployment) if _installed is not None else ()

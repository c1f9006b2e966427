"""Where the gateway learns which fleets exist, which names they serve and which endpoints are ready.

The proxy never talks to Kubernetes itself: it asks a :class:`Directory`. Two implementations exist,
``kube.KubeDirectory`` (watches RerankerDeployments and their EndpointSlices, wakes a fleet through
the scale subresource) and ``static.StaticDirectory`` (a fixed list from settings, for tests, benches
and users without Kubernetes). Keeping this boundary small lets the routing, picking, fan-out and
hold logic be tested against real server processes without a cluster.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@dataclass(frozen=True)
class Endpoint:
    """One ready server a request can be sent to."""

    url: str  # "http://198.18.1.5:8000"
    name: str  # pod or Mac endpoint name (logs, metrics)


@dataclass(frozen=True)
class Fleet:
    """One RerankerDeployment as the gateway sees it."""

    namespace: str
    name: str  # the RerankerDeployment
    served_names: tuple[str, ...]  # status.servedNames: model id + aliases
    endpoints: tuple[Endpoint, ...]  # READY ones only (pods and Macs, from the fleet Service's EndpointSlices)
    replicas: int  # spec.replicas (0: scaled to zero)
    can_wake: bool  # spec.scaleToZero set: the gateway may ask for one replica


@runtime_checkable
class Directory(Protocol):
    """The fleets the gateway may route to, kept current by whatever watches them."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def fleets(self) -> tuple[Fleet, ...]: ...

    async def changed(self) -> None:
        """Return at the directory's next change (held requests wait on it)."""
        ...

    async def wake(self, fleet: Fleet) -> None:
        """Ask for one replica of ``fleet`` (idempotent)."""
        ...

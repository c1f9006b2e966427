"""Holding requests for a fleet with no ready endpoint, while it wakes (Knative's activator).

A fleet scaled to zero (or whose pods are all restarting) has nowhere to send a request. Rather
than fail, the gateway holds it: asks the directory for one replica (if the fleet may be woken),
waits for the directory's next change, and forwards once an endpoint is ready. As in Knative's
activator, the hold is bounded in time (RERANKER_GATEWAY_HOLD_TIMEOUT_SECONDS, then 503 with
Retry-After) and in number (RERANKER_GATEWAY_MAX_HELD_REQUESTS, then 429), and a burst wakes the
fleet once: wake requests are spaced, and the directory's wake is idempotent anyway.
"""

from __future__ import annotations

import asyncio
import logging
import time

from .directory import Directory, Fleet
from .errors import FleetUnavailable, HoldFull
from .metrics import GatewayMetrics
from .routing import Router

log = logging.getLogger("reranker.gateway.hold")

#: Seconds between wake requests for one fleet while requests are held for it.
WAKE_EVERY = 10.0
#: Longest wait on the directory before looking again (a change may land between look and wait).
_LOOK_EVERY = 1.0


class Holds:
    def __init__(self, directory: Directory, router: Router, metrics: GatewayMetrics, *, timeout: float,
                 limit: int) -> None:
        self.directory, self.router, self.metrics = directory, router, metrics
        self.timeout, self.limit = timeout, limit
        self.held = 0
        self._woken: dict[tuple[str, str], float] = {}

    async def _wake(self, fleet: Fleet) -> None:
        key = (fleet.namespace, fleet.name)
        now = time.monotonic()
        if now - self._woken.get(key, -WAKE_EVERY) < WAKE_EVERY:
            return
        self._woken[key] = now
        self.metrics.wakes.labels(model=fleet.served_names[0] if fleet.served_names else fleet.name).inc()
        try:
            await self.directory.wake(fleet)
        except Exception:  # noqa: BLE001  the hold goes on: the fleet may come back by itself
            log.exception("waking fleet %s/%s failed", fleet.namespace, fleet.name)

    async def ready(self, fleet: Fleet) -> Fleet:
        """`fleet` with at least one ready endpoint, waiting for one if needed."""
        if fleet.endpoints:
            return fleet
        if self.held >= self.limit:
            raise HoldFull(f"{self.held} requests already wait for fleets to wake "
                           f"(RERANKER_GATEWAY_MAX_HELD_REQUESTS={self.limit})", retry_after=1)
        model = fleet.served_names[0] if fleet.served_names else fleet.name
        started = time.monotonic()
        deadline = started + self.timeout
        self.held += 1
        self.metrics.held.set(self.held)
        try:
            while True:
                current = self.router.current(fleet) or fleet
                if current.endpoints:
                    return current
                if current.can_wake and current.replicas == 0:  # pods on their way need no wake
                    await self._wake(current)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise FleetUnavailable(
                        f"fleet {fleet.namespace}/{fleet.name} has no ready endpoint after "
                        f"{self.timeout:g}s (RERANKER_GATEWAY_HOLD_TIMEOUT_SECONDS)", retry_after=5)
                try:
                    await asyncio.wait_for(self.directory.changed(), timeout=min(remaining, _LOOK_EVERY))
                except TimeoutError:
                    pass
        finally:
            self.held -= 1
            self.metrics.held.set(self.held)
            self.metrics.hold.labels(model=model).observe(time.monotonic() - started)

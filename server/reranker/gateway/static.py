"""StaticDirectory: fleets from a JSON list (settings or a file), for users without Kubernetes,
tests and benches.

Given a file path, the directory re-reads it when it changes, so a script (or a person) can add an
endpoint, and requests held for that fleet go through: the same hold-and-forward path a fleet
woken from zero takes under Kubernetes. `wake` cannot start anything here; it is logged, and the
request waits for the file to list an endpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from pathlib import Path
from typing import Any

from .directory import Endpoint, Fleet

log = logging.getLogger("reranker.gateway.static")


def parse_fleets(text: str) -> tuple[Fleet, ...]:
    """Fleets from their JSON description (RERANKER_GATEWAY_STATIC_FLEETS); ValueError naming what is wrong."""
    try:
        items = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"RERANKER_GATEWAY_STATIC_FLEETS is not JSON: {exc}") from None
    if not isinstance(items, list):
        raise ValueError("RERANKER_GATEWAY_STATIC_FLEETS must be a JSON list of fleets")
    fleets = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise ValueError(f"RERANKER_GATEWAY_STATIC_FLEETS[{i}]: an object with a `name`")
        names = item.get("served_names") or [item["name"]]
        endpoints = []
        for j, ep in enumerate(item.get("endpoints") or []):
            url, name = (ep, None) if isinstance(ep, str) else (ep.get("url"), ep.get("name"))
            if not isinstance(url, str) or not url.startswith(("http://", "https://")):
                raise ValueError(f"RERANKER_GATEWAY_STATIC_FLEETS[{i}].endpoints[{j}]: an http(s) URL")
            endpoints.append(Endpoint(url=url.rstrip("/"), name=name or url.split("://", 1)[1].rstrip("/")))
        fleets.append(Fleet(namespace=str(item.get("namespace", "")), name=item["name"],
                            served_names=tuple(str(n) for n in names), endpoints=tuple(endpoints),
                            replicas=int(item.get("replicas", len(endpoints))), can_wake=bool(item.get("can_wake", False))))
    return tuple(fleets)


class StaticDirectory:
    """A Directory over a fixed list, or over a JSON file re-read when its modification time changes."""

    def __init__(self, source: str, *, reload_seconds: float = 1.0) -> None:
        text = source.strip()
        self._path = None if text.startswith("[") else Path(text)
        self._reload_seconds = reload_seconds
        self._mtime: float | None = None
        self._fleets: tuple[Fleet, ...] = () if self._path else parse_fleets(text)
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.wakes: list[str] = []  # fleets asked to wake (nothing can wake them here)
        if self._path:
            self._reload()

    def _reload(self) -> bool:
        assert self._path is not None
        try:
            mtime = self._path.stat().st_mtime
            if mtime == self._mtime:
                return False
            fleets = parse_fleets(self._path.read_text())
        except (OSError, ValueError) as exc:
            log.error("static fleets file %s: %s (keeping the fleets read before)", self._path, exc)
            return False
        self._mtime = mtime
        if fleets == self._fleets:
            return False
        self._fleets = fleets
        return True

    def set_fleets(self, fleets: tuple[Fleet, ...]) -> None:
        """Replace the fleets (what a file change does) and wake whoever waits on `changed`."""
        self._fleets = fleets
        self._signal()

    def _signal(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._reload_seconds)
            if self._reload():
                log.info("static fleets file %s changed: %d fleets", self._path, len(self._fleets))
                self._signal()

    async def start(self) -> None:
        if self._path is not None and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._watch())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def fleets(self) -> tuple[Fleet, ...]:
        return self._fleets

    async def changed(self) -> None:
        await self._changed.wait()

    async def wake(self, fleet: Fleet) -> None:
        self.wakes.append(fleet.name)
        log.warning("fleet %s has no ready endpoint and a static directory cannot start one; waiting for "
                    "the fleets file to list one", fleet.name)


def describe(fleets: tuple[Fleet, ...]) -> list[dict[str, Any]]:
    """Fleets back as the JSON `parse_fleets` reads (for writing a fleets file)."""
    return [{"name": f.name, "namespace": f.namespace, "served_names": list(f.served_names),
             "endpoints": [{"url": e.url, "name": e.name} for e in f.endpoints], "replicas": f.replicas,
             "can_wake": f.can_wake} for f in fleets]

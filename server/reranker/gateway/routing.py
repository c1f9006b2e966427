"""Which fleet serves a model name: the names each fleet serves (its model id and aliases, from
the RerankerDeployment's status), a default fleet for requests that name none, and the list
`GET /v1/models` answers."""

from __future__ import annotations

import logging

from ..errors import ModelNotFound
from .directory import Directory, Fleet

log = logging.getLogger("reranker.gateway.routing")


class Router:
    def __init__(self, directory: Directory, *, default_model: str = "") -> None:
        self.directory = directory
        self.default_model = default_model
        self._seen: tuple[Fleet, ...] | None = None
        self._by_name: dict[str, Fleet] = {}

    def names(self) -> dict[str, Fleet]:
        """Every served name -> its fleet (the first fleet by namespace/name when two claim one)."""
        fleets = self.directory.fleets()
        if fleets is not self._seen:
            by_name: dict[str, Fleet] = {}
            for fleet in sorted(fleets, key=lambda f: (f.namespace, f.name)):
                for name in fleet.served_names:
                    if name in by_name and by_name[name] != fleet:
                        log.warning("model name %r is served by fleets %s/%s and %s/%s: routing to the first",
                                    name, by_name[name].namespace, by_name[name].name, fleet.namespace, fleet.name)
                        continue
                    by_name[name] = fleet
            self._seen, self._by_name = fleets, by_name
        return self._by_name

    def fleet(self, model: str | None) -> Fleet:
        """The fleet for `model`; ModelNotFound (404, listing what is served) if none serves it."""
        names = self.names()
        if model is None:
            if self.default_model:
                fleet = names.get(self.default_model)
                if fleet is not None:
                    return fleet
                raise ModelNotFound(f"model: none named, and the default {self.default_model!r} "
                                    f"(RERANKER_GATEWAY_DEFAULT_MODEL) is not served; served: {sorted(names)}")
            fleets = {(f.namespace, f.name): f for f in names.values()}
            if len(fleets) == 1:
                return next(iter(fleets.values()))
            raise ModelNotFound(f"model: none named and no default (RERANKER_GATEWAY_DEFAULT_MODEL); served: {sorted(names)}")
        fleet = names.get(model)
        if fleet is None:
            raise ModelNotFound(f"model: {model!r} is not served here; served: {sorted(names)}")
        return fleet

    def current(self, fleet: Fleet) -> Fleet | None:
        """The directory's newest view of `fleet` (None once it is gone)."""
        for candidate in self.directory.fleets():
            if (candidate.namespace, candidate.name) == (fleet.namespace, fleet.name):
                return candidate
        return None

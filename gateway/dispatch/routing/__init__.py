"""Picks the engine for a request: filter -> assign a route -> filter engines -> score -> pick.

1. Routes of the model with a usable engine (healthy, not already tried by this request;
   `healthy` includes the engine's circuit breaker, gateway/engines/breaker.py).
2. The model's assigner picks one route (version) among them (gateway/dispatch/routing/assign.py).
3. The configured plugins filter and score that route's engines (gateway/dispatch/routing/plugins.py);
   the highest total score wins, ties broken at random so equal engines share the load.
The router never branches on which plugins are configured. `assign` does steps 1-2 alone: the
scheduler (gateway/dispatch/scheduler.py) assigns a request's route when it arrives and has the engine
picked in that route, among the engines with room, once one has a free slot.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from gateway.core.request import ApiRequest
from gateway.dispatch.routing.assign import ASSIGNERS, Assigner
from gateway.dispatch.routing.plugins import FILTERS, SCORERS, AdapterAffinity, Filter, Scorer
from gateway.engines.breaker import BreakerState
from gateway.engines.pool import Engine, Pool
from gateway.settings import ModelSettings, RouteSettings, RoutingSettings


@dataclass(frozen=True, slots=True)
class Pick:
    engine: Engine
    route: RouteSettings
    scores: tuple[tuple[str, float], ...] = ()  # each scorer's score of the engine, when it was scored (traces)


class Router:
    def __init__(
        self,
        pool: Pool,
        models: tuple[ModelSettings, ...],
        routing: RoutingSettings | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._pool = pool
        self._rng = rng or random.Random()
        routing = routing or RoutingSettings()
        self._filters: list[Filter] = [
            AdapterAffinity(),
            *(FILTERS[n](routing) for n in routing.plugins if n in FILTERS),
        ]
        self._scorers: list[Scorer] = [SCORERS[n](routing) for n in routing.plugins if n in SCORERS]
        self._scorer_names = [n for n in routing.plugins if n in SCORERS]
        self._assigners: dict[str, Assigner] = {m.name: ASSIGNERS[m.assignment](self._rng) for m in models}
        self._configured: dict[str, tuple[RouteSettings, ...]] = {m.name: m.routes for m in models}
        self._overrides: dict[str, tuple[RouteSettings, ...]] = {}
        self.adapters: dict[str, str] = {}  # LoRA adapter -> its base model (gateway/adapters/)
        self.routes = dict(self._configured)

    @property
    def pool(self) -> Pool:
        return self._pool

    def apply_overrides(self, overrides: Mapping[str, tuple[RouteSettings, ...]]) -> None:
        """Routes changed at run time (admin API) replace the configured ones of those models."""
        self._overrides = {m: r for m, r in overrides.items() if m in self._configured}
        self._rebuild()

    def set_adapters(self, adapters: Mapping[str, str]) -> None:
        """The LoRA adapters served (name -> base model): each is a model whose routes are its
        base's, with the adapter's name as the upstream model (how vLLM selects an adapter)."""
        self.adapters = {a: b for a, b in adapters.items() if b in self._configured and a not in self._configured}
        self._rebuild()

    def _rebuild(self) -> None:
        routes = {**self._configured, **self._overrides}
        for adapter, base in self.adapters.items():
            routes[adapter] = tuple(replace(r, model=adapter, adapter=adapter) for r in routes[base])
            self._assigners[adapter] = self._assigners[base]
        self.routes = routes

    def configured(self, model: str) -> tuple[RouteSettings, ...]:
        return self._configured.get(model) or self.routes[model]

    def knows(self, model: str) -> bool:
        return model in self.routes

    def pick(
        self, request: ApiRequest, tried: frozenset[str] = frozenset(), route: RouteSettings | None = None
    ) -> Pick | None:
        """An engine for the request, none of `tried`: in `route` when the route was assigned
        already (see `assign`), else in a route assigned now."""
        if route is not None:
            found = self._usable(route, tried)
            return self._pick(request, found, route) if found else None
        usable: dict[str, list[Engine]] = {}
        routes: list[RouteSettings] = []
        for route in self.routes[request.model]:
            if route.weight <= 0:
                continue
            found = self._usable(route, tried)
            if found:
                usable[route.name] = found
                routes.append(route)
        if not routes:
            return None
        route = self._assigners[request.model].choose(request, routes)
        return self._pick(request, usable[route.name], route)

    def assign(self, request: ApiRequest, tried: frozenset[str] = frozenset()) -> RouteSettings | None:
        """Steps 1 and 2 alone: the route (version) for the request, among the routes with a
        usable engine; None when there is none. The engine is picked later, in that route."""
        routes = [r for r in self.routes[request.model] if r.weight > 0 and self._usable(r, tried)]
        if len(routes) < 2:  # nothing to choose between
            return routes[0] if routes else None
        return self._assigners[request.model].choose(request, routes)

    def members(self, route: RouteSettings) -> list[Engine]:
        """The engines a route names, as they are now (a `discover: dns` entry stands for the
        engines found under its name)."""
        pool = self._pool  # inline (not pool.members_of): a call less, on every pick
        engines = pool.engines
        return [e for entry in route.engines for name in pool.groups.get(entry, ()) if (e := engines.get(name))]

    def _usable(self, route: RouteSettings, tried: frozenset[str]) -> list[Engine]:
        return [e for e in self.members(route) if e.healthy and e.name not in tried]

    def _pick(self, request: ApiRequest, candidates: list[Engine], route: RouteSettings) -> Pick:
        pick = self._choose(request, candidates, route)
        if pick.engine.breaker.state is not BreakerState.CLOSED:
            self._pool.take_trial(pick.engine)  # half-open: this request is its one trial
        return pick

    def _choose(self, request: ApiRequest, candidates: list[Engine], route: RouteSettings) -> Pick:
        if len(candidates) == 1:
            return Pick(candidates[0], route)
        chosen: Sequence[Engine] = candidates
        for f in self._filters:
            chosen = f.filter(request, chosen) or chosen
            if len(chosen) == 1:
                return Pick(chosen[0], route)
        scored = [list(scorer.score(request, chosen)) for scorer in self._scorers]
        totals = [sum(column) for column in zip(*scored, strict=True)] if scored else [0.0] * len(chosen)
        best = max(totals)
        i = self._rng.choice([i for i, t in enumerate(totals) if t == best])
        return Pick(chosen[i], route, tuple((name, s[i]) for name, s in zip(self._scorer_names, scored, strict=True)))

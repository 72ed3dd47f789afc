"""Picks the engine for a request: a route by weight (canary splits), then the least-loaded engine.

Filter (healthy, not already tried) -> choose a route by weight among routes that still have an
engine -> score engines by load -> pick the lowest, ties broken at random so equal engines share.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass

from gateway.pool import Engine, Pool
from gateway.settings import ModelSettings, RouteSettings


@dataclass(frozen=True, slots=True)
class Pick:
    engine: Engine
    upstream_model: str


class Router:
    def __init__(self, pool: Pool, models: tuple[ModelSettings, ...], rng: random.Random | None = None) -> None:
        self._pool = pool
        self._rng = rng or random.Random()
        self._configured: dict[str, tuple[RouteSettings, ...]] = {m.name: m.routes for m in models}
        self.routes = dict(self._configured)

    def apply_overrides(self, overrides: Mapping[str, tuple[RouteSettings, ...]]) -> None:
        """Routes changed at run time (admin API) replace the configured ones of those models."""
        self.routes = {**self._configured, **{m: r for m, r in overrides.items() if m in self._configured}}

    def configured(self, model: str) -> tuple[RouteSettings, ...]:
        return self._configured[model]

    def knows(self, model: str) -> bool:
        return model in self.routes

    def pick(self, model: str, exclude: frozenset[str] = frozenset()) -> Pick | None:
        candidates: list[tuple[RouteSettings, list[Engine]]] = []
        engines = self._pool.engines
        for route in self.routes[model]:
            if route.weight <= 0:
                continue
            usable = [e for name in route.engines if (e := engines.get(name)) and e.healthy and name not in exclude]
            if usable:
                candidates.append((route, usable))
        if not candidates:
            return None
        route, usable = self._by_weight(candidates)
        best = min(e.load() for e in usable)
        engine = self._rng.choice([e for e in usable if e.load() == best])
        return Pick(engine, route.model)

    def _by_weight(self, candidates: list[tuple[RouteSettings, list[Engine]]]) -> tuple[RouteSettings, list[Engine]]:
        if len(candidates) == 1:
            return candidates[0]
        total = sum(route.weight for route, _ in candidates)
        point = self._rng.random() * total
        for route, usable in candidates:
            point -= route.weight
            if point < 0:
                return route, usable
        return candidates[-1]

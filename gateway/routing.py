"""Picks the engine for a request: a route by weight (canary splits), then an engine by load.

Filter (healthy, not already tried) -> choose a route by weight among routes that still have an
engine -> score engines by load -> pick the lowest, ties broken at random so equal engines share.
With prefix affinity, a request carrying a prefix key goes to the engine that rendezvous hashing
assigns that key (so the same system prompt or conversation lands where its KV prefix is
cached), unless that engine is busier than the least-loaded one by more than `max_imbalance`.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping
from dataclasses import dataclass

from gateway.pool import Engine, Pool
from gateway.settings import ModelSettings, RouteSettings, RoutingSettings


@dataclass(frozen=True, slots=True)
class Pick:
    engine: Engine
    upstream_model: str


class Router:
    def __init__(
        self,
        pool: Pool,
        models: tuple[ModelSettings, ...],
        rng: random.Random | None = None,
        routing: RoutingSettings | None = None,
    ) -> None:
        self._pool = pool
        self.routing = routing or RoutingSettings()
        self.affinity = self.routing.strategy == "prefix_affinity"
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

    def pick(self, model: str, exclude: frozenset[str] = frozenset(), prefix: bytes | None = None) -> Pick | None:
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
        if prefix is not None and len(usable) > 1:
            owner = max(usable, key=lambda e: _rendezvous(prefix, e.name))
            if owner.load() - best <= self.routing.max_imbalance:
                return Pick(owner, route.model)
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


def _rendezvous(key: bytes, engine: str) -> bytes:
    """Highest-random-weight hashing: adding or losing an engine moves only its own keys."""
    return hashlib.blake2b(key + b"\0" + engine.encode(), digest_size=8).digest()


def prefix_key(body: dict[str, object], chars: int) -> bytes | None:
    """The start of the prompt: system prompt and first turns for chat, the prompt text otherwise."""
    messages = body.get("messages")
    if isinstance(messages, list):
        parts: list[str] = []
        size = 0
        for m in messages:
            content = m.get("content") if isinstance(m, dict) else None
            text = content if isinstance(content, str) else str(content)
            parts.append(text)
            size += len(text)
            if size >= chars:
                break
        joined = "\x1e".join(parts)[:chars]
    else:
        prompt = body.get("prompt")
        joined = prompt[:chars] if isinstance(prompt, str) else ""
    return joined.encode() if joined else None

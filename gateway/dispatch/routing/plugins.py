"""The engine-choice plugins, chosen by name in the config (`routing.plugins`).

A plugin is a filter (narrows the candidate engines; never to nothing) or a scorer (a score in
[0, 1] per candidate; the router adds them up). Each is small and knows nothing of the others.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Protocol

from gateway.core.request import ApiRequest
from gateway.engines.pool import Engine
from gateway.settings import RoutingSettings


class Filter(Protocol):
    def filter(self, request: ApiRequest, engines: Sequence[Engine]) -> Sequence[Engine]: ...


class Scorer(Protocol):
    def score(self, request: ApiRequest, engines: Sequence[Engine]) -> list[float]: ...


class AdapterAffinity:
    """A request for a LoRA adapter goes to the engines that hold it, among those with room (the
    candidates); when none does, any engine may take it and the gateway loads it there first
    (gateway/adapters/placement.py). Always on; a base model's request is held by no engine's
    adapters, so it keeps every candidate."""

    def filter(self, request: ApiRequest, engines: Sequence[Engine]) -> Sequence[Engine]:
        model = request.model
        holders = [e for e in engines if model in e.adapters]
        return holders or engines


class LeastLoaded:
    """The fewer requests in flight there (ours plus the engine's own queue), the better."""

    def score(self, request: ApiRequest, engines: Sequence[Engine]) -> list[float]:
        loads = [e.load() for e in engines]
        low, high = min(loads), max(loads)
        if high == low:
            return [1.0] * len(loads)
        return [(high - load) / (high - low) for load in loads]


class KvCache:
    """The more free KV cache an engine reports, the better (long prompts fit without eviction)."""

    def score(self, request: ApiRequest, engines: Sequence[Engine]) -> list[float]:
        return [1.0 - min(1.0, max(0.0, e.kv_usage)) for e in engines]


class PrefixAffinity:
    """Requests whose prompts start alike (a system prompt, a conversation) go to the engine that
    rendezvous hashing assigns that prefix, where its KV prefix is cached, unless that engine is
    busier than the least-loaded one by more than `max_imbalance` requests."""

    def __init__(self, prefix_chars: int, max_imbalance: int) -> None:
        self._chars = prefix_chars
        self._max_imbalance = max_imbalance

    def filter(self, request: ApiRequest, engines: Sequence[Engine]) -> Sequence[Engine]:
        prefix = request.prefix(self._chars)
        if prefix is None:
            return engines
        owner = max(engines, key=lambda e: _rendezvous(prefix, e.name))
        if owner.load() - min(e.load() for e in engines) <= self._max_imbalance:
            return (owner,)
        return engines


def _rendezvous(key: bytes, engine: str) -> bytes:
    """Highest-random-weight hashing: adding or losing an engine moves only its own keys."""
    return hashlib.blake2b(key + b"\0" + engine.encode(), digest_size=8).digest()


FILTERS: dict[str, Callable[[RoutingSettings], Filter]] = {
    "prefix_affinity": lambda s: PrefixAffinity(s.prefix_chars, s.max_imbalance),
}
SCORERS: dict[str, Callable[[RoutingSettings], Scorer]] = {
    "least_loaded": lambda s: LeastLoaded(),
    "kv_cache": lambda s: KvCache(),
}

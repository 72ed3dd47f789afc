"""Route assignment: which version (route) of a model a request goes to, chosen per model in the
config (`assignment`). `weighted` draws at random by weight for every request (canary splits)."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Protocol

from gateway.request import ApiRequest
from gateway.settings import RouteSettings


class Assigner(Protocol):
    def choose(self, request: ApiRequest, routes: Sequence[RouteSettings]) -> RouteSettings:
        """`routes` are those that still have a usable engine, never empty."""
        ...


class Weighted:
    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def choose(self, request: ApiRequest, routes: Sequence[RouteSettings]) -> RouteSettings:
        if len(routes) == 1:
            return routes[0]
        point = self._rng.random() * sum(r.weight for r in routes)
        for route in routes:
            point -= route.weight
            if point < 0:
                return route
        return routes[-1]


ASSIGNERS: dict[str, Callable[[random.Random], Assigner]] = {
    "weighted": Weighted,
}

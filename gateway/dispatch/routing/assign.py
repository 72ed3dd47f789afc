"""Route assignment: which version (route) of a model a request goes to, chosen per model in the
config (`assignment`).

- `weighted` draws at random by weight for every request (canary splits).
- `sticky` hashes (subject, model) over the route weights, so one user sees one version for as
  long as the weights stand (A/B tests). It is weighted rendezvous hashing: each route scores
  `weight / -ln(u)`, `u` a uniform hash of (subject, model, route name) in (0, 1), and the highest
  score wins, which happens with probability weight / total. Moving weight from one route to
  another moves only subjects between those two, in proportion to the change (10/90 -> 20/80
  moves 10% of subjects); a route that is down (the assigner sees only usable routes) loses its
  subjects to the others by weight while everyone else stays put, and gets them back when it
  returns. A request with no subject (no `user` field and no API key) is assigned as `weighted`.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable, Sequence
from typing import Protocol

from gateway.core.request import ApiRequest
from gateway.settings import RouteSettings

_SCALE = 1.0 / 2**64


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


class Sticky:
    def __init__(self, rng: random.Random) -> None:
        self._anonymous = Weighted(rng)

    def choose(self, request: ApiRequest, routes: Sequence[RouteSettings]) -> RouteSettings:
        subject = request.subject
        if subject is None:
            return self._anonymous.choose(request, routes)
        if len(routes) == 1:
            return routes[0]
        key = f"{request.model}\0{subject}\0".encode()
        return max(routes, key=lambda route: sticky_score(key, route))


def sticky_score(key: bytes, route: RouteSettings) -> float:
    """The route's rendezvous score for a subject; the route name, not its position, enters the
    hash, so reordering or adding routes leaves the other routes' scores unchanged."""
    digest = hashlib.blake2b(key + route.name.encode(), digest_size=8).digest()
    u = (int.from_bytes(digest, "big") + 0.5) * _SCALE  # in (0, 1), never 0 or 1
    return route.weight / -math.log(u)


ASSIGNERS: dict[str, Callable[[random.Random], Assigner]] = {
    "weighted": Weighted,
    "sticky": Sticky,
}

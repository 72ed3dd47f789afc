"""`GET /ready` and `GET /ready?model=NAME`: readiness per model, not per engine.

A model is ready when an engine of one of its routes (weight > 0) is healthy, or is stopped (scale
to zero) and can be woken by the next request. The gateway is ready when one model is (a gateway
that can serve some models stays in its Service; probe `?model=` for one model); it is never ready
while it drains.
"""

from __future__ import annotations

from typing import Any

from gateway.core.errors import model_not_found
from gateway.proxy.context import Gateway


def model_ready(gw: Gateway, model: str) -> bool:
    engines = gw.pool.engines
    for route in gw.router.routes[model]:
        if route.weight > 0 and any((e := engines.get(n)) is not None and e.healthy for n in route.engines):
            return True
    return gw.control.wakeable(model)


def readiness(gw: Gateway, model: str | None = None) -> tuple[int, dict[str, Any]]:
    """The status code and body of /ready."""
    if model is not None and not gw.router.knows(model):
        raise model_not_found(model)
    names = [model] if model is not None else list(gw.router.routes)
    models = {name: model_ready(gw, name) for name in names}
    draining = gw.drain.draining
    ready = any(models.values()) and not draining
    engines = gw.pool.engines.values()
    body: dict[str, Any] = {
        "ready": ready,
        "models": models,
        "engines": {e.name: e.healthy for e in engines},
        "engine_states": {e.name: e.public_state for e in engines},
    }
    if draining:
        body["draining"] = True
    return (200 if ready else 503), body

"""`GET /ready` and `GET /ready?model=NAME`: readiness per model, not per engine.

A model is `ready` when an engine of one of its routes (weight > 0) is healthy, `cold` when none
is but one is stopped (scale to zero) or its `discover: dns` engines are scaled to zero, so the
next request waits for an engine rather than failing, and `unavailable` otherwise. Ready and cold
models count as ready (`models`); `model_states` tells them apart. The gateway is ready when one
model is (a gateway that can serve some models stays in its Service, and a gateway whose models
are all cold must stay in it too: its waiting requests are what scales the engines up; probe
`?model=` for one model); it is never ready while it drains.
"""

from __future__ import annotations

from typing import Any

from gateway.core.errors import model_not_found
from gateway.proxy.context import Gateway


def model_state(gw: Gateway, model: str) -> str:
    members = gw.router.members
    for route in gw.router.routes[model]:
        if route.weight > 0 and any(e.healthy for e in members(route)):
            return "ready"
    return "cold" if gw.control.wakeable(model) else "unavailable"


def model_ready(gw: Gateway, model: str) -> bool:
    return model_state(gw, model) != "unavailable"


def readiness(gw: Gateway, model: str | None = None) -> tuple[int, dict[str, Any]]:
    """The status code and body of /ready."""
    if model is not None and not gw.router.knows(model):
        raise model_not_found(model)
    names = [model] if model is not None else list(gw.router.routes)
    states = {name: model_state(gw, name) for name in names}
    models = {name: state != "unavailable" for name, state in states.items()}
    draining = gw.drain.draining
    ready = any(models.values()) and not draining
    engines = gw.pool.engines.values()
    body: dict[str, Any] = {
        "ready": ready,
        "models": models,
        "model_states": states,
        "engines": {e.name: e.healthy for e in engines},
        "engine_states": {e.name: e.public_state for e in engines},
    }
    if draining:
        body["draining"] = True
    return (200 if ready else 503), body

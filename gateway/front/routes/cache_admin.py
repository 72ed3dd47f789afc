"""`/admin/cache`: the response cache's figures (GET) and invalidation (POST `{"model": NAME}` for
one model, `{}` for every model). Works on every replica at once: the generations live in Redis."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.cache.store import CacheStore
from gateway.core.errors import invalid, model_not_found
from gateway.core.request import parse_json, read_body
from gateway.proxy.context import Gateway

MAX_BODY = 4096


def cache_admin_routes(gw: Gateway) -> list[Route]:
    if gw.redis is None:
        return []  # the other admin paths say why the admin API is off; this one is simply absent
    auth = gw.admin_auth
    c = gw.settings.cache
    store = (
        gw.cache.store
        if gw.cache is not None
        else CacheStore(gw.redis.clients.lean, gw.settings.redis.prefix, c.ttl, c.max_memory)
    )

    async def show(request: Request) -> Response:
        (await auth.actor(request.scope)).require_read_all()
        stats = await store.stats()
        return JSONResponse({"object": "cache", "enabled": gw.cache is not None, "ttl": c.ttl, **stats})

    async def invalidate(request: Request) -> Response:
        actor = await auth.actor(request.scope)
        actor.require_admin()
        raw = await read_body(request.scope, request.receive, MAX_BODY)
        body = parse_json(raw) if raw.strip() else {}
        if not isinstance(body, dict) or body.keys() - {"model"}:
            raise invalid('Send {"model": NAME} to invalidate one model, or {} for all.', param="model")
        model = body.get("model")
        if model is not None:
            if not isinstance(model, str) or not model:
                raise invalid("'model' must be a model name.", param="model")
            if not gw.router.knows(model):
                raise model_not_found(model)
        # through the process's cache when it has one: its own copies go at once
        generation = await (gw.cache.invalidate(model) if gw.cache is not None else store.invalidate(model))
        if gw.audit is not None:
            await gw.audit.record(actor, "cache.invalidate", model or "*", after={"generation": generation})
        return JSONResponse({"object": "cache.invalidation", "model": model, "generation": generation})

    return [Route("/admin/cache", show, methods=["GET"]), Route("/admin/cache", invalidate, methods=["POST"])]

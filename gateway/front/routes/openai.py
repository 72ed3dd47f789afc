"""The public OpenAI API: parse -> exchange -> relay. Thin on purpose: the request's life is the
exchange's (gateway/proxy/exchange.py), parsing is gateway/core/request.py's."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from gateway.access.base import Principal
from gateway.core.errors import model_not_allowed, model_not_found
from gateway.core.request import (
    CHAT,
    COMPLETIONS,
    EMBEDDINGS,
    ApiRequest,
    Endpoint,
    parse_request,
    read_body,
    too_large,
)
from gateway.observe.observer import current
from gateway.proxy.context import Gateway
from gateway.proxy.exchange import Exchange


def check_model(gw: Gateway, principal: Principal, request: ApiRequest) -> None:
    """What every inference route checks before admission: the model exists, the prompt fits its
    bound, and the key may use it."""
    if not gw.router.knows(request.model):
        raise model_not_found(request.model)
    limit = gw.prompt_limits.get(request.model)
    if limit is not None and request.size > limit:
        raise too_large(limit)
    if not principal.may_use(request.model):
        raise model_not_allowed(request.model)


class OpenAIEndpoint:
    """An ASGI app for one POST endpoint: no Request object, no response class, no send wrapper
    of its own on the hot path."""

    def __init__(self, gw: Gateway, endpoint: Endpoint) -> None:
        self.gw = gw
        self.endpoint = endpoint

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gw = self.gw
        principal = await gw.access.authenticate(scope)
        obs = current() if gw.observe is not None else None  # the access log names the caller of a refusal too
        if obs is not None:
            obs.note_caller(principal.key_id, principal.key, principal.priority)
        request = parse_request(await read_body(scope, receive, gw.settings.server.max_body_bytes), self.endpoint)
        if obs is not None:
            obs.model = request.model
        check_model(gw, principal, request)
        cache = gw.cache.consult(scope, request, principal) if gw.cache is not None else None
        async with Exchange(gw, principal, request, scope["request_id"], receive) as exchange:
            await exchange.admit()
            if cache is not None and await exchange.from_cache(cache, send):
                return
            response = await exchange.call_engine()
            await exchange.relay(response, send)


def openai_routes(gw: Gateway) -> list[Route]:
    async def models(request: Request) -> Response:
        principal = await gw.access.authenticate(request.scope)
        created = int(gw.started)
        adapters = gw.router.adapters
        data: list[dict[str, object]] = [
            {"id": name, "object": "model", "created": created, "owned_by": "llm-gateway"}
            for name in gw.router.routes
            if principal.may_use(name)
        ]
        for entry in data:
            if entry["id"] in adapters:  # a LoRA adapter: its base model, as vLLM lists it
                entry["parent"] = adapters[str(entry["id"])]
        return JSONResponse({"object": "list", "data": data})

    return [
        *(Route(e.path, OpenAIEndpoint(gw, e), methods=["POST"]) for e in (CHAT, COMPLETIONS, EMBEDDINGS)),
        Route("/v1/models", models, methods=["GET"]),
    ]

"""build_app(settings): routes, middleware and lifespan; no logic of its own, no work at import."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from engines.http import ClientDisconnected
from gateway.access import Access, OpenAccess
from gateway.context import Gateway
from gateway.errors import GatewayError
from gateway.middleware import CatchAllMiddleware, RequestIdMiddleware
from gateway.routes.console import console_routes
from gateway.routes.openai import CHAT, COMPLETIONS, EMBEDDINGS, OpenAIRoutes
from gateway.settings import Settings, multiprocess_dir, settings_from_env

log = logging.getLogger(__name__)


async def _gateway_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, GatewayError)
    return exc.response()


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    messages = {404: f"No route for {request.url.path}.", 405: f"Method {request.method} not allowed here."}
    message = messages.get(exc.status_code, str(exc.detail))
    return GatewayError(exc.status_code, message, type="invalid_request_error").response()


async def _disconnected(request: Request, exc: Exception) -> Response:
    return Response(status_code=499)  # nobody is listening; nginx's code for it


@dataclass
class _RedisParts:
    access: Access
    admin_routes: list[Route]
    store: Any  # RouteStore
    client: Any  # redis.asyncio.Redis
    fast: Any  # RespClient | None


def _redis_parts(settings: Settings, gateway: Gateway) -> _RedisParts:
    """Keys, quotas, the route store and the admin API: everything that needs Redis."""
    import redis.asyncio as aioredis

    from gateway.auth import KeyedAccess
    from gateway.keys import KeyStore
    from gateway.quota import Quota
    from gateway.route_store import RouteStore
    from gateway.routes.admin import AdminRoutes
    from gateway.tokens import PromptCounter

    r = settings.redis
    assert r.url is not None
    client = aioredis.Redis.from_url(r.url, socket_timeout=r.timeout, socket_connect_timeout=r.timeout)
    keys = KeyStore(client, r.prefix, timeout=2 * r.timeout)
    from gateway.resp import RespClient

    fast = RespClient(r.url, r.timeout) if r.url.startswith("redis://") else None
    quota = Quota(
        client,
        r.prefix,
        lease_ttl=settings.auth.lease_ttl,
        failure_mode=r.failure_mode,
        redis_timeout=r.timeout,
        fast=fast,
    )
    store = RouteStore(client, r.prefix, gateway.router, {e.name: e for e in settings.engines})
    counter = PromptCounter({m.name: m.tokenizer for m in settings.models})
    access: Access = OpenAccess()
    if settings.auth.enabled:
        access = KeyedAccess(keys, quota, counter, settings.auth, gateway.metrics)
    engines = {e.name: e for e in settings.engines}
    admin = AdminRoutes(settings.auth.admin_key, keys, quota, gateway.router, store, engines)
    return _RedisParts(access, admin.routes(), store, client, fast)


def build_app(settings: Settings, *, multiprocess: str | None = None) -> FastPath:
    gateway = Gateway.build(settings, multiprocess)
    parts = _redis_parts(settings, gateway) if settings.redis.url else None
    access: Access = parts.access if parts else OpenAccess()
    api = OpenAIRoutes(gateway, access)

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def ready(request: Request) -> Response:
        engines = {e.name: e.healthy for e in gateway.pool.engines.values()}
        ok = any(engines.values())
        return JSONResponse({"ready": ok, "engines": engines}, status_code=200 if ok else 503)

    async def metrics(request: Request) -> Response:
        return Response(gateway.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncGenerator[None, None]:
        await gateway.upstream.start()
        gateway.pool.start()
        await access.start()
        if parts:
            parts.store.start()  # follows route changes made on any replica
        try:
            yield
        finally:
            if parts:
                await parts.store.stop()
                await parts.client.aclose()
                if parts.fast is not None:
                    await parts.fast.close()
            await access.stop()
            await gateway.pool.stop()
            await gateway.upstream.close()

    routes = [
        Route("/v1/chat/completions", api.chat_completions, methods=["POST"]),
        Route("/v1/completions", api.completions, methods=["POST"]),
        Route("/v1/embeddings", api.embeddings, methods=["POST"]),
        Route("/v1/models", api.models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/ready", ready, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        *(parts.admin_routes if parts else []),
        *console_routes(),
    ]
    handlers = {
        GatewayError: _gateway_error,
        HTTPException: _http_error,
        ClientDisconnected: _disconnected,
    }
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers=handlers)
    app.add_middleware(CatchAllMiddleware)
    app.add_middleware(RequestIdMiddleware)  # added last: outermost
    app.state.gateway = gateway
    return FastPath(app, api)


class FastPath:
    """POSTs to the OpenAI endpoints go straight to their handler; everything else (admin,
    metrics, health, lifespan, wrong methods) to the Starlette app. On a relayed stream this saves
    four send wrappers per chunk."""

    def __init__(self, app: Starlette, api: OpenAIRoutes) -> None:
        self.app = app
        self.state = app.state
        self._api = api
        self._hot = {e.path: e for e in (CHAT, COMPLETIONS, EMBEDDINGS)}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = self._hot.get(scope.get("path", "")) if scope["type"] == "http" else None
        if endpoint is not None and scope["method"] == "POST":
            await self._api.asgi(scope, receive, send, endpoint)
        else:
            await self.app(scope, receive, send)


def app_from_env() -> FastPath:
    """The factory uvicorn's worker processes call (`gateway.app:app_from_env`)."""
    return build_app(settings_from_env(), multiprocess=multiprocess_dir())

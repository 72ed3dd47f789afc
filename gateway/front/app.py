"""build_app(settings): the routes, the front middleware and the lifespan; no logic, no work at import."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from gateway.batch.runner import BatchRunner
from gateway.front.listeners import listener_app
from gateway.front.middleware import Front
from gateway.front.readiness import readiness
from gateway.front.response_retention import ResponseRetention
from gateway.front.routes.audio import audio_routes
from gateway.front.routes.batches import BatchRoutes
from gateway.front.routes.console import console_routes
from gateway.front.routes.files import FileRoutes
from gateway.front.routes.messages import messages_routes
from gateway.front.routes.monitor import monitor_routes
from gateway.front.routes.openai import openai_routes
from gateway.front.routes.passthrough import passthrough_routes
from gateway.front.routes.responses import StoredResponseRoutes
from gateway.front.store_service import StoreService, StoreUser
from gateway.monitor.writer import InferenceLog
from gateway.proxy.context import Gateway
from gateway.proxy.drain import Drain
from gateway.settings import Settings, multiprocess_dir, settings_from_env


class RedisParts:
    """Keys, quotas, the route store and the admin API: everything that needs Redis."""

    def __init__(self, settings: Settings, gw: Gateway) -> None:
        from gateway.access.auth import KeyedAccess
        from gateway.access.keys import KeyStore
        from gateway.access.quota import Quota
        from gateway.access.tokens import PromptCounter
        from gateway.dispatch.route_store import RouteStore
        from gateway.front.routes.admin import AdminRoutes
        from gateway.resp.connect import build_clients

        r = settings.redis
        assert r.url is not None
        self.clients = build_clients(r.url, cluster=r.cluster, timeout=r.timeout)
        keys = KeyStore(self.clients.admin, r.prefix, timeout=2 * r.timeout)
        quota = Quota(
            self.clients.lean,
            r.prefix,
            lease_ttl=settings.auth.lease_ttl,
            failure_mode=r.failure_mode,
            redis_timeout=r.timeout,
            metrics=gw.metrics,
        )
        engines = {e.name: e for e in settings.engines}
        self.store = RouteStore(self.clients.admin, self.clients.subscriber, r.prefix, gw.router, engines)
        self.counter = PromptCounter({m.name: m.tokenizer for m in settings.models})
        if settings.auth.enabled:
            gw.access = KeyedAccess(keys, quota, self.counter, settings.auth, gw.metrics)
        self.admin_routes = AdminRoutes(
            settings.auth.admin_key, keys, quota, gw.router, self.store, engines, gw.scheduler.view
        ).routes()

    def start(self) -> None:
        self.store.start()  # follows route changes made on any replica

    async def stop(self) -> None:
        await self.store.stop()
        await self.clients.aclose()
        self.counter.close()


def build_app(
    settings: Settings,
    *,
    multiprocess: str | None = None,
    drain: Drain | None = None,
    control_path: str | None = None,
) -> Front:
    """`drain` and `control_path` come from the worker process's server (gateway/process/worker.py)."""
    gw = Gateway.build(settings, multiprocess, drain, control_path)
    parts = RedisParts(settings, gw) if settings.redis.url else None
    runner = BatchRunner(gw)
    users: list[StoreUser] = [runner, ResponseRetention(settings.store)]
    if settings.inference_log.enabled:
        gw.inference_log = InferenceLog(settings.inference_log, settings.models, gw.metrics)
        users.append(gw.inference_log)
    store = StoreService(gw, users)  # files, batches and the inference log

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def ready(request: Request) -> Response:
        status, body = readiness(gw, request.query_params.get("model"))
        return JSONResponse(body, status_code=status)

    async def metrics(request: Request) -> Response:
        return Response(gw.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncGenerator[None, None]:
        await gw.upstream.start()
        gw.pool.start()
        await gw.access.start()
        if parts:
            parts.start()
        await store.start()
        await gw.control.start()
        try:
            yield
        finally:
            await gw.control.stop()
            await store.stop()  # the runner hands back its lines, the log writes its last rows
            if parts:
                await parts.stop()
            await gw.access.stop()
            await gw.pool.stop()
            await gw.upstream.close()

    routes: list[BaseRoute] = [
        *openai_routes(gw),
        *StoredResponseRoutes(gw).routes(),
        *messages_routes(gw),
        *passthrough_routes(gw),
        *audio_routes(gw),
        *FileRoutes(gw).routes(),
        *BatchRoutes(gw, runner).routes(),
        Route("/health", health, methods=["GET"]),
        Route("/ready", ready, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        *(parts.admin_routes if parts else []),
        *monitor_routes(gw),
        *console_routes(),
    ]
    return Front(listener_app(routes, lifespan, settings.server.admin_port))


def app_from_env() -> Front:
    """For serving the app under another ASGI server (`uvicorn --factory gateway.front.app:app_from_env`,
    with LLM_GATEWAY_CONFIG set): no managed engines, no drain of ours. `llm-gateway serve`
    (gateway/process/main.py) is the normal way."""
    return build_app(settings_from_env(), multiprocess=multiprocess_dir())
